"""Block-causal masks over frames (diffusion forcing) and how they meet the tile grid.

Video token ``n`` of frame ``f = n // (H·W)`` belongs to causal block ``f // c`` (``c`` frames
per block: SkyReels-V2's ``num_frame_per_block``, the ``causal_block_size`` of its
diffusion-forcing pipeline); a query attends a key iff the key's block is not later than the
query's. The semantics of the sparse selection under such a mask are written out in
:func:`sparse_inductor.reference.causal_token_mask`: policies choose among the *allowed* KV tiles
of each query tile (those not wholly in its future), every row also keeps its own tile, and the
kernels mask the tiles that straddle the boundary per token.

Everything here takes static ints (the mask is recognised only on static shapes).
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor


def check_causal_block_size(value) -> int | None:
    """``causal_block_size`` validated: ``None`` (no mask) or an int >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"causal_block_size must be None (no mask) or an int >= 1 (frames per causal block), "
                         f"got {value!r}")
    return int(value)


def effective_block_size(grid, causal_block_size: int | None) -> int | None:
    """``None`` where the mask masks nothing (no mask, or one causal block holding every frame)."""
    if causal_block_size is None or causal_block_size >= grid[0]:
        return None
    return causal_block_size


def tokens_per_block(grid, causal_block_size: int | None) -> int:
    """Video tokens per causal block, ``H · W · c`` (0: no mask). The kernels compare
    ``position // this`` of a query and a key (video-only sequences: position = raster index)."""
    if causal_block_size is None:
        return 0
    _, H, W = grid
    return H * W * causal_block_size


def _tile_frames(grid, tile, device):
    """Per video tile (tiles in (t, h, w) order): its first and last frame."""
    T, H, W = grid
    tt, th, tw = tile
    nt, nh, nw = -(-T // tt), -(-H // th), -(-W // tw)
    t = torch.arange(nt * nh * nw, device=device) // (nh * nw)
    first = t * tt
    last = torch.clamp(first + tt, max=T) - 1
    return first, last


def allowed_tiles(grid, tile, causal_block_size: int, device="cpu") -> Tensor:
    """Bool ``[M, M]``: KV tile j is allowed for query tile i, i.e. not wholly in its future:
    the causal block of j's first frame is not later than that of i's last frame."""
    first, last = _tile_frames(grid, tile, device)
    c = causal_block_size
    return (first // c).view(1, -1) <= (last // c).view(-1, 1)


def tiles_split_blocks(grid, tile, causal_block_size: int) -> bool:
    """Whether some tile holds frames of two causal blocks (then ``query_keep`` does not compose:
    a dropped token would receive its tile centre's output, computed over other keys)."""
    T, tt, c = grid[0], tile[0], causal_block_size
    return any(t0 // c != (min(t0 + tt, T) - 1) // c for t0 in range(0, T, tt))
