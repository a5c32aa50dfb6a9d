"""``Skip()``: the head contributes nothing (Sparse-vDiT's head skip, arXiv 2506.03065)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy, SelectionContext


@dataclass(frozen=True)
class Skip(Policy):
    """The head's output is exactly 0, for video and text queries alike, and so are the
    gradients through it: every row keeps no tile, so its programs exit at once."""

    static = True

    def width(self, tile_grid) -> int:
        return 0

    def skip_heads(self, heads: int) -> tuple[bool, ...]:
        return (True,) * heads

    def video_lists(self, ctx: SelectionContext):
        M = ctx.num_tiles
        return (torch.zeros((1, 1, M), dtype=torch.int32, device=ctx.device),
                torch.zeros((1, 1, M, 0), dtype=torch.int32, device=ctx.device))

    def describe(self) -> str:
        return "Skip()"
