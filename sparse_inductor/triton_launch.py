"""Launch the Triton kernels of ``kernel_templates`` on CUDA tensors (or CPU tensors under
``TRITON_INTERPRET=1``, for tests)."""
from __future__ import annotations

import os

import torch

from . import _compat


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def head_block(head_dim: int) -> int:
    """The power-of-two register width for a head dim (masked past ``head_dim``)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def default_config(block: int, head_dim: int) -> dict:
    """Warps and pipeline stages of the eager launch (the template autotunes around it)."""
    # Shared memory holds Q plus K and V for each pipeline stage; keep it under ~200 KB.
    # Measured at 64 x 128 (H100, bf16): 2 stages 3.13 ms, 3 stages 3.29 ms (benchmarks/NOTES.md).
    stages = 2 if block * head_block(head_dim) >= 64 * 128 else 3
    return {"num_warps": 8 if block >= 128 else 4, "num_stages": stages}


#: List entries whose valid rows the attention kernels pack per pass.
PACK_CHUNK = 32


def pack_meta() -> dict:
    """Constexprs of the row packing: ``CHUNK`` list entries per pass."""
    return {"CHUNK": PACK_CHUNK}


_TMA_CAPABLE: dict = {}  # device index -> bool


@_compat.constant_when_traced
def _tma_capable(device_type: str, device_index: int) -> bool:
    """Whether the device can run the TMA kernels: a CUDA device of compute capability 9.0 or
    higher (Hopper), and a Triton with host tensor descriptors. A constant under ``torch.compile``."""
    if device_type != "cuda":
        return False
    capable = _TMA_CAPABLE.get(device_index)
    if capable is None:
        try:
            from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
            capable = torch.cuda.get_device_capability(device_index)[0] >= 9
        except ImportError:
            capable = False
        _TMA_CAPABLE[device_index] = capable
    return capable


def tma_capable(device: torch.device) -> bool:
    """:func:`_tma_capable` of ``device``."""
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else -1)
    return _tma_capable(device.type, index)


def kernel_flags(dtype: torch.dtype) -> dict:
    """Constexpr flags: fp32 operands for the interpreter's dot, IEEE dots for fp32 inputs."""
    return {"UPCAST": interpreting(), "IEEE": dtype == torch.float32}


def _no_programs(grid) -> bool:
    """An empty batch (or no heads, rows...) launches nothing: Triton rejects a grid with a 0."""
    return any(n == 0 for n in grid)


