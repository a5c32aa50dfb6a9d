"""``Stripe(...)``: a fixed set of KV tiles that every query tile keeps (Sparse-vDiT's
"vertical stripe": a few global tokens everyone attends to, arXiv 2506.03065)."""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from .base import Policy, SelectionContext, check_count


def _check_positions(positions) -> tuple:
    out = []
    for p in positions:
        ok = isinstance(p, (tuple, list)) and len(p) == 3 and all(
            isinstance(x, numbers.Real) and not isinstance(x, bool) and 0.0 <= float(x) < 1.0 for x in p)
        if not ok:
            raise ValueError("Stripe tiles must be (t, h, w) positions as fractions of the tile grid in [0, 1), "
                             f"e.g. (0.0, 0.5, 0.5) for the first frame's centre tile; got {p!r}")
        out.append(tuple(float(x) for x in p))
    return tuple(sorted(set(out)))


@dataclass(frozen=True)
class Stripe(Policy):
    """Every query tile keeps the same KV tiles: those of the first ``first_frames`` tile
    frames, and the tiles at ``tiles``.

    Positions are stored relative to the tile grid so that a plan calibrated at one resolution
    applies at another: a position ``(ft, fh, fw)`` (fractions in ``[0, 1)``) names the tile
    ``(floor(ft·nt), floor(fh·nh), floor(fw·nw))`` (a position on a tile boundary names the upper
    tile). :func:`Stripe.at` makes them from tile
    coordinates of a given grid (the tile's centre as the fraction, so the same grid maps back
    to the same tiles). What carries over to another resolution: "the first f frames" and
    "the tile around this relative place". What does not: a stripe that was one tile wide
    stays one tile wide, so at a higher resolution it covers a smaller part of the video, and
    two positions may land on one tile at a lower resolution (the set shrinks).

    Args:
        tiles: ``((ft, fh, fw), ...)`` relative positions.
        first_frames: keep every tile of the first this many tile frames (int >= 0).
    """

    tiles: tuple = ()
    first_frames: int = 0

    static = True

    def __post_init__(self):
        if not isinstance(self.tiles, (tuple, list)):
            raise ValueError(f"Stripe tiles must be a tuple of (t, h, w) fractions, got {self.tiles!r}")
        object.__setattr__(self, "tiles", _check_positions(self.tiles))
        object.__setattr__(self, "first_frames", check_count(self.first_frames, "Stripe first_frames"))
        if not self.tiles and not self.first_frames:
            raise ValueError("Stripe needs tiles=... or first_frames=... (an empty stripe keeps nothing: use Skip())")

    @classmethod
    def at(cls, coords, tile_grid, first_frames: int = 0) -> "Stripe":
        """A stripe of the tiles at tile coordinates ``coords`` (``[(t, h, w), ...]``) of a grid
        of ``tile_grid = (nt, nh, nw)`` tiles."""
        positions = [tuple(round((c + 0.5) / n, 9) for c, n in zip(coord, tile_grid)) for coord in coords]
        return cls(tiles=tuple(positions), first_frames=first_frames)

    def tile_indices(self, tile_grid) -> list[int]:
        """The kept KV tiles (indices in (t, h, w) order) on a grid of ``tile_grid`` tiles."""
        nt, nh, nw = tile_grid

        def at(f, n):
            # A tile centre of the calibration grid may land on a boundary of this grid: take the
            # upper tile (the 1e-4 absorbs the 9-decimal rounding; real offsets are >= 1/(2n)).
            return min(int(f * n + 1e-4), n - 1)

        kept = {(at(ft, nt) * nh + at(fh, nh)) * nw + at(fw, nw) for ft, fh, fw in self.tiles}
        kept |= set(range(min(self.first_frames, nt) * nh * nw))
        return sorted(kept)

    def width(self, tile_grid) -> int:
        if not all(isinstance(n, int) for n in tile_grid):
            nt, nh, nw = tile_grid
            return len(self.tiles) + torch.sym_min(self.first_frames, nt) * nh * nw
        return len(self.tile_indices(tile_grid))

    def kept_tiles(self, ctx: SelectionContext):
        """Bool ``[M]``: the kept KV tiles, built by fills (no host-to-device copy)."""
        nt, nh, nw = ctx.tile_grid
        kept = torch.zeros(ctx.num_tiles, dtype=torch.bool, device=ctx.device)
        kept[: min(self.first_frames, nt) * nh * nw].fill_(True)
        for j in self.tile_indices(ctx.tile_grid):
            kept[j:j + 1].fill_(True)  # fills, not host scalars: capturable in a CUDA graph
        return kept

    def keeps(self, ctx: SelectionContext):
        M = ctx.num_tiles
        return self.kept_tiles(ctx).expand(M, M)

    def video_lists(self, ctx: SelectionContext):
        M = ctx.num_tiles
        width = self.width(ctx.tile_grid)
        cols = torch.sort((~self.kept_tiles(ctx)).to(torch.int8), stable=True).indices[:width].to(torch.int32)
        return (torch.full((1, 1, M), width, dtype=torch.int32, device=ctx.device),
                cols.expand(1, 1, M, width).contiguous())

    def describe(self) -> str:
        parts = [f"first_frames={self.first_frames}"] if self.first_frames else []
        if self.tiles:
            parts.append(f"{len(self.tiles)} tile(s)")
        return f"Stripe({', '.join(parts)})"
