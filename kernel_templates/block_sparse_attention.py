"""Block-sparse attention kernels (forward and backward) in Triton.

All tensors are in tile-major order: ``[B, H, M * BLOCK, D]`` with ``M`` blocks of ``BLOCK``
slots, the valid slots of a block first (``*_COUNTS[m]`` of them). Selections follow
FlexAttention's conventions: query-major ``KV_NUM_BLOCKS[B, H, Mq]`` / ``KV_INDICES[B, H, Mq,
MAX_KV]`` for the forward and dQ, kv-major ``Q_NUM_BLOCKS[B, H, Mk]`` / ``Q_INDICES[B, H, Mk,
MAX_Q]`` for dK/dV. Count tensors are ``[M]`` (shared by the batch, batch stride 0) or ``[B, M]``. Padding slots are never read (masked loads with ``other=0``) and never
contribute to a softmax or a gradient, so whatever they hold cannot change a result.

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
def _load_block(base, block, count, stride_n, offs_n, offs_d, HEAD_DIM):
    rows = block * offs_n.shape[0] + offs_n
    mask = (offs_n < count)[:, None] & (offs_d < HEAD_DIM)[None, :]
    return tl.load(base + rows[:, None] * stride_n + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def block_sparse_attn_fwd_kernel(
    Q, K, V, O, LSE,
    Q_COUNTS, KV_COUNTS, KV_NUM_BLOCKS, KV_INDICES,
    sm_scale, stride_qcb, stride_kvcb,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    H, NUM_Q_BLOCKS, MAX_KV, HEAD_DIM,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    q_count = tl.load(Q_COUNTS + b * stride_qcb + pid_m)
    row_valid = offs_m < q_count

    q = _load_block(Q + b * stride_qb + h * stride_qh, pid_m, q_count, stride_qn, offs_m, offs_d, HEAD_DIM)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    qk_scale = sm_scale * 1.4426950408889634

    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)

    list_row = pid_bh * NUM_Q_BLOCKS + pid_m
    n_kv = tl.load(KV_NUM_BLOCKS + list_row)
    for j in range(0, n_kv):
        kb = tl.load(KV_INDICES + list_row * MAX_KV + j)
        kv_count = tl.load(KV_COUNTS + b * stride_kvcb + kb)
        k = _load_block(k_base, kb, kv_count, stride_kn, offs_n, offs_d, HEAD_DIM)
        v = _load_block(v_base, kb, kv_count, stride_vn, offs_n, offs_d, HEAD_DIM)
        s = _dot(q, tl.trans(k), UPCAST, IEEE) * qk_scale
        s = tl.where((offs_n < kv_count)[None, :], s, float("-inf"))
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
    out = tl.where(row_valid[:, None], out, 0.0)
    lse = tl.where(has_mass, (m_i + tl.math.log2(tl.where(has_mass, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    lse = tl.where(row_valid, lse, 0.0)

    rows = pid_m * BLOCK + offs_m
    o_ptrs = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_d < HEAD_DIM)[None, :])
    # LSE is contiguous [B, H, Mq * BLOCK].
    tl.store(LSE + pid_bh * NUM_Q_BLOCKS * BLOCK + rows, lse)


@triton.jit
def block_sparse_attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    Q_COUNTS, KV_COUNTS, KV_NUM_BLOCKS, KV_INDICES,
    sm_scale, stride_qcb, stride_kvcb,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    H, NUM_Q_BLOCKS, MAX_KV, HEAD_DIM,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    q_count = tl.load(Q_COUNTS + b * stride_qcb + pid_m)
    row_valid = offs_m < q_count
    rows = pid_m * BLOCK + offs_m

    q = _load_block(Q + b * stride_qb + h * stride_qh, pid_m, q_count, stride_qn, offs_m, offs_d, HEAD_DIM)
    do = _load_block(DO + b * stride_dob + h * stride_doh, pid_m, q_count, stride_don, offs_m, offs_d, HEAD_DIM)
    row_stats = pid_bh * NUM_Q_BLOCKS * BLOCK + rows
    lse2 = tl.load(LSE + row_stats) * 1.4426950408889634
    delta = tl.load(DELTA + row_stats)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    qk_scale = sm_scale * 1.4426950408889634

    dq = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    list_row = pid_bh * NUM_Q_BLOCKS + pid_m
    n_kv = tl.load(KV_NUM_BLOCKS + list_row)
    for j in range(0, n_kv):
        kb = tl.load(KV_INDICES + list_row * MAX_KV + j)
        kv_count = tl.load(KV_COUNTS + b * stride_kvcb + kb)
        k = _load_block(k_base, kb, kv_count, stride_kn, offs_n, offs_d, HEAD_DIM)
        v = _load_block(v_base, kb, kv_count, stride_vn, offs_n, offs_d, HEAD_DIM)
        s = _dot(q, tl.trans(k), UPCAST, IEEE) * qk_scale
        valid = row_valid[:, None] & (offs_n < kv_count)[None, :]
        p = tl.where(valid, tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), UPCAST, IEEE)
        # where, not a multiply: delta of a padding row may be anything (0 * NaN = NaN).
        ds = tl.where(valid, p * (dp - delta[:, None]), 0.0)
        dq += _dot(ds.to(k.dtype), k, UPCAST, IEEE)

    dq = dq * sm_scale
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqn + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=(offs_d < HEAD_DIM)[None, :])


@triton.jit
def block_sparse_attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    Q_COUNTS, KV_COUNTS, Q_NUM_BLOCKS, Q_INDICES,
    sm_scale, stride_qcb, stride_kvcb,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, NUM_Q_BLOCKS, NUM_KV_BLOCKS, MAX_Q, HEAD_DIM,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    kv_count = tl.load(KV_COUNTS + b * stride_kvcb + pid_n)
    col_valid = offs_n < kv_count

    k = _load_block(K + b * stride_kb + h * stride_kh, pid_n, kv_count, stride_kn, offs_n, offs_d, HEAD_DIM)
    v = _load_block(V + b * stride_vb + h * stride_vh, pid_n, kv_count, stride_vn, offs_n, offs_d, HEAD_DIM)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    qk_scale = sm_scale * 1.4426950408889634

    dk = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    list_row = pid_bh * NUM_KV_BLOCKS + pid_n
    n_q = tl.load(Q_NUM_BLOCKS + list_row)
    for i in range(0, n_q):
        qb = tl.load(Q_INDICES + list_row * MAX_Q + i)
        q_count = tl.load(Q_COUNTS + b * stride_qcb + qb)
        q = _load_block(q_base, qb, q_count, stride_qn, offs_m, offs_d, HEAD_DIM)
        do = _load_block(do_base, qb, q_count, stride_don, offs_m, offs_d, HEAD_DIM)
        row_stats = pid_bh * NUM_Q_BLOCKS * BLOCK + qb * BLOCK + offs_m
        lse2 = tl.load(LSE + row_stats) * 1.4426950408889634
        delta = tl.load(DELTA + row_stats)
        # Transposed scores: [kv slots, q slots].
        s_t = _dot(k, tl.trans(q), UPCAST, IEEE) * qk_scale
        valid = col_valid[:, None] & (offs_m < q_count)[None, :]
        p_t = tl.where(valid, tl.math.exp2(s_t - lse2[None, :]), 0.0)
        dv += _dot(p_t.to(do.dtype), do, UPCAST, IEEE)
        dp_t = _dot(v, tl.trans(do), UPCAST, IEEE)
        ds_t = tl.where(valid, p_t * (dp_t - delta[None, :]), 0.0)
        dk += _dot(ds_t.to(q.dtype), q, UPCAST, IEEE)

    dk = dk * sm_scale
    rows = pid_n * BLOCK + offs_n
    d_mask = (offs_d < HEAD_DIM)[None, :]
    tl.store(DK + b * stride_dkb + h * stride_dkh + rows[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=d_mask)
    tl.store(DV + b * stride_dvb + h * stride_dvh + rows[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=d_mask)
