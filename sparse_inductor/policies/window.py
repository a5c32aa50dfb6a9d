"""``Window(rt, rh, rw)``: a local 3D window of tiles (Sparse-vDiT's "diagonal" pattern; the
tile-level form of Sliding Tile Attention's windows, arXiv 2502.04507)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy, SelectionContext, as_lists, check_count


def _span(radius: int, n):
    """Tiles a window of ``radius`` covers along an axis of ``n`` tiles, at most."""
    return min(2 * radius + 1, n) if isinstance(n, int) else torch.sym_min(2 * radius + 1, n)


@dataclass(frozen=True)
class Window(Policy):
    """Query tile ``i`` keeps KV tile ``j`` iff ``|t_i − t_j| <= rt``, ``|h_i − h_j| <= rh`` and
    ``|w_i − w_j| <= rw`` in tile coordinates. Static: no coarse stage runs. Radii are in tiles,
    so a plan made at one resolution keeps the same neighbourhood (in tiles) at another.

    Args:
        rt, rh, rw: window radii in tiles along t, h, w (ints >= 0).
    """

    rt: int = 1
    rh: int = 1
    rw: int = 1

    static = True

    def __post_init__(self):
        for name in ("rt", "rh", "rw"):
            object.__setattr__(self, name, check_count(getattr(self, name), f"Window {name}"))

    def width(self, tile_grid) -> int:
        nt, nh, nw = tile_grid
        return _span(self.rt, nt) * _span(self.rh, nh) * _span(self.rw, nw)

    def keeps(self, ctx: SelectionContext):
        """Bool ``[M, M]``: query tile i keeps KV tile j."""
        c = ctx.coords()
        d = (c[:, None, :] - c[None, :, :]).abs()
        return (d[..., 0] <= self.rt) & (d[..., 1] <= self.rh) & (d[..., 2] <= self.rw)

    def video_lists(self, ctx: SelectionContext):
        num, idx = as_lists(self.keeps(ctx), self.width(ctx.tile_grid))
        return num[None, None], idx[None, None]

    def describe(self) -> str:
        return f"Window({self.rt}, {self.rh}, {self.rw})"
