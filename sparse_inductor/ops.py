"""The block-sparse attention custom ops (namespace ``sparse_inductor``).

``block_sparse_attn_fwd`` and ``block_sparse_attn_bwd`` take Q, K, V in sequence order
(``[B, H, L, D]``, any strides with a unit feature stride), slot tables that say which sequence
position each block slot holds (see :mod:`kernel_templates.block_sparse_attention`), per-block
counts and a query-major block selection in FlexAttention's convention. Results come back in
sequence order, laid out like the input they belong to (``torch.empty_like(q)`` for ``out``, of
``k`` for ``dk``...),
so a following ``transpose(1, 2).reshape(...)`` stays a view.

On CUDA the eager op launches the Triton kernels of ``kernel_templates``; under
``torch.compile`` the Inductor lowering (:mod:`sparse_inductor.lowering`) renders the same
kernels as templates. On CPU a vectorised PyTorch implementation of the same arithmetic runs.
"""
from __future__ import annotations

import functools
import hashlib
import os

import torch
from torch import Tensor

from . import _compat, triton_launch
from .selection import explicit_lists, lists_from_mask, mask_from_lists
from .selection import pool_tiles as pool_tiles_torch
from .selection import top_k_allowed_tiles as top_k_allowed_tiles_torch
from .selection import top_k_tiles as top_k_tiles_torch


# --------------------------------------------------------------------------------------------
# Selection helpers shared by the autograd formula and the API.
# --------------------------------------------------------------------------------------------
def transpose_block_lists(kv_num_blocks: Tensor, kv_indices: Tensor, num_kv_blocks: int):
    """Query-major ``(kv_num_blocks[B,H,Mq], kv_indices[B,H,Mq,K])`` -> kv-major
    ``(q_num_blocks[B,H,Mk], q_indices[B,H,Mk,Mq])``, query blocks in increasing order (entries
    past ``q_num_blocks`` are unspecified). No atomics: deterministic.
    """
    return torch.ops.sparse_inductor.transpose_block_lists(kv_num_blocks, kv_indices, num_kv_blocks)


@torch.library.custom_op("sparse_inductor::transpose_block_lists", mutates_args=())
def _transpose_block_lists(kv_num_blocks: Tensor, kv_indices: Tensor, num_kv_blocks: int) -> tuple[Tensor, Tensor]:
    if not kv_indices.is_cuda:
        # Integer flags and a stable sort.
        mask = mask_from_lists(kv_num_blocks, kv_indices, num_kv_blocks)
        return lists_from_mask(mask.transpose(-1, -2))
    B, H, Mq, K = kv_indices.shape
    Mk = num_kv_blocks
    # Set flag [b, h, kv block, query block] for every listed entry; unlisted entries all write
    # to one spare element past the end. Every write stores 1, so duplicates cannot race.
    listed = torch.arange(K, device=kv_indices.device) < kv_num_blocks.unsqueeze(-1)
    bh = torch.arange(B * H, device=kv_indices.device).view(B, H, 1, 1)
    m = torch.arange(Mq, device=kv_indices.device).view(1, 1, Mq, 1)
    listed &= (kv_num_blocks != Mk).unsqueeze(-1)
    flat = ((bh * Mk + kv_indices.long()) * Mq + m).where(listed, B * H * Mk * Mq)
    flags = torch.zeros(B * H * Mk * Mq + 1, dtype=torch.int8, device=kv_indices.device)
    # index_fill_, not ``flags[flat] = 1``: that copies a host scalar to the GPU on every call, which
    # a CUDA graph cannot capture (found timing the TMA backward as a graph, NOTES v28).
    flags.index_fill_(0, flat.reshape(-1), 1)
    # A full row (every KV block, entries not stored) flags its query block in every KV row.
    flags = flags[:-1].view(B, H, Mk, Mq)
    flags |= (kv_num_blocks == Mk).to(torch.int8).view(B, H, 1, Mq)
    q_num = torch.empty((B, H, Mk), dtype=torch.int32, device=kv_indices.device)
    q_indices = torch.zeros((B, H, Mk, Mq), dtype=torch.int32, device=kv_indices.device)
    triton_launch.compact_rows(flags, q_num, q_indices)
    return q_num, q_indices


@_transpose_block_lists.register_fake
def _(kv_num_blocks, kv_indices, num_kv_blocks):
    B, H, Mq, _ = kv_indices.shape
    return (kv_num_blocks.new_empty((B, H, num_kv_blocks)),
            kv_indices.new_empty((B, H, num_kv_blocks, Mq)))


