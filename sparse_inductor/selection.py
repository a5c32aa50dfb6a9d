"""The coarse stage (DESIGN.md §3.2): mean-pool Q and K per tile, score tiles, keep the top k.

Pooling and top-k are custom ops of :mod:`sparse_inductor.ops` (one Triton kernel each on
CUDA); the torch versions here are their CPU implementations and the tests' second opinion.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: Fractions (sparsity, query_keep) are read to 12 decimal places.
DECIMALS = 10**12


def decimal_numerator(fraction: float):
    """``floor(x · 10^12)``: ``x`` cut to 12 decimal places, as an integer (a SymInt while Dynamo
    traces a symbolic ``x``: a float argument of a compiled function that changed between calls,
    where ``Fraction(repr(x))`` cannot be traced). Cutting, not rounding: 2/3 must stay below
    0.666...667, or ``ceil(2/3 · 48)`` would be 33; a decimal like 0.7 is exact either way, since
    ``0.7 · 10^12`` rounds to 700000000000.0 in floats."""
    return math.floor(fraction * DECIMALS)


def num_selected(sparsity: float, num_kv_tiles):
    """``k = max(1, ceil((1 - sparsity) * num_kv_tiles))``.

    The kept share ``1 - sparsity`` cut to 12 decimal places (:func:`decimal_numerator`) and the
    ceiling in integer arithmetic, so ``num_kv_tiles`` may be a SymInt and the sparsity symbolic
    under Dynamo: the float64 reference's ``ceil(round((1 - s) · n, 9))`` for any sparsity of up to
    9 decimal places (``0.7`` is 7/10, so ``0.3 * 10`` is 3, not 4 from float noise) and for
    fractions like 1/3.
    """
    keep = decimal_numerator(1.0 - sparsity)
    if isinstance(num_kv_tiles, Tensor):
        num_kv_tiles = num_kv_tiles.long()  # (10^12 times a count overflows int32)
    k = (num_kv_tiles * keep + DECIMALS - 1) // DECIMALS
    if isinstance(k, Tensor):  # per-row counts (allowed tiles under a block-causal mask)
        return k.clamp(min=1).to(torch.int32)
    # Plain ints stay plain (Dynamo on torch 2.11 cannot trace sym_max over two ints).
    return max(k, 1) if isinstance(k, int) else torch.sym_max(k, 1)


def pool_tiles(x_tiles: Tensor, counts: Tensor, block_size: int) -> Tensor:
    """Mean over the valid tokens of each tile: ``[B, H, M * block, D] -> [B, H, M, D]``.

    Padding slots are excluded with ``where`` (not a multiply), so whatever they hold,
    NaN included, cannot leak into the mean. Accumulates in fp32 (fp64 for fp64 input).
    """
    B, H, N, D = x_tiles.shape
    M = counts.shape[0]
    dtype = torch.float64 if x_tiles.dtype == torch.float64 else torch.float32
    valid = torch.arange(block_size, device=x_tiles.device) < counts.view(M, 1)
    x = torch.where(valid.view(1, 1, M, block_size, 1), x_tiles.view(B, H, M, block_size, D).to(dtype), 0)
    return x.sum(3) / counts.view(1, 1, M, 1).to(dtype)


def top_k_tiles(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` highest scores along the last dim, ties to the lower index,
    returned in increasing index order (int32).

    NaN ranks below every number, ``-inf`` included (whatever its sign bit), so a NaN score is
    kept only when fewer than ``k`` scores of the row are numbers, lowest index first; ``-0.0``
    equals ``0.0``. The GPU kernel (``top_k_tiles_kernel``) follows the same order.
    """
    # A stable descending sort keeps equal scores in index order: deterministic ties.
    nan = torch.isnan(scores)
    if bool(nan.any()):  # torch's sort puts NaN above +inf: move it below -inf, keeping the order
        order = torch.sort(scores.masked_fill(nan, float("-inf")), dim=-1, descending=True, stable=True).indices
        order = order.gather(-1, torch.sort(nan.gather(-1, order).to(torch.int8), dim=-1, stable=True).indices)
    else:
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return torch.sort(order[..., :k], dim=-1).values.to(torch.int32)


