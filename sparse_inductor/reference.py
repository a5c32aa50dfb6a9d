"""The oracle (DESIGN.md §3): plain, unoptimised PyTorch in float64, written independently of
the layout, selection and kernel code so that tests compare two derivations.

Everything here works in raster token order; tiles are identified per token with integer
division, never through the tile-major permutation.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def tile_ids(grid, tile) -> Tensor:
    """For each raster token, the index of its tile (tiles in (t, h, w) order)."""
    T, H, W = grid
    tt, th, tw = tile
    nh, nw = -(-H // th), -(-W // tw)
    t = torch.arange(T).view(T, 1, 1) // tt
    h = torch.arange(H).view(1, H, 1) // th
    w = torch.arange(W).view(1, 1, W) // tw
    return ((t * nh + h) * nw + w).reshape(-1)


def reference_selection(q: Tensor, k: Tensor, grid, sparsity: float, tile=(4, 4, 4), scale=None) -> Tensor:
    """Bool ``[B, H, M, M]``: query tile i keeps KV tile j.

    Mean-pools q and k per tile over its tokens, scores ``q̄ k̄ᵀ * scale`` and keeps the
    ``max(1, ceil((1 - sparsity) * M))`` best KV tiles per query tile, ties to the lower index.
    """
    ids = tile_ids(grid, tile).to(q.device)
    M = int(ids.max()) + 1
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    onehot = torch.nn.functional.one_hot(ids, M).to(torch.float64)  # [N, M]
    size = onehot.sum(0)

    def pool(x):
        return torch.einsum("bhnd,nm->bhmd", x.to(torch.float64), onehot) / size[:, None]

    scores = pool(q) @ pool(k).transpose(-1, -2) * scale
    keep = max(1, math.ceil(round((1.0 - sparsity) * M, 9)))
    selected = torch.zeros(scores.shape, dtype=torch.bool, device=q.device)
    B, H = scores.shape[:2]
    for b in range(B):
        for h in range(H):
            for i in range(M):
                # Highest score first, lower index first among equals.
                order = sorted(range(M), key=lambda j: (-scores[b, h, i, j].item(), j))
                selected[b, h, i, order[:keep]] = True
    return selected


def token_mask(selected: Tensor, grid, tile) -> Tensor:
    """Expand a tile mask ``[B, H, M, M]`` to a token mask ``[B, H, N, N]`` in raster order."""
    ids = tile_ids(grid, tile).to(selected.device)
    return selected[:, :, ids][:, :, :, ids]


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale=None):
    """Dense softmax attention in float64 under a bool token mask. Returns ``(out, lse)``."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q.to(torch.float64) @ k.to(torch.float64).transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.softmax(s, dim=-1) @ v.to(torch.float64), lse


def reference_video_sparse_attention(q, k, v, grid, sparsity=0.875, tile=(4, 4, 4), scale=None):
    """The full oracle: selection then fine attention, float64, raster order."""
    selected = reference_selection(q, k, grid, sparsity, tile, scale)
    return reference_attention(q, k, v, token_mask(selected, grid, tile), scale)[0]
