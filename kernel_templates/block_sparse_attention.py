"""Block-sparse attention kernels (forward and backward) in Triton: the one source of the math.

Tensors stay in sequence order, ``[B, H, L, D]`` with any batch/head/token strides and a unit
feature stride. The block layout is given by *slot* tables: ``SLOTS[b, m * BLOCK + j]`` is the
sequence position held by slot ``j`` of block ``m`` (``-1`` for a padding slot), and
``COUNTS[b, m]`` how many leading slots of block ``m`` take part in the attention. Query tables
are per head (``[B, H, n]``, strides may be 0) and their blocks may be smaller (``BLOCK_M`` slots)
than KV blocks (``BLOCK``): under query_keep a tile's kept rows fill a smaller query block. A query
slot holding ``-(p + 2)`` names position ``p`` as *excluded*: it lies past its block's count, is not
computed (the forward writes 0 and LSE -inf there; its real output comes from elsewhere), and
gets dQ = 0. Kernels
gather their rows through the slot table and scatter results back to the same positions, so no
permuted copy of Q, K, V or O is ever made. Slot and count tables are ``[B, n]`` (a batch
stride of 0 shares one table). A slot at or past its block's count is never loaded and never
contributes to a softmax or a gradient; its row is still written when it holds a real position
(a text key hidden by a key-padding mask gets dK = dV = 0).

The forward and dQ loops do not walk the listed KV blocks one by one: each pass takes ``CHUNK``
listed blocks, lays the valid slots of each end to end (a prefix sum of their counts) and walks
these packed rows ``BLOCK`` at a time, finding each packed row's slot in registers. So the
padding slots of border tiles (a 21-frame grid's last tile holds 16 of 64 tokens) cost no MMA
work and no memory is written. dK/dV do not pack (packing measured slower there;
benchmarks/NOTES.md): a step takes one query block, or, where query blocks are smaller than KV
blocks (query_keep), ``BLOCK // BLOCK_M`` consecutive entries of the list at once, ``BLOCK`` rows
in all (the step is latency-bound, so fewer rows per step saved nothing; NOTES.md v18).

Selections follow FlexAttention's conventions: query-major ``KV_NUM_BLOCKS[B, H, Mq]`` /
``KV_INDICES[B, H, Mq, MAX_KV]`` for the forward and dQ, kv-major ``Q_NUM_BLOCKS[B, H, Mk]`` /
``Q_INDICES[B, H, Mk, MAX_Q]`` for dK/dV (all contiguous). A full row (``KV_NUM_BLOCKS`` equal
to the number of KV blocks: a text query block) walks every block and reads no entries, so
``MAX_KV`` may be narrower than the number of blocks.

Masks cost instructions in every step, so only the steps that need one take it: the packed
loops mask the last, partly filled step of each chunk; dK/dV need no per-step mask (padding
query rows add exactly 0; padding key rows are zeroed once, see :func:`_gradient_lse2`).

The ``*_tile`` functions hold all arithmetic. Two thin entry points use them: the ``*_kernel``
functions below (launched directly by the eager op) and the Inductor templates of
:mod:`kernel_templates.inductor_templates`, which embed these functions' source and differ only
in how the main output is stored (Inductor's ``store_output``, where epilogues fuse).

Softmax runs in base 2 (``exp2`` with log2(e) folded into the scale, one FMA per score); LSE is
stored in natural log units, like SDPA's.

Block-causal masks (diffusion forcing; :mod:`sparse_inductor.causal`): with the constexpr
``CAUSAL_TOKENS`` > 0 (video tokens per causal block, ``H·W·frames``; video-only sequences, so a
position is its raster index) a query at position ``p`` attends a key at ``p'`` only if
``p' // CAUSAL_TOKENS <= p // CAUSAL_TOKENS``. Every step then masks its scores (forward, dQ) or
its transposed probabilities (dK/dV) per token: that is how a listed tile that straddles the
causal boundary contributes only its allowed keys. With ``CAUSAL_TOKENS = 0`` (the default) the
mask is compiled out.
"""
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # The interpreter multiplies bf16 bit patterns in tl.dot, so it gets fp32 operands.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _block_rows(SLOTS, stride_sb, COUNTS, stride_cb, b, block, offs):
    """Sequence positions of a block's slots (-1 = padding) and which slots take part."""
    count = tl.load(COUNTS + b * stride_cb + block)
    rows = tl.load(SLOTS + b * stride_sb + block * offs.shape[0] + offs)
    return rows, offs < count


