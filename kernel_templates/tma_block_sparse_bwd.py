"""The backward of the compact tile-major TMA block-sparse forward (:mod:`kernel_templates.tma_block_sparse`).

Computes ``(dQ, dK, dV)``, the exact gradient of the forward's definition (DESIGN.md §3: softmax
attention of each query row over the tokens of its query tile's listed KV tiles, per head; a row
listing nothing has output 0 and LSE -inf and contributes nothing), given the incoming gradient
``dO`` (and optionally ``dLSE``), the forward's output ``O`` and its natural-log LSE. By default
the FlashAttention-2 split into two kernels, no atomics (so deterministic); optionally dQ fused
into the dK/dV kernel by atomic adds:

- ``delta = rowsum(O * dO) - dLSE`` (fp32, ``[B, H, L]``) is one torch pass before the kernels
  (a gradient on LSE folds into delta: ``d lse / d s`` is the softmax row). It is a small
  memory-bound reduction; folding it into the dQ kernel would need a second pass over O there.
- **dQ** (:func:`_tma_packed_bwd_dq`): one program per (query tile, batch * head). It walks the
  tile's KV box lists exactly as the forward does (:func:`sparse_inductor.compact_layout.kv_boxes_by_class`,
  class by class: full boxes unmasked, then whole boxes, half-box pairs and quarter-box quads,
  ``BLOCK`` columns a step), recomputes ``P = exp2(S * scale * log2e - LSE * log2e)`` from the LSE
  (no online softmax), ``dP = dO Vᵀ``, ``dS = P ∘ (dP - delta)``, ``dQ += dS K``, and stores
  ``dQ * scale`` for the tile's own rows.
- **dK/dV** (:func:`_tma_packed_bwd_dkdv`): one program per (KV tile, batch * head). It walks the
  query tiles that list this KV tile (the kv-major transpose,
  :func:`sparse_inductor.ops.transpose_block_lists`), turned into query boxes by the same
  ``kv_boxes_by_class`` (it maps lists of tiles to boxes whatever the tiles stand for; adjacent
  query tiles merge into full boxes), so a 16-token border query tile costs a quarter box, not a
  ``BLOCK``-row step. Per box: ``Sᵀ = K Qᵀ``, ``Pᵀ``, ``dV += Pᵀ dO``, ``dPᵀ = V dOᵀ``,
  ``dSᵀ = Pᵀ ∘ (dPᵀ - deltaᵀ)``, ``dK += dSᵀ Q``; stores ``dK * scale`` and ``dV`` for the tile's
  own rows.
- **Fused dQ** (``dq_mode="atomic"`` / ``"atomic_tma"``, benchmarks/NOTES.md v22): the dQ kernel is
  not launched; the dK/dV kernel also computes each query box's partial ``dQᵀ = Kᵀ dSᵀ`` (fp32
  ``[D, BOX]``; 5 matmuls per (query box, KV tile) pair instead of the split's 7) and adds it into a zeroed fp32
  ``[B, H, L, D]`` buffer, by ``tl.atomic_add`` on the box's valid rows ("atomic", which the
  interpreter runs) or by one TMA reduce-add of the box (``cp.reduce.async.bulk.tensor``,
  "atomic_tma"; rows past the count get exactly +-0, :func:`_add_dq`); then one pass
  ``dq = acc * scale`` cast to the input dtype. The program's own K rows past its count (the next
  tile's) are zeroed and ``dSᵀ``'s selected, since a dQ row sums over KV rows. **Not
  deterministic**: the fp32 adds land in any order, so callers pick "separate" while
  ``torch.are_deterministic_algorithms_enabled()`` (:func:`backward_dq_mode`). At D = 128 (sm_90a,
  Triton 3.6, 4 warps) only the ``dkdv_variant="half_steps"`` form (``BLOCK / 2``-row query steps)
  keeps 2 programs per SM: with "atomic_tma" 255 registers and no spill; with "atomic" a 24-byte
  spill (4 spill instructions in the quarter-box loop only); "default" and "two_pass" fused spill
  or need one program per SM (NOTES v22). Not yet run on a GPU.

**Layout.** Every tensor is ``[B, H, L, D]`` in compact tile-major order
(:func:`~sparse_inductor.compact_layout.to_compact`; tile ``j`` holds rows ``[off_j, off_j + n_j)``,
no gaps), contiguous, loaded through host ``TensorDescriptor`` s over ``[B * H, L, D]`` with boxes
of ``BLOCK``, ``BLOCK / 2`` and ``BLOCK / 4`` rows, per-head extent ``L`` (TMA fills zeros past
``L``, never the next head's rows). LSE, delta and the results are in the same compact order.

**Masks.** A box's rows past its valid count are real rows of the next tile, so they must be
masked: in dQ the KV columns of every non-full box are set to ``P = 0`` (a select, so an overflow
to inf there is dropped, not multiplied); in dK/dV the query rows of a box past its count read
``LSE = +inf`` (a masked load), which gives ``P = exp2(finite - inf) = 0`` exactly, and delta 0,
so they add exactly 0 with no mask on the ``[BLOCK, BOX]`` scores. A row whose LSE is -inf (its
tile lists nothing) is read as +inf too, so its ``P`` is 0, never ``exp2(-inf + inf)`` = NaN:
its dQ is 0 and it adds nothing (defensive: with the forward's own LSE such a row has no KV boxes
in dQ and is in no transposed list, so the guard is not reached in scope). Each program computes all ``BLOCK`` rows of its own tile's box and
stores only its tile's rows (masked stores), as the forward does. Rows of a program are
independent in the results (a row of dQ depends on its own q, dO, LSE, delta; a row of dK, dV on
its own k, v), so the extra rows cannot leak into stored ones.

Both kernels keep the forward's branch-free class loops (the unused places of a step's group load
the class's last box again with no valid row), fp32 accumulators, P and dS rounded to the input
dtype before their MMAs (flash-style), and the forward's ``_mma`` (fp32 operands under the
interpreter, whose ``tl.dot`` multiplies bf16 bit patterns; IEEE dots for fp32 inputs).

Launch: ``num_warps`` 4, ``num_stages`` 2 by default (not tuned: no GPU timing yet). Compiled for
sm_90a on CPU with Triton 3.6 (bf16, BLOCK 64, 4 warps): dQ 199 registers at D = 128 (154 at 64),
no spills; dK/dV 255 registers at D = 128 with a 4-byte spill (200 at 64, none): two fp32
``[BLOCK, D]`` accumulators plus the ``[BLOCK, BOX]`` scores; K and V stay in shared memory (SS
wgmma), P and dS feed their MMAs from registers. The spill is outside the loop steps (none of
their instructions touches local memory) and 2 programs of 4 warps fit an SM either way (shared
memory allows 2 at D = 128), so ``dkdv_variant`` (:data:`DKDV_VARIANTS`) offers compiled variants
that use fewer registers rather than replacing the default (benchmarks/NOTES.md v20,
``benchmarks/sass_backward.py``).

query_keep (v23, ``q_layout``): the query side (Q, dO, LSE, delta, dQ) on the kept layout, the KV
side on the full compact one; dQ runs unchanged on the kept tiles, the dK/dV kernel walks query
boxes over kept rows (``LQ``, their row stride, a separate argument whose default ``None`` leaves
the default path's sm_90a SASS byte-identical).

128-slot tiles (v26): the wrapper runs each as two 64-slot tiles (``split_tiles``,
:func:`sparse_inductor.compact_layout.half_tiles` and ``half_tile_lists``): the same pairs of rows, so
the same gradients, at the 64-row programs' register budget (the kernels' own 128-row programs are
correct but 2.7-4.5x slower on the H200, NOTES v26).

Out of scope (as in the forward): text blocks (joint attention), key padding,
block-causal masks, full rows stored without entries, device-side descriptors, second-order
gradients. Inputs are assumed finite: a non-finite value in a masked row of a box (another tile's)
would reach the results through ``0 * inf`` in the MMAs, as in the forward.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kernel_templates.tma_block_sparse import _check, _descriptor, _load_box, _mma, _own_rows
from sparse_inductor.compact_layout import MIN_BOX, CompactLayout, half_tile_lists, half_tiles, kv_boxes_by_class

LOG2E = 1.4426950408889634

#: ``dkdv_variant`` of :func:`tma_packed_block_sparse_attention_backward`: how the dK/dV kernel is
#: compiled (benchmarks/NOTES.md v20; ``benchmarks/sass_backward.py`` prints their registers).
#: "default": the kernel as described above. "half_boxes": each ``BLOCK``-row query box (full and
#: whole classes) as two ``BLOCK / 2``-row halves, scores ``[BLOCK, BLOCK / 2]``. "two_pass": the
#: kernel twice, once accumulating only dV (``Sᵀ``, ``Pᵀ``, ``dV``), once only dK (``Sᵀ`` again,
#: ``dPᵀ``, ``dK``): one fp32 ``[BLOCK, D]`` accumulator each, ``Sᵀ`` computed twice.
#: "stats_in_acc": LSE and delta start the score MMAs' accumulators (:func:`_dkdv_box`).
#: "half_steps": every step takes ``BLOCK / 2`` query rows: a ``BLOCK``-row box is two steps, a half
#: box one, quarter boxes two a step (:func:`_dkdv_half_steps`; v22, for the fused dQ).
DKDV_VARIANTS = ("default", "half_boxes", "two_pass", "stats_in_acc", "half_steps")

#: ``dq_mode`` of :func:`tma_packed_block_sparse_attention_backward` (benchmarks/NOTES.md v22).
#: "separate": dQ by its own kernel (deterministic). "atomic": no dQ kernel; the dK/dV kernel also
#: computes each query box's dQ partial and adds it into an fp32 buffer with ``tl.atomic_add`` (not
#: deterministic: the order of the float additions varies from run to run). "atomic_tma": the same
#: with one TMA reduce-add per box through a tensor descriptor (sm_90; the Triton interpreter has no
#: descriptor reduce, so it is not run on CPU).
DQ_MODES = ("separate", "atomic", "atomic_tma")
#: ``FUSE_DQ`` of the dK/dV kernel for each ``dq_mode``.
_FUSE_DQ = {"separate": 0, "atomic": 1, "atomic_tma": 2}
#: The ``dkdv_variant`` s the fused dQ is built and tested with (NOTES v22: "half_steps" is the one
#: out of spills at D = 128; "default" is the plain fused kernel, "two_pass" fuses dQ into its dK pass).
ATOMIC_VARIANTS = ("half_steps", "default", "two_pass")


# ---------------------------------------------------------------------------------------------
# Shared
# ---------------------------------------------------------------------------------------------
@triton.jit
def _row_stats(LSE, DELTA, offs, valid):
    """Base-2 LSE and delta of query rows ``offs`` (flat ``[B * H * L]`` offsets). Rows not
    ``valid`` and rows with LSE -inf (nothing listed) read LSE +inf, so their P is exactly 0."""
    lse2 = tl.load(LSE + offs, mask=valid, other=float("inf")) * 1.4426950408889634
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    return lse2, tl.load(DELTA + offs, mask=valid, other=0.0)


@triton.jit
def _store_rows(X, bh, L, start, mine, x, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Store the tile's own rows (``mine``) of a ``BLOCK``-row result at compact row ``start``:
    the box's other rows are the next tile's, which a TMA store of the box would overwrite."""
    rows = bh.to(tl.int64) * L + start + tl.arange(0, BLOCK)
    ptrs = X + rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(ptrs, x.to(X.dtype.element_ty), mask=mine[:, None])


