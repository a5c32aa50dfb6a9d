"""The block-sparse attention custom ops (namespace ``sparse_inductor``).

``block_sparse_attn_fwd`` and ``block_sparse_attn_bwd`` work on tile-major tensors
``[B, H, M * block, D]`` (see :mod:`sparse_inductor.layout`) and a query-major block selection
in FlexAttention's convention. On CUDA they run the Triton kernels of ``kernel_templates``;
on CPU a vectorised PyTorch implementation of the same arithmetic. Both are opaque to
``torch.compile`` (the Inductor lowering replaces them with templates on CUDA).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import triton_launch
from .selection import lists_from_mask, mask_from_lists


# --------------------------------------------------------------------------------------------
# Selection helpers shared by the autograd formula and the API.
# --------------------------------------------------------------------------------------------
def transpose_block_lists(kv_num_blocks: Tensor, kv_indices: Tensor, num_kv_blocks: int):
    """Query-major ``(kv_num_blocks[B,H,Mq], kv_indices[B,H,Mq,K])`` -> kv-major
    ``(q_num_blocks[B,H,Mk], q_indices[B,H,Mk,Mq])``, query blocks in increasing order.

    Built from integer flags and a stable sort: no atomics, deterministic.
    """
    return lists_from_mask(mask_from_lists(kv_num_blocks, kv_indices, num_kv_blocks).transpose(-1, -2))


# --------------------------------------------------------------------------------------------
# CPU implementation: the same arithmetic as the kernels, vectorised over blocks.
# --------------------------------------------------------------------------------------------
def _stats_dtype(q: Tensor) -> torch.dtype:
    """LSE / delta precision: fp32, or fp64 for fp64 inputs (the CPU reference precision)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _per_batch(counts: Tensor, B: int) -> Tensor:
    return counts.expand(B, counts.shape[-1]) if counts.dim() == 1 else counts


def _gathered(q, k, v, q_counts, kv_counts, kv_num_blocks, kv_indices):
    """Per query block, the listed K/V blocks side by side plus validity masks."""
    B, H, Nq, D = q.shape
    Mq, Mk = q_counts.shape[-1], kv_counts.shape[-1]
    S = Nq // Mq
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    slots = torch.arange(S, device=q.device)
    q_valid = slots < _per_batch(q_counts, B).unsqueeze(-1)  # [B, Mq, S]
    kv_valid = slots < _per_batch(kv_counts, B).unsqueeze(-1)  # [B, Mk, S]
    qb = torch.where(q_valid[:, None, :, :, None], q.reshape(B, H, Mq, S, D).to(dtype), 0)
    kb = torch.where(kv_valid[:, None, :, :, None], k.reshape(B, H, Mk, S, D).to(dtype), 0)
    vb = torch.where(kv_valid[:, None, :, :, None], v.reshape(B, H, Mk, S, D).to(dtype), 0)
    K = kv_indices.shape[-1]
    listed = torch.arange(K, device=q.device) < kv_num_blocks.unsqueeze(-1)  # [B, H, Mq, K]
    idx = torch.where(listed, kv_indices, 0).long()
    bi = torch.arange(B, device=q.device).view(B, 1, 1, 1)
    hi = torch.arange(H, device=q.device).view(1, H, 1, 1)
    k_sel = kb[bi, hi, idx].reshape(B, H, Mq, K * S, D)
    v_sel = vb[bi, hi, idx].reshape(B, H, Mq, K * S, D)
    col_valid = (kv_valid[bi, idx] & listed.unsqueeze(-1)).reshape(B, H, Mq, 1, K * S)
    row_valid = q_valid[:, None, :, :, None]  # [B, 1, Mq, S, 1]
    return qb, k_sel, v_sel, idx, row_valid, col_valid