def like(x: Tensor, result: Tensor) -> Tensor:
    """``result`` laid out as ``torch.empty_like(x)`` (what the fakes promise); a copy only when
    the layouts differ (e.g. an input whose feature stride is not 1)."""
    want = torch.empty_like(x)
    if want.stride() == result.stride():
        return result
    return want.copy_(result)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """LSE / delta precision: fp32, or fp64 for fp64 inputs (the CPU reference precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _unit_feature_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# --------------------------------------------------------------------------------------------
# CPU implementation: the same arithmetic as the kernels, vectorised over blocks. Rows are
# gathered into block order through the slot tables, and results scattered back.
# --------------------------------------------------------------------------------------------
def _per_head(table: Tensor, B: int, H: int) -> Tensor:
    """A ``[B, n]`` (KV) or ``[B, H, n]`` (query) table as ``[B, H, n]``."""
    return (table.unsqueeze(1) if table.dim() == 2 else table).expand(B, H, table.shape[-1])


def _to_blocks(x: Tensor, slots: Tensor) -> Tensor:
    """``[B, H, L, D]`` -> ``[B, H, n, D]`` in slot order (padding slots hold row 0; every use
    masks them by the counts)."""
    B, H, _, D = x.shape
    idx = _per_head(slots, B, H).clamp(min=0).long()
    return torch.gather(x, 2, idx.unsqueeze(-1).expand(B, H, idx.shape[-1], D))


def _from_blocks(x_blocks: Tensor, slots: Tensor, length: int) -> Tensor:
    """``[B, H, n, D]`` in slot order -> ``[B, H, length, D]`` (zeros where no slot lands);
    padding (-1) and excluded (-(p + 2)) slots are dropped."""
    B, H, n, D = x_blocks.shape
    slots = _per_head(slots, B, H)
    idx = torch.where(slots >= 0, slots, length).long()
    out = x_blocks.new_zeros(B, H, length + 1, D)
    out.scatter_(2, idx.unsqueeze(-1).expand(B, H, n, D), x_blocks)
    return out[:, :, :length]


def _gathered(q, k, v, q_counts, kv_counts, kv_num_blocks, kv_indices, causal=None):
    """Per query block, the listed K/V blocks side by side plus validity masks (block order).
    Query blocks have ``Sq`` slots, KV blocks ``Sk`` (smaller query blocks under query_keep).
    ``causal``: ``(q_slots, kv_slots, tokens per causal block)`` of a block-causal mask; then the
    last result is the pairs it allows, ``[B, H, Mq, Sq, K * Sk]`` (else ``None``)."""
    B, H, Nq, D = q.shape
    Mq, Mk = q_counts.shape[-1], kv_counts.shape[-1]
    Sq, Sk = Nq // Mq, k.shape[2] // Mk
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_valid = torch.arange(Sq, device=q.device) < _per_head(q_counts, B, H).unsqueeze(-1)  # [B, H, Mq, Sq]
    kv_valid = torch.arange(Sk, device=q.device) < kv_counts.expand(B, -1).unsqueeze(-1)  # [B, Mk, Sk]
    qb = torch.where(q_valid.unsqueeze(-1), q.reshape(B, H, Mq, Sq, D).to(dtype), 0)
    kb = torch.where(kv_valid[:, None, :, :, None], k.reshape(B, H, Mk, Sk, D).to(dtype), 0)
    vb = torch.where(kv_valid[:, None, :, :, None], v.reshape(B, H, Mk, Sk, D).to(dtype), 0)
    kv_indices = explicit_lists(kv_num_blocks, kv_indices, Mk)
    K = kv_indices.shape[-1]
    listed = torch.arange(K, device=q.device) < kv_num_blocks.unsqueeze(-1)  # [B, H, Mq, K]
    idx = torch.where(listed, kv_indices, 0).long()
    bi = torch.arange(B, device=q.device).view(B, 1, 1, 1)
    hi = torch.arange(H, device=q.device).view(1, H, 1, 1)
    k_sel = kb[bi, hi, idx].reshape(B, H, Mq, K * Sk, D)
    v_sel = vb[bi, hi, idx].reshape(B, H, Mq, K * Sk, D)
    col_valid = (kv_valid[bi, idx] & listed.unsqueeze(-1)).reshape(B, H, Mq, 1, K * Sk)
    # Unlisted entries gathered block 0: zero them so that nothing there (NaN included) leaks.
    k_sel = torch.where(col_valid.transpose(-1, -2), k_sel, 0)
    v_sel = torch.where(col_valid.transpose(-1, -2), v_sel, 0)
    row_valid = q_valid.unsqueeze(-1)  # [B, H, Mq, Sq, 1]
    allowed = None
    if causal is not None:
        # Block-causal mask: key position p' is allowed for query position p iff
        # p' // tokens <= p // tokens (video-only sequences). Padding / excluded query slots are
        # invalid rows anyway.
        q_slots, kv_slots, tokens = causal
        q_block = _per_head(q_slots, B, H).reshape(B, H, Mq, Sq).clamp(min=0) // tokens
        kv_block = _per_head(kv_slots, B, H).reshape(B, H, Mk, Sk).clamp(min=0) // tokens
        key_block = kv_block[bi, hi, idx].reshape(B, H, Mq, 1, K * Sk)
        allowed = key_block <= q_block.unsqueeze(-1)
    return qb, k_sel, v_sel, idx, row_valid, col_valid, allowed


def _causal(q_slots, kv_slots, causal_tokens):
    return (q_slots, kv_slots, causal_tokens) if causal_tokens > 0 else None


def _torch_fwd(q, k, v, q_slots, kv_slots, q_counts, kv_counts, kv_num_blocks, kv_indices, scale, causal_tokens=0):
    B, H, Lq, D = q.shape
    qt, kt, vt = _to_blocks(q, q_slots), _to_blocks(k, kv_slots), _to_blocks(v, kv_slots)
    qb, k_sel, v_sel, _, row_valid, col_valid, allowed = _gathered(qt, kt, vt, q_counts, kv_counts, kv_num_blocks,
                                                                   kv_indices, _causal(q_slots, kv_slots, causal_tokens))
    s = (qb @ k_sel.transpose(-1, -2)) * scale
    s = s.masked_fill(~col_valid, float("-inf"))
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    # Only LSE = -inf means "no key" (a skipped head, every key masked): output 0. A NaN or +inf
    # LSE comes from NaN / Inf in q or in the kept k, v and propagates as in the reference.
    has_mass = lse != float("-inf")
    p = torch.where(has_mass, torch.exp(s - torch.where(has_mass, lse, 0)), 0)
    rows = qb.shape[2] * qb.shape[3]  # explicit sizes: -1 is ambiguous for an empty batch
    out = torch.where(row_valid, p @ v_sel, 0).reshape(B, H, rows, D)
    lse = torch.where(row_valid, lse, 0).reshape(B, H, rows, 1)
    return _from_blocks(out, q_slots, Lq), _from_blocks(lse, q_slots, Lq).squeeze(-1)


def _torch_bwd(grad_out, q, k, v, lse, delta, q_slots, kv_slots, q_counts, kv_counts, kv_num_blocks, kv_indices,
               scale, causal_tokens=0):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    Mq, Mk = q_counts.shape[-1], kv_counts.shape[-1]
    Sq, Sk = q_slots.shape[-1] // Mq, kv_slots.shape[-1] // Mk
    qt, kt, vt = _to_blocks(q, q_slots), _to_blocks(k, kv_slots), _to_blocks(v, kv_slots)
    qb, k_sel, v_sel, idx, row_valid, col_valid, allowed = _gathered(qt, kt, vt, q_counts, kv_counts, kv_num_blocks,
                                                                     kv_indices, _causal(q_slots, kv_slots,
                                                                                         causal_tokens))
    do = torch.where(row_valid, _to_blocks(grad_out, q_slots).reshape(B, H, Mq, Sq, D).to(qb.dtype), 0)
    lse = _to_blocks(lse.unsqueeze(-1), q_slots).reshape(B, H, Mq, Sq, 1).to(qb.dtype)
    # A row with a +inf score has LSE +inf and a NaN softmax (as the reference's): NaN gradients.
    lse = torch.where(lse == float("inf"), float("nan"), lse)
    delta = _to_blocks(delta.unsqueeze(-1), q_slots).reshape(B, H, Mq, Sq, 1).to(qb.dtype)
    s = (qb @ k_sel.transpose(-1, -2)) * scale
    valid = col_valid & row_valid
    if allowed is not None:
        valid = valid & allowed
    p = torch.where(valid, torch.exp(s - lse), 0)
    ds = torch.where(valid, p * (do @ v_sel.transpose(-1, -2) - delta), 0)
    # Rows and key slots that take no part get exactly 0 (a NaN elsewhere in their block must not
    # reach them through a 0 * NaN product), as in the kernels.
    dq = torch.where(row_valid, (ds @ k_sel) * scale, 0)
    K = idx.shape[-1]
    key_valid = col_valid.transpose(-1, -2)  # [B, H, Mq, K * Sk, 1]
    dk_sel = torch.where(key_valid, (ds.transpose(-1, -2) @ qb) * scale, 0).reshape(B, H, Mq * K, Sk, D)
    dv_sel = torch.where(key_valid, p.transpose(-1, -2) @ do, 0).reshape(B, H, Mq * K, Sk, D)
    # Sum each listed block's contribution into its KV block (index_add is sequential on CPU).
    offset = (torch.arange(B * H, device=q.device) * Mk).view(B, H, 1)
    flat = (idx.reshape(B, H, Mq * K) + offset).reshape(-1)
    dk = torch.zeros((B * H * Mk, Sk, D), dtype=qb.dtype, device=q.device)
    dv = torch.zeros_like(dk)
    dk.index_add_(0, flat, dk_sel.reshape(-1, Sk, D))
    dv.index_add_(0, flat, dv_sel.reshape(-1, Sk, D))
    return (
        _from_blocks(dq.reshape(B, H, Mq * Sq, D), q_slots, Lq),
        _from_blocks(dk.reshape(B, H, Mk * Sk, D), kv_slots, Lk),
        _from_blocks(dv.reshape(B, H, Mk * Sk, D), kv_slots, Lk),
    )


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """sha256 of the package version and every source compiled code depends on (the kernels,
    their templates and lowering, the passes)."""
    from . import __version__

    h = hashlib.sha256(__version__.encode())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for package in ("kernel_templates", "sparse_inductor", "passes"):
        folder = os.path.join(root, package)
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    h.update(name.encode() + f.read())
    return h.hexdigest()


#: Passed by every caller of the attention ops as ``kernel_version``. Inductor's FX-graph cache
#: keys a graph on its code, not on out-of-tree lowerings, so a graph compiled with plain
#: ``backend="inductor"`` would otherwise reuse a cached kernel after the kernels changed.
KERNEL_VERSION = int(source_hash()[:12], 16)


@torch.library.custom_op("sparse_inductor::block_sparse_attn_fwd", mutates_args=())
def block_sparse_attn_fwd(
    q: Tensor, k: Tensor, v: Tensor,
    q_slots: Tensor, kv_slots: Tensor, q_counts: Tensor, kv_counts: Tensor,
    kv_num_blocks: Tensor, kv_indices: Tensor,
    scale: float, kernel_version: int = 0, causal_tokens: int = 0,
) -> tuple[Tensor, Tensor]:
    """Block-sparse attention forward.

    Args:
        q, k, v: ``[B, H, Lq, D]``, ``[B, H, Lk, D]`` in sequence order.
        q_slots, kv_slots: int32 ``[B, H, Mq * Sq]`` / ``[B, Mk * S]`` (batch and head strides may
            be 0), the sequence position each block slot holds, ``-1`` for padding. Query blocks
            hold ``Sq`` slots and KV blocks ``S`` (``Sq < S`` under query_keep); the query tables
            are per head because query_keep chooses rows per head (``[B, Mq * Sq]`` / ``[B, Mq]``
            tables are shared by the heads).
        q_counts, kv_counts: int32 ``[B, H, Mq]`` / ``[B, Mk]``, slots per block that take part.
            A query slot holding ``-(p + 2)`` excludes position ``p`` (query_keep's dropped rows):
            not computed, its output row not written, its dQ row 0.
        kv_num_blocks, kv_indices: int32 ``[B, H, Mq]`` / ``[B, H, Mq, K]``, the selection.
        scale: softmax scale.
        kernel_version: not read; callers pass :data:`KERNEL_VERSION` so that it is part of
            the graph a compiler caches.
        causal_tokens: a block-causal mask over video-only sequences (diffusion forcing): the
            query at position ``p`` attends the key at ``p'`` only if ``p' // causal_tokens <=
            p // causal_tokens`` (``H·W·frames per causal block``); 0: no mask.

    Returns ``(out, lse)``: ``out`` laid out like ``q``; ``lse`` contiguous ``[B, H, Lq]`` in fp32
    (fp64 for fp64 inputs), natural-log units.
    """
    q_in = q
    if q.numel() == 0:  # no batch or no heads: nothing to compute (and no kernel to launch)
        return torch.empty_like(q_in), q.new_empty(q.shape[:-1], dtype=stats_dtype(q.dtype))
    q, k, v = (_unit_feature_stride(x) for x in (q, k, v))
    if q.is_cuda:
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        tables = (t.contiguous() if t.stride(-1) != 1 else t for t in (q_slots, kv_slots, q_counts, kv_counts))
        triton_launch.block_sparse_fwd(q, k, v, out, lse, *tables, kv_num_blocks.contiguous(),
                                       kv_indices.contiguous(), scale, causal_tokens=causal_tokens)
        return like(q_in, out), lse
    out, lse = _torch_fwd(q, k, v, q_slots, kv_slots, q_counts, kv_counts, kv_num_blocks, kv_indices, scale,
                          causal_tokens)
    return like(q_in, torch.empty_like(q_in).copy_(out)), lse.to(stats_dtype(q.dtype)).contiguous()


def _register_lowerings():
    # A fake runs whenever a graph holding the op is traced: the moment to make sure Inductor
    # knows our templates (lazily, so that importing the package does not import Inductor).
    from .lowering import ensure_registered

    ensure_registered()


@block_sparse_attn_fwd.register_fake
def _(q, k, v, q_slots, kv_slots, q_counts, kv_counts, kv_num_blocks, kv_indices, scale, kernel_version=0,
      causal_tokens=0):
    _register_lowerings()
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=stats_dtype(q.dtype))


@torch.library.custom_op("sparse_inductor::block_sparse_attn_bwd", mutates_args=())
def block_sparse_attn_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor,
    q_slots: Tensor, kv_slots: Tensor, q_counts: Tensor, kv_counts: Tensor,
    kv_num_blocks: Tensor, kv_indices: Tensor, q_num_blocks: Tensor, q_indices: Tensor,
    scale: float, kernel_version: int = 0, causal_tokens: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Block-sparse attention backward. ``delta = rowsum(out * grad_out) - grad_lse``
    (contiguous ``[B, H, Lq]``, like ``lse``).

    Returns ``(dq, dk, dv)`` laid out like ``q``, ``k``, ``v``; dQ walks the query-major lists,
    dK/dV the kv-major ``(q_num_blocks [B, H, Mk], q_indices [B, H, Mk, Mq])``. ``kernel_version``
    and ``causal_tokens`` as in the forward.
    """
    inputs = (q, k, v)
    if q.numel() == 0:
        return tuple(torch.empty_like(x) for x in inputs)
    grad_out, q, k, v = (_unit_feature_stride(x) for x in (grad_out, q, k, v))
    if q.is_cuda:
        dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
        tables = (t.contiguous() if t.stride(-1) != 1 else t for t in (q_slots, kv_slots, q_counts, kv_counts))
        lists = (t.contiguous() for t in (kv_num_blocks, kv_indices, q_num_blocks, q_indices))
        triton_launch.block_sparse_bwd(grad_out, q, k, v, lse.contiguous(), delta.contiguous(), dq, dk, dv,
                                       *tables, *lists, scale, causal_tokens=causal_tokens)
        grads = (dq, dk, dv)
    else:
        grads = _torch_bwd(grad_out, q, k, v, lse, delta, q_slots, kv_slots, q_counts, kv_counts, kv_num_blocks,
                           kv_indices, scale, causal_tokens)
        grads = [torch.empty_like(x).copy_(g) for x, g in zip(inputs, grads)]
    return tuple(like(x, g) for x, g in zip(inputs, grads))


@block_sparse_attn_bwd.register_fake
def _(grad_out, q, k, v, lse, delta, q_slots, kv_slots, q_counts, kv_counts, kv_num_blocks, kv_indices,
      q_num_blocks, q_indices, scale, kernel_version=0, causal_tokens=0):
    _register_lowerings()
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, q_slots: Tensor, kv_slots: Tensor, q_counts: Tensor,
                           kv_counts: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
                           scale: float, causal_tokens: int = 0) -> tuple[Tensor, Tensor]:
    """``block_sparse_attn_fwd`` as callers use it: the custom op (kernels, lowering, autograd),
    except under a ``torch.func`` differentiation transform or with forward-mode AD duals, which
    the custom op does not support: then the same arithmetic as plain, differentiable PyTorch (the
    CPU implementation, on any device; exact, slower, and it materialises the gathered K/V of each
    query block)."""
    if _compat.functorch_grad_active() or _compat.has_forward_grad(q, k, v):
        kv_indices = explicit_lists(kv_num_blocks, kv_indices, kv_counts.shape[-1], always=True)
        out, lse = _torch_fwd(q, k, v, q_slots, kv_slots, q_counts, kv_counts, kv_num_blocks, kv_indices, scale,
                              causal_tokens)
        return out.to(q.dtype), lse.to(stats_dtype(q.dtype))
    return torch.ops.sparse_inductor.block_sparse_attn_fwd(q, k, v, q_slots, kv_slots, q_counts, kv_counts,
                                                           kv_num_blocks, kv_indices, scale, KERNEL_VERSION,
                                                           causal_tokens)


