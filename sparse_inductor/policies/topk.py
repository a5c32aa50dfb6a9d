"""``TopK(sparsity)``: VSA's fixed budget (DESIGN.md §3.2), the default policy.

Every query tile keeps the ``k = max(1, ceil((1 - sparsity) * M))`` video KV tiles with the
highest coarse score ``q̄·k̄ · scale`` (ties to the lower index). ``sparsity(0.875)`` means
``TopK(0.875)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy, SelectionContext


@dataclass(frozen=True)
class TopK(Policy):
    """Keep the ``k = max(1, ceil((1 - sparsity) * M))`` best-scoring KV tiles of every query
    tile (the same ``k`` for every tile, head and batch).

    Args:
        sparsity: fraction of the video KV tiles skipped, in ``[0, 1)``; 0 is dense attention.
    """

    sparsity: float = 0.875

    def __post_init__(self):
        from ..config import check_sparsity

        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))

    def keep(self, num_tiles):
        from ..selection import num_selected

        return num_selected(self.sparsity, num_tiles)

    def width(self, tile_grid) -> int:
        nt, nh, nw = tile_grid
        return self.keep(nt * nh * nw)

    def is_dense(self, num_tiles=None) -> bool:
        return self.sparsity == 0.0

    def video_lists(self, ctx: SelectionContext):
        k = self.keep(ctx.num_tiles)
        scores = ctx.scores()
        if ctx.allowed is not None:
            # Block-causal mask: row i keeps k_i = max(1, ceil((1 - sparsity) * A_i)) of its A_i
            # allowed tiles (the width k is that of a row that sees every tile).
            k_rows = self.keep(ctx.num_allowed)
            idx = torch.ops.sparse_inductor.top_k_tiles_allowed(scores, ctx.allowed, k_rows, k)
            return k_rows.expand(idx.shape[:-1]).contiguous(), idx
        if not (isinstance(ctx.scale, (int, float)) and ctx.scale > 0):
            # A positive scale cannot change which tiles are the top k (it can only merge two
            # scores into a tie by rounding), so it is applied only where it could: saving one
            # pass over the [B, H, M, M] scores.
            scores = scores * ctx.scale
        idx = torch.ops.sparse_inductor.top_k_tiles(scores, k)
        num = torch.full(idx.shape[:-1], k, dtype=torch.int32, device=idx.device)
        return num, idx

    def describe(self) -> str:
        return f"TopK({self.sparsity})"
