"""Hopper-style attention forwards through TMA tensor descriptors (issue 22, item 1: the ceiling).

Two kernels that measure what Triton reaches on this GPU when every K/V block is one contiguous
TMA load, the structure the block-sparse kernels are to adopt:

- ``tma_dense_attention``: dense softmax attention over ``[B, H, N, D]`` (128-row blocks).
- ``tma_block_list_attention``: every 64-row query tile of *tile-major* q/k/v walks its own list of
  64-row KV tiles (the selection's ``kv_num_blocks`` / ``kv_indices``); a KV tile's padded rows
  (``kv_counts``) are masked. Query rows are computed for every slot (padded query slots produce
  rows nobody reads). No text blocks, no key padding, no query_keep: a ceiling, not the product.

Forward only. Both take host-side ``triton.tools.tensor_descriptor.TensorDescriptor`` arguments
over 3D views ``[B * H, L, D]`` so that a block past one head's rows reads zeros, never the next
head's.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # fp32 inputs get IEEE products: tl.dot's default on Hopper is TF32 (a 4e-4 relative error).
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _attend_block(q, k, v, acc, m_i, l_i, valid, qk_scale, IEEE: tl.constexpr):
    """One online-softmax step (base 2) of a query block over one K/V block."""
    s = _dot(q, tl.trans(k), None, IEEE) * qk_scale
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
    return acc, m_new, l_i


@triton.jit
def _tma_dense_fwd(q_desc, k_desc, v_desc, o_desc, N, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    q = q_desc.load([bh, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_N)
    for start_n in range(0, N, BLOCK_N):
        k = k_desc.load([bh, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = v_desc.load([bh, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        acc, m_i, l_i = _attend_block(q, k, v, acc, m_i, l_i, (start_n + cols)[None, :] < N, qk_scale, IEEE)
    out = (acc / l_i[:, None]).to(q.dtype)
    o_desc.store([bh, start_m, 0], out.reshape(1, BLOCK_M, HEAD_DIM))


@triton.jit
def _tma_block_list_fwd(q_desc, k_desc, v_desc, o_desc, kv_num_blocks, kv_indices, kv_counts, num_q_tiles,
                        max_list, qk_scale, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    row = bh * num_q_tiles + tile
    q = q_desc.load([bh, tile * BLOCK, 0]).reshape(BLOCK, HEAD_DIM)
    acc = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    cols = tl.arange(0, BLOCK)
    for j in range(tl.load(kv_num_blocks + row)):
        kv_tile = tl.load(kv_indices + row * max_list + j)
        k = k_desc.load([bh, kv_tile * BLOCK, 0]).reshape(BLOCK, HEAD_DIM)
        v = v_desc.load([bh, kv_tile * BLOCK, 0]).reshape(BLOCK, HEAD_DIM)
        count = tl.load(kv_counts + kv_tile)
        acc, m_i, l_i = _attend_block(q, k, v, acc, m_i, l_i, cols[None, :] < count, qk_scale, IEEE)
    out = (acc / tl.maximum(l_i, 1e-30)[:, None]).to(q.dtype)
    o_desc.store([bh, tile * BLOCK, 0], out.reshape(1, BLOCK, HEAD_DIM))


def _descriptors(block_rows: int, *tensors):
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, H, L, D = tensors[0].shape
    return [TensorDescriptor.from_tensor(t.reshape(B * H, L, D), [1, block_rows, D]) for t in tensors]


def _check(q, k, v):
    if not (q.shape == k.shape == v.shape and q.dim() == 4):
        raise ValueError(f"q, k, v must be [B, H, L, D] of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[-1] not in (64, 128):
        raise ValueError(f"head dim must be 64 or 128, got {q.shape[-1]}")


def tma_dense_attention(q, k, v, scale=None, block_m=128, block_n=128, num_warps=8, num_stages=3):
    """Dense attention ``softmax(q kᵀ · scale) v`` over contiguous ``[B, H, N, D]``."""
    _check(q, k, v)
    q, k, v = (x.contiguous() for x in (q, k, v))
    B, H, N, D = q.shape
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    (qd, od), (kd, vd) = _descriptors(block_m, q, out), _descriptors(block_n, k, v)
    _tma_dense_fwd[(triton.cdiv(N, block_m), B * H)](qd, kd, vd, od, N, scale * 1.4426950408889634, HEAD_DIM=D,
                                                      BLOCK_M=block_m, BLOCK_N=block_n, IEEE=q.dtype == torch.float32,
                                                      num_warps=num_warps,
                                                      num_stages=num_stages)
    return out


def tma_block_list_attention(q_tiles, k_tiles, v_tiles, kv_num_blocks, kv_indices, kv_counts, scale=None,
                             block=64, num_warps=4, num_stages=2):
    """Block-sparse attention over tile-major ``[B, H, M * block, D]`` (``sparse_inductor.to_tiles``):
    query tile ``i`` of head ``(b, h)`` attends to the KV tiles ``kv_indices[b, h, i, :kv_num_blocks[b, h,
    i]]``, each masked to its ``kv_counts`` valid rows. Output tile-major like ``q_tiles``."""
    _check(q_tiles, k_tiles, v_tiles)
    q, k, v = (x.contiguous() for x in (q_tiles, k_tiles, v_tiles))
    B, H, L, D = q.shape
    if L % block:
        raise ValueError(f"tile-major inputs hold a multiple of block={block} rows, got {L}")
    M = L // block
    if kv_num_blocks.shape != (B, H, M) or kv_indices.shape[:3] != (B, H, M):
        raise ValueError(f"kv_num_blocks must be [B, H, M] = {(B, H, M)} and kv_indices [B, H, M, K]; got "
                         f"{tuple(kv_num_blocks.shape)} and {tuple(kv_indices.shape)}")
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qd, kd, vd, od = _descriptors(block, q, k, v, out)
    _tma_block_list_fwd[(M, B * H)](qd, kd, vd, od, kv_num_blocks.to(torch.int32).contiguous(),
                                    kv_indices.to(torch.int32).contiguous(), kv_counts.to(torch.int32).contiguous(),
                                    M, kv_indices.shape[-1], scale * 1.4426950408889634, HEAD_DIM=D, BLOCK=block,
                                    IEEE=q.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages)
    return out
