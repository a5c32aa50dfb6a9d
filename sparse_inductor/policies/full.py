"""``Full()``: every KV tile (dense attention for this head; Sparse-vDiT's "full" mode)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy, SelectionContext


@dataclass(frozen=True)
class Full(Policy):
    """Every query tile keeps every KV tile. Its rows are *full rows* (DESIGN.md §3.5): the
    kernels walk every block without reading list entries, so a full head costs no list memory.
    A site whose every head is ``Full()`` (without ``query_keep``) runs as plain SDPA."""

    static = True

    def width(self, tile_grid) -> int:
        return 0  # full rows store no entries

    def is_dense(self, num_tiles=None) -> bool:
        return True

    def video_lists(self, ctx: SelectionContext):
        M = ctx.num_tiles
        return (torch.full((1, 1, M), M, dtype=torch.int32, device=ctx.device),
                torch.zeros((1, 1, M, 0), dtype=torch.int32, device=ctx.device))

    def describe(self) -> str:
        return "Full()"
