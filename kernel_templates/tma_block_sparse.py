"""Block-sparse attention forward over *compact* tile-major Q/K/V through TMA boxes (issue 22, item 2).

The TMA ceiling kernel (:func:`kernel_templates.tma_attention.tma_block_list_attention`) loads every
listed KV tile as one 64-row box of a padded tile-major layout, so a border tile holding 16 tokens
costs a 64-column step; at Wan 480p the selection lists such tiles often (listed tiles are 66 %
full on average), which makes it slower there than the row-packed gather kernel. This kernel keeps
the TMA structure and avoids most of that padding:

- **Layout** (``sparse_inductor.compact_layout``: ``compact_layout``, ``to_compact``, ``from_compact``): tile ``j``'s ``n_j``
  valid tokens are rows ``[off_j, off_j + n_j)`` of ``[B, H, L, D]`` (``L`` = tokens, no gaps), so
  a TMA box may start at any tile. A box runs into the next tile's rows (masked) or past ``L``
  (each head's descriptor has extent ``L``: TMA fills zeros, never the next head's rows).
- **Box classes** (``compact_layout.box_class``): the listed rows are loaded in boxes (a listed tile, or a
  ``BLOCK``-row piece of a run of neighbouring listed tiles), each with the smallest box its rows
  fit, ``BLOCK``, ``BLOCK / 2`` or ``BLOCK / 4`` rows (at least 16, ``tl.dot``'s minimum), and the
  boxes of one softmax step always add up to ``BLOCK`` columns: one full box (no mask), one
  partial box, two half boxes, or four quarter boxes. So at 480p a 16-token tile costs a
  16-column share of a step and the online-softmax rescale still happens once per ``BLOCK``
  columns.
- **Box lists** (``compact_layout.kv_boxes_by_class``): each row's KV list turned into boxes (start row, valid
  rows), runs of listed tiles that are neighbours in memory merged and cut into ``BLOCK``-row
  boxes whatever the tile boundaries, then ordered class by class. A separate pass, so that the
  kernel's loops stay branch-free and pipelined and find a box with two independent loads; the
  selection's top-k could write this form directly.
- **Query side**: one program per (query tile, batch * head) loads its tile as one ``BLOCK``-row box
  at ``off_i``; a partial query tile computes the box's extra rows and stores only its own (a
  masked store: a TMA store of the box would overwrite the next tile's rows, which no padding
  absorbs here; one store per program costs well under 1 % of its time).
- ``q_in_registers``: Q passes through registers once, so that the QK MMAs read it from
  registers (wgmma RS) instead of from shared memory for every box (SS): the 16-column MMAs of
  quarter boxes would otherwise be bound by re-reading Q (2 KB of Q per 0.5 KB of K). Costs ~44
  registers (156 -> 200 at D = 128 in the sm_90a SASS, NOTES v16; occupancy is bound by shared
  memory anyway). The default for query boxes of up to 64 rows: on the H200 it is 1.7 % / 4.0 % faster
  than SS on the dividing and the 480p grid (1.933 vs 1.966 ms, 2.027 vs 2.112 ms; ``bench_attention.py``
  times both, NOTES v16). A 128-row query box in registers spills at 4 warps (2.208 vs 1.819 ms at 480p,
  NOTES v25), so those read Q from shared memory (:func:`q_in_registers_default`).

Output and LSE (natural log, fp32, ``[B, H, L]``) are written in compact tile-major order
(``out_order="tile"``) or scattered straight to sequence order (``out_order="sequence"``, the
store does the inverse permutation). Online softmax in base 2 with fp32 accumulators; a row with
no listed tile gets output 0 and LSE -inf.

query_keep (v23): the query side on a layout of its own, the kept rows only (``q_layout`` of
:func:`tma_packed_block_sparse_attention`; the kernel itself is unchanged).
Out of scope in this first version: text blocks (joint attention), key padding,
block-causal masks, full rows stored without entries, the backward (``tma_block_sparse_bwd.py``).
Non-finite values: a masked box's rows past its count are the next tile's and may hold anything;
their scores are set to -inf by a select, and their V rows to 0 by a select (``_own_rows``), since
``0 * inf`` in P·V would be NaN. That select costs a shared-memory round trip of V in masked boxes
only (sm_90a SASS, D = 128, Q in registers: whole box 407 -> 560 instructions, two half boxes
505 -> 687, four quarter boxes 708 -> 917, full boxes unchanged; 196 -> 210 registers; not yet
timed, NOTES v21).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparse_inductor.compact_layout import MIN_BOX, CompactLayout, check_step, kv_boxes_by_class

# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------
@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # The interpreter multiplies bf16 bit patterns in tl.dot, so it gets fp32 operands.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load_box(k_desc, v_desc, bh, starts, rows, e, stop, BOX: tl.constexpr, HEAD_DIM: tl.constexpr):
    """K and V boxes of ``BOX`` rows of box-list entry ``e``, and which box rows are its tile's.
    Past the class's last entry (an unused place of a step's group) the last entry is loaded
    again with no valid row: every load of a step stays unconditional."""
    last = tl.minimum(e, stop - 1)
    start = tl.load(starts + last)
    count = tl.where(e < stop, tl.load(rows + last), 0)
    k = k_desc.load([bh, start, 0]).reshape(BOX, HEAD_DIM)
    v = v_desc.load([bh, start, 0]).reshape(BOX, HEAD_DIM)
    return k, v, tl.arange(0, BOX) < count


@triton.jit
def _own_rows(x, valid):
    """``x`` with the rows that are not the box's tile's set to 0 (a select): their P is 0, but
    0 * inf in a matmul is NaN, and those rows are another tile's, which may hold any value."""
    return tl.where(valid[:, None], x, tl.zeros_like(x))


