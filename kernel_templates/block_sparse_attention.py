"""Block-sparse attention kernels (forward and backward) in Triton: the one source of the math.

Tensors stay in sequence order, ``[B, H, L, D]`` with any batch/head/token strides and a unit
feature stride. The block layout is given by *slot* tables: ``SLOTS[b, m * BLOCK + j]`` is the
sequence position held by slot ``j`` of block ``m`` (``-1`` for a padding slot), and
``COUNTS[b, m]`` how many leading slots of block ``m`` take part in the attention. Kernels
gather their rows through the slot table and scatter results back to the same positions, so no
permuted copy of Q, K, V or O is ever made. Slot and count tables are ``[B, n]`` (a batch
stride of 0 shares one table). A slot at or past its block's count is never loaded and never
contributes to a softmax or a gradient; its row is still written when it holds a real position
(a text key hidden by a key-padding mask gets dK = dV = 0).

The forward and dQ loops do not walk the listed KV blocks one by one: each pass packs the
sequence positions of the valid slots of ``CHUNK`` listed blocks into the program's slice of
``SCRATCH`` (int32, ``CHUNK * BLOCK`` per program) and walks them ``BLOCK`` at a time, so the
padding slots of border tiles (a 21-frame grid's last tile holds 16 of 64 tokens) cost no MMA
work. dK/dV keep one query block per step (packing measured slower there; benchmarks/NOTES.md).

Selections follow FlexAttention's conventions: query-major ``KV_NUM_BLOCKS[B, H, Mq]`` /
``KV_INDICES[B, H, Mq, MAX_KV]`` for the forward and dQ, kv-major ``Q_NUM_BLOCKS[B, H, Mk]`` /
``Q_INDICES[B, H, Mk, MAX_Q]`` for dK/dV (all contiguous).

The ``*_tile`` functions hold all arithmetic. Two thin entry points use them: the ``*_kernel``
functions below (launched directly by the eager op) and the Inductor templates of
:mod:`kernel_templates.inductor_templates`, which embed these functions' source and differ only
in how the main output is stored (Inductor's ``store_output``, where epilogues fuse).

Softmax runs in base 2 (``exp2`` with log2(e) folded into the scale); LSE is stored in natural
log units, like SDPA's.
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
def _pack_rows(INDICES, first, n, SLOTS, stride_sb, COUNTS, stride_cb, b, SCRATCH,
               BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Write the sequence positions of the valid slots of list entries ``[first, first + CHUNK)``
    (those below ``n``) to the program's ``SCRATCH``, back to back; return how many there are.

    The loop then walks these rows ``BLOCK`` at a time, so a border tile with 16 of 64 tokens
    costs 16 columns, not 64, and the rows of several blocks share one step.
    """
    e = first + tl.arange(0, CHUNK)
    live = e < n
    ids = tl.load(INDICES + e, mask=live, other=0)
    count = tl.where(live, tl.load(COUNTS + b * stride_cb + ids, mask=live, other=0), 0)
    at = tl.cumsum(count, 0) - count
    j = tl.arange(0, BLOCK)
    take = j[None, :] < count[:, None]  # a block's valid slots come first
    rows = tl.load(SLOTS + b * stride_sb + ids[:, None] * BLOCK + j[None, :], mask=take, other=-1)
    tl.debug_barrier()  # every thread has read the previous chunk's rows
    tl.store(SCRATCH + at[:, None] + j[None, :], rows, mask=take)
    tl.debug_barrier()  # this chunk's rows are visible to every thread
    return tl.sum(count, 0)


@triton.jit
def _packed_rows(SCRATCH, step, n_rows, offs):
    """Sequence positions and validity of the ``BLOCK`` columns of loop step ``step``."""
    pos = step * offs.shape[0] + offs
    valid = pos < n_rows
    return tl.load(SCRATCH + pos, mask=valid, other=-1), valid


