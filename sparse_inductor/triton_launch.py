"""Launch the Triton kernels of ``kernel_templates`` on CUDA tensors (or CPU tensors under
``TRITON_INTERPRET=1``, for tests)."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def head_block(head_dim: int) -> int:
    """The power-of-two register width for a head dim (masked past ``head_dim``)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def _launch_config(block: int, head_dim: int) -> dict:
    # Shared memory holds Q plus K and V for each pipeline stage; keep it under ~200 KB.
    stages = 2 if block * head_block(head_dim) > 64 * 128 else 3
    return {"num_warps": 8 if block >= 128 else 4, "num_stages": stages}


def _count_stride(counts: torch.Tensor) -> int:
    return counts.stride(0) if counts.dim() == 2 else 0


def _flags(q: torch.Tensor) -> dict:
    return {"UPCAST": interpreting(), "IEEE": q.dtype == torch.float32}


def _strides3(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def block_sparse_fwd(q, k, v, q_counts, kv_counts, kv_num_blocks, kv_indices, scale):
    from kernel_templates.block_sparse_attention import block_sparse_attn_fwd_kernel

    B, H, Nq, D = q.shape
    Mq = q_counts.shape[-1]
    block = Nq // Mq
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    block_sparse_attn_fwd_kernel[(Mq, B * H)](
        q, k, v, out, lse,
        q_counts, kv_counts, kv_num_blocks, kv_indices,
        scale, _count_stride(q_counts), _count_stride(kv_counts),
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out),
        H, Mq, kv_indices.shape[-1], D,
        BLOCK=block, BLOCK_D=head_block(D), **_flags(q), **_launch_config(block, D),
    )
    return out, lse


def block_sparse_bwd(grad_out, q, k, v, lse, delta, q_counts, kv_counts,
                     kv_num_blocks, kv_indices, q_num_blocks, q_indices, scale):
    from kernel_templates.block_sparse_attention import (
        block_sparse_attn_bwd_dkdv_kernel,
        block_sparse_attn_bwd_dq_kernel,
    )

    B, H, Nq, D = q.shape
    Mq = q_counts.shape[-1]
    Mk = kv_counts.shape[-1]
    block = Nq // Mq
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    common = dict(BLOCK=block, BLOCK_D=head_block(D), **_flags(q), **_launch_config(block, D))
    block_sparse_attn_bwd_dq_kernel[(Mq, B * H)](
        q, k, v, grad_out, lse, delta, dq,
        q_counts, kv_counts, kv_num_blocks, kv_indices,
        scale, _count_stride(q_counts), _count_stride(kv_counts),
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(grad_out), *_strides3(dq),
        H, Mq, kv_indices.shape[-1], D, **common,
    )
    block_sparse_attn_bwd_dkdv_kernel[(Mk, B * H)](
        q, k, v, grad_out, lse, delta, dk, dv,
        q_counts, kv_counts, q_num_blocks, q_indices,
        scale, _count_stride(q_counts), _count_stride(kv_counts),
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(grad_out), *_strides3(dk), *_strides3(dv),
        H, Mq, Mk, q_indices.shape[-1], D, **common,
    )
    return dq, dk, dv