def top_k_allowed_tiles(scores: Tensor, allowed: Tensor, k_rows: Tensor, width: int) -> Tensor:
    """Per row i of ``scores [..., Mq, M]``: the ``k_rows[i]`` highest scores among the columns
    ``allowed[i]`` holds (bool ``[Mq, M]``; ``k_rows`` int ``[Mq]``, at most the row's allowed
    count), ties to the lower column and NaN below every number as in :func:`top_k_tiles`;
    int32 ``[..., Mq, width]``, the kept columns first in increasing order, then zeros."""
    nan = torch.isnan(scores)
    order = torch.sort(scores.masked_fill(nan, float("-inf")), dim=-1, descending=True, stable=True).indices
    # Stable re-sorts by rank class: allowed numbers, then allowed NaN, then disallowed columns.
    rank = (nan.to(torch.int8) + 2 * (~allowed).to(torch.int8)).expand(scores.shape)
    order = order.gather(-1, torch.sort(rank.gather(-1, order), dim=-1, stable=True).indices)
    M = scores.shape[-1]
    kept = torch.arange(M, device=scores.device) < k_rows.unsqueeze(-1)
    cols = torch.sort(torch.where(kept, order, M), dim=-1).values[..., :width]
    return torch.where(cols < M, cols, 0).to(torch.int32).contiguous()


def restrict_to_allowed(num: Tensor, idx: Tensor, allowed: Tensor, full_rows: bool) -> tuple[Tensor, Tensor]:
    """Video lists ``(num [B, H, Mv], idx [B, H, Mv, W])`` under a block-causal mask: the listed
    tiles that ``allowed`` (bool ``[Mv, Mv]``) holds, plus each row's own tile, in increasing
    order, ``min(W + 1, Mv)`` wide (``full_rows``: rows may be full, every tile with no stored
    entries, e.g. ``Full()``; they are written out first). Static shapes, no host sync."""
    Mv = allowed.shape[-1]
    if full_rows:
        idx = explicit_lists(num, idx, Mv, always=True)
    W = idx.shape[-1]
    listed = torch.arange(W, device=idx.device) < num.unsqueeze(-1)
    rows = torch.arange(Mv, device=idx.device).view(Mv, 1)
    kept = listed & allowed[rows, idx.long().clamp(0, Mv - 1)]
    own = rows.to(idx.dtype).expand(*idx.shape[:-1], 1)
    has_own = (kept & (idx == own)).any(-1, keepdim=True)
    entries = torch.cat([torch.where(kept, idx, Mv), torch.where(has_own, Mv, own)], dim=-1)
    entries = torch.sort(entries, dim=-1).values[..., :min(W + 1, Mv)]
    valid = entries < Mv
    return valid.sum(-1, dtype=torch.int32), torch.where(valid, entries, 0).to(torch.int32).contiguous()