@triton.jit
def _load_rows(base, rows, valid, stride_n, offs_d, HEAD_DIM):
    mask = valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    return tl.load(base + rows[:, None] * stride_n + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _kv_list(KV_NUM_BLOCKS, KV_INDICES, SCRATCH, b, h, m, H, NUM_Q_BLOCKS, MAX_KV,
             BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Length and start of query block ``m``'s KV list, and its program's part of ``SCRATCH``
    (one ``CHUNK * BLOCK`` slice per list row)."""
    list_row = (b * H + h) * NUM_Q_BLOCKS + m
    scratch = SCRATCH + list_row.to(tl.int64) * (CHUNK * BLOCK)
    return tl.load(KV_NUM_BLOCKS + list_row), KV_INDICES + list_row * MAX_KV, scratch


@triton.jit
def _packed_kv(scratch, step, n_rows, offs, k_base, v_base, stride_kn, stride_vn, offs_d, HEAD_DIM):
    """K and V rows of loop step ``step`` over the packed rows, and which columns are real."""
    kv_rows, col_valid = _packed_rows(scratch, step, n_rows, offs)
    k = _load_rows(k_base, kv_rows, col_valid, stride_kn, offs_d, HEAD_DIM)
    v = _load_rows(v_base, kv_rows, col_valid, stride_vn, offs_d, HEAD_DIM)
    return k, v, col_valid


@triton.jit
def fwd_tile(
    Q, K, V, LSE, Q_SLOTS, KV_SLOTS, Q_COUNTS, KV_COUNTS, KV_NUM_BLOCKS, KV_INDICES, SCRATCH,
    b, h, m, H, L_Q, NUM_Q_BLOCKS, MAX_KV, HEAD_DIM, sm_scale,
    stride_qsb, stride_kvsb, stride_qcb, stride_kvcb,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """One query block of one head: flash-style online softmax over its listed KV blocks.

    Stores LSE (contiguous ``[B, H, L_Q]``); returns the normalised output tile (fp32), its rows
    and the store mask for the caller to write O.
    """
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    q_rows, row_valid = _block_rows(Q_SLOTS, stride_qsb, Q_COUNTS, stride_qcb, b, m, offs)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, q_rows, row_valid, stride_qn, offs_d, HEAD_DIM)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    qk_scale = sm_scale * 1.4426950408889634

    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)

    n_kv, list_start, scratch = _kv_list(KV_NUM_BLOCKS, KV_INDICES, SCRATCH, b, h, m, H, NUM_Q_BLOCKS, MAX_KV,
                                         BLOCK, CHUNK)
    for first in range(0, n_kv, CHUNK):
        n_rows = _pack_rows(list_start, first, n_kv, KV_SLOTS, stride_kvsb, KV_COUNTS, stride_kvcb, b, scratch,
                            BLOCK, CHUNK)
        for step in range(0, tl.cdiv(n_rows, BLOCK)):
            k, v, col_valid = _packed_kv(scratch, step, n_rows, offs, k_base, v_base, stride_kn, stride_vn, offs_d,
                                         HEAD_DIM)
            s = _dot(q, tl.trans(k), UPCAST, IEEE) * qk_scale
            s = tl.where(col_valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen only masked columns keeps m = -inf; shift by 0 to avoid inf - inf.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_shift[:, None])
            alpha = tl.math.exp2(m_i - m_shift)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, IEEE)
            m_i = m_new

    has_mass = l_i > 0.0
    out = acc / tl.where(has_mass, l_i, 1.0)[:, None]
    lse = tl.where(has_mass, (m_i + tl.math.log2(tl.where(has_mass, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    stored = q_rows >= 0
    tl.store(LSE + (b * H + h) * L_Q + q_rows, lse, mask=stored)
    mask = stored[:, None] & (offs_d < HEAD_DIM)[None, :]
    return out, q_rows, offs_d, mask


@triton.jit
def dq_tile(
    Q, K, V, DO, LSE, DELTA, DQ, Q_SLOTS, KV_SLOTS, Q_COUNTS, KV_COUNTS, KV_NUM_BLOCKS, KV_INDICES, SCRATCH,
    b, h, m, H, L_Q, NUM_Q_BLOCKS, MAX_KV, HEAD_DIM, sm_scale,
    stride_qsb, stride_kvsb, stride_qcb, stride_kvcb,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """dQ of one query block of one head, walking its KV list; stores dQ."""
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    q_rows, row_valid = _block_rows(Q_SLOTS, stride_qsb, Q_COUNTS, stride_qcb, b, m, offs)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, q_rows, row_valid, stride_qn, offs_d, HEAD_DIM)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, q_rows, row_valid, stride_don, offs_d, HEAD_DIM)
    stats = (b * H + h) * L_Q + q_rows
    lse2 = tl.load(LSE + stats, mask=row_valid, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + stats, mask=row_valid, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    qk_scale = sm_scale * 1.4426950408889634

    dq = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    n_kv, list_start, scratch = _kv_list(KV_NUM_BLOCKS, KV_INDICES, SCRATCH, b, h, m, H, NUM_Q_BLOCKS, MAX_KV,
                                         BLOCK, CHUNK)
    for first in range(0, n_kv, CHUNK):
        n_rows = _pack_rows(list_start, first, n_kv, KV_SLOTS, stride_kvsb, KV_COUNTS, stride_kvcb, b, scratch,
                            BLOCK, CHUNK)
        for step in range(0, tl.cdiv(n_rows, BLOCK)):
            k, v, col_valid = _packed_kv(scratch, step, n_rows, offs, k_base, v_base, stride_kn, stride_vn, offs_d,
                                         HEAD_DIM)
            s = _dot(q, tl.trans(k), UPCAST, IEEE) * qk_scale
            valid = row_valid[:, None] & col_valid[None, :]
            p = tl.where(valid, tl.math.exp2(s - lse2[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), UPCAST, IEEE)
            # where, not a multiply: a masked product may hold inf - inf (0 * NaN = NaN).
            ds = tl.where(valid, p * (dp - delta[:, None]), 0.0)
            dq += _dot(ds.to(k.dtype), k, UPCAST, IEEE)

    dq = dq * sm_scale
    mask = (q_rows >= 0)[:, None] & (offs_d < HEAD_DIM)[None, :]
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + q_rows[:, None] * stride_dqn + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask)


@triton.jit
def dkdv_tile(
    Q, K, V, DO, LSE, DELTA, DV, Q_SLOTS, KV_SLOTS, Q_COUNTS, KV_COUNTS, Q_NUM_BLOCKS, Q_INDICES,
    b, h, n, H, L_Q, NUM_KV_BLOCKS, MAX_Q, HEAD_DIM, sm_scale,
    stride_qsb, stride_kvsb, stride_qcb, stride_kvcb,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dvb, stride_dvh, stride_dvn,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """dK and dV of one KV block of one head, walking its (transposed) query list.

    Stores dV; returns dK (fp32), its rows and the store mask for the caller to write dK.
    """
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    kv_rows, col_valid = _block_rows(KV_SLOTS, stride_kvsb, KV_COUNTS, stride_kvcb, b, n, offs)
    k = _load_rows(K + b * stride_kb + h * stride_kh, kv_rows, col_valid, stride_kn, offs_d, HEAD_DIM)
    v = _load_rows(V + b * stride_vb + h * stride_vh, kv_rows, col_valid, stride_vn, offs_d, HEAD_DIM)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    stats_base = (b * H + h) * L_Q
    qk_scale = sm_scale * 1.4426950408889634

    dk = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    list_row = (b * H + h) * NUM_KV_BLOCKS + n
    n_q = tl.load(Q_NUM_BLOCKS + list_row)
    for i in range(0, n_q):
        qb = tl.load(Q_INDICES + list_row * MAX_Q + i)
        q_rows, row_valid = _block_rows(Q_SLOTS, stride_qsb, Q_COUNTS, stride_qcb, b, qb, offs)
        q = _load_rows(q_base, q_rows, row_valid, stride_qn, offs_d, HEAD_DIM)
        do = _load_rows(do_base, q_rows, row_valid, stride_don, offs_d, HEAD_DIM)
        lse2 = tl.load(LSE + stats_base + q_rows, mask=row_valid, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + stats_base + q_rows, mask=row_valid, other=0.0)
        # Transposed scores: [kv slots, q slots].
        s_t = _dot(k, tl.trans(q), UPCAST, IEEE) * qk_scale
        valid = col_valid[:, None] & row_valid[None, :]
        p_t = tl.where(valid, tl.math.exp2(s_t - lse2[None, :]), 0.0)
        dv += _dot(p_t.to(do.dtype), do, UPCAST, IEEE)
        dp_t = _dot(v, tl.trans(do), UPCAST, IEEE)
        ds_t = tl.where(valid, p_t * (dp_t - delta[None, :]), 0.0)
        dk += _dot(ds_t.to(q.dtype), q, UPCAST, IEEE)

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
    Q, K, V, O, LSE, Q_SLOTS, KV_SLOTS, Q_COUNTS, KV_COUNTS, KV_NUM_BLOCKS, KV_INDICES, SCRATCH,
    sm_scale, H, L_Q, NUM_Q_BLOCKS, MAX_KV, HEAD_DIM,
    stride_qsb, stride_kvsb, stride_qcb, stride_kvcb,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    CHUNK: tl.constexpr,
):
    m = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    out, rows, offs_d, mask = fwd_tile(
        Q, K, V, LSE, Q_SLOTS, KV_SLOTS, Q_COUNTS, KV_COUNTS, KV_NUM_BLOCKS, KV_INDICES, SCRATCH,
        b, h, m, H, L_Q, NUM_Q_BLOCKS, MAX_KV, HEAD_DIM, sm_scale,
        stride_qsb, stride_kvsb, stride_qcb, stride_kvcb,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        BLOCK, BLOCK_D, UPCAST, IEEE, CHUNK,
    )
    o_ptrs = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask)


@triton.jit
def block_sparse_attn_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV,
    Q_SLOTS, KV_SLOTS, Q_COUNTS, KV_COUNTS, KV_NUM_BLOCKS, KV_INDICES, Q_NUM_BLOCKS, Q_INDICES, SCRATCH,
    sm_scale, H, L_Q, NUM_Q_BLOCKS, NUM_KV_BLOCKS, MAX_KV, MAX_Q, HEAD_DIM,
    stride_qsb, stride_kvsb, stride_qcb, stride_kvcb,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    if pid < NUM_KV_BLOCKS:
        dk, rows, offs_d, mask = dkdv_tile(
            Q, K, V, DO, LSE, DELTA, DV, Q_SLOTS, KV_SLOTS, Q_COUNTS, KV_COUNTS, Q_NUM_BLOCKS, Q_INDICES,
            b, h, pid, H, L_Q, NUM_KV_BLOCKS, MAX_Q, HEAD_DIM, sm_scale,
            stride_qsb, stride_kvsb, stride_qcb, stride_kvcb,
            stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
            stride_dob, stride_doh, stride_don, stride_dvb, stride_dvh, stride_dvn,
            BLOCK, BLOCK_D, UPCAST, IEEE,
        )
        dk_ptrs = DK + b * stride_dkb + h * stride_dkh + rows[:, None] * stride_dkn + offs_d[None, :]
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=mask)
    else:
        dq_tile(
            Q, K, V, DO, LSE, DELTA, DQ, Q_SLOTS, KV_SLOTS, Q_COUNTS, KV_COUNTS, KV_NUM_BLOCKS, KV_INDICES, SCRATCH,
            b, h, pid - NUM_KV_BLOCKS, H, L_Q, NUM_Q_BLOCKS, MAX_KV, HEAD_DIM, sm_scale,
            stride_qsb, stride_kvsb, stride_qcb, stride_kvcb,
            stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
            stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
            BLOCK, BLOCK_D, UPCAST, IEEE, CHUNK,
        )
