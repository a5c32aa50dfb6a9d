"""Modules for model authors who build sparse attention into the model itself.

:class:`VideoSparseAttention` is a self-attention layer over video tokens with VSA's two
branches (arXiv 2505.13389): a *fine* branch, block-sparse attention over the top-k KV tiles of
each query tile (:func:`sparse_inductor.video_sparse_attention`), and a *coarse* branch, dense
attention between the tiles' mean-pooled Q, K, V (:func:`coarse_attention`), combined as
``fine + gate(x) * coarse`` with ``gate`` a zero-initialised linear layer. At initialisation the
gate is 0, so the layer is exactly fine-only attention (DESIGN.md §3.4); a model trained with
it can learn to use the coarse branch.

The layer trains eagerly and under ``torch.compile`` (``backend="inductor"``, whose lowering
of the sparse op runs the Triton templates on CUDA).
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn as torch_nn
import torch.nn.functional as F
from torch import Tensor

from .api import MAX_HEAD_DIM, video_sparse_attention
from .config import check_sparsity
from .layout import check_grid_and_tile, tile_layout, to_tiles
from .selection import pool_tiles

__all__ = ["VideoSparseAttention", "coarse_attention"]


def coarse_attention(q: Tensor, k: Tensor, v: Tensor, grid, *, tile=(4, 4, 4), scale: float | None = None) -> Tensor:
    """VSA's coarse branch: dense softmax attention between tiles, broadcast back to tokens.

    Q, K and V are mean-pooled per tile over the tile's valid tokens (a border tile of a grid
    that does not divide by the tile averages only the tokens it has), the ``M x M`` tile
    scores ``q̄ k̄ᵀ · scale`` go through a softmax, and every token receives the coarse output
    of its own tile.

    Args:
        q, k, v: ``[B, H, N, D]`` in raster token order over ``grid`` (w fastest).
        grid: ``(T, H, W)`` with ``T * H * W == N``.
        tile: tile shape ``(t, h, w)``.
        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        ``[B, H, N, D]`` in ``q``'s dtype; differentiable in ``q``, ``k`` and ``v``. Computed in
        float32 (float64 for float64 input): there are only ``M = N / 64`` tiles, so the cost is
        the pooling, not the attention.
    """
    grid, tile = check_grid_and_tile(grid, tile)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4 or t.shape != q.shape:
            raise ValueError(f"{name} must be a [B, H, N, D] tensor shaped like q; got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if q.shape[2] != math.prod(grid):
        raise ValueError(f"q has N={q.shape[2]} tokens but grid {grid} holds T*H*W={math.prod(grid)}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    layout = tile_layout(grid, tile, q.device)
    S = layout.block_size

    def pool(x):  # [B, H, N, D] -> [B, H, M, D], mean over each tile's valid tokens
        return pool_tiles(to_tiles(x, layout), layout.counts, S)

    q_mean, k_mean, v_mean = pool(q), pool(k), pool(v)
    weights = torch.softmax((q_mean @ k_mean.transpose(-1, -2)) * scale, dim=-1)
    per_tile = weights @ v_mean  # [B, H, M, D]
    token_tile = layout.scatter_index // S  # the tile of each raster token
    return per_tile.index_select(2, token_tile).to(q.dtype)


class VideoSparseAttention(torch_nn.Module):
    """Self-attention over video tokens with VSA's fine (block-sparse) and gated coarse branches.

    ``forward(x, grid)`` computes, per head, ``fine + gate(x) * coarse`` and projects it out:

    - ``fine``: :func:`sparse_inductor.video_sparse_attention` at ``sparsity`` and ``tile``; at
      ``sparsity=0`` plain ``F.scaled_dot_product_attention`` (so a model built with
      ``sparsity=0`` can still be made sparse by ``torch.compile(backend="sparse_inductor")``).
    - ``coarse``: :func:`coarse_attention` (only when ``gated=True``).
    - ``gate``: ``nn.Linear(dim, dim)`` on the layer's input, weight and bias zero-initialised,
      no sigmoid (as in VSA), so a new or retrofitted layer starts as fine-only attention.

    Args:
        dim: model width (input and output features).
        num_heads: attention heads; ``dim`` must divide by it, head dim at most 256.
        sparsity: fraction of KV tiles each query tile skips, in ``[0, 1)``. May be changed
            later through the ``sparsity`` attribute (e.g. a schedule that ramps it up).
        tile: tile shape ``(t, h, w)`` in tokens, default VSA's ``(4, 4, 4)``.
        gated: add the gated coarse branch (``False``: fine branch only, no gate parameters).
        qk_norm: RMS-normalise q and k per head before the rotary embedding (as Wan does).
        bias: bias in the q/k/v/out projections.

    Parameters are named ``to_q``, ``to_k``, ``to_v``, ``to_out``, ``to_gate`` (and ``norm_q``,
    ``norm_k`` with ``qk_norm``), so a dense checkpoint with the same projections loads with
    ``strict=False`` and the gate stays 0.
    """

    def __init__(self, dim: int, num_heads: int, *, sparsity: float = 0.875, tile=(4, 4, 4), gated: bool = True,
                 qk_norm: bool = False, bias: bool = True):
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if dim // num_heads > MAX_HEAD_DIM:
            raise ValueError(f"head dim dim // num_heads = {dim // num_heads} must be at most {MAX_HEAD_DIM}")
        self.dim, self.num_heads, self.head_dim = int(dim), int(num_heads), int(dim) // int(num_heads)
        self.sparsity = check_sparsity(sparsity)
        self.tile = check_grid_and_tile((1, 1, 1), tile)[1]
        self.to_q = torch_nn.Linear(dim, dim, bias=bias)
        self.to_k = torch_nn.Linear(dim, dim, bias=bias)
        self.to_v = torch_nn.Linear(dim, dim, bias=bias)
        self.to_out = torch_nn.Linear(dim, dim, bias=bias)
        if qk_norm:
            self.norm_q = torch_nn.RMSNorm(self.head_dim, eps=1e-6)
            self.norm_k = torch_nn.RMSNorm(self.head_dim, eps=1e-6)
        else:
            self.norm_q = self.norm_k = None
        if gated:
            self.to_gate = torch_nn.Linear(dim, dim)
            torch_nn.init.zeros_(self.to_gate.weight)
            torch_nn.init.zeros_(self.to_gate.bias)
        else:
            self.to_gate = None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, sparsity={self.sparsity}, tile={self.tile}, "
                f"gated={self.to_gate is not None}")

    def forward(self, x: Tensor, grid, rotary=None) -> Tensor:
        """Attend over the video tokens ``x``.

        Args:
            x: ``[B, N, dim]``, tokens in raster order over ``grid`` (w fastest).
            grid: ``(T, H, W)`` with ``T * H * W == N``.
            rotary: optional callable applied to q and to k, each ``[B, N, num_heads,
                head_dim]`` (after ``qk_norm``), returning the same shape: the place for a
                3D RoPE.

        Returns:
            ``[B, N, dim]``.
        """
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a [B, N, dim={self.dim}] tensor, got {got}")
        grid = check_grid_and_tile(grid, (1, 1, 1))[0]
        B, N, _ = x.shape
        if N != math.prod(grid):
            raise ValueError(f"x has N={N} tokens but grid {grid} holds T*H*W={math.prod(grid)}")
        q = self.to_q(x).view(B, N, self.num_heads, self.head_dim)
        k = self.to_k(x).view(B, N, self.num_heads, self.head_dim)
        v = self.to_v(x).view(B, N, self.num_heads, self.head_dim)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        if rotary is not None:
            q, k = rotary(q), rotary(k)
        # One dtype for the attention: under autocast the norms and RoPE may leave q, k in
        # float32 while v is bfloat16, and the sparse op takes a single dtype.
        q, k, v = (t.to(v.dtype).transpose(1, 2) for t in (q, k, v))  # [B, heads, N, head_dim]
        if self.sparsity == 0.0:
            fine = F.scaled_dot_product_attention(q, k, v)
        else:
            fine = video_sparse_attention(q, k, v, grid, sparsity=self.sparsity, tile=self.tile)
        out = fine.transpose(1, 2).reshape(B, N, self.dim)
        if self.to_gate is not None:
            coarse = coarse_attention(q, k, v, grid, tile=self.tile).transpose(1, 2).reshape(B, N, self.dim)
            out = out + self.to_gate(x).to(out.dtype) * coarse
        return self.to_out(out)