def _setup_context(ctx, inputs, output):
    q, k, v, q_slots, kv_slots, q_counts, kv_counts, kv_num_blocks, kv_indices, scale, kernel_version, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_slots, kv_slots, q_counts, kv_counts, kv_num_blocks, kv_indices)
    ctx.scale, ctx.kernel_version, ctx.causal_tokens = scale, kernel_version, causal


def _backward_delta(out, grad_out, grad_lse, dtype):
    """``rowsum(out * dO) - dLSE`` in the statistics dtype of ``dtype``: the backward's delta (d lse /
    d s is the softmax row, so a gradient on LSE folds into it). Shared by every op's backward."""
    stats = stats_dtype(dtype)
    delta = (out.to(stats) * grad_out.to(stats)).sum(-1)
    return delta if grad_lse is None else delta - grad_lse.to(stats)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, q_slots, kv_slots, q_counts, kv_counts, kv_num_blocks, kv_indices = ctx.saved_tensors
    delta = _backward_delta(out, grad_out, grad_lse, q.dtype)
    if torch.is_grad_enabled():
        # create_graph=True: the gradient itself is differentiated later (double backward). The
        # backward op has no autograd formula, so the same arithmetic runs as plain, differentiable
        # PyTorch (the CPU implementation, on any device). q, k, v, out and lse are the saved
        # inputs and outputs, so their own graphs carry the second-order terms.
        grads = _torch_bwd(grad_out, q, k, v, lse, delta, q_slots, kv_slots, q_counts, kv_counts, kv_num_blocks,
                           kv_indices, ctx.scale, ctx.causal_tokens)
        dq, dk, dv = (g.to(x.dtype) for g, x in zip(grads, (q, k, v)))
        return dq, dk, dv, None, None, None, None, None, None, None, None, None
    q_num_blocks, q_indices = transpose_block_lists(kv_num_blocks, kv_indices, kv_counts.shape[-1])
    dq, dk, dv = torch.ops.sparse_inductor.block_sparse_attn_bwd(
        grad_out, q, k, v, lse, delta.contiguous(), q_slots, kv_slots, q_counts, kv_counts, kv_num_blocks,
        kv_indices, q_num_blocks, q_indices, ctx.scale, ctx.kernel_version, ctx.causal_tokens,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


block_sparse_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# The compact tile-major TMA forward (issue 22, v17): K and V arrive permuted into compact
# tile-major order (``sparse_inductor.compact_layout``), so every listed tile is a TMA box.
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("sparse_inductor::tma_block_sparse_attn_fwd", mutates_args=())
def tma_block_sparse_attn_fwd(
    q: Tensor, q_compact: Tensor, k_compact: Tensor, v_compact: Tensor,
    q_slots: Tensor, kv_slots: Tensor, counts: Tensor, tile_offsets: Tensor, positions: Tensor,
    kv_num_blocks: Tensor, kv_indices: Tensor, scale: float, kernel_version: int = 0,
) -> tuple[Tensor, Tensor]:
    """Block-sparse attention forward of a video-only self-attention over compact tile-major K, V.

    Args:
        q: ``[B, H, L, D]`` in sequence order: the output is laid out like it (on CPU without the
            interpreter the forward reads it through ``q_slots``); it gets no gradient, the
            permuted ``q_compact`` does.
        q_compact, k_compact, v_compact: ``[B, H, L, D]`` in compact tile-major order
            (:func:`sparse_inductor.compact_layout.to_compact`).
        q_slots: int32 ``[M * S]``, the layout's slot table (sequence positions, ``-1`` padding).
        kv_slots: int32 ``[M * S]``, the compact row of each slot (:func:`compact_slots`).
        counts, tile_offsets: int32 ``[M]``, valid tokens per tile and each tile's first compact row.
        positions: int64 ``[L]``, the sequence position of each compact row.
        kv_num_blocks, kv_indices: int32 ``[B, H, M]`` / ``[B, H, M, K]``, the selection; every
            entry stored (no full rows without entries).
        scale: softmax scale (positive). ``kernel_version`` as in ``block_sparse_attn_fwd``.

    Returns ``(out, lse)`` in sequence order, as ``block_sparse_attn_fwd`` with these lists.
    On CUDA (or under ``TRITON_INTERPRET=1``) the TMA kernel of
    ``kernel_templates/tma_block_sparse.py``; otherwise the CPU implementation on the same
    tables. Under ``torch.compile`` the op stays an extern call of this function (host TMA
    descriptors; no template); so does its backward, ``tma_block_sparse_attn_bwd``, which runs in
    compact order.
    """
    if q.numel() == 0:
        return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=stats_dtype(q.dtype))
    if q.is_cuda or triton_launch.interpreting():
        from kernel_templates.tma_block_sparse import tma_packed_block_sparse_attention

        from .compact_layout import CompactLayout

        compact = CompactLayout(block=q_slots.shape[-1] // counts.shape[-1], num_tiles=counts.shape[-1],
                                num_tokens=q.shape[2], counts=counts.contiguous(),
                                tile_offsets=tile_offsets.contiguous(), positions=positions.contiguous(), rows=None)
        # The store scatters to sequence order, into a buffer laid out like q (the fake's promise).
        return tma_packed_block_sparse_attention(q_compact, k_compact, v_compact, kv_num_blocks.contiguous(),
                                                 kv_indices.contiguous(), compact, scale, out_order="sequence",
                                                 out=torch.empty_like(q))
    B, H = q.shape[:2]
    out, lse = _torch_fwd(q, k_compact, v_compact, q_slots.expand(B, H, -1), kv_slots.expand(B, -1),
                          counts.expand(B, H, -1), counts.expand(B, -1), kv_num_blocks, kv_indices, scale)
    return like(q, torch.empty_like(q).copy_(out)), lse.to(stats_dtype(q.dtype)).contiguous()


