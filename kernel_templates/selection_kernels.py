"""Triton kernels of the coarse stage (DESIGN.md §3.2, §3.7): tile mean-pooling (alone, or fused with
the compact permutation of the TMA kernels), top-k, the cumulative-mass cut and the query ranking of
``query_keep``.

Both are memory- or launch-bound; their job is to avoid the several passes the same steps
take as separate torch ops (gather, mask, reduce, two full sorts).
"""
import triton
import triton.language as tl


@triton.jit
def _tile_rows(X_HEAD, rows, valid, stride_n, offs_d, HEAD_DIM):
    """The rows at sequence positions ``rows`` of one head (``[BLOCK, BLOCK_D]``), zero where not
    ``valid`` (a tile's padding slots) and past the head dim."""
    mask = valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    # int64 rows: a q sliced from a fused QKV projection has a sequence stride of 3 * H * D, and
    # L * stride passes 2^31 at 1080p with 40 heads.
    return tl.load(X_HEAD + rows.to(tl.int64)[:, None] * stride_n + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _tile_q_k(Q, K, SLOTS, COUNTS, m, bh, H, HEAD_DIM, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
              stride_kn, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Tile ``m``'s rows of Q and K for program ``bh`` (``[BLOCK, BLOCK_D]`` each, zero past the tile's
    count and the head dim), with the count and the row mask. ``SLOTS[m * BLOCK + j]``: sequence
    position of slot ``j`` of tile ``m``; the first ``COUNTS[m]`` slots are valid."""
    b = (bh // H).to(tl.int64)  # b * stride_qb passes 2^31 at 720p from a batch of 6
    h = (bh % H).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    count = tl.load(COUNTS + m)
    rows = tl.load(SLOTS + m * BLOCK + offs)
    valid = offs < count
    q = _tile_rows(Q + b * stride_qb + h * stride_qh, rows, valid, stride_qn, offs_d, HEAD_DIM)
    k = _tile_rows(K + b * stride_kb + h * stride_kh, rows, valid, stride_kn, offs_d, HEAD_DIM)
    return q, k, count, valid, offs, offs_d


@triton.jit
def _store_tile_means(Q_MEAN, K_MEAN, q, k, count, m, bh, NUM_TILES, offs_d, HEAD_DIM):
    """The fp32 means of one tile's Q and K rows into contiguous ``[B, H, NUM_TILES, HEAD_DIM]``: the one
    reduction both pooling kernels use, so their means are bit-equal at equal warps."""
    out = (bh * NUM_TILES + m) * HEAD_DIM + offs_d
    tl.store(Q_MEAN + out, tl.sum(q.to(tl.float32), 0) / count, mask=offs_d < HEAD_DIM)
    tl.store(K_MEAN + out, tl.sum(k.to(tl.float32), 0) / count, mask=offs_d < HEAD_DIM)


@triton.jit
def pool_tiles_kernel(
    Q, K, SLOTS, COUNTS, Q_MEAN, K_MEAN,
    H, NUM_TILES, HEAD_DIM,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Mean of Q and K over the valid tokens of one tile of one head (fp32 accumulate); program
    ``(m, bh)`` is tile ``m`` of batch-head ``bh``."""
    m = tl.program_id(0)
    bh = tl.program_id(1)
    q, k, count, _, _, offs_d = _tile_q_k(Q, K, SLOTS, COUNTS, m, bh, H, HEAD_DIM, stride_qb, stride_qh, stride_qn,
                                          stride_kb, stride_kh, stride_kn, BLOCK, BLOCK_D)
    _store_tile_means(Q_MEAN, K_MEAN, q, k, count, m, bh, NUM_TILES, offs_d, HEAD_DIM)


@triton.jit
def compact_pool_kernel(
    Q, K, SLOTS, COUNTS, TILE_OFFSETS, Q_COMPACT, K_COMPACT, Q_MEAN, K_MEAN,
    H, NUM_TILES, NUM_ROWS, HEAD_DIM,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One tile of one head of Q and K copied into compact tile-major order and mean-pooled, in one
    read: the rows ``pool_tiles_kernel`` loads are also stored at compact rows
    ``TILE_OFFSETS[m] + j`` (``j < COUNTS[m]``) of ``Q_COMPACT`` / ``K_COMPACT``, contiguous
    ``[B, H, NUM_ROWS, HEAD_DIM]``. The means are the same loads reduced the same way as in
    ``pool_tiles_kernel``, so the selection does not depend on which of the two computed them."""
    m = tl.program_id(0)
    bh = tl.program_id(1)
    q, k, count, valid, offs, offs_d = _tile_q_k(Q, K, SLOTS, COUNTS, m, bh, H, HEAD_DIM, stride_qb, stride_qh,
                                                 stride_qn, stride_kb, stride_kh, stride_kn, BLOCK, BLOCK_D)
    # int64: B * H * rows * D passes 2^31 at 720p (21x45x80, H = 40, D = 128) from a batch of 6.
    dst = ((bh.to(tl.int64) * NUM_ROWS + tl.load(TILE_OFFSETS + m) + offs) * HEAD_DIM)[:, None] + offs_d[None, :]
    mask = valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(Q_COMPACT + dst, q, mask=mask)
    tl.store(K_COMPACT + dst, k, mask=mask)
    _store_tile_means(Q_MEAN, K_MEAN, q, k, count, m, bh, NUM_TILES, offs_d, HEAD_DIM)


@triton.jit
def rank_query_rows_kernel(
    Q, SLOTS, COUNTS, N_KEPT, TABLES, KEPT,
    H, NUM_TILES, HEAD_DIM,
    stride_qb, stride_qh, stride_qn,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, F64: tl.constexpr,
):
    """``query_keep``'s ranking of one video tile of one head (DESIGN.md §3.7).

    Rank of slot s: the centre (``COUNTS[m] // 2``) first, then the lowest cosine similarity of
    its query to the centre's (NaN as the most similar), padding slots last, ties to the lower
    slot: ``#{t : key_t < key_s or (key_t == key_s and t < s)}``, counted over all pairs of the
    tile (cheaper than a sort at 64 slots). ``TABLES[.., rank_s] = slot_s`` (``-(slot_s + 2)``
    when ``rank_s >= N_KEPT[m]``: not computed) and ``KEPT[.., s] = rank_s < N_KEPT[m]``.
    """
    m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    count = tl.load(COUNTS + m)
    n_kept = tl.load(N_KEPT + m)
    slots = tl.load(SLOTS + m * BLOCK + offs)
    valid = offs < count
    q = _tile_rows(Q + b * stride_qb + h * stride_qh, slots, valid, stride_qn, offs_d, HEAD_DIM)
    q = q.to(tl.float64) if F64 else q.to(tl.float32)
    is_centre = offs == count // 2
    qc = tl.sum(tl.where(is_centre[:, None], q, 0.0), 0)
    dot = tl.sum(q * qc[None, :], 1)
    # Correctly rounded square roots and division, as torch's: the ranks must not depend on the path.
    if F64:
        norms = tl.sqrt(tl.sum(q * q, 1)) * tl.sqrt(tl.sum(qc * qc, 0))
        cos = dot / tl.where(norms > 1e-30, norms, 1e-30)
    else:
        norms = tl.sqrt_rn(tl.sum(q * q, 1)) * tl.sqrt_rn(tl.sum(qc * qc, 0))
        cos = tl.div_rn(dot, tl.where(norms > 1e-30, norms, 1e-30))
    key = tl.where(cos != cos, 2.0, cos)
    key = tl.where(is_centre, -3.0, tl.where(valid, key, 3.0))
    key_s, key_t = key[:, None], key[None, :]
    before = (key_t < key_s) | ((key_t == key_s) & (offs[None, :] < offs[:, None]))
    rank = tl.sum(before.to(tl.int32), 1)
    base = (bh * NUM_TILES + m) * BLOCK
    tl.store(TABLES + base + rank, tl.where((rank >= n_kept) & (slots >= 0), -slots - 2, slots))
    tl.store(KEPT + base + offs, (rank < n_kept).to(tl.int8))


@triton.jit
def _compact_columns(kept, cols, OUT_ROW):
    """Store the columns where ``kept`` holds, in increasing order, at ``OUT_ROW[0:]``."""
    pos = tl.cumsum(kept.to(tl.int32), 0) - 1
    tl.store(OUT_ROW + pos, cols, mask=kept)


@triton.jit
def _top_k_of_keys(key, in_row, K):
    """Which columns hold the ``K`` largest unsigned ``key`` values, ties to the lower column.

    The K-th largest key is found bit by bit from the top (at most 32 counting passes: cheaper
    than sorting the row; the search stops once exactly K keys lie at or above the candidate),
    and columns equal to it are taken lowest first until K are kept.
    """
    kth = tl.zeros([], tl.uint32)
    bit = tl.full([], 31, tl.int32)
    while bit >= 0:
        candidate = kth | (tl.full([], 1, tl.uint32) << bit.to(tl.uint32))
        n_at_or_above = tl.sum((key >= candidate).to(tl.int32), 0)
        if n_at_or_above >= K:
            kth = candidate
        # Exactly K keys at or above the candidate are the top K whatever the lower bits hold:
        # stop (random scores separate the K-th from the next key after ~20 of the 32 bits).
        bit = tl.where(n_at_or_above == K, -1, bit - 1)
    above = key > kth
    at = (key == kth) & in_row
    ties_wanted = K - tl.sum(above.to(tl.int32), 0)
    return above | (at & (tl.cumsum(at.to(tl.int32), 0) <= ties_wanted))


@triton.jit
def _score_keys(s, in_row):
    """Unsigned keys ordered like the fp32 scores ``s``; columns outside the row and NaN (either
    sign) get key 0, below ``-inf``'s."""
    s = s + 0.0  # -0.0 -> +0.0: equal scores must get equal keys
    bits = s.to(tl.int32, bitcast=True)
    signed_key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the float value
    key = (signed_key ^ (-2147483647 - 1)).to(tl.uint32, bitcast=True)  # same order, unsigned
    return tl.where(in_row & (s == s), key, 0)


@triton.jit
def top_k_tiles_kernel(SCORES, OUT, NUM_COLS, K, COLS: tl.constexpr):
    """The ``K`` highest scores of one row (fp32, contiguous rows of ``NUM_COLS``), ties to the
    lower column; their columns are written in increasing order (``OUT`` rows of ``K``).

    Floats are mapped to unsigned keys with the same order (:func:`_top_k_of_keys`). NaN (either
    sign) gets key 0, below ``-inf``'s: it ranks lowest, as in the CPU op
    (:func:`sparse_inductor.selection.top_k_tiles`).
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, COLS)
    in_row = cols < NUM_COLS
    s = tl.load(SCORES + row * NUM_COLS + cols, mask=in_row, other=float("-inf"))
    key = _score_keys(s, in_row)
    _compact_columns(_top_k_of_keys(key, in_row, K), cols, OUT + row * K)


@triton.jit
def top_k_tiles_allowed_kernel(SCORES, ALLOWED, K_ROWS, OUT, NUM_COLS, NUM_Q_ROWS, WIDTH, COLS: tl.constexpr):
    """:func:`top_k_tiles_kernel` under a block-causal mask: row ``r`` (query tile ``i = r %
    NUM_Q_ROWS``) keeps its ``K_ROWS[i]`` highest scores among the columns ``ALLOWED[i]`` (int8
    ``[NUM_Q_ROWS, NUM_COLS]``) holds; disallowed columns are outside the row, so they rank below
    NaN. ``OUT`` rows of ``WIDTH``, zero past the kept columns (zeroed by the caller)."""
    row = tl.program_id(0).to(tl.int64)
    i = row % NUM_Q_ROWS
    cols = tl.arange(0, COLS)
    in_row = cols < NUM_COLS
    in_row = in_row & (tl.load(ALLOWED + i * NUM_COLS + cols, mask=in_row, other=0) != 0)
    s = tl.load(SCORES + row * NUM_COLS + cols, mask=in_row, other=float("-inf"))
    key = _score_keys(s, in_row)
    _compact_columns(_top_k_of_keys(key, in_row, tl.load(K_ROWS + i)), cols, OUT + row * WIDTH)


@triton.jit
def _mass_cut_row(s, n, in_row, cols, OUT_ROW, P, LO, HI, KEEP_ALL: tl.constexpr):
    """The cut of one row of logits ``s`` over the columns ``in_row`` holds (tile counts ``n``);
    writes the kept columns at ``OUT_ROW`` and returns the length (:func:`mass_cut_tiles_kernel`)."""
    s = tl.where(in_row & (s == s), s, float("-inf"))
    s = s + tl.log(n)
    top = tl.max(s, 0)
    undefined = (top == float("-inf")) | (top == float("inf"))
    e = tl.where(in_row, tl.exp(s - tl.where(undefined, 0.0, top)), 0.0)
    prob = e / tl.sum(e, 0)
    key = tl.where(in_row, prob.to(tl.uint32, bitcast=True), 0)
    key = tl.where(undefined, 0, key)  # every column ties: the lowest are kept
    n_in_row = tl.sum(in_row.to(tl.int32), 0)
    length = n_in_row
    if not KEEP_ALL:
        tau = tl.zeros([], tl.uint32)
        bit = tl.full([], 30, tl.int32)  # probabilities <= 1.0 = 0x3F800000 < 2^30
        while bit >= 0:
            candidate = tau | (tl.full([], 1, tl.uint32) << bit.to(tl.uint32))
            if tl.sum(tl.where(key >= candidate, prob, 0.0), 0) >= P:
                tau = candidate
            bit -= 1
        above = key > tau
        at = (key == tau) & in_row
        p_tie = tl.max(tl.where(at, prob, 0.0), 0)
        missing = P - tl.sum(tl.where(above, prob, 0.0), 0)
        ties = tl.minimum(tl.maximum(tl.math.ceil(missing / tl.where(p_tie > 0, p_tie, 1.0)), 1.0),
                          tl.sum(at.to(tl.float32), 0))
        # tau == 0: the row's float sum fell short of P by rounding; keep every tile.
        length = tl.where(tau > 0, tl.sum(above.to(tl.int32), 0) + ties.to(tl.int32), n_in_row)
        length = tl.where(undefined, LO, length)
    length = tl.minimum(tl.maximum(length, LO), HI)
    _compact_columns(_top_k_of_keys(key, in_row, length), cols, OUT_ROW)
    return length


@triton.jit
def mass_cut_tiles_kernel(LOGITS, COUNTS, NUM, OUT, NUM_COLS, P, LO, HI, WIDTH, KEEP_ALL: tl.constexpr,
                          COLS: tl.constexpr):
    """BSA's cumulative-mass cut of one row (DESIGN.md §3.7): ``P = softmax(logits + ln(counts))``
    over ``NUM_COLS`` tiles; the kept length is that of the shortest prefix of P sorted
    descending (ties to the lower column) whose sum reaches ``P``, clamped to ``[LO, HI]``; the
    kept columns (the top ``length`` of P) are written in increasing order into ``OUT`` (rows of
    ``WIDTH``), the length into ``NUM``.

    No sort: probabilities are non-negative floats, so their bit patterns order like them. A bit
    search finds the largest key ``tau`` whose keys at or above it hold at least ``P`` of the
    mass; that is the key at the cut. The keys above ``tau`` are kept, then ties at ``tau``
    (lowest column first) until the mass is reached. The kept set is then the top ``length``
    keys (:func:`_top_k_of_keys`), which also serves the clamped lengths.

    As the CPU op: a NaN logit counts as ``-inf`` (no mass); a row whose softmax is undefined (no
    finite logit, or a ``+inf`` one) keeps ``LO`` tiles (``HI`` with ``KEEP_ALL``), lowest first.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, COLS)
    in_row = cols < NUM_COLS
    s = tl.load(LOGITS + row * NUM_COLS + cols, mask=in_row, other=float("-inf"))
    n = tl.load(COUNTS + cols, mask=in_row, other=1).to(tl.float32)
    length = _mass_cut_row(s, n, in_row, cols, OUT + row * WIDTH, P, LO, HI, KEEP_ALL)
    tl.store(NUM + row, length)


@triton.jit
def mass_cut_tiles_allowed_kernel(LOGITS, COUNTS, ALLOWED, LO_ROWS, HI_ROWS, NUM, OUT, NUM_COLS, NUM_Q_ROWS, P, WIDTH,
                                  KEEP_ALL: tl.constexpr, COLS: tl.constexpr):
    """:func:`mass_cut_tiles_kernel` under a block-causal mask: row ``r`` (query tile ``i = r %
    NUM_Q_ROWS``) is cut over the columns ``ALLOWED[i]`` (int8 ``[NUM_Q_ROWS, NUM_COLS]``) holds,
    as if it had only those, its length clamped to ``[LO_ROWS[i], HI_ROWS[i]]``."""
    row = tl.program_id(0).to(tl.int64)
    i = row % NUM_Q_ROWS
    cols = tl.arange(0, COLS)
    in_row = cols < NUM_COLS
    in_row = in_row & (tl.load(ALLOWED + i * NUM_COLS + cols, mask=in_row, other=0) != 0)
    s = tl.load(LOGITS + row * NUM_COLS + cols, mask=in_row, other=float("-inf"))
    n = tl.load(COUNTS + cols, mask=cols < NUM_COLS, other=1).to(tl.float32)
    length = _mass_cut_row(s, n, in_row, cols, OUT + row * WIDTH, P, tl.load(LO_ROWS + i), tl.load(HI_ROWS + i),
                           KEEP_ALL)
    tl.store(NUM + row, length)


@triton.jit
def compact_rows_kernel(MASK, NUM, INDICES, NUM_COLS, COLS: tl.constexpr):
    """Per row of a 0/1 ``MASK`` (int8, contiguous rows of ``NUM_COLS``): how many are set, and
    the set columns in increasing order (``INDICES`` rows of ``NUM_COLS``, the rest left as is)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, COLS)
    kept = tl.load(MASK + row * NUM_COLS + cols, mask=cols < NUM_COLS, other=0) != 0
    tl.store(NUM + row, tl.sum(kept.to(tl.int32), 0))
    _compact_columns(kept, cols, INDICES + row * NUM_COLS)