# ---------------------------------------------------------------------------------------------
# dQ: one program per (query tile, batch * head), walking the tile's KV boxes
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dq_box(q, do, lse2, delta, k, v, valid, dq, qk_scale, MASKED: tl.constexpr, UPCAST: tl.constexpr,
            IEEE: tl.constexpr):
    """dQ (unscaled) contribution of one KV box; its columns past the box's count are not the
    listed tile's (``MASKED``)."""
    if MASKED:
        # The box's rows past its count are the next tile's and may hold anything: K's are zeroed
        # (a select; 0 * inf in dS K would be NaN), and dS is selected below, which covers V's.
        k = _own_rows(k, valid)
    p = tl.math.exp2(_mma(q, tl.trans(k), None, UPCAST, IEEE) * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(valid[None, :], p, 0.0)
    ds = p * (_mma(do, tl.trans(v), None, UPCAST, IEEE) - delta[:, None])
    if MASKED:
        ds = tl.where(valid[None, :], ds, 0.0)
    return _mma(ds.to(k.dtype), k, dq, UPCAST, IEEE)


@triton.jit
def _dq_class(q, do, lse2, delta, dq, k_desc, v_desc, bh, starts, rows, start, stop, qk_scale,
              BOX: tl.constexpr, GROUP: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
              UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """The KV box-list entries ``[start, stop)`` of one class, ``GROUP`` boxes of ``BOX`` rows a
    step (the forward's steps: the step's loads are issued before its MMAs)."""
    for e in range(start, stop, GROUP):
        k0, v0, valid0 = _load_box(k_desc, v_desc, bh, starts, rows, e, stop, BOX, HEAD_DIM)
        if GROUP >= 2:
            k1, v1, valid1 = _load_box(k_desc, v_desc, bh, starts, rows, e + 1, stop, BOX, HEAD_DIM)
        if GROUP == 4:
            k2, v2, valid2 = _load_box(k_desc, v_desc, bh, starts, rows, e + 2, stop, BOX, HEAD_DIM)
            k3, v3, valid3 = _load_box(k_desc, v_desc, bh, starts, rows, e + 3, stop, BOX, HEAD_DIM)
        dq = _dq_box(q, do, lse2, delta, k0, v0, valid0, dq, qk_scale, MASKED, UPCAST, IEEE)
        if GROUP >= 2:
            dq = _dq_box(q, do, lse2, delta, k1, v1, valid1, dq, qk_scale, MASKED, UPCAST, IEEE)
        if GROUP == 4:
            dq = _dq_box(q, do, lse2, delta, k2, v2, valid2, dq, qk_scale, MASKED, UPCAST, IEEE)
            dq = _dq_box(q, do, lse2, delta, k3, v3, valid3, dq, qk_scale, MASKED, UPCAST, IEEE)
    return dq


@triton.jit
def _tma_packed_bwd_dq(q_desc, do_desc, k_desc, v_desc, k_half_desc, v_half_desc, k_quarter_desc, v_quarter_desc,
                       LSE, DELTA, DQ, BOX_STARTS, BOX_ROWS, CLASS_ENDS, TILE_OFFSETS, COUNTS, L, M, MAX_LIST,
                       qk_scale, sm_scale, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, UPCAST: tl.constexpr,
                       IEEE: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    q_start = tl.load(TILE_OFFSETS + tile)
    q = q_desc.load([bh, q_start, 0]).reshape(BLOCK, HEAD_DIM)
    do = do_desc.load([bh, q_start, 0]).reshape(BLOCK, HEAD_DIM)
    mine = tl.arange(0, BLOCK) < tl.load(COUNTS + tile)
    lse2, delta = _row_stats(LSE, DELTA, bh.to(tl.int64) * L + q_start + tl.arange(0, BLOCK), mine)
    dq = tl.zeros([BLOCK, HEAD_DIM], tl.float32)

    row = bh * M + tile
    starts = BOX_STARTS + row * MAX_LIST
    rows = BOX_ROWS + row * MAX_LIST
    full_end = tl.load(CLASS_ENDS + row * 4)
    whole_end = tl.load(CLASS_ENDS + row * 4 + 1)
    half_end = tl.load(CLASS_ENDS + row * 4 + 2)
    quarter_end = tl.load(CLASS_ENDS + row * 4 + 3)
    dq = _dq_class(q, do, lse2, delta, dq, k_desc, v_desc, bh, starts, rows, 0, full_end, qk_scale, BLOCK, 1, False,
                   HEAD_DIM, UPCAST, IEEE)
    dq = _dq_class(q, do, lse2, delta, dq, k_desc, v_desc, bh, starts, rows, full_end, whole_end, qk_scale, BLOCK, 1,
                   True, HEAD_DIM, UPCAST, IEEE)
    if BLOCK // 2 >= 16:
        dq = _dq_class(q, do, lse2, delta, dq, k_half_desc, v_half_desc, bh, starts, rows, whole_end, half_end,
                       qk_scale, BLOCK // 2, 2, True, HEAD_DIM, UPCAST, IEEE)
    if BLOCK // 4 >= 16:
        dq = _dq_class(q, do, lse2, delta, dq, k_quarter_desc, v_quarter_desc, bh, starts, rows, half_end,
                       quarter_end, qk_scale, BLOCK // 4, 4, True, HEAD_DIM, UPCAST, IEEE)
    # The score scale is applied once here rather than to dS in every step.
    _store_rows(DQ, bh, L, q_start, mine, dq * sm_scale, BLOCK, HEAD_DIM)


# ---------------------------------------------------------------------------------------------
# dK, dV: one program per (KV tile, batch * head), walking the query boxes that list the tile
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dkdv_box(k, v, q, do, valid, start, LSE, DELTA, stats, dk, dv, qk_scale, BOX: tl.constexpr,
              UPCAST: tl.constexpr, IEEE: tl.constexpr, DO_DK: tl.constexpr = True, DO_DV: tl.constexpr = True,
              STATS_IN_ACC: tl.constexpr = False, DQ_TO=None, bh=None, mine=None, FUSE_DQ: tl.constexpr = 0):
    """dK (unscaled) and dV contributions of one query box at compact row ``start``; its rows past
    the box's count (not ``valid``) read LSE +inf (:func:`_row_stats`), so they add exactly 0.

    ``DO_DK`` / ``DO_DV``: which of the two results this program accumulates (both by default;
    ``dkdv_variant="two_pass"`` runs the kernel once for each). ``STATS_IN_ACC``
    (``dkdv_variant="stats_in_acc"``): the row statistics start the two score MMAs' accumulators,
    ``Sᵀ - LSE / (scale log2e)`` and ``dPᵀ - deltaᵀ``, instead of being applied after them, so the
    ``BOX`` columns of LSE and delta each thread holds are dead before the MMAs are issued (an LSE
    of +inf starts the accumulator at -inf, so P is still exactly 0).

    ``FUSE_DQ`` (``dq_mode`` "atomic" 1 / "atomic_tma" 2, with ``DO_DK``): the box's dQ partial is
    computed too, transposed, ``dQᵀ = Kᵀ dSᵀ`` (unscaled, fp32 ``[D, BOX]``: an MMA of M = D, so
    wgmma takes it whatever ``BOX``, where ``dS K`` has M = ``BOX`` < 64 for half and quarter
    boxes), and added into the fp32 accumulator ``DQ_TO`` (:func:`_add_dq`). ``dSᵀ``'s rows that are
    not the program's tile's (not ``mine``: the next tile's keys, in a partial tile) are selected to
    0 first: their P is not 0 (those keys are not in the query rows' LSE), and a dQ row sums over the
    KV rows, where a dK or dV row does not (the kernel zeroes those rows of K as well)."""
    lse2, delta = _row_stats(LSE, DELTA, stats + start + tl.arange(0, BOX), valid)
    if STATS_IN_ACC:
        s_acc = tl.zeros([k.shape[0], BOX], tl.float32) - (lse2 / qk_scale)[None, :]
        p_t = tl.math.exp2(_mma(k, tl.trans(q), s_acc, UPCAST, IEEE) * qk_scale)
    else:
        p_t = tl.math.exp2(_mma(k, tl.trans(q), None, UPCAST, IEEE) * qk_scale - lse2[None, :])
    if DO_DV:
        dv = _mma(p_t.to(do.dtype), do, dv, UPCAST, IEEE)
    if DO_DK:
        if STATS_IN_ACC:
            dp_acc = tl.zeros([k.shape[0], BOX], tl.float32) - delta[None, :]
            ds_t = p_t * _mma(v, tl.trans(do), dp_acc, UPCAST, IEEE)
        else:
            ds_t = p_t * (_mma(v, tl.trans(do), None, UPCAST, IEEE) - delta[None, :])
        if FUSE_DQ != 0:
            ds_t = tl.where(mine[:, None], ds_t, 0.0)
        dk = _mma(ds_t.to(q.dtype), q, dk, UPCAST, IEEE)
        if FUSE_DQ != 0:
            _add_dq(DQ_TO, bh, stats, start, valid, _mma(tl.trans(k), ds_t.to(q.dtype), None, UPCAST, IEEE), BOX,
                    k.shape[1], FUSE_DQ)
    return dk, dv


@triton.jit
def _add_dq(DQ_TO, bh, stats, start, valid, dq_t, BOX: tl.constexpr, HEAD_DIM: tl.constexpr,
            FUSE_DQ: tl.constexpr):
    """Add a query box's dQ partial, transposed (``dq_t``, fp32 ``[D, BOX]``, the box at compact row
    ``start``), into the fp32 ``[B * H, L, D]`` accumulator.

    ``FUSE_DQ`` 1: ``tl.atomic_add`` on pointers (one scalar base, constant offsets), the box's
    valid rows only; relaxed: the sum needs no ordering, only each add to be atomic. 2: one TMA
    reduce-add (``cp.reduce.async.bulk.tensor``) of the whole box through descriptor ``DQ_TO``
    (rows past ``L`` are clipped by TMA). The box's rows past its count are the next tile's rows in
    compact order, and the reduce adds exactly +-0.0 to them, which changes no value (x + -0.0 = x;
    +0.0 only turns a -0.0 into +0.0): such a query row reads LSE +inf and delta 0
    (:func:`_row_stats`), so its column of ``Pᵀ`` is exp2(finite - inf) = 0 and its column of ``dSᵀ``
    is 0 * (finite - 0) = +-0 (rounded to +-0 in bf16), and its dQ row is a sum of +-0 times the
    program's K rows, finite (the foreign ones are zeroed). The same holds for the unused places of a
    step's group (they reload the class's last box with count 0). It needs Q and dO finite in those
    rows (another tile's: the v21 gap of this kernel), as the dK/dV results already do."""
    if FUSE_DQ == 1:
        base = DQ_TO + (stats + start) * HEAD_DIM
        ptrs = base + (tl.arange(0, BOX)[None, :] * HEAD_DIM + tl.arange(0, HEAD_DIM)[:, None])
        tl.atomic_add(ptrs, dq_t, mask=valid[None, :], sem="relaxed")
    else:
        DQ_TO.atomic_add([bh, start, 0], tl.trans(dq_t).reshape(1, BOX, HEAD_DIM))


@triton.jit
def _box_start(starts, e, stop):
    # The compact row of entry ``e``'s box, clamped as _load_box clamps its entry.
    return tl.load(starts + tl.minimum(e, stop - 1))


@triton.jit
def _dkdv_class(k, v, dk, dv, q_desc, do_desc, LSE, DELTA, stats, bh, starts, rows, start, stop, qk_scale,
                BOX: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
                IEEE: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr, STATS_IN_ACC: tl.constexpr,
                DQ_TO=None, mine=None, FUSE_DQ: tl.constexpr = 0):
    """The query box-list entries ``[start, stop)`` of one class, ``GROUP`` boxes of ``BOX`` rows
    (``BLOCK`` query rows) a step; ``DQ_TO``, ``mine``, ``FUSE_DQ``: :func:`_dkdv_box`'s."""
    for e in range(start, stop, GROUP):
        # _load_box of Q and dO: the same box walk as the forward's K and V.
        q0, do0, valid0 = _load_box(q_desc, do_desc, bh, starts, rows, e, stop, BOX, HEAD_DIM)
        if GROUP >= 2:
            q1, do1, valid1 = _load_box(q_desc, do_desc, bh, starts, rows, e + 1, stop, BOX, HEAD_DIM)
        if GROUP == 4:
            q2, do2, valid2 = _load_box(q_desc, do_desc, bh, starts, rows, e + 2, stop, BOX, HEAD_DIM)
            q3, do3, valid3 = _load_box(q_desc, do_desc, bh, starts, rows, e + 3, stop, BOX, HEAD_DIM)
        dk, dv = _dkdv_box(k, v, q0, do0, valid0, _box_start(starts, e, stop), LSE, DELTA, stats, dk, dv, qk_scale,
                           BOX, UPCAST, IEEE, DO_DK, DO_DV, STATS_IN_ACC, DQ_TO, bh, mine, FUSE_DQ)
        if GROUP >= 2:
            dk, dv = _dkdv_box(k, v, q1, do1, valid1, _box_start(starts, e + 1, stop), LSE, DELTA, stats, dk, dv,
                               qk_scale, BOX, UPCAST, IEEE, DO_DK, DO_DV, STATS_IN_ACC, DQ_TO, bh, mine, FUSE_DQ)
        if GROUP == 4:
            dk, dv = _dkdv_box(k, v, q2, do2, valid2, _box_start(starts, e + 2, stop), LSE, DELTA, stats, dk, dv,
                               qk_scale, BOX, UPCAST, IEEE, DO_DK, DO_DV, STATS_IN_ACC, DQ_TO, bh, mine, FUSE_DQ)
            dk, dv = _dkdv_box(k, v, q3, do3, valid3, _box_start(starts, e + 3, stop), LSE, DELTA, stats, dk, dv,
                               qk_scale, BOX, UPCAST, IEEE, DO_DK, DO_DV, STATS_IN_ACC, DQ_TO, bh, mine, FUSE_DQ)
    return dk, dv


@triton.jit
def _dkdv_class_halved(k, v, dk, dv, q_half_desc, do_half_desc, LSE, DELTA, stats, bh, starts, rows, start, stop,
                       qk_scale, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
                       IEEE: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr, STATS_IN_ACC: tl.constexpr):
    """``dkdv_variant="half_boxes"``: the ``BLOCK``-row query box-list entries ``[start, stop)``,
    each as its two ``BLOCK / 2``-row halves (both loaded, then both computed), so the scores of a
    box are two ``[BLOCK, BLOCK / 2]`` tiles, one live at a time. A half's rows past the box's count
    are masked through the LSE as a box's are (the second half of a short box adds exactly 0)."""
    HALF: tl.constexpr = BLOCK // 2
    for e in range(start, stop):
        row0 = tl.load(starts + e)
        count = tl.load(rows + e)
        q0 = q_half_desc.load([bh, row0, 0]).reshape(HALF, HEAD_DIM)
        do0 = do_half_desc.load([bh, row0, 0]).reshape(HALF, HEAD_DIM)
        q1 = q_half_desc.load([bh, row0 + HALF, 0]).reshape(HALF, HEAD_DIM)
        do1 = do_half_desc.load([bh, row0 + HALF, 0]).reshape(HALF, HEAD_DIM)
        dk, dv = _dkdv_box(k, v, q0, do0, tl.arange(0, HALF) < count, row0, LSE, DELTA, stats, dk, dv, qk_scale,
                           HALF, UPCAST, IEEE, DO_DK, DO_DV, STATS_IN_ACC)
        dk, dv = _dkdv_box(k, v, q1, do1, tl.arange(0, HALF) + HALF < count, row0 + HALF, LSE, DELTA, stats, dk, dv,
                           qk_scale, HALF, UPCAST, IEEE, DO_DK, DO_DV, STATS_IN_ACC)
    return dk, dv


@triton.jit
def _dkdv_half_steps(k, v, dk, dv, q_half_desc, do_half_desc, LSE, DELTA, stats, bh, starts, rows, whole_end,
                     half_end, qk_scale, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
                     IEEE: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr, DQ_TO=None, mine=None,
                     FUSE_DQ: tl.constexpr = 0):
    """``dkdv_variant="half_steps"``: the full, whole and half classes' entries ``[0, half_end)`` as
    one loop of ``BLOCK / 2``-row query steps: a ``BLOCK``-row box (entries before ``whole_end``)
    is two steps, its halves; a half box one. So a step's scores are ``[BLOCK, BLOCK / 2]`` and a
    fused dQ partial ``[D, BLOCK / 2]`` (what keeps the fused kernel out of spills, NOTES v22),
    and only one half box of Q and dO per pipeline stage is in shared memory. A second half's rows
    past its box's count (a whole box of at most ``BLOCK / 2`` rows) add exactly 0, as any masked
    row does."""
    HALF: tl.constexpr = BLOCK // 2
    for s in range(0, whole_end + half_end):
        # Steps [0, 2 * whole_end) are the halves of the BLOCK-row boxes, the rest one half box each.
        split = s < 2 * whole_end
        e = tl.where(split, s // 2, s - whole_end)
        part = tl.where(split, s % 2, 0)
        row0 = tl.load(starts + e) + part * HALF
        count = tl.load(rows + e) - part * HALF
        q0 = q_half_desc.load([bh, row0, 0]).reshape(HALF, HEAD_DIM)
        do0 = do_half_desc.load([bh, row0, 0]).reshape(HALF, HEAD_DIM)
        dk, dv = _dkdv_box(k, v, q0, do0, tl.arange(0, HALF) < count, row0, LSE, DELTA, stats, dk, dv, qk_scale,
                           HALF, UPCAST, IEEE, DO_DK, DO_DV, False, DQ_TO, bh, mine, FUSE_DQ)
    return dk, dv


@triton.jit
def _tma_packed_bwd_dkdv(k_desc, v_desc, q_desc, do_desc, q_half_desc, do_half_desc, q_quarter_desc,
                         do_quarter_desc, LSE, DELTA, DK, DV, BOX_STARTS, BOX_ROWS, CLASS_ENDS, TILE_OFFSETS, COUNTS,
                         L, M, MAX_LIST, qk_scale, sm_scale, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                         UPCAST: tl.constexpr, IEEE: tl.constexpr, DO_DK: tl.constexpr = True,
                         DO_DV: tl.constexpr = True, HALF_BOXES: tl.constexpr = False,
                         STATS_IN_ACC: tl.constexpr = False, HALF_STEPS: tl.constexpr = False, DQ_ACC=None,
                         dq_acc_half_desc=None, dq_acc_quarter_desc=None, FUSE_DQ: tl.constexpr = 0, LQ=None):
    # The constexpr flags select dkdv_variant (DKDV_VARIANTS) and dq_mode (FUSE_DQ: 0 separate,
    # 1 atomic adds on pointers into DQ_ACC, 2 TMA reduces through descriptors DQ_ACC and the half
    # and quarter ones); their defaults (and None) are the default path. LQ: the query side's rows
    # per head when it has a layout of its own (query_keep's kept layout, v23): the row stride of
    # LSE, delta (and a fused dQ); L stays the KV side's (dK, dV). None (a constexpr): LQ = L.
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    kv_start = tl.load(TILE_OFFSETS + tile)
    k = k_desc.load([bh, kv_start, 0]).reshape(BLOCK, HEAD_DIM)
    v = v_desc.load([bh, kv_start, 0]).reshape(BLOCK, HEAD_DIM)
    mine = tl.arange(0, BLOCK) < tl.load(COUNTS + tile)
    if FUSE_DQ != 0:
        # K's rows of the next tile enter dQ (Kᵀ dSᵀ sums over KV rows): zeroed once (a select, so a
        # non-finite key there is dropped), and dSᵀ's rows are selected (_dkdv_box).
        k = _own_rows(k, mine)
    if FUSE_DQ == 2:
        dq_full = DQ_ACC
        dq_half = dq_acc_half_desc
        dq_quarter = dq_acc_quarter_desc
    else:
        dq_full = DQ_ACC
        dq_half = DQ_ACC
        dq_quarter = DQ_ACC
    stats = bh.to(tl.int64) * (L if LQ is None else LQ)
    dk = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK, HEAD_DIM], tl.float32)

    row = bh * M + tile
    starts = BOX_STARTS + row * MAX_LIST
    rows = BOX_ROWS + row * MAX_LIST
    whole_end = tl.load(CLASS_ENDS + row * 4 + 1)
    half_end = tl.load(CLASS_ENDS + row * 4 + 2)
    quarter_end = tl.load(CLASS_ENDS + row * 4 + 3)
    # Full and whole boxes alike: the query-row mask lives in the LSE load, so no class needs a
    # mask on the scores. Known gap (NOTES v21): a masked box's rows past its count are the next
    # tile's, and a non-finite Q or dO there reaches this tile's dK/dV through 0 * inf; zeroing
    # them (as dQ and the forward zero K and V) made this kernel spill at D = 128, so it waits for a
    # measured fix.
    # half_steps: quarter boxes two a step (BLOCK / 2 query rows, as its other steps), else four.
    QUARTER_GROUP: tl.constexpr = 2 if HALF_STEPS else 4
    if HALF_STEPS and BLOCK // 2 >= 16:
        dk, dv = _dkdv_half_steps(k, v, dk, dv, q_half_desc, do_half_desc, LSE, DELTA, stats, bh, starts, rows,
                                  whole_end, half_end, qk_scale, BLOCK, HEAD_DIM, UPCAST, IEEE, DO_DK, DO_DV, dq_half,
                                  mine, FUSE_DQ)
    elif HALF_BOXES and BLOCK // 2 >= 16:
        dk, dv = _dkdv_class_halved(k, v, dk, dv, q_half_desc, do_half_desc, LSE, DELTA, stats, bh, starts, rows, 0,
                                    whole_end, qk_scale, BLOCK, HEAD_DIM, UPCAST, IEEE, DO_DK, DO_DV, STATS_IN_ACC)
    else:
        dk, dv = _dkdv_class(k, v, dk, dv, q_desc, do_desc, LSE, DELTA, stats, bh, starts, rows, 0, whole_end,
                             qk_scale, BLOCK, 1, HEAD_DIM, UPCAST, IEEE, DO_DK, DO_DV, STATS_IN_ACC, dq_full, mine,
                             FUSE_DQ)
    if BLOCK // 2 >= 16 and not HALF_STEPS:
        dk, dv = _dkdv_class(k, v, dk, dv, q_half_desc, do_half_desc, LSE, DELTA, stats, bh, starts, rows, whole_end,
                             half_end, qk_scale, BLOCK // 2, 2, HEAD_DIM, UPCAST, IEEE, DO_DK, DO_DV, STATS_IN_ACC,
                             dq_half, mine, FUSE_DQ)
    if BLOCK // 4 >= 16:
        dk, dv = _dkdv_class(k, v, dk, dv, q_quarter_desc, do_quarter_desc, LSE, DELTA, stats, bh, starts, rows,
                             half_end, quarter_end, qk_scale, BLOCK // 4, QUARTER_GROUP, HEAD_DIM, UPCAST, IEEE,
                             DO_DK, DO_DV, STATS_IN_ACC, dq_quarter, mine, FUSE_DQ)
    if DO_DK:
        _store_rows(DK, bh, L, kv_start, mine, dk * sm_scale, BLOCK, HEAD_DIM)
    if DO_DV:
        _store_rows(DV, bh, L, kv_start, mine, dv, BLOCK, HEAD_DIM)


# ---------------------------------------------------------------------------------------------
# Host
# ---------------------------------------------------------------------------------------------
def _check_backward(grad_out, q, out, lse, grad_lse):
    B, H, L, D = q.shape
    for name, x in (("grad_out", grad_out), ("out", out)):
        if tuple(x.shape) != (B, H, L, D):
            raise ValueError(f"{name} must be [B, H, L, D] = {(B, H, L, D)} like q, got {tuple(x.shape)}")
    for name, x in (("lse", lse), ("grad_lse", grad_lse)):
        if x is not None and tuple(x.shape) != (B, H, L):
            raise ValueError(f"{name} must be [B, H, L] = {(B, H, L)}, got {tuple(x.shape)}")


def tma_packed_block_sparse_attention_backward(grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices,
                                               compact: CompactLayout, scale=None, *, boxes=None, q_boxes=None,
                                               grad_lse=None, delta=None, num_warps: int = 4, num_stages: int = 2,
                                               dkdv_variant: str = "default", dq_mode: str = "separate",
                                               q_layout: CompactLayout | None = None, split_tiles: bool | None = None):
    """Gradients ``(dq, dk, dv)`` of :func:`~kernel_templates.tma_block_sparse.tma_packed_block_sparse_attention`
    (``out_order="tile"``) with respect to its ``q, k, v``.

    ``grad_out, q, k, v, out``: ``[B, H, L, D]`` in compact tile-major order (D 64 or 128; fp32,
    fp16 or bf16); ``lse``: the forward's fp32 ``[B, H, L]`` (natural log), compact order;
    ``grad_lse``: an optional gradient on that LSE. ``kv_num_blocks [B, H, M]``, ``kv_indices
    [B, H, M, K]``: the forward's query-major lists (any order, every entry stored). ``boxes``:
    :func:`kv_boxes_by_class` of these lists (the forward's, when the caller kept them);
    ``q_boxes``: the same of their kv-major transpose (``transpose_block_lists``); each computed
    when not given. ``delta``: ``rowsum(out * grad_out) - grad_lse`` (fp32 ``[B, H, L]``, compact
    order) when the caller has it; then ``out`` and ``grad_lse`` are not read (``out`` may be None).
    ``dkdv_variant``: one of :data:`DKDV_VARIANTS`, how the dK/dV kernel is compiled (same
    results up to rounding). ``dq_mode``: one of :data:`DQ_MODES`: dQ by its own kernel
    ("separate", deterministic) or fused into the dK/dV kernel by fp32 atomic adds ("atomic",
    "atomic_tma"; with ``dkdv_variant="two_pass"`` into its dK pass). The atomic modes are not
    deterministic (float addition order), so a caller must choose "separate" while
    ``torch.are_deterministic_algorithms_enabled()`` (:func:`backward_dq_mode`). Returns contiguous
    tensors like ``q, k, v``, in compact order.

    ``q_layout``: the query side's own compact layout, as in the forward (query_keep's kept layout,
    v23): ``grad_out, q, out`` ``[B, H, Lq, D]``, ``lse``, ``delta``, ``grad_lse`` ``[B, H, Lq]`` and
    ``dq`` in its order; the dQ programs take their tiles' offsets and counts from it, and ``q_boxes``
    (computed when not given) are the kv-major lists' boxes over it, so neighbouring kept tiles
    merge into one query box. K, V, dK, dV and ``boxes`` stay on ``compact``.

    ``split_tiles``: run each tile as two tiles of half its slots
    (:func:`~sparse_inductor.compact_layout.half_tiles`, same gradients); ``None``, the default,
    splits tiles of more than 64 slots, which then take ``boxes = q_boxes = None`` (they are made
    for the halves). Tiles of up to 128 slots (benchmarks/NOTES.md v26: the kernels' own 128-row
    programs need twice the accumulator registers).
    """
    if dkdv_variant not in DKDV_VARIANTS:
        raise ValueError(f"dkdv_variant must be one of {', '.join(map(repr, DKDV_VARIANTS))}, got {dkdv_variant!r}")
    if dq_mode not in DQ_MODES:
        raise ValueError(f"dq_mode must be one of {', '.join(map(repr, DQ_MODES))}, got {dq_mode!r}")
    if dq_mode != "separate" and dkdv_variant not in ATOMIC_VARIANTS:
        raise ValueError(f"dq_mode {dq_mode!r} takes dkdv_variant one of {', '.join(map(repr, ATOMIC_VARIANTS))}, "
                         f"got {dkdv_variant!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    _check(q, k, v, kv_num_blocks, kv_indices, compact, scale, q_layout)
    _check_backward(grad_out, q, q if out is None else out, lse, grad_lse)
    if compact.block > 128:
        raise ValueError(f"tiles of at most 128 slots, got {compact.block}")
    if split_tiles and compact.block // 2 < MIN_BOX:
        raise ValueError(f"split_tiles takes tiles of at least {2 * MIN_BOX} slots (halves of at least {MIN_BOX} rows, "
                         f"tl.dot's minimum), got {compact.block}")
    if compact.block > 64 if split_tiles is None else split_tiles:
        if boxes is not None or q_boxes is not None:
            raise ValueError(f"boxes and q_boxes must be None for {compact.block}-slot tiles (they are made for "
                             f"the {compact.block // 2}-slot halves the kernels run)")
        q_side = compact if q_layout is None else q_layout
        kv_num_blocks, kv_indices = half_tile_lists(kv_num_blocks, kv_indices, compact.counts, q_side.counts,
                                                    compact.block)
        compact, q_layout = half_tiles(compact), None if q_layout is None else half_tiles(q_layout)
    from sparse_inductor.triton_launch import kernel_flags

    # TMA descriptors need contiguous rows; incoming gradients may be stride-0 views.
    grad_out, q, k, v = (x.contiguous() for x in (grad_out, q, k, v))
    B, H, L, D = k.shape
    Lq = q.shape[2]
    M = compact.num_tiles
    q_side = compact if q_layout is None else q_layout
    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
    if dq.numel() == 0:
        return dq, dk, dv
    if delta is None:
        if out is None:
            raise ValueError("out is needed when delta is not given")
        delta = (out.float() * grad_out.float()).sum(-1)
        if grad_lse is not None:
            delta = delta - grad_lse.float()
    elif tuple(delta.shape) != (B, H, Lq):
        raise ValueError(f"delta must be [B, H, L] = {(B, H, Lq)}, got {tuple(delta.shape)}")
    delta = delta.float().contiguous()
    lse = lse.float().contiguous()
    if boxes is None:
        boxes = kv_boxes_by_class(kv_num_blocks, kv_indices, compact)
    if q_boxes is None:
        from sparse_inductor.ops import transpose_block_lists

        # The kv-major lists come out increasing, so their box pass skips its sort.
        q_boxes = kv_boxes_by_class(*transpose_block_lists(kv_num_blocks, kv_indices, M), q_side, lists_sorted=True)

    block = compact.block
    # Half and quarter boxes exist only from 16 rows (tl.dot's minimum); the full ones stand in
    # (their classes are then empty and their loops compiled out).
    half, quarter = (r if r >= MIN_BOX else block for r in (block // 2, block // 4))
    meta = dict(HEAD_DIM=D, BLOCK=block, **kernel_flags(q.dtype), num_warps=num_warps, num_stages=num_stages)
    grid = (M, B * H)
    qk_scale = scale * LOG2E
    tables = (compact.tile_offsets, compact.counts)

    fused = {}
    if dq_mode == "separate":
        starts, rows, ends = boxes
        # The dQ kernel's tables and L are all the query side's (K and V come through descriptors).
        _tma_packed_bwd_dq[grid](
            _descriptor(q, block), _descriptor(grad_out, block), _descriptor(k, block), _descriptor(v, block),
            _descriptor(k, half), _descriptor(v, half), _descriptor(k, quarter), _descriptor(v, quarter),
            lse, delta, dq, starts, rows, ends, q_side.tile_offsets, q_side.counts, Lq, M, starts.shape[-1], qk_scale,
            scale, **meta)
    else:
        # The unscaled dQ sums, fp32 [B * H, L, D]: every row gets adds from each KV tile it lists.
        dq_acc = torch.zeros(B, H, Lq, D, dtype=torch.float32, device=q.device)
        if dq_mode == "atomic":
            fused = dict(DQ_ACC=dq_acc)
        else:
            fused = dict(DQ_ACC=_descriptor(dq_acc, block), dq_acc_half_desc=_descriptor(dq_acc, half),
                         dq_acc_quarter_desc=_descriptor(dq_acc, quarter))

    starts, rows, ends = q_boxes
    args = (_descriptor(k, block), _descriptor(v, block), _descriptor(q, block), _descriptor(grad_out, block),
            _descriptor(q, half), _descriptor(grad_out, half), _descriptor(q, quarter), _descriptor(grad_out, quarter),
            lse, delta, dk, dv, starts, rows, ends, *tables, L, M, starts.shape[-1], qk_scale, scale)
    fused = dict(fused, FUSE_DQ=_FUSE_DQ[dq_mode]) if fused else {}
    if q_layout is not None:
        meta["LQ"] = Lq  # the query side's row stride (LSE, delta, a fused dQ); L stays dK/dV's
    if dkdv_variant == "default":
        _tma_packed_bwd_dkdv[grid](*args, **fused, **meta)
    elif dkdv_variant == "two_pass":
        _tma_packed_bwd_dkdv[grid](*args, DO_DK=False, DO_DV=True, **meta)
        _tma_packed_bwd_dkdv[grid](*args, DO_DK=True, DO_DV=False, **fused, **meta)
    else:
        _tma_packed_bwd_dkdv[grid](*args, **dkdv_flags(dkdv_variant), **fused, **meta)
    if dq_mode != "separate":
        # One pass: the score scale and the cast (out= takes the lower-precision float result).
        torch.mul(dq_acc, scale, out=dq)
    return dq, dk, dv


#: The environment variable :func:`backward_dq_mode` reads.
DQ_MODE_ENV = "SPARSE_INDUCTOR_BACKWARD_DQ"


def backward_dq_mode(default: str = "separate") -> str:
    """The ``dq_mode`` a caller should pass: "separate" while
    ``torch.are_deterministic_algorithms_enabled()`` (the atomic modes add in no fixed order),
    else ``$SPARSE_INDUCTOR_BACKWARD_DQ`` (``default`` when unset; one of :data:`DQ_MODES`)."""
    mode = os.environ.get(DQ_MODE_ENV, default)
    if mode not in DQ_MODES:
        raise ValueError(f"{DQ_MODE_ENV} must be one of {', '.join(map(repr, DQ_MODES))}, got {mode!r}")
    return "separate" if torch.are_deterministic_algorithms_enabled() else mode


def dkdv_flags(variant: str) -> dict:
    """The dK/dV kernel's constexpr flags of a one-launch ``dkdv_variant`` (empty: the default)."""
    return {"default": {}, "half_boxes": {"HALF_BOXES": True}, "stats_in_acc": {"STATS_IN_ACC": True},
            "half_steps": {"HALF_STEPS": True}}[variant]