@dataclass(frozen=True)
class BlockSelection:
    """Which KV tiles each query tile attends to (FlexAttention's query-major convention).

    Attributes:
        kv_num_blocks: int32 ``[B, H, Mq]``, how many KV tiles each query tile keeps.
        kv_indices: int32 ``[B, H, Mq, K]``, the kept KV tiles in increasing order (the first
            ``kv_num_blocks`` entries of each row are meaningful). A *full* row, one whose
            ``kv_num_blocks`` equals the number of KV blocks, keeps every block and its entries
            are not read, so ``K`` may be narrower than that (text query blocks, DESIGN.md §3.5).
        counts: int32 ``[M]``, valid tokens per tile (tiles are shared by Q and KV).
        block_size: slots per tile in the tile-major layout.
        grid: the video grid ``(T, H, W)``.
        tile: the tile shape.
        query_counts: int32 ``[B, H, Mq]``, query rows computed per tile under ``query_keep``
            (``None``: every valid row).
    """

    kv_num_blocks: Tensor
    kv_indices: Tensor
    counts: Tensor
    block_size: int
    grid: tuple[int, int, int]
    tile: tuple[int, int, int]
    query_counts: Tensor | None = None

    def dense_mask(self) -> Tensor:
        """The selection as a bool ``[B, H, Mq, Mk]`` block mask."""
        return mask_from_lists(self.kv_num_blocks, self.kv_indices, self.counts.shape[-1])

    def kept_pairs(self) -> Tensor:
        """float64 ``[B, H]``: the query-key pairs computed (the attention FLOPs, up to a
        constant), from the lists: kept (query tile, KV tile) pairs weighted by the query rows
        computed and the valid keys."""
        counts = self.counts.to(torch.float64)
        rows = counts if self.query_counts is None else self.query_counts.to(torch.float64)
        keys = (self.dense_mask().to(torch.float64) * counts).sum(-1)  # [B, H, Mq]
        return (keys * rows).sum(-1)

    def kept_fraction(self) -> float:
        """Computed pairs over dense pairs (``1 - `` this is the attention FLOPs saved)."""
        n = float(self.counts.to(torch.float64).sum())
        B, H = self.kv_num_blocks.shape[:2]
        return float(self.kept_pairs().sum()) / (B * H * n * n)


def explicit_lists(num: Tensor, indices: Tensor, num_cols: int, always: bool = False) -> Tensor:
    """``indices`` with every full row (``num == num_cols``) written out as ``0 .. num_cols - 1``,
    widened to ``num_cols`` entries if it is narrower and has a full row (``always``: whether or
    not it has one, with no data-dependent branch, e.g. under ``torch.vmap``). For the CPU paths;
    the kernels read full rows without their entries."""
    full = num == num_cols
    if not always and indices.shape[-1] < num_cols and not bool(full.any()):
        return indices
    K = indices.shape[-1]
    if K < num_cols:
        indices = torch.cat([indices, indices.new_zeros(*indices.shape[:-1], num_cols - K)], dim=-1)
    every = torch.arange(indices.shape[-1], dtype=indices.dtype, device=indices.device)
    return torch.where(full.unsqueeze(-1), every, indices)


def mask_from_lists(num: Tensor, indices: Tensor, num_cols: int) -> Tensor:
    """``(num [B, H, R], indices [B, H, R, K])`` -> bool block mask ``[B, H, R, num_cols]``.
    Integer scatter-add of flags: deterministic, whatever the padding entries hold."""
    indices = explicit_lists(num, indices, num_cols)
    B, H, R, K = indices.shape
    listed = torch.arange(K, device=indices.device) < num.unsqueeze(-1)
    hits = torch.zeros((B, H, R, num_cols), dtype=torch.int32, device=indices.device)
    hits.scatter_add_(-1, torch.where(listed, indices, 0).long(), listed.to(torch.int32))
    return hits > 0