@triton.jit
def _scores(q, k, valid, MASKED: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Unscaled scores of one box; its rows that are not the tile's are -inf (``MASKED``)."""
    s = _mma(q, tl.trans(k), None, UPCAST, IEEE)
    if MASKED:
        s = tl.where(valid[None, :], s, float("-inf"))
    return s


@triton.jit
def _rescale(m_i, row_max, l_i, acc, qk_scale):
    """The new running maximum (scaled, base 2) of a step, and l and acc rescaled to it. The scale
    is applied to the row maximum (it is positive) and fused into the exponents."""
    m_new = tl.maximum(m_i, row_max * qk_scale)
    # A row that has seen only masked columns keeps m = -inf; shift by 0 to avoid inf - inf.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_shift)
    return m_new, m_shift, l_i * alpha, acc * alpha[:, None]


@triton.jit
def _accumulate(s, v, m_shift, qk_scale, l_i, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Add one box's probabilities to l and its P·V to acc."""
    p = tl.math.exp2(s * qk_scale - m_shift[:, None])
    return l_i + tl.sum(p, 1), _mma(p.to(v.dtype), v, acc, UPCAST, IEEE)


@triton.jit
def _step_one(q, m_i, l_i, acc, k_desc, v_desc, bh, starts, rows, e, stop, qk_scale,
              BOX: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
              IEEE: tl.constexpr):
    """One online-softmax step over one tile in one box."""
    k, v, valid = _load_box(k_desc, v_desc, bh, starts, rows, e, stop, BOX, HEAD_DIM)
    if MASKED:
        v = _own_rows(v, valid)
    s = _scores(q, k, valid, MASKED, UPCAST, IEEE)
    m_i, m_shift, l_i, acc = _rescale(m_i, tl.max(s, 1), l_i, acc, qk_scale)
    l_i, acc = _accumulate(s, v, m_shift, qk_scale, l_i, acc, UPCAST, IEEE)
    return m_i, l_i, acc


@triton.jit
def _step_two(q, m_i, l_i, acc, k_desc, v_desc, bh, starts, rows, e, stop, qk_scale,
              BOX: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """One step over the tiles of entries ``e, e + 1``, each in a half box: one rescale."""
    k0, v0, valid0 = _load_box(k_desc, v_desc, bh, starts, rows, e, stop, BOX, HEAD_DIM)
    k1, v1, valid1 = _load_box(k_desc, v_desc, bh, starts, rows, e + 1, stop, BOX, HEAD_DIM)
    v0, v1 = _own_rows(v0, valid0), _own_rows(v1, valid1)
    s0 = _scores(q, k0, valid0, True, UPCAST, IEEE)
    s1 = _scores(q, k1, valid1, True, UPCAST, IEEE)
    m_i, m_shift, l_i, acc = _rescale(m_i, tl.maximum(tl.max(s0, 1), tl.max(s1, 1)), l_i, acc, qk_scale)
    l_i, acc = _accumulate(s0, v0, m_shift, qk_scale, l_i, acc, UPCAST, IEEE)
    l_i, acc = _accumulate(s1, v1, m_shift, qk_scale, l_i, acc, UPCAST, IEEE)
    return m_i, l_i, acc


@triton.jit
def _step_four(q, m_i, l_i, acc, k_desc, v_desc, bh, starts, rows, e, stop, qk_scale,
               BOX: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """One step over the tiles of entries ``e .. e + 3``, each in a quarter box: one rescale."""
    k0, v0, valid0 = _load_box(k_desc, v_desc, bh, starts, rows, e, stop, BOX, HEAD_DIM)
    k1, v1, valid1 = _load_box(k_desc, v_desc, bh, starts, rows, e + 1, stop, BOX, HEAD_DIM)
    k2, v2, valid2 = _load_box(k_desc, v_desc, bh, starts, rows, e + 2, stop, BOX, HEAD_DIM)
    k3, v3, valid3 = _load_box(k_desc, v_desc, bh, starts, rows, e + 3, stop, BOX, HEAD_DIM)
    v0, v1, v2, v3 = _own_rows(v0, valid0), _own_rows(v1, valid1), _own_rows(v2, valid2), _own_rows(v3, valid3)
    s0 = _scores(q, k0, valid0, True, UPCAST, IEEE)
    s1 = _scores(q, k1, valid1, True, UPCAST, IEEE)
    s2 = _scores(q, k2, valid2, True, UPCAST, IEEE)
    s3 = _scores(q, k3, valid3, True, UPCAST, IEEE)
    row_max = tl.maximum(tl.maximum(tl.max(s0, 1), tl.max(s1, 1)), tl.maximum(tl.max(s2, 1), tl.max(s3, 1)))
    m_i, m_shift, l_i, acc = _rescale(m_i, row_max, l_i, acc, qk_scale)
    l_i, acc = _accumulate(s0, v0, m_shift, qk_scale, l_i, acc, UPCAST, IEEE)
    l_i, acc = _accumulate(s1, v1, m_shift, qk_scale, l_i, acc, UPCAST, IEEE)
    l_i, acc = _accumulate(s2, v2, m_shift, qk_scale, l_i, acc, UPCAST, IEEE)
    l_i, acc = _accumulate(s3, v3, m_shift, qk_scale, l_i, acc, UPCAST, IEEE)
    return m_i, l_i, acc


@triton.jit
def _walk_class(q, m_i, l_i, acc, k_desc, v_desc, bh, starts, rows, start, stop, qk_scale,
                BOX: tl.constexpr, GROUP: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
                UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """The list entries ``[start, stop)`` of one box class, ``GROUP`` boxes of ``BOX`` rows a step."""
    for e in range(start, stop, GROUP):
        if GROUP == 1:
            m_i, l_i, acc = _step_one(q, m_i, l_i, acc, k_desc, v_desc, bh, starts, rows, e, stop,
                                      qk_scale, BOX, MASKED, HEAD_DIM, UPCAST, IEEE)
        elif GROUP == 2:
            m_i, l_i, acc = _step_two(q, m_i, l_i, acc, k_desc, v_desc, bh, starts, rows, e, stop,
                                      qk_scale, BOX, HEAD_DIM, UPCAST, IEEE)
        else:
            m_i, l_i, acc = _step_four(q, m_i, l_i, acc, k_desc, v_desc, bh, starts, rows, e, stop,
                                       qk_scale, BOX, HEAD_DIM, UPCAST, IEEE)
    return m_i, l_i, acc


@triton.jit
def _tma_packed_fwd(q_desc, k_desc, v_desc, k_half_desc, v_half_desc, k_quarter_desc, v_quarter_desc, O, LSE,
                    BOX_STARTS, BOX_ROWS, CLASS_ENDS, TILE_OFFSETS, COUNTS, POSITIONS, L, M, MAX_LIST, H, stride_ob,
                    stride_oh, stride_ol, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, SEQUENCE_ORDER: tl.constexpr,
                    Q_IN_REGISTERS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr, SUB_BOXES: tl.constexpr):
    """The kernel with host-side descriptors (``TensorDescriptor`` arguments)."""
    _packed_program(q_desc, k_desc, v_desc, k_half_desc, v_half_desc, k_quarter_desc, v_quarter_desc, O, LSE,
                    BOX_STARTS, BOX_ROWS, CLASS_ENDS, TILE_OFFSETS, COUNTS, POSITIONS, L, M, MAX_LIST, H, stride_ob,
                    stride_oh, stride_ol, qk_scale,
                    HEAD_DIM, BLOCK, SEQUENCE_ORDER, Q_IN_REGISTERS, UPCAST, IEEE, BLOCK_M, SUB_BOXES)


@triton.jit
def _device_descriptor(X, BH, L, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
    """An in-kernel descriptor over ``[B * H, L, D]`` (contiguous) with ``ROWS``-row boxes."""
    return tl.make_tensor_descriptor(X, shape=[BH, L, HEAD_DIM], strides=[L * HEAD_DIM, HEAD_DIM, 1],
                                     block_shape=[1, ROWS, HEAD_DIM])


@triton.jit
def _tma_packed_fwd_device(Q, K, V, O, LSE, BOX_STARTS, BOX_ROWS, CLASS_ENDS, TILE_OFFSETS, COUNTS, POSITIONS, BH,
                           L, M, MAX_LIST, H, stride_ob, stride_oh, stride_ol, qk_scale, HEAD_DIM: tl.constexpr,
                           BLOCK: tl.constexpr, HALF: tl.constexpr, QUARTER: tl.constexpr, SEQUENCE_ORDER: tl.constexpr,
                           Q_IN_REGISTERS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                           BLOCK_M: tl.constexpr, SUB_BOXES: tl.constexpr):
    """The same program with device-side descriptors built from pointers, the form an Inductor
    template can take (Inductor's own TMA templates build theirs so; NOTES v17): the A/B of their
    cost against host descriptors is ``tma_packed_kernel_devdesc`` in bench_attention.py."""
    _packed_program(_device_descriptor(Q, BH, L, HEAD_DIM, BLOCK_M), _device_descriptor(K, BH, L, HEAD_DIM, BLOCK),
                    _device_descriptor(V, BH, L, HEAD_DIM, BLOCK), _device_descriptor(K, BH, L, HEAD_DIM, HALF),
                    _device_descriptor(V, BH, L, HEAD_DIM, HALF), _device_descriptor(K, BH, L, HEAD_DIM, QUARTER),
                    _device_descriptor(V, BH, L, HEAD_DIM, QUARTER), O, LSE, BOX_STARTS, BOX_ROWS, CLASS_ENDS,
                    TILE_OFFSETS, COUNTS, POSITIONS, L, M, MAX_LIST, H, stride_ob, stride_oh, stride_ol, qk_scale,
                    HEAD_DIM, BLOCK, SEQUENCE_ORDER, Q_IN_REGISTERS, UPCAST, IEEE, BLOCK_M, SUB_BOXES)


@triton.jit
def _packed_program(q_desc, k_desc, v_desc, k_half_desc, v_half_desc, k_quarter_desc, v_quarter_desc, O, LSE,
                    BOX_STARTS, BOX_ROWS, CLASS_ENDS, TILE_OFFSETS, COUNTS, POSITIONS, L, M, MAX_LIST, H, stride_ob,
                    stride_oh, stride_ol, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, SEQUENCE_ORDER: tl.constexpr,
                    Q_IN_REGISTERS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr, SUB_BOXES: tl.constexpr):
    """One (query tile, batch * head) program over its box lists, whatever made the descriptors:
    its tile's rows in one ``BLOCK_M``-row query box, or (``SUB_BOXES``: query boxes smaller than
    the tile) in as many as its rows need, one after the other."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    q_start = tl.load(TILE_OFFSETS + tile)
    count = tl.load(COUNTS + tile)
    if SUB_BOXES:
        for sub in range(0, count, BLOCK_M):
            _query_box(q_desc, k_desc, v_desc, k_half_desc, v_half_desc, k_quarter_desc, v_quarter_desc, O, LSE,
                       BOX_STARTS, BOX_ROWS, CLASS_ENDS, POSITIONS, L, M, MAX_LIST, H, stride_ob, stride_oh,
                       stride_ol, qk_scale, tile, bh, q_start + sub, count - sub, HEAD_DIM, BLOCK, SEQUENCE_ORDER,
                       Q_IN_REGISTERS, UPCAST, IEEE, BLOCK_M)
    else:
        _query_box(q_desc, k_desc, v_desc, k_half_desc, v_half_desc, k_quarter_desc, v_quarter_desc, O, LSE,
                   BOX_STARTS, BOX_ROWS, CLASS_ENDS, POSITIONS, L, M, MAX_LIST, H, stride_ob, stride_oh, stride_ol,
                   qk_scale, tile, bh, q_start, count, HEAD_DIM, BLOCK, SEQUENCE_ORDER, Q_IN_REGISTERS, UPCAST, IEEE,
                   BLOCK_M)


@triton.jit
def _query_box(q_desc, k_desc, v_desc, k_half_desc, v_half_desc, k_quarter_desc, v_quarter_desc, O, LSE,
               BOX_STARTS, BOX_ROWS, CLASS_ENDS, POSITIONS, L, M, MAX_LIST, H, stride_ob, stride_oh, stride_ol,
               qk_scale, tile, bh, q_start, mine_rows, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
               SEQUENCE_ORDER: tl.constexpr, Q_IN_REGISTERS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """The ``BLOCK_M`` query rows from compact row ``q_start`` over the tile's box lists (steps of
    ``BLOCK`` KV rows); stores the first ``mine_rows`` of them."""
    q = q_desc.load([bh, q_start, 0]).reshape(BLOCK_M, HEAD_DIM)
    if Q_IN_REGISTERS:
        # An exact multiply by 1.0 the compiler cannot fold: Q becomes a register operand (wgmma RS).
        q = (q.to(tl.float32) * (qk_scale / qk_scale)).to(q.dtype)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    row = bh * M + tile
    starts = BOX_STARTS + row * MAX_LIST
    rows = BOX_ROWS + row * MAX_LIST
    full_end = tl.load(CLASS_ENDS + row * 4)
    whole_end = tl.load(CLASS_ENDS + row * 4 + 1)
    half_end = tl.load(CLASS_ENDS + row * 4 + 2)
    quarter_end = tl.load(CLASS_ENDS + row * 4 + 3)
    m_i, l_i, acc = _walk_class(q, m_i, l_i, acc, k_desc, v_desc, bh, starts, rows, 0, full_end, qk_scale, BLOCK, 1,
                                False, HEAD_DIM, UPCAST, IEEE)
    m_i, l_i, acc = _walk_class(q, m_i, l_i, acc, k_desc, v_desc, bh, starts, rows, full_end, whole_end, qk_scale,
                                BLOCK, 1, True, HEAD_DIM, UPCAST, IEEE)
    if BLOCK // 2 >= 16:
        m_i, l_i, acc = _walk_class(q, m_i, l_i, acc, k_half_desc, v_half_desc, bh, starts, rows, whole_end, half_end,
                                    qk_scale, BLOCK // 2, 2, True, HEAD_DIM, UPCAST, IEEE)
    if BLOCK // 4 >= 16:
        m_i, l_i, acc = _walk_class(q, m_i, l_i, acc, k_quarter_desc, v_quarter_desc, bh, starts, rows, half_end,
                                    quarter_end, qk_scale, BLOCK // 4, 4, True, HEAD_DIM, UPCAST, IEEE)

    # No mass (l = 0) only for a row that listed nothing: output 0, LSE -inf. NaN mass stays NaN.
    has_mass = (l_i > 0.0) | (l_i != l_i)
    out = acc / tl.where(has_mass, l_i, 1.0)[:, None]
    lse = tl.where(has_mass, (m_i + tl.math.log2(tl.where(has_mass, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    # Only the tile's own rows are stored: the box's others are the next tile's (masked store).
    offs = tl.arange(0, BLOCK_M)
    mine = offs < mine_rows
    dst = q_start + offs
    if SEQUENCE_ORDER:
        dst = tl.load(POSITIONS + dst, mask=mine, other=0)
    tl.store(LSE + bh.to(tl.int64) * L + dst, lse, mask=mine)
    # O may have any row / head / batch strides (e.g. laid out like a transposed [B, L, H, D] q).
    o_rows = (bh // H).to(tl.int64) * stride_ob + (bh % H).to(tl.int64) * stride_oh + dst.to(tl.int64) * stride_ol
    o_ptrs = O + o_rows[:, None] + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mine[:, None])


def _descriptor(x: torch.Tensor, rows: int):
    """A TMA descriptor over ``[B * H, L, D]`` with ``rows``-row boxes (per-head extent ``L``)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, H, L, D = x.shape
    return TensorDescriptor.from_tensor(x.reshape(B * H, L, D), [1, rows, D])


def _check(q, k, v, kv_num_blocks, kv_indices, compact, scale, q_layout=None):
    if q_layout is None:
        if not (q.shape == k.shape == v.shape and q.dim() == 4):
            raise ValueError(f"q, k, v must be [B, H, L, D] of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                             f"{tuple(v.shape)}")
    elif not (k.shape == v.shape and q.dim() == k.dim() == 4 and q.shape[:2] == k.shape[:2]
              and q.shape[-1] == k.shape[-1]):
        raise ValueError(f"q must be [B, H, Lq, D] and k, v [B, H, L, D] of one B, H, D, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, L, D = k.shape
    if D not in (64, 128):
        raise ValueError(f"head dim must be 64 or 128, got {D}")
    if L != compact.num_tokens:
        raise ValueError(f"compact tile-major inputs hold the layout's {compact.num_tokens} rows, got {L}")
    if q_layout is not None and (q.shape[2] != q_layout.num_tokens or q_layout.num_tiles != compact.num_tiles
                                 or q_layout.block != compact.block):
        raise ValueError(f"the query layout ({q_layout.num_tiles} tiles of {q_layout.block} slots, "
                         f"{q_layout.num_tokens} rows) must have the KV layout's tiles ({compact.num_tiles} of "
                         f"{compact.block}) and q's {q.shape[2]} rows")
    if scale <= 0:
        raise ValueError(f"scale must be positive (it is applied to the row maximum), got {scale}")
    M = compact.num_tiles
    if tuple(kv_num_blocks.shape) != (B, H, M) or tuple(kv_indices.shape[:3]) != (B, H, M):
        raise ValueError(f"kv_num_blocks must be [B, H, M] = {(B, H, M)} and kv_indices [B, H, M, K]; got "
                         f"{tuple(kv_num_blocks.shape)} and {tuple(kv_indices.shape)}")


def q_in_registers_default(query_rows: int) -> bool:
    """Whether a forward with ``query_rows``-row query boxes keeps Q in registers by default: up to
    64 rows (faster, NOTES v16); not 128 (the accumulator and Q spill at 4 warps, NOTES v25 / v26)."""
    return query_rows <= 64


def tma_packed_block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, compact: CompactLayout, scale=None, *,
                                      out_order: str = "tile", boxes=None, out=None, q_in_registers: bool | None = None,
                                      device_descriptors: bool = False, num_warps: int = 4, num_stages: int = 2,
                                      q_layout: CompactLayout | None = None, step: int | None = None,
                                      query_rows: int | None = None):
    """Block-sparse attention over compact tile-major ``q, k, v`` (``[B, H, L, D]``, :func:`to_compact`):
    query tile ``i`` of head ``(b, h)`` attends to the tokens of KV tiles
    ``kv_indices[b, h, i, :kv_num_blocks[b, h, i]]`` (any order; every entry stored).

    ``boxes``: :func:`kv_boxes_by_class` of these lists, when the caller has it (computed
    otherwise, with adjacent tiles merged). Returns ``(out, lse)``: ``out`` like ``q`` and fp32 ``lse [B, H, L]`` (natural log),
    both in compact tile-major order (``out_order="tile"``) or in sequence order (``"sequence"``).
    ``out``: where to write the output (``[B, H, L, D]``, any strides with a unit feature stride;
    e.g. ``torch.empty_like`` of a sequence-order q that is a transposed view); a new contiguous
    tensor otherwise. ``device_descriptors``: build the TMA descriptors inside the kernel (the form
    a template takes) instead of on the host; the same results.

    ``q_layout``: a compact layout of the query side of its own (query_keep's kept layout,
    :func:`sparse_inductor.query_keep.kept_layout`: tile ``i`` holds ``q_layout.counts[i]`` rows at
    ``q_layout.tile_offsets[i]``, as many tiles and slots per tile as ``compact``); then ``q`` is
    ``[B, H, Lq, D]`` in that order, program ``i`` loads its ``BLOCK``-row query box at its offset
    there (its rows past the count are the next tile's: computed, not stored, as for a partial
    tile) and ``out`` / ``lse`` (``[B, H, Lq]``) come back in that order (``out_order="tile"``, host
    descriptors). The KV side, ``compact`` and the box lists are unchanged. The kernel is the same:
    only its tables and ``L`` (the LSE's row stride) are the query layout's.

    ``step`` (KV rows per online-softmax step, the full box) and ``query_rows`` (the query box):
    each ``compact.block`` or half of it, independently. ``None``: a step of at most 64 rows, and a
    query box of the tile (of at most 64 rows with ``q_layout``): at 128-slot tiles, 64-row steps at
    4 warps are 1.20x faster than 128-row steps at 8 and 128-row ones at 4 spill (H200, NOTES v25). 128-slot tiles with a 64-row
    step and 128-row query boxes keep the S tile at 128 x 64 (the structure of the ceiling probe,
    NOTES v25); 64-row query boxes over 128-slot tiles fit query_keep's 64 kept rows of a tile. A
    query box smaller than a tile's rows is run as many times as the rows need, in one program.
    ``boxes`` must then be :func:`kv_boxes_by_class` with the same ``step``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    _check(q, k, v, kv_num_blocks, kv_indices, compact, scale, q_layout)
    if out_order not in ("tile", "sequence"):
        raise ValueError(f"out_order must be 'tile' or 'sequence', got {out_order!r}")
    if q_layout is not None and (out_order != "tile" or device_descriptors):
        raise ValueError("with a query layout (q_layout) the output is stored in its order (out_order='tile') "
                         "through host descriptors (device_descriptors=False)")
    from sparse_inductor.triton_launch import kernel_flags

    q, k, v = (x.contiguous() for x in (q, k, v))
    B, H, L, D = q.shape
    block = compact.block
    step = check_step(min(block, 64) if step is None else step, block)
    if query_rows is not None and query_rows not in (block, block // 2) or query_rows == block // 2 < MIN_BOX:
        allowed = " or ".join(map(str, [block] + ([block // 2] if block // 2 >= MIN_BOX else [])))
        raise ValueError(f"query_rows must be {allowed} (rows of the query box for {block}-slot tiles: the tile or "
                         f"half of it), got {query_rows}")
    query_rows = query_rows or (min(block, 64) if q_layout is not None else block)
    q_in_registers = q_in_registers_default(query_rows) if q_in_registers is None else q_in_registers
    starts, rows, ends = (boxes if boxes is not None else
                          kv_boxes_by_class(kv_num_blocks, kv_indices, compact, step=step))
    if starts.shape[-1] != kv_indices.shape[-1] * (block // step):
        raise ValueError(f"boxes must be kv_boxes_by_class(..., step={step}) of these lists ({kv_indices.shape[-1]} "
                         f"entries -> {kv_indices.shape[-1] * (block // step)} boxes a row), got {starts.shape[-1]}")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.stride(-1) != 1 or out.dtype != q.dtype:
        raise ValueError(f"out must be a {q.dtype} tensor of shape {tuple(q.shape)} with a unit feature stride, got "
                         f"{out.dtype} {tuple(out.shape)} strides {out.stride()}")
    lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    # Half and quarter boxes exist only from 16 rows (tl.dot's minimum); the full ones stand in.
    half, quarter = (r if r >= MIN_BOX else step for r in (step // 2, step // 4))
    tables = (starts, rows, ends, compact.tile_offsets, compact.counts, compact.positions)
    if q_layout is not None:
        # The query side on its own layout: the programs' tile offsets and counts, and L (the LSE's
        # row stride), are the query layout's; POSITIONS is not read in tile order (any int64 table).
        positions = compact.positions if compact.positions is not None else q_layout.tile_offsets.new_zeros(
            1, dtype=torch.int64)
        tables = (starts, rows, ends, q_layout.tile_offsets, q_layout.counts, positions)
    meta = dict(HEAD_DIM=D, BLOCK=step, BLOCK_M=query_rows, SUB_BOXES=query_rows < block,
                SEQUENCE_ORDER=out_order == "sequence", Q_IN_REGISTERS=q_in_registers,
                **kernel_flags(q.dtype), num_warps=num_warps, num_stages=num_stages)
    grid = (compact.num_tiles, B * H)
    qk_scale = scale * 1.4426950408889634
    if device_descriptors:
        # In-kernel descriptors live in scratch memory that Triton asks this allocator for.
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=q.device))
        _tma_packed_fwd_device[grid](q, k, v, out, lse, *tables, B * H, L, compact.num_tiles, starts.shape[-1],
                                     H, *out.stride()[:3], qk_scale, HALF=half, QUARTER=quarter, **meta)
        return out, lse
    descriptors = [_descriptor(q, query_rows), _descriptor(k, step), _descriptor(v, step), _descriptor(k, half),
                   _descriptor(v, half), _descriptor(k, quarter), _descriptor(v, quarter)]
    _tma_packed_fwd[grid](*descriptors, out, lse, *tables, L, compact.num_tiles, starts.shape[-1], H,
                          *out.stride()[:3], qk_scale, **meta)
    return out, lse
