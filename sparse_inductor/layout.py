"""Tile-major token layout for a 3D video grid, with optional text spans (DESIGN.md §3.1, §3.5).

Tokens arrive in raster order over a grid ``(T, H, W)`` (w fastest), optionally with text
tokens before and/or after the video span. The kernels want them grouped in blocks: the video
tiles first, in ``(t, h, w)`` order with the tokens of one tile in raster order inside it,
then the text tokens in blocks of their own. Every block has the same number of slots
(``block_size``, a power of two of at least 16 so that ``tl.dot`` can take it); a border tile
of a grid that does not divide by the tile, and the last text block, have fewer valid tokens,
stored first, and the remaining slots are padding that no kernel reads.

The index arithmetic is written with torch ops on sizes only, so it also traces with symbolic
sizes inside a compiled graph (no sorting, no Python branching on sizes).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from . import _compat

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


def _ceil_div(a, b):
    return (a + b - 1) // b


@dataclass(frozen=True)
class TileLayout:
    """The block layout of one sequence: a video grid under a tile shape, plus text spans.

    Attributes:
        grid: ``(T, H, W)`` of the video tokens.
        tile: ``(t, h, w)`` tile shape.
        text_before, text_after: text tokens before / after the video span.
        block_size: slots per block.
        num_video_tiles: number of video tiles (blocks ``0 .. num_video_tiles - 1``).
        num_tiles: total number of blocks (video tiles, then text blocks).
        counts: int32 ``[num_tiles]``, valid tokens per block.
        gather_index: int64 ``[num_tiles * block_size]``; the sequence position each slot holds,
            or ``L`` (one past the last token) for a padding slot.
        scatter_index: int64 ``[L]``; the slot each sequence position lands in.
    """

    grid: Grid
    tile: Grid
    text_before: int
    text_after: int
    block_size: int
    num_video_tiles: int
    num_tiles: int
    counts: torch.Tensor
    gather_index: torch.Tensor
    scatter_index: torch.Tensor

    @property
    def num_video_tokens(self):
        T, H, W = self.grid
        return T * H * W

    @property
    def num_tokens(self):
        return self.text_before + self.num_video_tokens + self.text_after

    @property
    def num_slots(self):
        return self.num_tiles * self.block_size

    @property
    def slots(self) -> torch.Tensor:
        """int32 ``[num_slots]``: the sequence position each slot holds, ``-1`` for padding (the
        slot table of the kernels)."""
        return torch.where(self.gather_index < self.num_tokens, self.gather_index, -1).to(torch.int32)


def build_layout(grid, tile: Grid, text_before=0, text_after=0, device="cpu") -> TileLayout:
    """Build a :class:`TileLayout`; ``grid`` and the text lengths may be SymInts (no caching)."""
    T, H, W = grid
    tt, th, tw = tile
    S = block_size_for(tile)
    nt, nh, nw = _ceil_div(T, tt), _ceil_div(H, th), _ceil_div(W, tw)
    Mv = nt * nh * nw
    N = T * H * W
    L_text = text_before + text_after
    Mt = _ceil_div(L_text, S)
    L = N + L_text
    kw = dict(device=device, dtype=torch.int64)

    # Video slots: slot -> (tile, offset j); the tile's real extent (a_t, a_h, a_w) is smaller
    # at the border; j < a_t*a_h*a_w are its tokens in raster order inside the tile.
    slot = torch.arange(Mv * S, **kw)
    m, j = slot // S, slot % S
    mt, mh, mw = m // (nh * nw), (m // nw) % nh, m % nw
    at = torch.clamp(T - mt * tt, max=tt)
    ah = torch.clamp(H - mh * th, max=th)
    aw = torch.clamp(W - mw * tw, max=tw)
    valid = j < at * ah * aw
    lt, lh, lw = j // (ah * aw), (j // aw) % ah, j % aw
    raster = (mt * tt + lt) * (H * W) + (mh * th + lh) * W + (mw * tw + lw)
    video_gather = torch.where(valid, raster + text_before, L)
    video_counts = (at * ah * aw)[::S]

    # Text slots: the text tokens in sequence order (those before the video, then after).
    tslot = torch.arange(Mt * S, **kw)
    text_pos = torch.where(tslot < text_before, tslot, tslot + N)  # >= 0 by construction
    text_gather = torch.where(tslot < L_text, text_pos, L)
    text_counts = torch.clamp(L_text - torch.arange(Mt, **kw) * S, max=S)

    # Inverse: sequence position -> slot. Coordinates are clamped into range for every position
    # (values of the branch not taken stay valid indices; Inductor's range analysis needs that).
    pos = torch.arange(L, **kw)
    n = torch.clamp(pos - text_before, min=0, max=N - 1)
    t, h, w = n // (H * W), (n // W) % H, n % W
    tile_of = ((t // tt) * nh + h // th) * nw + w // tw
    ah_n = torch.clamp(H - (h // th) * th, max=th)
    aw_n = torch.clamp(W - (w // tw) * tw, max=tw)
    video_slot = tile_of * S + ((t % tt) * ah_n + h % th) * aw_n + w % tw
    text_slot = Mv * S + torch.where(pos < text_before, pos, torch.clamp(pos - N, min=0))
    is_video = (pos >= text_before) & (pos < text_before + N)
    scatter_index = torch.where(is_video, video_slot, text_slot)

    return TileLayout(
        grid=tuple(grid), tile=tuple(tile), text_before=text_before, text_after=text_after,
        block_size=S, num_video_tiles=Mv, num_tiles=Mv + Mt,
        counts=torch.cat([video_counts, text_counts]).to(torch.int32),
        gather_index=torch.cat([video_gather, text_gather]),
        scatter_index=scatter_index,
    )


@functools.lru_cache(maxsize=64)
def _cached_layout(grid: Grid, tile: Grid, text_before: int, text_after: int, device: torch.device) -> TileLayout:
    return build_layout(grid, tile, text_before, text_after, device)


def tile_layout(grid, tile=(4, 4, 4), device="cpu", *, text_before: int = 0, text_after: int = 0) -> TileLayout:
    """The (cached) :class:`TileLayout` of ``grid`` under ``tile`` with index tensors on ``device``."""
    grid, tile = check_grid_and_tile(grid, tile)
    if torch.compiler.is_compiling() or _compat.dispatch_mode_active():
        # Traced (e.g. VideoSparseAttention under torch.compile): the index arithmetic becomes part
        # of the graph and is folded there; Dynamo would only warn about and skip the cache.
        # Under a dispatch mode (FakeTensorMode of a tracing tool, torch.export, meta init...)
        # the tensors built are the mode's: never cached, and a cached real layout is never
        # handed to the mode either.
        return build_layout(grid, tile, int(text_before), int(text_after), torch.device(device))
    return _cached_layout(grid, tile, int(text_before), int(text_after), torch.device(device))


def to_tiles(x: torch.Tensor, layout: TileLayout, dim: int = -2) -> torch.Tensor:
    """Sequence order -> block order along ``dim`` (padding slots are zero)."""
    dim = dim % x.dim()
    pad_shape = list(x.shape)
    pad_shape[dim] = 1
    padded = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    return padded.index_select(dim, layout.gather_index)


def from_tiles(x: torch.Tensor, layout: TileLayout, dim: int = -2) -> torch.Tensor:
    """Block order -> sequence order along ``dim`` (padding slots are dropped)."""
    return x.index_select(dim % x.dim(), layout.scatter_index)