@tma_block_sparse_attn_fwd.register_fake
def _(q, q_compact, k_compact, v_compact, q_slots, kv_slots, counts, tile_offsets, positions, kv_num_blocks,
      kv_indices, scale, kernel_version=0):
    _register_lowerings()  # the other ops' templates, for the rest of the graph
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=stats_dtype(q.dtype))


#: How the TMA backward computes dQ when ``$SPARSE_INDUCTOR_BACKWARD_DQ`` is unset (benchmarks/NOTES.md
#: v22): "separate" (its own kernel, deterministic) or a fused mode ("atomic", "atomic_tma": dQ
#: added into an fp32 buffer by the dK/dV kernel, not deterministic). Under
#: ``torch.use_deterministic_algorithms`` the backward always runs "separate".
TMA_BACKWARD_DQ_MODE = "separate"
#: The dK/dV kernel variant of the fused modes: 32-row query steps, the one without spills at D = 128.
TMA_FUSED_DQ_VARIANT = "half_steps"


def _tma_backward_kernels(grad_out, q, k, v, lse, delta, kv_num_blocks, kv_indices, kv_layout, q_layout, scale):
    """The TMA backward kernels of both TMA ops (``q_layout`` is ``kv_layout`` unless query_keep < 1)
    in the chosen ``dq_mode``; 128-slot tiles run as 64-slot halves (v26)."""
    import kernel_templates.tma_block_sparse_bwd as bwd

    dq_mode = bwd.backward_dq_mode(default=TMA_BACKWARD_DQ_MODE)
    variant = "default" if dq_mode == "separate" else TMA_FUSED_DQ_VARIANT
    return bwd.tma_packed_block_sparse_attention_backward(
        grad_out, q, k, v, None, lse, kv_num_blocks.contiguous(), kv_indices.contiguous(), kv_layout, scale,
        delta=delta, dq_mode=dq_mode, dkdv_variant=variant, q_layout=None if q_layout is kv_layout else q_layout)


