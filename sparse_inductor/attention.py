"""The function the compiler pass puts in place of a rewritten SDPA call.

Plain torch ops around the block-sparse custom op: permutation into block order, the coarse
selection, the op, the permutation back. It traces with symbolic sizes, so one compiled graph
serves every resolution of a ``dynamic=True`` model.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

from . import _compat, ops  # ops registers the custom ops
from . import triton_launch
from .causal import effective_block_size, tiles_split_blocks, tokens_per_block
from .compact_layout import compact_layout, compact_slots
from .layout import TileLayout, build_layout
from .query_keep import _centre_maps, broadcast_centres, from_kept, kept_layout, num_kept, select_queries, to_kept
from .selection import select_tiles
from .stats import recording


def _valid_keys_first(layout: TileLayout, key_padding_mask: Tensor):
    """Per-batch KV slot tables in which every block lists its unmasked keys first, and per-batch
    KV counts of the unmasked keys only (DESIGN.md §3.5 with a key-padding mask).

    Text keys are packed across the text blocks (each batch's unmasked text keys first); each video
    tile keeps its own slots, unmasked ones first (stable, so in raster order). Queries are never
    masked (their block counts are unchanged); a masked key sits past its block's count: never
    attended, and its dK/dV row is written as 0. The coarse selection does not see the mask (it
    pools every video token). So any bool key-padding mask is exact, whatever keys it hides.
    """
    B = key_padding_mask.shape[0]
    keep = key_padding_mask.reshape(B, -1)  # [B, L] True = attend
    S, Mv = layout.block_size, layout.num_video_tiles
    video_slots = Mv * S
    L_text = layout.text_before + layout.text_after
    slots = layout.slots
    # Video tiles: unmasked keys first within each tile.
    video = slots[:video_slots].long()
    video_keep = ((video >= 0) & keep[:, video.clamp(min=0)]).view(B, Mv, S)
    order = torch.sort((~video_keep).to(torch.int8), dim=2, stable=True).indices
    video_tables = torch.gather(slots[:video_slots].view(1, Mv, S).expand(B, Mv, S), 2, order).reshape(B, video_slots)
    video_counts = video_keep.sum(2, dtype=torch.int32)
    # Text blocks: the unmasked text keys first, across the text blocks.
    text_pos = slots[video_slots: video_slots + L_text].long()  # text positions, in order
    text_order = torch.sort((~keep[:, text_pos]).to(torch.int8), dim=1, stable=True).indices  # [B, Lt]
    kv_slots = torch.cat([video_tables, slots[video_slots:].expand(B, -1)], dim=1).clone()
    kv_slots[:, video_slots: video_slots + L_text] = text_pos[text_order].to(torch.int32)
    n_valid = keep[:, text_pos].sum(1, keepdim=True)  # [B, 1]
    text_blocks = torch.arange(layout.num_tiles - Mv, device=keep.device)
    text_counts = torch.clamp(n_valid - text_blocks * S, min=0, max=S)
    kv_counts = torch.cat([video_counts, text_counts.to(torch.int32)], dim=1)
    return kv_slots.contiguous(), kv_counts.contiguous()


def _no_rows(B, H) -> bool:
    """An empty batch or no heads (static sizes): nothing to choose query rows from."""
    return isinstance(B, int) and isinstance(H, int) and B * H == 0


log = logging.getLogger("sparse_inductor")

#: Which forward kernel block-sparse calls use, from the environment variable of that name:
#: ``"auto"`` (default): the compact tile-major TMA forward where it applies on a Hopper-or-newer
#: GPU, the gather kernel elsewhere; ``"gather"``: always the gather kernel; ``"tma"``: the TMA
#: forward wherever it applies, on any device (the CPU runs it under ``TRITON_INTERPRET=1``,
#: else the CPU implementation on its tables; for tests). Read once at import; tests patch it.
FORWARD_KERNEL = os.environ.get("SPARSE_INDUCTOR_FORWARD_KERNEL", "auto")
FORWARD_KERNELS = ("auto", "gather", "tma")
if FORWARD_KERNEL not in FORWARD_KERNELS:
    raise ValueError(f"SPARSE_INDUCTOR_FORWARD_KERNEL must be one of {FORWARD_KERNELS}, got {FORWARD_KERNEL!r}")


#: Whether the compact TMA path pools Q and K in the pass that permutes them (``ops.compact_pool``,
#: benchmarks/NOTES.md v28) when the policy reads the tile means. ``False`` restores the separate
#: permutation and pool. Read when a graph is traced: Dynamo guards on it where it traces
#: ``sparse_attention`` itself (``torch.compile`` of the API, the benchmarks' A/B rows), while a model
#: compiled with ``backend="sparse_inductor"`` keeps the value of its first compile. For benchmarks,
#: not a user setting (a module global: not per thread).
POOL_IN_PERMUTATION = True


def tma_forward_unsupported(q: Tensor, k: Tensor, v: Tensor, layout: TileLayout, policy, scale: float,
                            query_keep: float, key_padding_mask, causal_block_size) -> str | None:
    """Why the compact TMA forward (``ops.tma_block_sparse_attn_fwd``, or under ``query_keep < 1``
    ``ops.tma_query_keep_attn_fwd``) cannot take this call, or ``None`` if it can. It covers
    video-only self-attention with 16 to 128 slots per tile (128-slot tiles: the forward walks them
    in 64-row steps, NOTES v25, the backward runs them as 64-slot halves, v26), D 64 or 128, fp16 / bf16 / fp32, any
    ``query_keep`` (v23), without key padding, block-causal masks, full rows (a ``Full()`` policy
    anywhere), a scale that is not positive (the kernel scales the row maximum), or a ``torch.func``
    transform (``vmap`` included: its compact permutations have no vmap rule) or forward-mode AD."""
    from .selection import _has_text, _may_have_full_rows

    if _has_text(layout):
        return "text tokens (joint attention)"
    if key_padding_mask is not None:
        return "a key-padding mask"
    if causal_block_size is not None:
        return "a block-causal mask"
    if _may_have_full_rows(policy):
        return "full rows (Full() policy)"
    if not scale > 0:
        return f"scale {scale} (must be positive)"
    if not (q.shape == k.shape == v.shape):
        return "q, k, v of different shapes"
    if q.shape[-1] not in (64, 128):
        return f"head dim {q.shape[-1]} (64 or 128)"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype}"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v of different dtypes ({q.dtype}, {k.dtype}, {v.dtype})"
    if layout.block_size > 128:
        return f"{layout.block_size} slots per tile (at most 128)"
    if q.stride(-1) != 1:
        return "a q whose feature stride is not 1"
    if _no_rows(*q.shape[:2]):
        return "no batch or no heads"
    if _compat.functorch_active() or _compat.has_forward_grad(q, k, v):
        return "a torch.func transform or forward-mode AD"
    return None


def forward_kernel_for(q: Tensor, *args, forward_kernel: str | None = None) -> tuple[str, str]:
    """``("tma" or "gather", why)``: the forward kernel a call with these arguments (those of
    :func:`tma_forward_unsupported`) runs, and, for the gather kernel, why (``""`` when the TMA
    path was not asked for: ``"gather"``, or ``"auto"`` off Hopper)."""
    choice = FORWARD_KERNEL if forward_kernel is None else forward_kernel
    if choice not in FORWARD_KERNELS:
        raise ValueError(f"forward_kernel must be one of {FORWARD_KERNELS} or None, got {choice!r}")
    if choice == "gather":
        return "gather", ""
    if choice == "auto" and not triton_launch.tma_capable(q.device):
        return "gather", ""
    reason = tma_forward_unsupported(q, *args)
    return ("gather", reason) if reason is not None else ("tma", "")


def use_tma_forward(q: Tensor, *args, forward_kernel: str | None = None) -> bool:
    """Whether this call runs the compact TMA forward (:data:`FORWARD_KERNEL`,
    :func:`tma_forward_unsupported`); an explicit ``"tma"`` that cannot apply says why in a log
    line (debug level under ``"auto"``, where the gather kernel is the documented choice)."""
    kernel, reason = forward_kernel_for(q, *args, forward_kernel=forward_kernel)
    if reason and not torch.compiler.is_compiling():  # Dynamo cannot trace a logger call
        choice = FORWARD_KERNEL if forward_kernel is None else forward_kernel
        (log.info if choice == "tma" else log.debug)(
            "sparse_inductor: the gather forward kernel runs this call, the TMA forward does not cover %s", reason)
    return kernel == "tma"


def _tma_attention(q: Tensor, k: Tensor, v: Tensor, layout: TileLayout, kv_num_blocks: Tensor,
                   kv_indices: Tensor, scale: float, query_keep: float = 1.0, qk_compact=None) -> Tensor:
    """The block-sparse op through the compact TMA kernels: Q, K, V permuted into compact
    tile-major order (under ``torch.compile`` a gather that Inductor fuses into the kernel that
    produces them; Q and K come from :class:`_CompactPool`, an opaque op, when the policy reads the
    tile means); the output comes back in sequence order (the forward's store scatters it, through
    q's strides); the backward runs in compact order and dQ/dK/dV flow back through the permutation.
    ``qk_compact``: ``(compact layout, q_compact, k_compact)`` already made by :class:`_CompactPool`
    (the selection's pooling pass). ``query_keep < 1``: :func:`_tma_query_keep_attention`."""
    if qk_compact is not None:
        assert query_keep >= 1.0, "the fused permutation + pool covers query_keep = 1 only"
        compact, q_compact, k_compact = qk_compact
        v_compact = _CompactRows.apply(v, compact.positions, compact.rows)
    else:
        compact = compact_layout(layout)
        if query_keep < 1.0:
            return _tma_query_keep_attention(q, k, v, layout, compact, kv_num_blocks, kv_indices, scale, query_keep)
        q_compact, k_compact, v_compact = (_CompactRows.apply(x, compact.positions, compact.rows) for x in (q, k, v))
    out, _ = torch.ops.sparse_inductor.tma_block_sparse_attn_fwd(
        q, q_compact, k_compact, v_compact, layout.slots, compact_slots(compact), compact.counts,
        compact.tile_offsets, compact.positions, kv_num_blocks, kv_indices, scale, ops.KERNEL_VERSION)
    return out


def _tma_query_keep_attention(q: Tensor, k: Tensor, v: Tensor, layout: TileLayout, compact, kv_num_blocks: Tensor,
                              kv_indices: Tensor, scale: float, query_keep: float) -> Tensor:
    """query_keep < 1 on the compact TMA kernels (benchmarks/NOTES.md v23): each head's kept query rows
    gathered into the kept layout (:func:`sparse_inductor.query_keep.kept_layout`; the counts and
    offsets are shared by every head), K and V into compact order as at ``query_keep = 1``; the op
    runs on those (outputs, LSE and the backward in kept order), and every dropped row receives its
    centre's output (a gather; its dO is summed into the centre's in the backward, in a fixed order).
    dQ reaches the kept rows only (a dropped row's q takes no part: the ranking is a discrete choice)."""
    kept = kept_layout(q, layout, query_keep)
    q_kept = to_kept(q, kept)
    k_compact, v_compact = (_CompactRows.apply(x, compact.positions, compact.rows) for x in (k, v))
    attn, _ = torch.ops.sparse_inductor.tma_query_keep_attn_fwd(
        q_kept, k_compact, v_compact, kept.slots(), compact_slots(compact), kept.compact.counts,
        kept.compact.tile_offsets, compact.counts, compact.tile_offsets, kv_num_blocks, kv_indices, scale,
        ops.KERNEL_VERSION)
    return from_kept(attn, kept)


class _CompactRows(torch.autograd.Function):
    """Rows of ``[B, H, L, D]`` permuted into compact order (``positions``); the gradient goes
    back by the inverse permutation (``rows``): a gather both ways, no scatter-add."""

    @staticmethod
    def forward(x, positions, rows):
        return x.index_select(2, positions)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return grad.index_select(2, rows), None, None


class _CompactPool(torch.autograd.Function):
    """``q`` and ``k`` permuted into compact order as :class:`_CompactRows` does, plus their tile
    means (no gradient: the selection is a discrete choice), from one read
    (``sparse_inductor::compact_pool``); the gradients go back by the inverse permutation."""

    @staticmethod
    def forward(q, k, layout, compact):
        return torch.ops.sparse_inductor.compact_pool(
            q, k, layout.slots[: layout.num_video_tiles * layout.block_size], compact.counts, compact.tile_offsets,
            compact.positions)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[2], output[3])
        ctx.save_for_backward(inputs[3].rows)

    @staticmethod
    def backward(ctx, grad_q, grad_k, _q_mean, _k_mean):
        (rows,) = ctx.saved_tensors
        return grad_q.index_select(2, rows), grad_k.index_select(2, rows), None, None


def resolve_policy(policy=None, sparsity=None):
    """The policy a call asks for: ``policy`` if given, else ``TopK(sparsity)`` (default 0.875)."""
    from .policies import Policy, TopK

    if policy is None:
        return TopK(0.875 if sparsity is None else sparsity)
    if not isinstance(policy, Policy):
        raise TypeError("policy must be a selection policy such as sparse_inductor.TopK(0.875), "
                        f"CumulativeMass(0.9), Window(1, 1, 1) or PerHead([...]); got {policy!r}")
    return policy


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, grid, *, tile, sparsity: float | None = None, policy=None,
                     query_keep: float = 1.0, scale: float | None = None, text_before=0, text_after=0,
                     key_padding_mask: Tensor | None = None, layout: TileLayout | None = None,
                     static_lists=None, record_as: str | None = None,
                     causal_block_size: int | None = None, forward_kernel: str | None = None) -> Tensor:
    """Block-sparse attention over ``[text_before | video T*H*W | text_after]`` tokens.

    ``q, k, v``: ``[B, H, L, D]``. Video query tiles attend to the video tiles the ``policy``
    (default ``TopK(sparsity)``) keeps and to all text; text queries attend to everything.
    ``query_keep < 1`` computes only some rows of each video tile (:mod:`.query_keep`).
    ``key_padding_mask`` (bool, ``[B, 1, 1, L]`` or ``[1, 1, 1, L]``, True = attend) hides keys, text
    or video, from every query (not from the coarse selection).
    ``causal_block_size`` (frames per causal block; video-only sequences, no key-padding mask)
    applies the block-causal mask of diffusion forcing: the selection is intersected with it and
    straddling tiles are masked per token (:func:`sparse_inductor.reference.causal_token_mask`).
    ``forward_kernel`` (``"auto"``, ``"gather"`` or ``"tma"``; ``None``: :data:`FORWARD_KERNEL`)
    picks the forward kernel as :func:`use_tma_forward` says.
    ``static_lists`` (``{static policy: (num, idx)}``) passes lists precomputed for this grid
    (graph constants of static patterns, so no selection runs for them). ``record_as`` (a site
    name) records the selection in an active :func:`sparse_inductor.stats` context; eager calls
    record without it whenever such a context is active.
    Inputs are assumed validated by the caller. ``layout`` may pass a cached layout (eager
    use); otherwise the index arithmetic is built here, which inside a compiled graph becomes
    part of the graph (symbolic sizes allowed).

    The gather kernels make no permuted copy of Q, K, V or the output: they gather and scatter
    rows through the layout's slot table. Where the compact TMA kernels run
    (:func:`use_tma_forward`), Q, K and V are permuted into compact tile-major order first (fused
    into their producer under ``torch.compile``, except Q and K when the policy reads the tile means:
    then one op permutes and pools them, ``ops.compact_pool``; gradients flow back through the
    permutation).
    Either way the output comes back laid out like ``q``, except with ``query_keep < 1`` on the TMA
    kernels, where it is the (contiguous) gather that gives dropped rows their centre's output.
    """
    policy = resolve_policy(policy, sparsity)
    query_keep = _compat.specialize_float(query_keep)  # one graph per value (not validated here)
    if layout is None:
        layout = build_layout(grid, tile, text_before, text_after, q.device)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    B, H = q.shape[:2]
    causal_block_size = effective_block_size(layout.grid, causal_block_size)
    if causal_block_size is not None and key_padding_mask is not None:
        raise ValueError("causal_block_size: a block-causal mask does not combine with a key-padding mask")
    if causal_block_size is not None and query_keep < 1.0 and tiles_split_blocks(layout.grid, layout.tile,
                                                                                  causal_block_size):
        raise ValueError(f"query_keep={query_keep} with causal_block_size={causal_block_size}: tile {layout.tile} "
                         f"holds frames of two causal blocks, so a dropped token would receive the output of a token "
                         f"that sees other keys; use query_keep=1.0 or a causal block size that is a multiple of "
                         f"the tile's {layout.tile[0]} frames")
    if key_padding_mask is None:
        kv_slots, kv_counts = layout.slots.expand(B, -1), layout.counts.expand(B, -1)
    else:
        kv_slots, kv_counts = _valid_keys_first(layout, key_padding_mask.expand(B, -1, -1, -1))
    tma = use_tma_forward(q, k, v, layout, policy, scale, query_keep, key_padding_mask, causal_block_size,
                          forward_kernel=forward_kernel)
    compact, means = None, None
    if tma and query_keep >= 1.0 and not policy.static and POOL_IN_PERMUTATION:
        # The policy reads the tile means: pool Q and K in the pass that permutes them (v28).
        compact = compact_layout(layout)
        q_compact, k_compact, q_mean, k_mean = _CompactPool.apply(q, k, layout, compact)
        means = (q_mean, k_mean)
    with torch.no_grad():
        kv_num_blocks, kv_indices = select_tiles(q.detach(), k.detach(), layout, policy, scale,
                                                 static_lists=static_lists, causal_block_size=causal_block_size,
                                                 means=means)
    # is_compiling() first: Dynamo cannot trace the ContextVar read in recording().
    if record_as is None and not torch.compiler.is_compiling() and recording():
        record_as = "eager"
    if tma:
        if record_as is not None:
            q_rows = layout.counts if query_keep >= 1.0 else num_kept(query_keep, layout.counts).to(torch.int32)
            kv_num_blocks = torch.ops.sparse_inductor.record_selection(
                kv_num_blocks, kv_indices, q_rows.expand(B, H, -1), layout.counts, layout.num_video_tiles,
                f"{record_as}|{policy.describe()}")
        qk_compact = None if compact is None else (compact, q_compact, k_compact)
        return _tma_attention(q, k, v, layout, kv_num_blocks, kv_indices, scale, query_keep, qk_compact)
    keep = None
    if query_keep < 1.0 and not _no_rows(B, H):
        keep = select_queries(q, layout, query_keep)
    if record_as is not None:
        q_rows = layout.counts.expand(B, H, -1) if keep is None else keep.rows_per_tile_counts()
        kv_num_blocks = torch.ops.sparse_inductor.record_selection(
            kv_num_blocks, kv_indices, q_rows, layout.counts, layout.num_video_tiles,
            f"{record_as}|{policy.describe()}")
    if keep is not None:
        q_slots, q_counts = keep.q_slots, keep.q_counts
        kv_num_blocks, kv_indices = keep.query_lists(kv_num_blocks, kv_indices)
    else:
        q_slots, q_counts = layout.slots.expand(B, H, -1), layout.counts.expand(B, H, -1)
    out, _ = ops.block_sparse_attention(q, k, v, q_slots, kv_slots, q_counts, kv_counts, kv_num_blocks, kv_indices,
                                        scale, tokens_per_block(layout.grid, causal_block_size))
    if keep is None:
        return out
    if _compat.functorch_grad_active() or _compat.has_forward_grad(out):
        # broadcast_centres' autograd.Function has no setup_context / jvp: the plain expression here
        # has the same gradient.
        centre_pos, _, _ = _centre_maps(layout, out.device)
        return torch.where(keep.kept.unsqueeze(-1), out, out.index_select(2, centre_pos))
    return broadcast_centres(out, keep)


def sparse_attention_static_layout(q: Tensor, k: Tensor, v: Tensor, counts: Tensor, gather_index: Tensor,
                                   scatter_index: Tensor, grid, *, tile, text_before: int = 0,
                                   text_after: int = 0, **kwargs) -> Tensor:
    """:func:`sparse_attention` with the layout's index tensors precomputed (static sizes).

    The compiler pass stores them as graph constants, so Inductor indexes with constant
    tensors instead of re-deriving them from index arithmetic.
    """
    from .layout import block_size_for

    S = block_size_for(tile)
    nt, nh, nw = (-(-g // t) for g, t in zip(grid, tile))
    layout = TileLayout(tuple(grid), tuple(tile), text_before, text_after, S, nt * nh * nw, counts.shape[0],
                        counts, gather_index, scatter_index)
    return sparse_attention(q, k, v, grid, tile=tile, text_before=text_before, text_after=text_after,
                            layout=layout, **kwargs)
