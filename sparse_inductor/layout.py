"""Tile-major token layout for a 3D video grid (DESIGN.md §3.1).

Tokens arrive in raster order over a grid ``(T, H, W)`` (w fastest). The kernels want them
grouped by tile: tiles in ``(t, h, w)`` order, the tokens of one tile in raster order inside
it. Every tile gets the same number of slots (``block_size``, a power of two of at least 16
so that ``tl.dot`` can take it); a border tile of a grid that does not divide by the tile
has fewer valid tokens, stored first, and the remaining slots are padding that no kernel
reads.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

Grid = tuple[int, int, int]

#: The largest number of slots one tile may have (one kernel block).
MAX_BLOCK_SIZE = 256


def block_size_for(tile: Grid) -> int:
    """Slots per tile: the tile's token count rounded up to a power of two, at least 16."""
    return max(16, 1 << (math.prod(tile) - 1).bit_length())


def check_grid_and_tile(grid, tile) -> tuple[Grid, Grid]:
    """Validate ``grid`` and ``tile`` and return them as tuples of ints."""
    for name, value in (("grid", grid), ("tile", tile)):
        if (
            not isinstance(value, (tuple, list))
            or len(value) != 3
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in value)
        ):
            raise ValueError(f"{name} must be a tuple of three positive ints (T, H, W), got {value!r}")
    tile = tuple(tile)
    if math.prod(tile) > MAX_BLOCK_SIZE:
        raise ValueError(
            f"tile {tile} holds {math.prod(tile)} tokens; at most {MAX_BLOCK_SIZE} tokens per tile are supported"
        )
    return tuple(grid), tile


@dataclass(frozen=True)
class TileLayout:
    """The tile-major layout of one grid under one tile shape.

    Attributes:
        grid: ``(T, H, W)`` of the video tokens.
        tile: ``(t, h, w)`` tile shape.
        tiles_per_dim: number of tiles along each axis (ceil division).
        block_size: slots per tile in the tile-major tensor.
        num_tiles: total number of tiles.
        counts: int32 ``[num_tiles]``, valid tokens per tile.
        gather_index: int64 ``[num_tiles * block_size]``; the raster token each slot holds, or
            ``N`` (one past the last token) for a padding slot.
        scatter_index: int64 ``[N]``; the slot each raster token lands in.
    """

    grid: Grid
    tile: Grid
    tiles_per_dim: Grid
    block_size: int
    num_tiles: int
    counts: torch.Tensor
    gather_index: torch.Tensor
    scatter_index: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def num_slots(self) -> int:
        return self.num_tiles * self.block_size

    def to(self, device: torch.device) -> "TileLayout":
        return _layout_on_device(self.grid, self.tile, torch.device(device))


def _build_layout(grid: Grid, tile: Grid) -> TileLayout:
    T, H, W = grid
    tt, th, tw = tile
    nt, nh, nw = (-(-g // t) for g, t in zip(grid, tile))
    S = block_size_for(tile)
    # Raster index of every token, viewed per (tile, offset-in-tile) over a padded grid.
    t = torch.arange(nt * tt).view(nt, tt, 1, 1, 1, 1)
    h = torch.arange(nh * th).view(1, 1, nh, th, 1, 1)
    w = torch.arange(nw * tw).view(1, 1, 1, 1, nw, tw)
    valid = (t < T) & (h < H) & (w < W)  # [nt, tt, nh, th, nw, tw]
    raster = t * (H * W) + h * W + w
    # -> [tiles (t, h, w order), tokens inside the tile (raster order)]
    valid = valid.permute(0, 2, 4, 1, 3, 5).reshape(nt * nh * nw, tt * th * tw)
    raster = raster.expand(nt, tt, nh, th, nw, tw).permute(0, 2, 4, 1, 3, 5).reshape(nt * nh * nw, tt * th * tw)
    # Valid tokens first inside each tile, keeping raster order (stable sort on ~valid).
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    valid = torch.gather(valid, 1, order)
    raster = torch.gather(raster, 1, order)
    N = T * H * W
    gather_index = torch.full((nt * nh * nw, S), N, dtype=torch.int64)
    gather_index[:, : tt * th * tw] = torch.where(valid, raster, N)
    gather_index = gather_index.reshape(-1)
    is_token = gather_index < N
    scatter_index = torch.empty(N, dtype=torch.int64)
    scatter_index[gather_index[is_token]] = torch.nonzero(is_token).squeeze(1)
    counts = valid.sum(1).to(torch.int32)
    return TileLayout(grid, tile, (nt, nh, nw), S, nt * nh * nw, counts, gather_index, scatter_index)


@functools.lru_cache(maxsize=64)
def _layout_on_device(grid: Grid, tile: Grid, device: torch.device) -> TileLayout:
    base = _build_layout(grid, tile)
    if device.type == "cpu":
        return base
    return TileLayout(
        base.grid,
        base.tile,
        base.tiles_per_dim,
        base.block_size,
        base.num_tiles,
        base.counts.to(device),
        base.gather_index.to(device),
        base.scatter_index.to(device),
    )


def tile_layout(grid, tile=(4, 4, 4), device="cpu") -> TileLayout:
    """The (cached) :class:`TileLayout` of ``grid`` under ``tile`` with index tensors on ``device``."""
    grid, tile = check_grid_and_tile(grid, tile)
    return _layout_on_device(grid, tile, torch.device(device))


def to_tiles(x: torch.Tensor, layout: TileLayout, dim: int = -2) -> torch.Tensor:
    """Raster order -> tile-major order along ``dim`` (padding slots are zero).

    ``x.shape[dim]`` must be the layout's token count. The result has ``num_slots`` entries
    along ``dim``.
    """
    dim = dim % x.dim()
    pad_shape = list(x.shape)
    pad_shape[dim] = 1
    padded = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    return padded.index_select(dim, layout.gather_index)


def from_tiles(x: torch.Tensor, layout: TileLayout, dim: int = -2) -> torch.Tensor:
    """Tile-major order -> raster order along ``dim`` (padding slots are dropped)."""
    return x.index_select(dim % x.dim(), layout.scatter_index)