@torch.library.custom_op("sparse_inductor::tma_block_sparse_attn_bwd", mutates_args=())
def tma_block_sparse_attn_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor,
    slots: Tensor, counts: Tensor, tile_offsets: Tensor, positions: Tensor,
    kv_num_blocks: Tensor, kv_indices: Tensor, scale: float, kernel_version: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of ``tma_block_sparse_attn_fwd``, every tensor in compact tile-major order:
    ``grad_out, q, k, v`` ``[B, H, L, D]``, ``lse`` and ``delta = rowsum(out * grad_out) - grad_lse``
    fp32 ``[B, H, L]``; ``slots`` the compact slot table (:func:`compact_slots`), the other tables
    as in the forward. Returns ``(dq, dk, dv)`` in compact order. On CUDA (or under
    ``TRITON_INTERPRET=1``) the TMA backward kernels (``kernel_templates/tma_block_sparse_bwd.py``:
    dQ, then dK/dV over the transposed lists; dQ fused into dK/dV by atomic adds only when
    ``$SPARSE_INDUCTOR_BACKWARD_DQ`` or :data:`TMA_BACKWARD_DQ_MODE` asks and deterministic
    algorithms are off); otherwise the CPU implementation on the tables."""
    if q.numel() == 0:
        return tuple(torch.empty_like(x) for x in (q, k, v))
    if q.is_cuda or triton_launch.interpreting():
        from .compact_layout import CompactLayout

        compact = CompactLayout(block=slots.shape[-1] // counts.shape[-1], num_tiles=counts.shape[-1],
                                num_tokens=q.shape[2], counts=counts.contiguous(),
                                tile_offsets=tile_offsets.contiguous(), positions=positions.contiguous(), rows=None)
        return _tma_backward_kernels(grad_out, q, k, v, lse, delta, kv_num_blocks, kv_indices, compact, compact,
                                     scale)
    B, H = q.shape[:2]
    grads = _torch_bwd(grad_out, q, k, v, lse, delta, slots.expand(B, H, -1), slots.expand(B, -1),
                       counts.expand(B, H, -1), counts.expand(B, -1), kv_num_blocks, kv_indices, scale)
    return tuple(torch.empty_like(x).copy_(g) for x, g in zip((q, k, v), grads))


@tma_block_sparse_attn_bwd.register_fake
def _(grad_out, q, k, v, lse, delta, slots, counts, tile_offsets, positions, kv_num_blocks, kv_indices, scale,
      kernel_version=0):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _tma_setup_context(ctx, inputs, output):
    (_, q_compact, k_compact, v_compact, _, kv_slots, counts, tile_offsets, positions, kv_num_blocks, kv_indices,
     scale, kernel_version) = inputs
    out, lse = output
    ctx.save_for_backward(q_compact, k_compact, v_compact, out, lse, kv_slots, counts, tile_offsets, positions,
                          kv_num_blocks, kv_indices)
    ctx.scale, ctx.kernel_version = scale, kernel_version


def _tma_backward(ctx, grad_out, grad_lse):
    """Gradients for ``q_compact, k_compact, v_compact`` (none for the sequence-order ``q``, which
    the caller permuted into ``q_compact``): ``grad_out``, LSE and delta are permuted into compact
    order and the whole backward runs there."""
    (q, k, v, out, lse, slots, counts, tile_offsets, positions, kv_num_blocks, kv_indices) = ctx.saved_tensors
    delta = _backward_delta(out, grad_out, grad_lse, q.dtype)
    grad_out, lse, delta = (x.index_select(2, positions) for x in (grad_out, lse, delta))
    if torch.is_grad_enabled():  # double backward: differentiable torch, as the gather op's
        B, H = q.shape[:2]
        grads = _torch_bwd(grad_out, q, k, v, lse, delta, slots.expand(B, H, -1), slots.expand(B, -1),
                           counts.expand(B, H, -1), counts.expand(B, -1), kv_num_blocks, kv_indices, ctx.scale)
        dq, dk, dv = (g.to(x.dtype) for g, x in zip(grads, (q, k, v)))
    else:
        dq, dk, dv = torch.ops.sparse_inductor.tma_block_sparse_attn_bwd(
            grad_out, q, k, v, lse, delta.contiguous(), slots, counts, tile_offsets, positions, kv_num_blocks,
            kv_indices, ctx.scale, ctx.kernel_version)
    return None, dq, dk, dv, None, None, None, None, None, None, None, None, None


tma_block_sparse_attn_fwd.register_autograd(_tma_backward, setup_context=_tma_setup_context)


# --------------------------------------------------------------------------------------------
# query_keep < 1 on the compact TMA kernels (v23): the query side on the kept layout
# (``query_keep.kept_layout``), the KV side on the full compact layout, both ops in those orders.
# --------------------------------------------------------------------------------------------
def _kept_layouts(q_slots, kv_slots, q_counts, q_tile_offsets, kv_counts, kv_tile_offsets, Lq, L):
    from .compact_layout import CompactLayout

    M = kv_counts.shape[-1]
    S = kv_slots.shape[-1] // M
    q_layout = CompactLayout(block=S, num_tiles=M, num_tokens=Lq, counts=q_counts.contiguous(),
                             tile_offsets=q_tile_offsets.contiguous(), positions=None, rows=None)
    kv_layout = CompactLayout(block=S, num_tiles=M, num_tokens=L, counts=kv_counts.contiguous(),
                              tile_offsets=kv_tile_offsets.contiguous(), positions=None, rows=None)
    return q_layout, kv_layout


@torch.library.custom_op("sparse_inductor::tma_query_keep_attn_fwd", mutates_args=())
def tma_query_keep_attn_fwd(
    q_kept: Tensor, k_compact: Tensor, v_compact: Tensor,
    q_slots: Tensor, kv_slots: Tensor, q_counts: Tensor, q_tile_offsets: Tensor, kv_counts: Tensor,
    kv_tile_offsets: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor, scale: float, kernel_version: int = 0,
) -> tuple[Tensor, Tensor]:
    """The forward of the kept query rows (query_keep < 1) over compact tile-major K, V.

    Args:
        q_kept: ``[B, H, Lq, D]``, each head's kept query rows in kept order (tile ``i``'s
            ``q_counts[i]`` rows at ``q_tile_offsets[i]``; :func:`sparse_inductor.query_keep.kept_layout`).
        k_compact, v_compact: ``[B, H, L, D]`` in compact tile-major order.
        q_slots, kv_slots: int32 ``[M * S]``, the kept / compact row each padded slot holds (``-1``
            past a tile's count; the CPU implementation's tables, and where ``S`` is read from).
        q_counts, q_tile_offsets, kv_counts, kv_tile_offsets: int32 ``[M]``, the two layouts.
        kv_num_blocks, kv_indices, scale, kernel_version: as in ``tma_block_sparse_attn_fwd``.

    Returns ``(out, lse)`` of the kept rows, ``[B, H, Lq, D]`` (contiguous) and ``[B, H, Lq]``, in
    kept order: the caller gives the dropped rows their centre's. On CUDA (or under
    ``TRITON_INTERPRET=1``) the TMA forward with its query side on the kept layout (``q_layout``);
    otherwise the CPU implementation on the slot tables.
    """
    if q_kept.numel() == 0:
        return torch.empty_like(q_kept), q_kept.new_empty(q_kept.shape[:-1], dtype=stats_dtype(q_kept.dtype))
    if q_kept.is_cuda or triton_launch.interpreting():
        from kernel_templates.tma_block_sparse import tma_packed_block_sparse_attention

        q_layout, kv_layout = _kept_layouts(q_slots, kv_slots, q_counts, q_tile_offsets, kv_counts, kv_tile_offsets,
                                            q_kept.shape[2], k_compact.shape[2])
        return tma_packed_block_sparse_attention(q_kept, k_compact, v_compact, kv_num_blocks.contiguous(),
                                                 kv_indices.contiguous(), kv_layout, scale, q_layout=q_layout)
    B, H = q_kept.shape[:2]
    out, lse = _torch_fwd(q_kept, k_compact, v_compact, q_slots.expand(B, H, -1), kv_slots.expand(B, -1),
                          q_counts.expand(B, H, -1), kv_counts.expand(B, -1), kv_num_blocks, kv_indices, scale)
    return out.to(q_kept.dtype).contiguous(), lse.to(stats_dtype(q_kept.dtype)).contiguous()


@tma_query_keep_attn_fwd.register_fake
def _(q_kept, k_compact, v_compact, q_slots, kv_slots, q_counts, q_tile_offsets, kv_counts, kv_tile_offsets,
      kv_num_blocks, kv_indices, scale, kernel_version=0):
    _register_lowerings()  # the other ops' templates, for the rest of the graph
    return (q_kept.new_empty(q_kept.shape),
            q_kept.new_empty(q_kept.shape[:-1], dtype=stats_dtype(q_kept.dtype)))


@torch.library.custom_op("sparse_inductor::tma_query_keep_attn_bwd", mutates_args=())
def tma_query_keep_attn_bwd(
    grad_out: Tensor, q_kept: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor,
    q_slots: Tensor, kv_slots: Tensor, q_counts: Tensor, q_tile_offsets: Tensor, kv_counts: Tensor,
    kv_tile_offsets: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor, scale: float, kernel_version: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of ``tma_query_keep_attn_fwd``: ``grad_out`` ``[B, H, Lq, D]`` (the dropped
    rows' dO already summed into their centres'), ``lse`` and ``delta`` ``[B, H, Lq]`` in kept
    order, ``k, v`` compact; returns ``(dq_kept, dk, dv)`` in those orders. On CUDA (or under
    ``TRITON_INTERPRET=1``) the TMA backward with ``q_layout`` (dQ per kept tile; dK/dV over the
    kv-major lists' boxes of kept rows, neighbouring kept tiles merged); else the CPU implementation."""
    if q_kept.numel() == 0:
        return tuple(torch.empty_like(x) for x in (q_kept, k, v))
    if q_kept.is_cuda or triton_launch.interpreting():
        q_layout, kv_layout = _kept_layouts(q_slots, kv_slots, q_counts, q_tile_offsets, kv_counts, kv_tile_offsets,
                                            q_kept.shape[2], k.shape[2])
        return _tma_backward_kernels(grad_out, q_kept, k, v, lse, delta, kv_num_blocks, kv_indices, kv_layout,
                                     q_layout, scale)
    B, H = q_kept.shape[:2]
    grads = _torch_bwd(grad_out, q_kept, k, v, lse, delta, q_slots.expand(B, H, -1), kv_slots.expand(B, -1),
                       q_counts.expand(B, H, -1), kv_counts.expand(B, -1), kv_num_blocks, kv_indices, scale)
    return tuple(g.to(x.dtype).contiguous() for x, g in zip((q_kept, k, v), grads))


