"""The eager API: :func:`video_sparse_attention` and :func:`select_blocks`."""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from . import ops  # noqa: F401  (registers the custom ops)
from .attention import sparse_attention
from .causal import check_causal_block_size, effective_block_size, tiles_split_blocks
from .config import check_sparsity
from .layout import check_grid_and_tile, tile_layout
from .policies import Policy, TopK
from .query_keep import check_query_keep, num_kept
from .selection import BlockSelection, select_tiles

#: dtypes the op accepts on every device; float64 too on CPU (:func:`supported_dtypes`), where it
#: is the reference's precision (the Triton kernels and templates do not take it).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def supported_dtypes(device_type: str) -> tuple:
    """The dtypes the op accepts on a device type (``"cpu"`` adds float64)."""
    return SUPPORTED_DTYPES + ((torch.float64,) if device_type == "cpu" else ())


def _check_tensors(names_and_tensors) -> None:
    first_name, first = names_and_tensors[0]
    for name, t in names_and_tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [B, H, N, D], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims [B, H, N, D], got shape {tuple(t.shape)}")
        if t.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {first_name} has {tuple(first.shape)}; "
                "q, k and v must have the same [B, H, N, D] (self-attention over the same tokens)"
            )
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name} is on device {t.device}; accepted devices are 'cpu' and 'cuda'")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; put them on one device")
        allowed = supported_dtypes(t.device.type)
        if t.dtype not in allowed:
            raise TypeError(f"{name} has dtype {t.dtype}; accepted dtypes on {t.device.type} are "
                            + ", ".join(str(d) for d in allowed))
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; use one dtype")
    D = first.shape[-1]
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim (last dim of q) must be in [1, {MAX_HEAD_DIM}], got {D}")


def _prepare(q: Tensor, grid, tile, scale, policy, sparsity, query_keep):
    grid, tile = check_grid_and_tile(grid, tile)
    if policy is None:
        policy = TopK(check_sparsity(sparsity))
    elif not isinstance(policy, Policy):
        raise TypeError("policy must be a selection policy such as sparse_inductor.TopK(0.875), "
                        f"CumulativeMass(0.9), Window(1, 1, 1) or PerHead([...]); got {policy!r}")
    reason = policy.check_heads(q.shape[1])
    if reason:
        raise ValueError(f"policy does not fit q: {reason}")
    query_keep = check_query_keep(query_keep)
    N = q.shape[2]
    if N != math.prod(grid):
        raise ValueError(f"q has N={N} tokens but grid {grid} holds T*H*W={math.prod(grid)}; "
                         "N must equal T*H*W (tokens in raster order)")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number or None (1/sqrt(D)), got {scale!r}")
    return tile_layout(grid, tile, q.device), float(scale), policy, query_keep


def select_blocks(q: Tensor, k: Tensor, grid, *, sparsity: float = 0.875, policy=None, query_keep: float = 1.0,
                  tile=(4, 4, 4), scale: float | None = None, causal_block_size: int | None = None) -> BlockSelection:
    """The tile selection :func:`video_sparse_attention` makes for these ``q`` and ``k``.

    Args:
        q, k: ``[B, H, N, D]`` in raster token order over ``grid``.
        grid: ``(T, H, W)`` with ``T * H * W == N``.
        sparsity: fraction of KV tiles skipped, in ``[0, 1)``, when no ``policy`` is given: each
            query tile keeps ``max(1, ceil((1 - sparsity) * num_tiles))`` tiles (``TopK``).
        policy: a selection policy (:mod:`sparse_inductor.policies`), e.g. ``CumulativeMass(0.9)``.
        query_keep: the share of each tile's query rows computed (BSA), in ``(0, 1]``; recorded
            in ``query_counts``.
        tile: tile shape ``(t, h, w)``; border tiles of a non-dividing grid are partial.
        scale: softmax scale, default ``1 / sqrt(D)``.
        causal_block_size: the selection under a block-causal mask of this many frames per
            causal block (as in :func:`video_sparse_attention`).

    Returns:
        A :class:`BlockSelection` (query-major ``kv_num_blocks`` / ``kv_indices`` over tiles in
        ``(t, h, w)`` order, the per-tile valid counts and, per head, the query rows computed).
    """
    _check_tensors([("q", q), ("k", k)])
    layout, scale, policy, query_keep = _prepare(q, grid, tile, scale, policy, sparsity, query_keep)
    causal_block_size = _check_causal(layout, causal_block_size, query_keep)
    with torch.no_grad():
        kv_num_blocks, kv_indices = select_tiles(q, k, layout, policy, scale, causal_block_size=causal_block_size)
        query_counts = None
        if query_keep < 1.0:
            query_counts = num_kept(query_keep, layout.counts.long()).to(torch.int32).expand(*q.shape[:2], -1)
    return BlockSelection(kv_num_blocks, kv_indices, layout.counts, layout.block_size, layout.grid, layout.tile,
                          query_counts)