def _torch_fwd(q, k, v, q_counts, kv_counts, kv_num_blocks, kv_indices, scale):
    B, H, Nq, D = q.shape
    qb, k_sel, v_sel, _, row_valid, col_valid = _gathered(q, k, v, q_counts, kv_counts, kv_num_blocks, kv_indices)
    s = (qb @ k_sel.transpose(-1, -2)) * scale
    s = s.masked_fill(~col_valid, float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    has_mass = torch.isfinite(lse)
    p = torch.where(has_mass, torch.exp(s - torch.where(has_mass, lse, 0)), 0)
    out = torch.where(row_valid, p @ v_sel, 0)
    lse = torch.where(row_valid, lse, 0).squeeze(-1)
    return out.reshape(B, H, Nq, D).to(q.dtype), lse.reshape(B, H, Nq).to(_stats_dtype(q))


def _torch_bwd(grad_out, q, k, v, lse, delta, q_counts, kv_counts, kv_num_blocks, kv_indices, scale):
    B, H, Nq, D = q.shape
    Mq, Mk = q_counts.shape[-1], kv_counts.shape[-1]
    S = Nq // Mq
    qb, k_sel, v_sel, idx, row_valid, col_valid = _gathered(q, k, v, q_counts, kv_counts, kv_num_blocks, kv_indices)
    do = torch.where(row_valid, grad_out.reshape(B, H, Mq, S, D).to(qb.dtype), 0)
    lse = lse.reshape(B, H, Mq, S, 1).to(qb.dtype)
    delta = delta.reshape(B, H, Mq, S, 1).to(qb.dtype)
    s = (qb @ k_sel.transpose(-1, -2)) * scale
    valid = col_valid & row_valid
    p = torch.where(valid, torch.exp(s - lse), 0)
    ds = torch.where(valid, p * (do @ v_sel.transpose(-1, -2) - delta), 0)
    dq = (ds @ k_sel) * scale
    K = idx.shape[-1]
    dk_sel = ((ds.transpose(-1, -2) @ qb) * scale).reshape(B, H, Mq * K, S, D)
    dv_sel = (p.transpose(-1, -2) @ do).reshape(B, H, Mq * K, S, D)
    # Sum each listed block's contribution into its KV block (index_add is sequential on CPU).
    offset = (torch.arange(B * H, device=q.device) * Mk).view(B, H, 1)
    flat = (idx.reshape(B, H, Mq * K) + offset).reshape(-1)
    dk = torch.zeros((B * H * Mk, S, D), dtype=qb.dtype, device=q.device)
    dv = torch.zeros_like(dk)
    dk.index_add_(0, flat, dk_sel.reshape(-1, S, D))
    dv.index_add_(0, flat, dv_sel.reshape(-1, S, D))
    return (
        dq.reshape(B, H, Nq, D).to(q.dtype),
        dk.reshape(B, H, Mk * S, D).to(k.dtype),
        dv.reshape(B, H, Mk * S, D).to(v.dtype),
    )


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("sparse_inductor::block_sparse_attn_fwd", mutates_args=())
def block_sparse_attn_fwd(
    q: Tensor, k: Tensor, v: Tensor,
    q_counts: Tensor, kv_counts: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Block-sparse attention forward. Returns ``(out [B,H,Nq,D], lse [B,H,Nq])``; LSE is fp32
    (fp64 for fp64 inputs) in natural-log units."""
    if q.is_cuda:
        return triton_launch.block_sparse_fwd(
            q.contiguous(), k.contiguous(), v.contiguous(),
            q_counts.contiguous(), kv_counts.contiguous(), kv_num_blocks.contiguous(), kv_indices.contiguous(),
            scale,
        )
    out, lse = _torch_fwd(q, k, v, q_counts, kv_counts, kv_num_blocks, kv_indices, scale)
    return out.contiguous(), lse.contiguous()


@block_sparse_attn_fwd.register_fake
def _(q, k, v, q_counts, kv_counts, kv_num_blocks, kv_indices, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=_stats_dtype(q))


@torch.library.custom_op("sparse_inductor::block_sparse_attn_bwd", mutates_args=())
def block_sparse_attn_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor,
    q_counts: Tensor, kv_counts: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
    q_num_blocks: Tensor, q_indices: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Block-sparse attention backward. ``delta = rowsum(out * grad_out) - grad_lse``.

    Returns ``(dq, dk, dv)``; dQ walks the query-major lists, dK/dV the kv-major lists.
    """
    if q.is_cuda:
        return triton_launch.block_sparse_bwd(
            grad_out.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(),
            lse.contiguous(), delta.contiguous(),
            q_counts.contiguous(), kv_counts.contiguous(), kv_num_blocks.contiguous(), kv_indices.contiguous(),
            q_num_blocks.contiguous(), q_indices.contiguous(), scale,
        )
    dq, dk, dv = _torch_bwd(grad_out, q, k, v, lse, delta, q_counts, kv_counts, kv_num_blocks, kv_indices, scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@block_sparse_attn_bwd.register_fake
def _(grad_out, q, k, v, lse, delta, q_counts, kv_counts, kv_num_blocks, kv_indices, q_num_blocks, q_indices, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, q_counts, kv_counts, kv_num_blocks, kv_indices, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_counts, kv_counts, kv_num_blocks, kv_indices)
    ctx.scale = scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, q_counts, kv_counts, kv_num_blocks, kv_indices = ctx.saved_tensors
    stats = _stats_dtype(q)
    delta = (out.to(stats) * grad_out.to(stats)).sum(-1)
    if grad_lse is not None:
        # d lse / d s = softmax row, so a gradient on LSE folds into delta.
        delta = delta - grad_lse.to(stats)
    q_num_blocks, q_indices = transpose_block_lists(kv_num_blocks, kv_indices, kv_counts.shape[-1])
    dq, dk, dv = torch.ops.sparse_inductor.block_sparse_attn_bwd(
        grad_out, q, k, v, lse, delta, q_counts, kv_counts, kv_num_blocks, kv_indices,
        q_num_blocks, q_indices, ctx.scale,
    )
    return dq, dk, dv, None, None, None, None, None


block_sparse_attn_fwd.register_autograd(_backward, setup_context=_setup_context)
