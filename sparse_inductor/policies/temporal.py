"""``Temporal(rh, rw)``: the same spatial place in every frame (Sparse-vDiT's "multi-diagonal"
pattern, arXiv 2506.03065)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Policy, SelectionContext, as_lists, check_count
from .window import _span


@dataclass(frozen=True)
class Temporal(Policy):
    """Query tile ``i`` keeps KV tile ``j`` iff ``|h_i − h_j| <= rh`` and ``|w_i − w_j| <= rw``,
    in every frame (any ``t``). Static. Radii are in tiles.

    Args:
        rh, rw: spatial radii in tiles (ints >= 0).
    """

    rh: int = 0
    rw: int = 0

    static = True

    def __post_init__(self):
        for name in ("rh", "rw"):
            object.__setattr__(self, name, check_count(getattr(self, name), f"Temporal {name}"))

    def width(self, tile_grid) -> int:
        nt, nh, nw = tile_grid
        return nt * _span(self.rh, nh) * _span(self.rw, nw)

    def keeps(self, ctx: SelectionContext):
        c = ctx.coords()
        d = (c[:, None, :] - c[None, :, :]).abs()
        return (d[..., 1] <= self.rh) & (d[..., 2] <= self.rw)

    def video_lists(self, ctx: SelectionContext):
        num, idx = as_lists(self.keeps(ctx), self.width(ctx.tile_grid))
        return num[None, None], idx[None, None]

    def describe(self) -> str:
        return f"Temporal({self.rh}, {self.rw})"