@triton.jit
def _chunk_blocks(INDICES, first, n, listed, COUNTS, stride_cb, b, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """The list entries ``[first, first + CHUNK)`` (those below ``n``; blocks ``first, first + 1,
    ...`` for a full row, ``listed`` false) laid end to end: packed
    row ``p`` is valid slot ``p - at[t]`` of block ``ids[t]``, where segment ``t`` holds block
    ``ids[t]``'s ``count[t]`` valid slots (a block's valid slots come first) from
    ``at[t] = count[0] + ... + count[t - 1]`` on.

    Returned in the form :func:`_packed_rows` reads in registers: the slot of packed row ``p`` is
    ``p + ids[0] * BLOCK + (sum of jump[t] over the segments with end[t] <= p)``, where ``end[t]``
    is where segment ``t`` ends and ``jump[t]`` is how the slot offset ``ids * BLOCK - at``
    changes from segment ``t`` to ``t + 1``. Also returns the number of packed rows.

    The loop then walks these rows ``BLOCK`` at a time, so a border tile with 16 of 64 tokens
    costs 16 columns, not 64, and the rows of several blocks share one step.
    """
    e = first + tl.arange(0, CHUNK)
    live = e < n
    # A full row (``listed`` false) keeps every block in order and stores no entries.
    ids = tl.where(listed, tl.load(INDICES + e, mask=tl.where(listed, live, False), other=0), e)
    next_ids = tl.where(listed, tl.load(INDICES + e + 1, mask=tl.where(listed, e + 1 < n, False), other=0), e + 1)
    count = tl.where(live, tl.load(COUNTS + b * stride_cb + ids, mask=live, other=0), 0)
    end = tl.cumsum(count, 0)
    # A segment past the last live one is never passed by a valid row (its end is the total).
    jump = (next_ids - ids) * BLOCK - count
    first_id = tl.sum(tl.where(e == first, ids, 0), 0)
    return end, jump, first_id * BLOCK, tl.sum(count, 0)


@triton.jit
def _packed_rows(SLOTS, stride_sb, b, end, jump, base, step, n_rows, offs):
    """Sequence positions and validity of the ``BLOCK`` columns of loop step ``step`` over the
    packed rows of a chunk (:func:`_chunk_blocks`): one compare and one add per (column,
    segment), in registers, with no memory written."""
    pos = step * offs.shape[0] + offs
    valid = pos < n_rows
    slot = pos + base + tl.sum(tl.where(end[None, :] <= pos[:, None], jump[None, :], 0), 1)
    return tl.load(SLOTS + b * stride_sb + slot, mask=valid, other=-1), valid


@triton.jit
def _load_rows(base, rows, valid, stride_n, offs_d, HEAD_DIM):
    mask = valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    return tl.load(base + rows[:, None] * stride_n + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _kv_list(KV_NUM_BLOCKS, KV_INDICES, b, h, m, H, NUM_Q_BLOCKS, NUM_KV_BLOCKS, MAX_KV):
    """Length and start of query block ``m``'s KV list, and whether its entries are stored (a
    full row, every KV block, stores none)."""
    list_row = (b * H + h) * NUM_Q_BLOCKS + m
    n_kv = tl.load(KV_NUM_BLOCKS + list_row)
    return n_kv, KV_INDICES + list_row * MAX_KV, n_kv != NUM_KV_BLOCKS


@triton.jit
def _packed_kv(KV_SLOTS, stride_kvsb, b, end, jump, base, step, n_rows, offs, k_base, v_base, stride_kn, stride_vn,
               offs_d, HEAD_DIM):
    """K and V rows of loop step ``step`` over the packed rows, which columns are real, and their
    sequence positions."""
    kv_rows, col_valid = _packed_rows(KV_SLOTS, stride_kvsb, b, end, jump, base, step, n_rows, offs)
    k = _load_rows(k_base, kv_rows, col_valid, stride_kn, offs_d, HEAD_DIM)
    v = _load_rows(v_base, kv_rows, col_valid, stride_vn, offs_d, HEAD_DIM)
    return k, v, col_valid, kv_rows


@triton.jit
def _causal_block(rows, CAUSAL_TOKENS: tl.constexpr):
    """The causal block of each position (the positions themselves without a mask)."""
    if CAUSAL_TOKENS > 0:
        return rows // CAUSAL_TOKENS
    else:
        return rows


@triton.jit
def _softmax_step(q, k, v, col_valid, m_i, l_i, acc, qk_scale, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                  MASKED: tl.constexpr, kv_rows, q_block, CAUSAL_TOKENS: tl.constexpr):
    """One online-softmax step over a ``BLOCK`` of keys; ``m_i`` is in scaled base-2 units.

    Only a partly filled step (``MASKED``) masks columns: the others hold valid keys only. The
    scale is applied to the row maximum and fused into the exponent (one FMA per score). Under a
    block-causal mask (``CAUSAL_TOKENS``) keys of a later causal block than the row's are masked.
    """
    s = _dot(q, tl.trans(k), UPCAST, IEEE)
    if MASKED:
        s = tl.where(col_valid[None, :], s, float("-inf"))
    if CAUSAL_TOKENS > 0:
        s = tl.where(_causal_block(kv_rows, CAUSAL_TOKENS)[None, :] <= q_block[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    # A row that has seen only masked columns keeps m = -inf; shift by 0 to avoid inf - inf.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * qk_scale - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, IEEE)
    return m_new, l_i, acc


@triton.jit
def _gradient_lse2(LSE, stats, row_valid):
    """Base-2 LSE of the gradient kernels' query rows, chosen so that full steps need no mask.

    Padding query rows (Q, dO and delta loaded as 0) read 0: their p = 1 meets dO = 0 in dV and
    gives dS = 1 * (0 - 0) = 0. Rows without softmax mass (LSE = -inf, output 0) read +inf, so
    p = 0. Padding key slots do need masking where they mix with valid keys (their p = 2^-lse2
    may overflow): the dQ loop masks its partly filled steps, and dK/dV zero their rows at the end.
    """
    lse2 = tl.load(LSE + stats, mask=row_valid, other=0.0) * 1.4426950408889634
    return tl.where(lse2 == float("-inf"), float("inf"), lse2)


@triton.jit
def _dq_step(q, do, k, v, lse2, delta, col_valid, dq, qk_scale, UPCAST: tl.constexpr, IEEE: tl.constexpr,
             MASKED: tl.constexpr, kv_rows, q_block, CAUSAL_TOKENS: tl.constexpr):
    """dQ contribution of a ``BLOCK`` of keys; only a partly filled step (``MASKED``) masks its
    padding columns (see :func:`_gradient_lse2`); a block-causal mask masks later keys."""
    p = tl.math.exp2(_dot(q, tl.trans(k), UPCAST, IEEE) * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(col_valid[None, :], p, 0.0)
    if CAUSAL_TOKENS > 0:
        p = tl.where(_causal_block(kv_rows, CAUSAL_TOKENS)[None, :] <= q_block[:, None], p, 0.0)
    ds = p * (_dot(do, tl.trans(v), UPCAST, IEEE) - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, UPCAST, IEEE)


@triton.jit
def fwd_tile(
    Q, K, V, LSE, Q_SLOTS, KV_SLOTS, Q_COUNTS, KV_COUNTS, KV_NUM_BLOCKS, KV_INDICES,
    b, h, m, H, L_Q, NUM_Q_BLOCKS, NUM_KV_BLOCKS, MAX_KV, HEAD_DIM, sm_scale,
    stride_qsb, stride_qsh, stride_kvsb, stride_qcb, stride_qch, stride_kvcb,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, CHUNK: tl.constexpr, CAUSAL_TOKENS: tl.constexpr,
):
    """One query block of one head: flash-style online softmax over its listed KV blocks.

    Stores LSE (contiguous ``[B, H, L_Q]``); returns the normalised output tile (fp32), its rows
    and the store mask for the caller to write O.
    """
    offs = tl.arange(0, BLOCK)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_rows, row_valid = _block_rows(Q_SLOTS + h * stride_qsh, stride_qsb, Q_COUNTS + h * stride_qch, stride_qcb, b, m,
                                    offs_m)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, q_rows, row_valid, stride_qn, offs_d, HEAD_DIM)
    q_block = _causal_block(q_rows, CAUSAL_TOKENS)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    qk_scale = sm_scale * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    n_kv, list_start, listed = _kv_list(KV_NUM_BLOCKS, KV_INDICES, b, h, m, H, NUM_Q_BLOCKS, NUM_KV_BLOCKS,
                                        MAX_KV)
    for first in range(0, n_kv, CHUNK):
        end, jump, base, n_rows = _chunk_blocks(list_start, first, n_kv, listed, KV_COUNTS, stride_kvcb, b, BLOCK,
                                                CHUNK)
        n_full = n_rows // BLOCK
        for step in range(0, n_full):
            k, v, col_valid, kv_rows = _packed_kv(KV_SLOTS, stride_kvsb, b, end, jump, base, step, n_rows, offs,
                                                  k_base, v_base, stride_kn, stride_vn, offs_d, HEAD_DIM)
            m_i, l_i, acc = _softmax_step(q, k, v, col_valid, m_i, l_i, acc, qk_scale, UPCAST, IEEE, False, kv_rows,
                                          q_block, CAUSAL_TOKENS)
        if n_full * BLOCK < n_rows:  # the chunk's last, partly filled step
            k, v, col_valid, kv_rows = _packed_kv(KV_SLOTS, stride_kvsb, b, end, jump, base, n_full, n_rows, offs,
                                                  k_base, v_base, stride_kn, stride_vn, offs_d, HEAD_DIM)
            m_i, l_i, acc = _softmax_step(q, k, v, col_valid, m_i, l_i, acc, qk_scale, UPCAST, IEEE, True, kv_rows,
                                          q_block, CAUSAL_TOKENS)

    # No mass (l = 0) only for a row that saw no key (skipped head, every key masked): output 0,
    # LSE -inf. A NaN l (NaN / Inf in q or in a kept k) is mass: NaN output and LSE, as in the
    # reference.
    has_mass = (l_i > 0.0) | (l_i != l_i)
    out = acc / tl.where(has_mass, l_i, 1.0)[:, None]
    lse = tl.where(has_mass, (m_i + tl.math.log2(tl.where(has_mass, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    # Rows marked excluded (-(p + 2): a query dropped by query_keep, whose output comes from its
    # centre) are written as 0 with LSE -inf at position p: every position of the output is
    # written, as an epilogue Inductor fuses into the store expects. The mask comes from the slot
    # (live anyway), not the count (a live row mask cost 36 registers and made the forward 23 %
    # slower on the H200, benchmarks/NOTES.md v12). The flag that selects the values is read again
    # from the slot table here, with a volatile load (never merged with the first read, nor moved
    # before the loop): taken from the first read, the compiler loaded the table a second time in
    # the accumulator's layout before the loop, and with Triton 3.6's ptxas (the H200 image's)
    # the 32-row query_keep forward went from 168 to 235 registers, i.e. from 3 to 2 programs per
    # SM, 17-18 % slower (benchmarks/NOTES.md, "query_keep kernel regression: static look").
    taking_part = tl.load(Q_SLOTS + h * stride_qsh + b * stride_qsb + m * BLOCK_M + offs_m, volatile=True) >= 0
    out = tl.where(taking_part[:, None], out, 0.0)
    lse = tl.where(taking_part, lse, float("-inf"))
    q_rows = tl.where(q_rows >= -1, q_rows, -q_rows - 2)
    stored = q_rows >= 0
    tl.store(LSE + (b * H + h) * L_Q + q_rows, lse, mask=stored)
    mask = stored[:, None] & (offs_d < HEAD_DIM)[None, :]
    return out, q_rows, offs_d, mask


@triton.jit
def dq_tile(
    Q, K, V, DO, LSE, DELTA, DQ, Q_SLOTS, KV_SLOTS, Q_COUNTS, KV_COUNTS, KV_NUM_BLOCKS, KV_INDICES,
    b, h, m, H, L_Q, NUM_Q_BLOCKS, NUM_KV_BLOCKS, MAX_KV, HEAD_DIM, sm_scale,
    stride_qsb, stride_qsh, stride_kvsb, stride_qcb, stride_qch, stride_kvcb,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, CHUNK: tl.constexpr, CAUSAL_TOKENS: tl.constexpr,
):
    """dQ of one query block of one head, walking its KV list; stores dQ (0 for the rows of the
    block's slots past its count that hold a position, excluded rows included)."""
    offs = tl.arange(0, BLOCK)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_rows, row_valid = _block_rows(Q_SLOTS + h * stride_qsh, stride_qsb, Q_COUNTS + h * stride_qch, stride_qcb, b, m,
                                    offs_m)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, q_rows, row_valid, stride_qn, offs_d, HEAD_DIM)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, q_rows, row_valid, stride_don, offs_d, HEAD_DIM)
    stats = (b * H + h) * L_Q + q_rows
    lse2 = _gradient_lse2(LSE, stats, row_valid)
    delta = tl.load(DELTA + stats, mask=row_valid, other=0.0)
    q_block = _causal_block(q_rows, CAUSAL_TOKENS)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    qk_scale = sm_scale * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_kv, list_start, listed = _kv_list(KV_NUM_BLOCKS, KV_INDICES, b, h, m, H, NUM_Q_BLOCKS, NUM_KV_BLOCKS,
                                        MAX_KV)
    for first in range(0, n_kv, CHUNK):
        end, jump, base, n_rows = _chunk_blocks(list_start, first, n_kv, listed, KV_COUNTS, stride_kvcb, b, BLOCK,
                                                CHUNK)
        n_full = n_rows // BLOCK
        for step in range(0, n_full):
            k, v, col_valid, kv_rows = _packed_kv(KV_SLOTS, stride_kvsb, b, end, jump, base, step, n_rows, offs,
                                                  k_base, v_base, stride_kn, stride_vn, offs_d, HEAD_DIM)
            dq = _dq_step(q, do, k, v, lse2, delta, col_valid, dq, qk_scale, UPCAST, IEEE, False, kv_rows, q_block,
                          CAUSAL_TOKENS)
        if n_full * BLOCK < n_rows:  # the chunk's last, partly filled step
            k, v, col_valid, kv_rows = _packed_kv(KV_SLOTS, stride_kvsb, b, end, jump, base, n_full, n_rows, offs,
                                                  k_base, v_base, stride_kn, stride_vn, offs_d, HEAD_DIM)
            dq = _dq_step(q, do, k, v, lse2, delta, col_valid, dq, qk_scale, UPCAST, IEEE, True, kv_rows, q_block,
                          CAUSAL_TOKENS)

    # Rows that take no part get exactly 0, even next to a NaN key (0 * NaN in the loop).
    dq = tl.where((q_rows >= 0)[:, None], dq * sm_scale, 0.0)
    # Excluded rows (-(p + 2)) lie past the count, so their dQ is 0: written at position p.
    q_rows = tl.where(q_rows >= -1, q_rows, -q_rows - 2)
    mask = (q_rows >= 0)[:, None] & (offs_d < HEAD_DIM)[None, :]
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + q_rows[:, None] * stride_dqn + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask)


@triton.jit
def _group_rows(ENTRIES, i, n_q, SLOTS, stride_sb, COUNTS, stride_cb, b, offs, BLOCK_M: tl.constexpr):
    """Sequence positions of the ``BLOCK`` query rows of a dK/dV step that takes the list entries
    ``i, i + 1, ...`` at once (``BLOCK // BLOCK_M`` of them), and which rows take part: row ``r``
    is slot ``r % BLOCK_M`` of the block of entry ``i + r // BLOCK_M``; it takes part iff that
    entry exists (below ``n_q``) and the slot is below the block's count. A missing entry reads
    block 0 with count 0, so its rows are padding rows like any other (see :func:`_gradient_lse2`).
    The entries and counts are scalar loads spread over the rows by selects: loaded per row (a
    replicated gather), the sm_90 loop took 919 instructions, 120 global loads and 6 spill ops
    at BLOCK_M 32, against 761, 76 and 0 (benchmarks/sass_loops.py, Triton 3.6)."""
    group = offs // BLOCK_M
    start = tl.zeros_like(offs)
    count = tl.zeros_like(offs)
    for g in tl.static_range(offs.shape[0] // BLOCK_M):
        exists = i + g < n_q
        qb = tl.load(ENTRIES + i + g, mask=exists, other=0)
        start = tl.where(group == g, qb * BLOCK_M, start)
        count = tl.where(group == g, tl.load(COUNTS + b * stride_cb + qb, mask=exists, other=0), count)
    slot = offs % BLOCK_M
    rows = tl.load(SLOTS + b * stride_sb + start + slot)
    return rows, slot < count


@triton.jit
def _dkdv_step(k, v, q_base, do_base, LSE, DELTA, stats_base, q_rows, row_valid, offs_d, stride_qn, stride_don,
               HEAD_DIM, dk, dv, qk_scale, UPCAST: tl.constexpr, IEEE: tl.constexpr, kv_block,
               CAUSAL_TOKENS: tl.constexpr):
    """dK and dV contributions of the query rows ``q_rows`` (those with ``row_valid``), with
    transposed scores ``[kv slots, query rows]`` (no padding masks: see :func:`_gradient_lse2`; a
    block-causal mask masks later keys, per row)."""
    q = _load_rows(q_base, q_rows, row_valid, stride_qn, offs_d, HEAD_DIM)
    do = _load_rows(do_base, q_rows, row_valid, stride_don, offs_d, HEAD_DIM)
    lse2 = _gradient_lse2(LSE, stats_base + q_rows, row_valid)
    delta = tl.load(DELTA + stats_base + q_rows, mask=row_valid, other=0.0)
    p_t = tl.math.exp2(_dot(k, tl.trans(q), UPCAST, IEEE) * qk_scale - lse2[None, :])
    if CAUSAL_TOKENS > 0:
        p_t = tl.where(kv_block[:, None] <= _causal_block(q_rows, CAUSAL_TOKENS)[None, :], p_t, 0.0)
    dv += _dot(p_t.to(do.dtype), do, UPCAST, IEEE)
    ds_t = p_t * (_dot(v, tl.trans(do), UPCAST, IEEE) - delta[None, :])
    dk += _dot(ds_t.to(q.dtype), q, UPCAST, IEEE)
    return dk, dv


@triton.jit
def dkdv_tile(
    Q, K, V, DO, LSE, DELTA, DV, Q_SLOTS, KV_SLOTS, Q_COUNTS, KV_COUNTS, Q_NUM_BLOCKS, Q_INDICES,
    b, h, n, H, L_Q, NUM_KV_BLOCKS, MAX_Q, HEAD_DIM, sm_scale,
    stride_qsb, stride_qsh, stride_kvsb, stride_qcb, stride_qch, stride_kvcb,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dvb, stride_dvh, stride_dvn,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, CAUSAL_TOKENS: tl.constexpr,
):
    """dK and dV of one KV block of one head, walking its (transposed) query list.

    Stores dV; returns dK (fp32), its rows and the store mask for the caller to write dK.
    """
    offs = tl.arange(0, BLOCK)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_slots = Q_SLOTS + h * stride_qsh
    q_counts = Q_COUNTS + h * stride_qch
    kv_rows, col_valid = _block_rows(KV_SLOTS, stride_kvsb, KV_COUNTS, stride_kvcb, b, n, offs)
    k = _load_rows(K + b * stride_kb + h * stride_kh, kv_rows, col_valid, stride_kn, offs_d, HEAD_DIM)
    v = _load_rows(V + b * stride_vb + h * stride_vh, kv_rows, col_valid, stride_vn, offs_d, HEAD_DIM)
    kv_block = _causal_block(kv_rows, CAUSAL_TOKENS)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    stats_base = (b * H + h) * L_Q
    qk_scale = sm_scale * 1.4426950408889634

    dk = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    list_row = (b * H + h) * NUM_KV_BLOCKS + n
    n_q = tl.load(Q_NUM_BLOCKS + list_row)
    if BLOCK_M == BLOCK:  # one query block per step
        for i in range(0, n_q):
            qb = tl.load(Q_INDICES + list_row * MAX_Q + i)
            q_rows, row_valid = _block_rows(q_slots, stride_qsb, q_counts, stride_qcb, b, qb, offs_m)
            dk, dv = _dkdv_step(k, v, q_base, do_base, LSE, DELTA, stats_base, q_rows, row_valid, offs_d, stride_qn,
                                stride_don, HEAD_DIM, dk, dv, qk_scale, UPCAST, IEEE, kv_block, CAUSAL_TOKENS)
    else:
        # Smaller query blocks (query_keep): a step takes BLOCK // BLOCK_M list entries, BLOCK rows
        # in all. The step is latency-bound, so halving its rows saved nothing (fwd+bwd at
        # query_keep 0.5 was 0.96x of query_keep 1; benchmarks/NOTES.md v18). Every row attends
        # this KV block, so rows of different query blocks share a step with no extra mask.
        for i in range(0, n_q, BLOCK // BLOCK_M):
            q_rows, row_valid = _group_rows(Q_INDICES + list_row * MAX_Q, i, n_q, q_slots, stride_qsb, q_counts,
                                            stride_qcb, b, offs, BLOCK_M)
            dk, dv = _dkdv_step(k, v, q_base, do_base, LSE, DELTA, stats_base, q_rows, row_valid, offs_d, stride_qn,
                                stride_don, HEAD_DIM, dk, dv, qk_scale, UPCAST, IEEE, kv_block, CAUSAL_TOKENS)
    # The padding key slots took part unmasked; a slot past the count that holds a real position
    # (a key hidden by a key-padding mask) must get dK = dV = 0.
    dk = tl.where(col_valid[:, None], dk, 0.0)
    dv = tl.where(col_valid[:, None], dv, 0.0)

    dk = dk * sm_scale
    mask = (kv_rows >= 0)[:, None] & (offs_d < HEAD_DIM)[None, :]
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + kv_rows[:, None] * stride_dvn + offs_d[None, :]
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)
    return dk, kv_rows, offs_d, mask


# --------------------------------------------------------------------------------------------
# Entry points of the eager op. Grid: forward (Mq, B * H); backward (Mk + Mq, B * H), the first
# Mk programs computing dK/dV, the rest dQ (one launch, no atomics).
# --------------------------------------------------------------------------------------------
@triton.jit
def block_sparse_attn_fwd_kernel(
    Q, K, V, O, LSE, Q_SLOTS, KV_SLOTS, Q_COUNTS, KV_COUNTS, KV_NUM_BLOCKS, KV_INDICES,
    sm_scale, H, L_Q, NUM_Q_BLOCKS, NUM_KV_BLOCKS, MAX_KV, HEAD_DIM,
    stride_qsb, stride_qsh, stride_kvsb, stride_qcb, stride_qch, stride_kvcb,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, CHUNK: tl.constexpr, CAUSAL_TOKENS: tl.constexpr = 0,
):
    m = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    out, rows, offs_d, mask = fwd_tile(
        Q, K, V, LSE, Q_SLOTS, KV_SLOTS, Q_COUNTS, KV_COUNTS, KV_NUM_BLOCKS, KV_INDICES,
        b, h, m, H, L_Q, NUM_Q_BLOCKS, NUM_KV_BLOCKS, MAX_KV, HEAD_DIM, sm_scale,
        stride_qsb, stride_qsh, stride_kvsb, stride_qcb, stride_qch, stride_kvcb,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        BLOCK, BLOCK_M, BLOCK_D, UPCAST, IEEE, CHUNK, CAUSAL_TOKENS,
    )
    o_ptrs = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask)


@triton.jit
def block_sparse_attn_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV,
    Q_SLOTS, KV_SLOTS, Q_COUNTS, KV_COUNTS, KV_NUM_BLOCKS, KV_INDICES, Q_NUM_BLOCKS, Q_INDICES,
    sm_scale, H, L_Q, NUM_Q_BLOCKS, NUM_KV_BLOCKS, MAX_KV, MAX_Q, HEAD_DIM,
    stride_qsb, stride_qsh, stride_kvsb, stride_qcb, stride_qch, stride_kvcb,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, CHUNK: tl.constexpr, CAUSAL_TOKENS: tl.constexpr = 0,
):
    pid = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    if pid < NUM_KV_BLOCKS:
        dk, rows, offs_d, mask = dkdv_tile(
            Q, K, V, DO, LSE, DELTA, DV, Q_SLOTS, KV_SLOTS, Q_COUNTS, KV_COUNTS, Q_NUM_BLOCKS, Q_INDICES,
            b, h, pid, H, L_Q, NUM_KV_BLOCKS, MAX_Q, HEAD_DIM, sm_scale,
            stride_qsb, stride_qsh, stride_kvsb, stride_qcb, stride_qch, stride_kvcb,
            stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
            stride_dob, stride_doh, stride_don, stride_dvb, stride_dvh, stride_dvn,
            BLOCK, BLOCK_M, BLOCK_D, UPCAST, IEEE, CAUSAL_TOKENS,
        )
        dk_ptrs = DK + b * stride_dkb + h * stride_dkh + rows[:, None] * stride_dkn + offs_d[None, :]
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=mask)
    else:
        dq_tile(
            Q, K, V, DO, LSE, DELTA, DQ, Q_SLOTS, KV_SLOTS, Q_COUNTS, KV_COUNTS, KV_NUM_BLOCKS, KV_INDICES,
            b, h, pid - NUM_KV_BLOCKS, H, L_Q, NUM_Q_BLOCKS, NUM_KV_BLOCKS, MAX_KV, HEAD_DIM, sm_scale,
            stride_qsb, stride_qsh, stride_kvsb, stride_qcb, stride_qch, stride_kvcb,
            stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
            stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
            BLOCK, BLOCK_M, BLOCK_D, UPCAST, IEEE, CHUNK, CAUSAL_TOKENS,
        )