def video_sparse_attention(q: Tensor, k: Tensor, v: Tensor, grid, *, sparsity: float = 0.875, policy=None,
                           query_keep: float = 1.0, tile=(4, 4, 4), scale: float | None = None,
                           causal_block_size: int | None = None) -> Tensor:
    """Block-sparse self-attention over 3D video tokens.

    Each query tile attends exactly (softmax over the kept tokens only) to the KV tiles a
    selection policy keeps: by default VSA's ``TopK(sparsity)``, the tiles with the highest
    mean-pooled scores ``mean(q) · mean(k) * scale``. At ``sparsity=0`` (and ``query_keep=1``)
    this is ``F.scaled_dot_product_attention(q, k, v, scale=scale)``.

    Args:
        q, k, v: ``[B, H, N, D]`` tensors in raster token order over ``grid`` (w fastest);
            float16, bfloat16 or float32 (float64 too on CPU); CPU or CUDA.
        grid: ``(T, H, W)`` of the video tokens, ``T * H * W == N``.
        sparsity: fraction of KV tiles skipped, in ``[0, 1)`` (``TopK``), when no ``policy``.
        policy: a selection policy from :mod:`sparse_inductor.policies` (``TopK``,
            ``CumulativeMass``, ``Window``, ``Temporal``, ``Stripe``, ``Full``, ``Skip``, unions
            with ``|``, ``PerHead``).
        query_keep: BSA's query sparsity, in ``(0, 1]``: per tile only the centre token and the
            ``ceil(r·n) − 1`` tokens least similar to it are computed; the others receive the
            centre's output (:mod:`sparse_inductor.query_keep`).
        tile: tile shape ``(t, h, w)``, default VSA's ``(4, 4, 4)`` (at most 256 tokens).
        scale: softmax scale, default ``1 / sqrt(D)``.
        causal_block_size: a block-causal mask over frames (diffusion forcing, SkyReels-V2's
            ``causal_block_size``): a query of frame ``f`` attends the keys of frames ``f'`` with
            ``f' // c <= f // c``. Every policy then chooses among each query tile's allowed KV
            tiles (TopK keeps ``max(1, ceil((1 - sparsity) · A_i))`` of the ``A_i`` tiles not
            wholly in the future), each query tile also keeps its own tile, and tiles that
            straddle the boundary are masked per token; at ``sparsity=0`` this is SDPA under
            that mask. ``query_keep < 1`` needs tiles that do not cross a causal block boundary.
            ``None`` (default): no mask.

    Returns:
        ``[B, H, N, D]`` in the same token order; differentiable in ``q``, ``k`` and ``v`` (also twice,
        forward-mode and under ``torch.func``).

    NaN and Inf (README, Guarantees): a row is NaN where its query or a kept key / value gives NaN,
    as in attention over the kept tokens; a row that keeps no key is 0. The selection ranks NaN
    coarse scores below every number, ties to the lower index (so a NaN key outside the kept tiles
    does not reach the output).
    """
    _check_tensors([("q", q), ("k", k), ("v", v)])
    layout, scale, policy, query_keep = _prepare(q, grid, tile, scale, policy, sparsity, query_keep)
    causal_block_size = _check_causal(layout, causal_block_size, query_keep)
    return sparse_attention(q, k, v, layout.grid, policy=policy, query_keep=query_keep, tile=layout.tile,
                            scale=scale, layout=layout, causal_block_size=causal_block_size)


def _check_causal(layout, causal_block_size, query_keep) -> int | None:
    """``causal_block_size`` validated against the tile and ``query_keep`` (errors name both)."""
    causal_block_size = check_causal_block_size(causal_block_size)
    c = effective_block_size(layout.grid, causal_block_size)
    if c is not None and query_keep < 1.0 and tiles_split_blocks(layout.grid, layout.tile, c):
        raise ValueError(f"query_keep={query_keep} does not compose with causal_block_size={c} on tile {layout.tile}: "
                         "a tile holds frames of two causal blocks, and its dropped tokens would receive the output "
                         "of a token that sees other keys; use query_keep=1.0, or a causal_block_size that is a "
                         f"multiple of the tile's {layout.tile[0]} frames")
    return causal_block_size