@tma_query_keep_attn_bwd.register_fake
def _(grad_out, q_kept, k, v, lse, delta, q_slots, kv_slots, q_counts, q_tile_offsets, kv_counts, kv_tile_offsets,
      kv_num_blocks, kv_indices, scale, kernel_version=0):
    return tuple(x.new_empty(x.shape) for x in (q_kept, k, v))


def _tma_query_keep_setup_context(ctx, inputs, output):
    (q_kept, k, v, q_slots, kv_slots, q_counts, q_tile_offsets, kv_counts, kv_tile_offsets, kv_num_blocks, kv_indices,
     scale, kernel_version) = inputs
    out, lse = output
    ctx.save_for_backward(q_kept, k, v, out, lse, q_slots, kv_slots, q_counts, q_tile_offsets, kv_counts,
                          kv_tile_offsets, kv_num_blocks, kv_indices)
    ctx.scale, ctx.kernel_version = scale, kernel_version


def _tma_query_keep_backward(ctx, grad_out, grad_lse):
    (q, k, v, out, lse, q_slots, kv_slots, q_counts, q_tile_offsets, kv_counts, kv_tile_offsets, kv_num_blocks,
     kv_indices) = ctx.saved_tensors
    delta = _backward_delta(out, grad_out, grad_lse, q.dtype)
    if torch.is_grad_enabled():  # double backward: differentiable torch, as the gather op's
        B, H = q.shape[:2]
        grads = _torch_bwd(grad_out, q, k, v, lse, delta, q_slots.expand(B, H, -1), kv_slots.expand(B, -1),
                           q_counts.expand(B, H, -1), kv_counts.expand(B, -1), kv_num_blocks, kv_indices, ctx.scale)
        dq, dk, dv = (g.to(x.dtype) for g, x in zip(grads, (q, k, v)))
    else:
        dq, dk, dv = torch.ops.sparse_inductor.tma_query_keep_attn_bwd(
            grad_out, q, k, v, lse, delta.contiguous(), q_slots, kv_slots, q_counts, q_tile_offsets, kv_counts,
            kv_tile_offsets, kv_num_blocks, kv_indices, ctx.scale, ctx.kernel_version)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


