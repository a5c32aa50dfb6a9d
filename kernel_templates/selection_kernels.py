"""Triton kernels of the coarse stage (DESIGN.md §3.2): tile mean-pooling and top-k.

Both are memory- or launch-bound; their job is to avoid the several passes the same steps
take as separate torch ops (gather, mask, reduce, two full sorts).
"""
import triton
import triton.language as tl


@triton.jit
def pool_tiles_kernel(
    Q, K, SLOTS, COUNTS, Q_MEAN, K_MEAN,
    H, NUM_TILES, HEAD_DIM,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Mean of Q and K over the valid tokens of one tile of one head (fp32 accumulate).

    ``SLOTS[m * BLOCK + j]``: sequence position of slot ``j`` of tile ``m``; the first
    ``COUNTS[m]`` slots are valid. Means are written contiguous ``[B, H, NUM_TILES, HEAD_DIM]``.
    """
    m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    count = tl.load(COUNTS + m)
    rows = tl.load(SLOTS + m * BLOCK + offs)
    mask = (offs < count)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :], mask=mask, other=0.0)
    k = tl.load(K + b * stride_kb + h * stride_kh + rows[:, None] * stride_kn + offs_d[None, :], mask=mask, other=0.0)
    out = (bh * NUM_TILES + m) * HEAD_DIM + offs_d
    tl.store(Q_MEAN + out, tl.sum(q.to(tl.float32), 0) / count, mask=offs_d < HEAD_DIM)
    tl.store(K_MEAN + out, tl.sum(k.to(tl.float32), 0) / count, mask=offs_d < HEAD_DIM)


@triton.jit
def top_k_tiles_kernel(SCORES, OUT, NUM_COLS, K, COLS: tl.constexpr):
    """The ``K`` highest scores of one row (fp32, contiguous rows of ``NUM_COLS``), ties to the
    lower column; their columns are written in increasing order (``OUT`` rows of ``K``).

    Floats are mapped to int32 keys with the same order, one sort finds the K-th largest key,
    and columns equal to it are taken lowest first until K are kept.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, COLS)
    in_row = cols < NUM_COLS
    s = tl.load(SCORES + row * NUM_COLS + cols, mask=in_row, other=float("-inf"))
    s = s + 0.0  # -0.0 -> +0.0: equal scores must get equal keys
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the float value
    lowest = -2147483647 - 1
    key = tl.where(in_row, key, lowest)
    ordered = tl.sort(key, descending=True)
    kth = tl.sum(tl.where(cols == K - 1, ordered, 0), 0)
    above = key > kth
    at = (key == kth) & in_row
    ties_wanted = K - tl.sum(above.to(tl.int32), 0)
    kept = above | (at & (tl.cumsum(at.to(tl.int32), 0) <= ties_wanted))
    pos = tl.cumsum(kept.to(tl.int32), 0) - 1
    tl.store(OUT + row * K + pos, cols, mask=kept)