def _strides3(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _table_strides(q_slots, kv_slots, q_counts, kv_counts):
    """Batch (and, for the per-head query tables, head) strides of the slot and count tables.
    Query tables given as ``[B, n]`` are shared by the heads (head stride 0), like the KV tables."""
    def batch_and_head(t):
        return (t.stride(0), t.stride(1)) if t.dim() == 3 else (t.stride(0), 0)
    return (*batch_and_head(q_slots), kv_slots.stride(0), *batch_and_head(q_counts), kv_counts.stride(0))


def blocks(q_slots, q_counts, kv_slots, kv_counts) -> dict:
    """``BLOCK`` (slots per KV block) and ``BLOCK_M`` (slots per query block): equal, except under
    ``query_keep`` where a query tile's kept rows fit a smaller query block."""
    return {"BLOCK": kv_slots.shape[-1] // kv_counts.shape[-1], "BLOCK_M": q_slots.shape[-1] // q_counts.shape[-1]}


def block_sparse_fwd(q, k, v, out, lse, q_slots, kv_slots, q_counts, kv_counts, kv_num_blocks, kv_indices, scale,
                     config: dict | None = None, causal_tokens: int = 0):
    """Fill ``out`` (any strides, unit feature stride) and ``lse`` (contiguous ``[B, H, Lq]``).
    ``config``: ``num_warps`` and ``num_stages`` (default :func:`default_config`).
    ``causal_tokens``: tokens per causal block of a block-causal mask (0: none)."""
    from kernel_templates.block_sparse_attention import block_sparse_attn_fwd_kernel

    B, H, Lq, D = q.shape
    Mq = q_counts.shape[-1]
    sizes = blocks(q_slots, q_counts, kv_slots, kv_counts)
    if _no_programs((Mq, B * H)):
        return
    block_sparse_attn_fwd_kernel[(Mq, B * H)](
        q, k, v, out, lse, q_slots, kv_slots, q_counts, kv_counts, kv_num_blocks, kv_indices,
        scale, H, Lq, Mq, kv_counts.shape[-1], kv_indices.shape[-1], D,
        *_table_strides(q_slots, kv_slots, q_counts, kv_counts),
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out),
        **sizes, BLOCK_D=head_block(D), **kernel_flags(q.dtype), **pack_meta(), CAUSAL_TOKENS=int(causal_tokens),
        **(config or default_config(sizes["BLOCK"], D)),
    )


def block_sparse_bwd(grad_out, q, k, v, lse, delta, dq, dk, dv, q_slots, kv_slots, q_counts, kv_counts,
                     kv_num_blocks, kv_indices, q_num_blocks, q_indices, scale, causal_tokens: int = 0):
    """Fill ``dq``, ``dk``, ``dv`` (one launch: dK/dV programs, then dQ programs);
    ``causal_tokens`` as in :func:`block_sparse_fwd`."""
    from kernel_templates.block_sparse_attention import block_sparse_attn_bwd_kernel

    B, H, Lq, D = q.shape
    Mq, Mk = q_counts.shape[-1], kv_counts.shape[-1]
    sizes = blocks(q_slots, q_counts, kv_slots, kv_counts)
    if _no_programs((Mk + Mq, B * H)):
        return
    block_sparse_attn_bwd_kernel[(Mk + Mq, B * H)](
        q, k, v, grad_out, lse, delta, dq, dk, dv,
        q_slots, kv_slots, q_counts, kv_counts, kv_num_blocks, kv_indices, q_num_blocks, q_indices,
        scale, H, Lq, Mq, Mk, kv_indices.shape[-1], q_indices.shape[-1], D,
        *_table_strides(q_slots, kv_slots, q_counts, kv_counts),
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(grad_out),
        *_strides3(dq), *_strides3(dk), *_strides3(dv),
        **sizes, BLOCK_D=head_block(D), **kernel_flags(q.dtype), **pack_meta(), CAUSAL_TOKENS=int(causal_tokens),
        **default_config(sizes["BLOCK"], D),
    )


def pool_tiles(q, k, slots, counts, q_mean, k_mean):
    """Fill ``q_mean``, ``k_mean`` (contiguous, fp32 or fp64 ``[B, H, M, D]``) with the tile means of
    ``q``, ``k`` (``[B, H, L, D]``, unit feature stride); ``slots`` int32 ``[M * block]``."""
    from kernel_templates.selection_kernels import pool_tiles_kernel

    B, H, _, D = q.shape
    M = counts.shape[0]
    if _no_programs((M, B * H)):
        return
    pool_tiles_kernel[(M, B * H)](
        q, k, slots, counts, q_mean, k_mean, H, M, D, *_strides3(q), *_strides3(k),
        BLOCK=slots.shape[0] // M, BLOCK_D=head_block(D), num_warps=pool_warps(slots.shape[0] // M),
    )


def pool_warps(block: int) -> int:
    """Warps of the pooling kernels (``pool_tiles_kernel``, ``compact_pool_kernel``), the same for both
    so their means are bit-equal (the reduction's order follows the layout). Measured on the H200,
    480p, D = 128 (benchmarks/NOTES.md v28): the fused kernel at 64 slots 0.112 / 0.116 / 0.173 ms at
    2 / 4 / 8 warps, at 128 slots 0.174 / 0.117 / 0.131 (2 warps spill)."""
    return 2 if block <= 64 else 4


def compact_pool(q, k, slots, counts, tile_offsets, q_compact, k_compact, q_mean, k_mean):
    """Fill ``q_compact``, ``k_compact`` (contiguous ``[B, H, L, D]``, compact tile-major rows) and
    ``q_mean``, ``k_mean`` (contiguous, fp32 or fp64 ``[B, H, M, D]``) from ``q``, ``k`` (``[B, H, L, D]``,
    sequence order, unit feature stride) in one pass; ``slots`` int32 ``[M * block]``."""
    from kernel_templates.selection_kernels import compact_pool_kernel

    B, H, L, D = q.shape
    M = counts.shape[0]
    if _no_programs((M, B * H)):
        return
    compact_pool_kernel[(M, B * H)](
        q, k, slots, counts, tile_offsets, q_compact, k_compact, q_mean, k_mean, H, M, L, D,
        *_strides3(q), *_strides3(k),
        BLOCK=slots.shape[0] // M, BLOCK_D=head_block(D), num_warps=pool_warps(slots.shape[0] // M),
    )


def rank_query_rows(q, video_slots, counts, n_kept, tables, kept):
    """Fill ``tables`` (int32 ``[B, H, Mv, S]``) and ``kept`` (int8, same shape) with
    ``query_keep``'s ranking of each video tile's query rows (``ops.rank_query_rows``); ``q``
    ``[B, H, L, D]`` with unit feature stride."""
    from kernel_templates.selection_kernels import rank_query_rows_kernel

    B, H, _, D = q.shape
    Mv = counts.shape[0]
    if _no_programs((Mv, B * H)):
        return
    S = video_slots.shape[0] // Mv
    rank_query_rows_kernel[(Mv, B * H)](
        q, video_slots, counts, n_kept, tables, kept, H, Mv, D, *_strides3(q),
        BLOCK=S, BLOCK_D=head_block(D), F64=q.dtype == torch.float64, num_warps=4 if S <= 64 else 8,
    )


def top_k_tiles(scores, k, out):
    """Fill ``out`` (int32 ``[..., k]``) with the columns of the ``k`` highest ``scores``
    (fp32 contiguous ``[..., M]``) per row, ties to the lower column, in increasing order."""
    from kernel_templates.selection_kernels import top_k_tiles_kernel

    M = scores.shape[-1]
    if _no_programs((scores.numel(), k)):
        return
    cols = _row_width(M)
    top_k_tiles_kernel[(scores.numel() // M,)](scores, out, M, k, COLS=cols, num_warps=_row_warps(cols))


def mass_cut_tiles(logits, counts, p, lo, hi, num, out):
    """Fill ``num`` (int32 ``[...]``) and ``out`` (int32 ``[..., hi]``, zeroed) with BSA's
    cumulative-mass cut of each row of ``logits`` (fp32 contiguous ``[..., M]``, scaled), tiles
    weighted by ``counts`` (int32 ``[M]``)."""
    from kernel_templates.selection_kernels import mass_cut_tiles_kernel

    M = logits.shape[-1]
    if _no_programs((logits.numel(),)):
        return
    cols = _row_width(M)
    mass_cut_tiles_kernel[(logits.numel() // M,)](logits, counts, num, out, M, float(p), lo, hi, hi,
                                                  KEEP_ALL=p >= 1.0, COLS=cols, num_warps=_row_warps(cols))


def top_k_tiles_allowed(scores, allowed, k_rows, out):
    """Fill ``out`` (int32 ``[..., Mq, width]``, zeroed) with the top ``k_rows[i]`` (int32 ``[Mq]``)
    columns of each row of ``scores`` (fp32 contiguous ``[..., Mq, M]``) among those ``allowed``
    (bool ``[Mq, M]``) holds, in increasing order."""
    from kernel_templates.selection_kernels import top_k_tiles_allowed_kernel

    M = scores.shape[-1]
    if _no_programs((scores.numel(), out.shape[-1])):
        return
    cols = _row_width(M)
    top_k_tiles_allowed_kernel[(scores.numel() // M,)](scores, allowed.to(torch.int8), k_rows, out, M,
                                                       allowed.shape[0], out.shape[-1], COLS=cols,
                                                       num_warps=_row_warps(cols))


def mass_cut_tiles_allowed(logits, counts, allowed, p, lo, hi, num, out):
    """:func:`mass_cut_tiles` of each row ``i`` over the columns ``allowed[i]`` holds, clamped to
    ``[lo[i], hi[i]]`` (int32 ``[Mq]``); ``out`` (int32 ``[..., Mq, width]``) zeroed."""
    from kernel_templates.selection_kernels import mass_cut_tiles_allowed_kernel

    M = logits.shape[-1]
    if _no_programs((logits.numel(),)):
        return
    cols = _row_width(M)
    mass_cut_tiles_allowed_kernel[(logits.numel() // M,)](logits, counts, allowed.to(torch.int8), lo, hi, num, out, M,
                                                          allowed.shape[0], float(p), out.shape[-1],
                                                          KEEP_ALL=p >= 1.0, COLS=cols, num_warps=_row_warps(cols))


def compact_rows(mask, num, indices):
    """Per row of an int8 0/1 ``mask [..., C]``: ``num`` = how many are set, ``indices``
    (int32 ``[..., C]``) = the set columns first, in increasing order (the rest untouched)."""
    from kernel_templates.selection_kernels import compact_rows_kernel

    C = mask.shape[-1]
    if _no_programs((mask.numel(),)):
        return
    cols = _row_width(C)
    compact_rows_kernel[(mask.numel() // C,)](mask, num, indices, C, COLS=cols, num_warps=_row_warps(cols))


def _row_width(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _row_warps(cols: int) -> int:
    # One warp per row up to 1024 columns (top-k at 480p: 0.074 ms with 1 warp, 0.080 with 4).
    return 1 if cols <= 1024 else 2 if cols <= 4096 else 4