tma_query_keep_attn_fwd.register_autograd(_tma_query_keep_backward, setup_context=_tma_query_keep_setup_context)


# --------------------------------------------------------------------------------------------
# Coarse-stage ops (DESIGN.md §3.2): one Triton kernel each on CUDA, plain torch on CPU.
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("sparse_inductor::pool_tiles", mutates_args=())
def pool_tiles(q: Tensor, k: Tensor, slots: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Tile means of ``q`` and ``k`` (``[B, H, L, D]`` in sequence order) over the valid tokens
    of each tile: ``slots`` int32 ``[M * S]`` (sequence position per slot; slots past a tile's
    count are ignored), ``counts`` int32 ``[M]`` (each >= 1). Returns two ``[B, H, M, D]`` in
    fp32 (fp64 for fp64 inputs)."""
    if q.is_cuda:
        q, k = _unit_feature_stride(q), _unit_feature_stride(k)
        B, H, _, D = q.shape
        q_mean = q.new_empty((B, H, counts.shape[0], D), dtype=stats_dtype(q.dtype))  # as the fake says
        k_mean = torch.empty_like(q_mean)
        triton_launch.pool_tiles(q, k, slots.contiguous(), counts.contiguous(), q_mean, k_mean)
        return q_mean, k_mean
    rows = slots.clamp(min=0).long()
    S = slots.shape[0] // counts.shape[0]
    return (pool_tiles_torch(q.index_select(2, rows), counts, S), pool_tiles_torch(k.index_select(2, rows), counts, S))


@pool_tiles.register_fake
def _(q, k, slots, counts):
    B, H, _, D = q.shape
    mean = q.new_empty((B, H, counts.shape[0], D), dtype=stats_dtype(q.dtype))
    return mean, torch.empty_like(mean)


@torch.library.custom_op("sparse_inductor::compact_pool", mutates_args=())
def compact_pool(q: Tensor, k: Tensor, slots: Tensor, counts: Tensor, tile_offsets: Tensor,
                 positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``q`` and ``k`` (``[B, H, L, D]``, sequence order) in compact tile-major order
    (``x.index_select(2, positions)``, contiguous) and their tile means (as :func:`pool_tiles`),
    from one read of each: the compact TMA path's permutation and the coarse stage's pooling fused
    (benchmarks/NOTES.md v28). ``slots`` int32 ``[M * S]``, ``counts`` / ``tile_offsets`` int32
    ``[M]`` (the compact layout's), ``positions`` int64 ``[L]`` (its sequence position per compact
    row). Returns ``(q_compact, k_compact, q_mean, k_mean)``. One Triton kernel on CUDA; on the CPU
    the two ops it replaces, so both paths pool exactly as :func:`pool_tiles` does."""
    if q.is_cuda:
        q, k = _unit_feature_stride(q), _unit_feature_stride(k)
        B, H, L, D = q.shape
        q_compact, k_compact = q.new_empty((B, H, L, D)), k.new_empty((B, H, L, D))
        q_mean = q.new_empty((B, H, counts.shape[0], D), dtype=stats_dtype(q.dtype))  # as the fake says
        k_mean = torch.empty_like(q_mean)
        triton_launch.compact_pool(q, k, slots.contiguous(), counts.contiguous(), tile_offsets.contiguous(),
                                   q_compact, k_compact, q_mean, k_mean)
        return q_compact, k_compact, q_mean, k_mean
    q_mean, k_mean = pool_tiles(q, k, slots, counts)
    return q.index_select(2, positions), k.index_select(2, positions), q_mean, k_mean


@compact_pool.register_fake
def _(q, k, slots, counts, tile_offsets, positions):
    B, H, L, D = q.shape
    mean = q.new_empty((B, H, counts.shape[0], D), dtype=stats_dtype(q.dtype))
    return q.new_empty((B, H, L, D)), k.new_empty((B, H, L, D)), mean, torch.empty_like(mean)


@torch.library.custom_op("sparse_inductor::rank_query_rows", mutates_args=())
def rank_query_rows(q: Tensor, video_slots: Tensor, counts: Tensor, n_kept: Tensor) -> tuple[Tensor, Tensor]:
    """``query_keep``'s ranking of the query rows of every video tile (DESIGN.md §3.7): the query
    tables int32 ``[B, H, Mv, S]`` and the kept flags bool ``[B, H, Mv, S]`` by slot (see
    ``query_keep.rank_query_rows_torch``, the CPU path). One Triton program per tile and head on
    CUDA."""
    from .query_keep import rank_query_rows_torch

    if q.is_cuda:
        B, H, _, _ = q.shape
        Mv = counts.shape[0]
        S = video_slots.shape[0] // Mv
        tables = q.new_empty((B, H, Mv, S), dtype=torch.int32)
        kept = q.new_empty((B, H, Mv, S), dtype=torch.bool)
        # The kernel stores 0 / 1 bytes: into the bool tensor's storage, no conversion pass.
        triton_launch.rank_query_rows(_unit_feature_stride(q), video_slots.contiguous(), counts.contiguous(),
                                      n_kept.contiguous(), tables, kept.view(torch.int8))
        return tables, kept
    return rank_query_rows_torch(q, video_slots, counts, n_kept)


@rank_query_rows.register_fake
def _(q, video_slots, counts, n_kept):
    B, H = q.shape[:2]
    Mv = counts.shape[0]
    shape = (B, H, Mv, video_slots.shape[0] // Mv)
    return q.new_empty(shape, dtype=torch.int32), q.new_empty(shape, dtype=torch.bool)


@torch.library.custom_op("sparse_inductor::top_k_tiles", mutates_args=())
def top_k_tiles(scores: Tensor, k: int) -> Tensor:
    """Columns of the ``k`` highest ``scores`` per row (last dim), ties to the lower column,
    in increasing order, int32 ``[..., k]``. Deterministic."""
    if scores.is_cuda and scores.dtype == torch.float32:
        out = scores.new_empty((*scores.shape[:-1], k), dtype=torch.int32)
        triton_launch.top_k_tiles(scores.contiguous(), k, out)
        return out
    return top_k_tiles_torch(scores, k)


@top_k_tiles.register_fake
def _(scores, k):
    return scores.new_empty((*scores.shape[:-1], k), dtype=torch.int32)


@torch.library.custom_op("sparse_inductor::top_k_tiles_allowed", mutates_args=())
def top_k_tiles_allowed(scores: Tensor, allowed: Tensor, k_rows: Tensor, width: int) -> Tensor:
    """Top-k under a block-causal mask: per row ``i`` of ``scores [..., Mq, M]`` the ``k_rows[i]``
    highest among the columns ``allowed[i]`` holds (bool ``[Mq, M]``), ties to the lower column,
    NaN below every number and disallowed columns below NaN; int32 ``[..., Mq, width]``, the kept
    columns first in increasing order, then zeros. Deterministic."""
    if scores.is_cuda and scores.dtype == torch.float32:
        out = scores.new_zeros((*scores.shape[:-1], width), dtype=torch.int32)
        triton_launch.top_k_tiles_allowed(scores.contiguous(), allowed.contiguous(), k_rows.to(torch.int32).contiguous(),
                                          out)
        return out
    return top_k_allowed_tiles_torch(scores, allowed, k_rows, width)


@top_k_tiles_allowed.register_fake
def _(scores, allowed, k_rows, width):
    return scores.new_empty((*scores.shape[:-1], width), dtype=torch.int32)


@torch.library.custom_op("sparse_inductor::mass_cut_tiles_allowed", mutates_args=())
def mass_cut_tiles_allowed(logits: Tensor, counts: Tensor, allowed: Tensor, p: float, lo: Tensor, hi: Tensor,
                           width: int) -> tuple[Tensor, Tensor]:
    """:func:`mass_cut_tiles` under a block-causal mask: each row ``i`` of ``logits [..., Mq, M]``
    is cut over the columns ``allowed[i]`` holds (bool ``[Mq, M]``) only, its length clamped to
    ``[lo[i], hi[i]]`` (int32 ``[Mq]``); ``(num [..., Mq], idx [..., Mq, width])`` int32, entries
    past ``num`` zero. Non-finite logits as in :func:`mass_cut_tiles`."""
    if logits.is_cuda and logits.dtype == torch.float32:
        num = logits.new_empty(logits.shape[:-1], dtype=torch.int32)
        out = logits.new_zeros((*logits.shape[:-1], width), dtype=torch.int32)
        triton_launch.mass_cut_tiles_allowed(logits.contiguous(), counts.contiguous(), allowed.contiguous(), p,
                                             lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous(), num,
                                             out)
        return num, out
    from .policies.mass import mass_cut_allowed_torch

    return mass_cut_allowed_torch(logits.masked_fill(torch.isnan(logits), float("-inf")), counts, allowed, p, lo, hi,
                                  width)


@mass_cut_tiles_allowed.register_fake
def _(logits, counts, allowed, p, lo, hi, width):
    return (logits.new_empty(logits.shape[:-1], dtype=torch.int32),
            logits.new_empty((*logits.shape[:-1], width), dtype=torch.int32))


@torch.library.custom_op("sparse_inductor::mass_cut_tiles", mutates_args=())
def mass_cut_tiles(logits: Tensor, counts: Tensor, p: float, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """BSA's cumulative-mass cut (DESIGN.md §3.7) of every row of ``logits`` (``[..., M]``,
    scaled coarse scores), tiles weighted by ``counts`` (int32 ``[M]``): ``(num [...], idx [...,
    hi])`` int32, the kept tiles first in increasing order, entries past ``num`` zero.

    Non-finite logits (both devices): a NaN logit counts as ``-inf`` (no mass, ranked last); a row
    whose softmax is undefined (every logit ``-inf`` or NaN, or a ``+inf`` one) keeps ``lo`` tiles
    (``hi`` when ``p >= 1``), the lowest indices."""
    if logits.is_cuda and logits.dtype == torch.float32:
        num = logits.new_empty(logits.shape[:-1], dtype=torch.int32)
        out = logits.new_zeros((*logits.shape[:-1], hi), dtype=torch.int32)
        triton_launch.mass_cut_tiles(logits.contiguous(), counts.contiguous(), p, lo, hi, num, out)
        return num, out
    from .policies.mass import mass_cut_torch

    # The softmax of a row with a NaN is NaN throughout: a NaN tile has no mass instead. (A row
    # left with no finite logit has a NaN softmax, which the cut reads as "keep the minimum".)
    return mass_cut_torch(logits.masked_fill(torch.isnan(logits), float("-inf")), counts, p, lo, hi)


@mass_cut_tiles.register_fake
def _(logits, counts, p, lo, hi):
    return (logits.new_empty(logits.shape[:-1], dtype=torch.int32),
            logits.new_empty((*logits.shape[:-1], hi), dtype=torch.int32))