def lists_from_mask(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Bool block mask ``[B, H, R, C]`` -> ``(num [B, H, R], indices [B, H, R, C])`` int32,
    each row's kept columns first in increasing order (a stable sort, so deterministic)."""
    num = mask.sum(-1, dtype=torch.int32)
    indices = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return num, indices.contiguous()


def select_tiles(q: Tensor, k: Tensor, layout, policy, scale: float, *, static_lists=None,
                 causal_block_size: int | None = None, means=None) -> tuple[Tensor, Tensor]:
    """The coarse stage on sequence-order ``q, k`` (``[B, H, L, D]``) under a selection
    ``policy`` (:mod:`sparse_inductor.policies`). Returns ``(kv_num_blocks, kv_indices)``.

    The policy chooses the video KV tiles of each video query tile (``static_lists``,
    ``{static policy: (num, idx)}``, are precomputed lists: graph constants). Text blocks are then added
    as DESIGN.md §3.5 says: every video row lists its video tiles and then every text block;
    text query blocks keep every block as full rows; a skipped head's rows keep nothing. So the
    lists are ``policy width + text blocks`` wide, not as wide as the number of blocks.

    ``causal_block_size`` (frames per causal block; video-only sequences): under that
    block-causal mask the policy chooses among each row's allowed tiles (its budget counts only
    them), then every row's list is intersected with the allowed tiles and gets its own tile
    (:func:`sparse_inductor.reference.causal_token_mask` has the rules); lists are one entry wider.

    ``means``: the tile means ``(q_mean, k_mean)`` if the caller has them already (the compact TMA
    path pools in its permutation pass, ``ops.compact_pool``); else they are pooled here when the
    policy asks.
    """
    from .causal import allowed_tiles, effective_block_size
    from .policies import SelectionContext
    from .policies.base import flags_tensor

    S, Mv, M = layout.block_size, layout.num_video_tiles, layout.num_tiles
    B, H = q.shape[:2]
    device = q.device
    counts = layout.counts[:Mv]
    def pooled():  # only policies that read q and k pay for the pooling
        return torch.ops.sparse_inductor.pool_tiles(q, k, layout.slots[: Mv * S], counts)

    causal_block_size = effective_block_size(layout.grid, causal_block_size)
    allowed = None
    if causal_block_size is not None:
        if _has_text(layout):
            raise ValueError("causal_block_size: a block-causal mask is supported on video-only attention "
                             "(no text tokens)")
        allowed = allowed_tiles(layout.grid, layout.tile, causal_block_size, device)
    ctx = SelectionContext(grid=layout.grid, tile=layout.tile, counts=counts, scale=scale, batch=B, heads=H,
                           device=device, means=pooled if means is None else means, static_lists=static_lists,
                           allowed=allowed)
    num, idx = policy.lists(ctx)
    W = idx.shape[-1]
    if isinstance(W, int) and W == 0:  # e.g. every head Full or Skip: rows store no entries
        idx, W = idx.new_zeros(*idx.shape[:-1], 1), 1
    num, idx = num.expand(B, H, Mv), idx.expand(B, H, Mv, W)
    if allowed is not None:
        # The common path of every policy: static patterns and Full are intersected here, and
        # every row gets its own tile (budget policies already chose among allowed tiles only).
        num, idx = restrict_to_allowed(num, idx, allowed, full_rows=_may_have_full_rows(policy))
    skip = policy.skip_heads(H)
    skipped = flags_tensor(skip, device).view(1, H, 1) if any(skip) else None
    if not _has_text(layout):
        if skipped is not None:
            num = torch.where(skipped, 0, num)
        return num.to(torch.int32).contiguous(), idx.contiguous()
    # Video rows: their video tiles, then every text block (numbered after the video tiles, so a
    # row stays increasing); a row with all video tiles becomes a full row. Text rows are full
    # rows: every block, no entries.
    Mt = M - Mv
    cols = torch.arange(W + Mt, device=device, dtype=torch.int32)
    n = num.unsqueeze(-1)
    padded = torch.cat([idx, idx.new_zeros(B, H, Mv, Mt)], dim=-1)
    video_rows = torch.where(cols < n, padded, torch.where(cols < n + Mt, Mv + cols - n, 0))
    text_rows = torch.zeros((B, H, Mt, W + Mt), dtype=torch.int32, device=device)
    kv_indices = torch.cat([video_rows.to(torch.int32), text_rows], dim=2).contiguous()
    kv_num_blocks = torch.cat([num + Mt, torch.full((B, H, Mt), M, dtype=num.dtype, device=device)], dim=2)
    if skipped is not None:
        kv_num_blocks = torch.where(skipped, 0, kv_num_blocks)
    return kv_num_blocks.to(torch.int32).contiguous(), kv_indices


def _may_have_full_rows(policy) -> bool:
    """Whether ``policy`` may yield full rows (``Full()`` anywhere in it)."""
    from .policies import Full

    if isinstance(policy, Full):
        return True
    members = getattr(policy, "policies", None) or getattr(policy, "members", None) or ()
    return any(_may_have_full_rows(m) for m in members)


def _has_text(layout) -> bool:
    lengths = (layout.text_before, layout.text_after)
    return not all(isinstance(n, int) and n == 0 for n in lengths)
