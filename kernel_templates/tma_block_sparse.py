"""Block-sparse attention forward over *compact* tile-major Q/K/V through TMA boxes (issue 22, item 2).

The TMA ceiling kernel (:func:`kernel_templates.tma_attention.tma_block_list_attention`) loads every
listed KV tile as one 64-row box of a padded tile-major layout, so a border tile holding 16 tokens
costs a 64-column step; at Wan 480p the selection lists such tiles often (listed tiles are 66 %
full on average), which makes it slower there than the row-packed gather kernel. This kernel keeps
the TMA structure and avoids most of that padding:

- **Layout** (:func:`compact_layout`, :func:`to_compact`, :func:`from_compact`): tile ``j``'s ``n_j``
  valid tokens are rows ``[off_j, off_j + n_j)`` of ``[B, H, L, D]`` (``L`` = tokens, no gaps), so
  a TMA box may start at any tile. A box runs into the next tile's rows (masked) or past ``L``
  (each head's descriptor has extent ``L``: TMA fills zeros, never the next head's rows).
- **Box classes** (:func:`box_class`): the listed rows are loaded in boxes (a listed tile, or a
  ``BLOCK``-row piece of a run of neighbouring listed tiles), each with the smallest box its rows
  fit, ``BLOCK``, ``BLOCK / 2`` or ``BLOCK / 4`` rows (at least 16, ``tl.dot``'s minimum), and the
  boxes of one softmax step always add up to ``BLOCK`` columns: one full box (no mask), one
  partial box, two half boxes, or four quarter boxes. So at 480p a 16-token tile costs a
  16-column share of a step and the online-softmax rescale still happens once per ``BLOCK``
  columns.
- **Box lists** (:func:`kv_boxes_by_class`): each row's KV list turned into boxes (start row, valid
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
  registers (155 -> 199 at D = 128; occupancy is bound by shared memory anyway). Which is faster
  is for the GPU to say (``bench_attention.py`` times both).

Output and LSE (natural log, fp32, ``[B, H, L]``) are written in compact tile-major order
(``out_order="tile"``) or scattered straight to sequence order (``out_order="sequence"``, the
store does the inverse permutation). Online softmax in base 2 with fp32 accumulators; a row with
no listed tile gets output 0 and LSE -inf.

Out of scope in this first version: text blocks (joint attention), key padding, query_keep,
block-causal masks, full rows stored without entries, the backward. Non-finite values in the rows
*after* a listed partial tile (another tile's, loaded by its box and masked) would reach the output
through ``0 * inf`` in P·V: inputs are assumed finite.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

#: Box classes, in the order each row's boxes are walked: ``BLOCK`` valid rows (unmasked), more than
#: ``BLOCK / 2`` in a ``BLOCK``-row box, at most ``BLOCK / 2`` in a half box (two per step), at most
#: ``BLOCK / 4`` in a quarter box (four per step).
FULL, WHOLE_BOX, HALF_BOX, QUARTER_BOX = range(4)
NUM_CLASSES = 4
#: The smallest box: ``tl.dot`` takes no dimension under 16.
MIN_BOX = 16


def box_rows(cls: int, block: int) -> int:
    """Rows of the TMA box of class ``cls`` for ``block``-slot tiles."""
    return (block, block, block // 2, block // 4)[cls]


def box_class(count: int, block: int) -> int:
    """The class of a box of ``count`` valid rows (:data:`FULL` ... :data:`QUARTER_BOX`)."""
    if count == block:
        return FULL
    if block // 4 >= MIN_BOX and count <= block // 4:
        return QUARTER_BOX
    if block // 2 >= MIN_BOX and count <= block // 2:
        return HALF_BOX
    return WHOLE_BOX


# ---------------------------------------------------------------------------------------------
# Layout and lists (torch; separate from the kernel: under the backend the permutation belongs in
# the pointwise kernel that produces Q/K/V, the class order in the selection's list writer).
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompactLayout:
    """Compact tile-major order of a video grid (no text): tile ``m`` holds rows
    ``[tile_offsets[m], tile_offsets[m] + counts[m])``.

    Attributes:
        block: slots per tile of the padded layout (the kernel's ``BLOCK``).
        counts, tile_offsets: int32 ``[num_tiles]``.
        positions: int64 ``[num_tokens]``, the sequence position of each compact row.
        rows: int64 ``[num_tokens]``, the compact row of each sequence position.
    """

    block: int
    num_tiles: int
    num_tokens: int
    counts: torch.Tensor
    tile_offsets: torch.Tensor
    positions: torch.Tensor
    rows: torch.Tensor


def compact_layout(layout) -> CompactLayout:
    """The compact order of a :class:`sparse_inductor.layout.TileLayout`: its slot table with the
    padding slots dropped (a tile's valid slots come first, so tiles stay in order)."""
    if layout.num_tiles != layout.num_video_tiles:
        raise ValueError("compact_layout covers video-only layouts; text blocks are out of scope")
    slots = layout.slots
    positions = slots[slots >= 0].long()
    rows = torch.empty_like(positions)
    rows[positions] = torch.arange(positions.numel(), device=positions.device)
    counts = layout.counts.to(torch.int32)
    return CompactLayout(
        block=layout.block_size, num_tiles=layout.num_tiles, num_tokens=positions.numel(), counts=counts,
        tile_offsets=(torch.cumsum(counts, 0) - counts).to(torch.int32), positions=positions, rows=rows)


def to_compact(x: torch.Tensor, compact: CompactLayout, dim: int = -2) -> torch.Tensor:
    """Sequence order -> compact tile-major order along ``dim`` (one gather)."""
    return x.index_select(dim % x.dim(), compact.positions)


def from_compact(x: torch.Tensor, compact: CompactLayout, dim: int = -2) -> torch.Tensor:
    """Compact tile-major order -> sequence order along ``dim``."""
    return x.index_select(dim % x.dim(), compact.rows)


def kv_boxes_by_class(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, compact: CompactLayout,
                      merge_adjacent: bool = True):
    """The boxes that cover each row's listed tiles, in box-class order (stable within a class).

    One box per listed tile; with ``merge_adjacent``, listed tiles that are neighbours in memory
    (tile ``j + 1`` right after tile ``j``) form one run of rows, cut into ``BLOCK``-row boxes and a
    remainder, whatever the tile boundaries (at 480p four listed 16-token tiles in a row are one
    full, unmasked box). A box never holds a row of an unlisted tile.

    Returns ``(starts, rows, class_ends)``: ``starts [B, H, M, K]`` int32, the compact row where each
    box begins, ``rows [B, H, M, K]`` int32, its valid rows, and ``class_ends [B, H, M, 4]`` int32:
    class ``c``'s boxes are ``[class_ends[..., c - 1], class_ends[..., c])`` (from 0 for ``c = 0``).
    A row has at most as many boxes as list entries; entries past ``class_ends[..., -1]`` are never
    read.
    """
    K = kv_indices.shape[-1]
    live = torch.arange(K, device=kv_indices.device) < kv_num_blocks[..., None]
    tiles = torch.where(live, kv_indices, 0).long()
    starts = compact.tile_offsets[tiles].long()
    rows = torch.where(live, compact.counts[tiles].long(), 0)
    if merge_adjacent:
        starts, rows = _merged_runs(starts, rows, live, compact.block)
    classes = _box_classes(rows, compact.block)
    key, order = torch.sort(torch.where(rows > 0, classes, NUM_CLASSES), dim=-1, stable=True)
    starts = starts.gather(-1, order).to(torch.int32).contiguous()
    rows = rows.gather(-1, order).to(torch.int32).contiguous()
    ends = torch.stack([(key <= c).sum(-1) for c in range(NUM_CLASSES)], dim=-1).to(torch.int32).contiguous()
    return starts, rows, ends


def _box_classes(rows: torch.Tensor, block: int) -> torch.Tensor:
    """:func:`box_class` of every box of ``rows`` valid rows (int64)."""
    cls = torch.full_like(rows, WHOLE_BOX)
    if block // 2 >= MIN_BOX:
        cls = torch.where(rows <= block // 2, HALF_BOX, cls)
    if block // 4 >= MIN_BOX:
        cls = torch.where(rows <= block // 4, QUARTER_BOX, cls)
    return torch.where(rows == block, FULL, cls)


def _merged_runs(starts, rows, live, block):
    """Boxes over runs of adjacent listed tiles: the live entries sorted by start, runs where a
    tile begins where the previous one ends, each run cut into ``block``-row pieces. Returns
    ``(starts, rows)`` of the pieces, as wide as the input (``rows`` 0 past a row's last piece)."""
    K = starts.shape[-1]
    starts, order = torch.sort(torch.where(live, starts, torch.iinfo(torch.int64).max), dim=-1)
    rows = rows.gather(-1, order)
    live = rows > 0
    previous_end = torch.nn.functional.pad((starts + rows)[..., :-1], (1, 0), value=-1)
    head = live & (starts != previous_end)
    run = torch.cumsum(head.long(), -1) - 1  # run of each live entry
    run = torch.where(live, run, K)  # dead entries go to a spill column
    run_rows = torch.zeros(*rows.shape[:-1], K + 1, dtype=rows.dtype, device=rows.device)
    run_rows.scatter_add_(-1, run, rows)
    run_start = torch.zeros_like(run_rows).scatter_(-1, torch.where(head, run, K), starts)
    run_rows, run_start = run_rows[..., :K], run_start[..., :K]
    # Piece p of run r starts at run_start[r] + p * block; pieces laid out run after run.
    pieces = (run_rows + block - 1) // block
    last_piece = torch.cumsum(pieces, -1)  # one past each run's last piece
    slot = torch.arange(K, device=rows.device).expand_as(rows).contiguous()
    piece_run = torch.searchsorted(last_piece, slot, right=True).clamp(max=K - 1)
    p = slot - (last_piece.gather(-1, piece_run) - pieces.gather(-1, piece_run))
    piece_start = run_start.gather(-1, piece_run) + p * block
    piece_rows = (run_rows.gather(-1, piece_run) - p * block).clamp(0, block)
    piece_rows = torch.where(slot < last_piece[..., -1:], piece_rows, 0)
    return piece_start, piece_rows


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
                    BOX_STARTS, BOX_ROWS, CLASS_ENDS, TILE_OFFSETS, COUNTS, POSITIONS, L, M, MAX_LIST, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, SEQUENCE_ORDER: tl.constexpr,
                    Q_IN_REGISTERS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    q_start = tl.load(TILE_OFFSETS + tile)
    q = q_desc.load([bh, q_start, 0]).reshape(BLOCK, HEAD_DIM)
    if Q_IN_REGISTERS:
        # An exact multiply by 1.0 the compiler cannot fold: Q becomes a register operand (wgmma RS).
        q = (q.to(tl.float32) * (qk_scale / qk_scale)).to(q.dtype)
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)

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
    offs = tl.arange(0, BLOCK)
    mine = offs < tl.load(COUNTS + tile)
    dst = q_start + offs
    if SEQUENCE_ORDER:
        dst = tl.load(POSITIONS + dst, mask=mine, other=0)
    dst = bh.to(tl.int64) * L + dst
    tl.store(LSE + dst, lse, mask=mine)
    o_ptrs = O + dst[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mine[:, None])


def _descriptor(x: torch.Tensor, rows: int):
    """A TMA descriptor over ``[B * H, L, D]`` with ``rows``-row boxes (per-head extent ``L``)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, H, L, D = x.shape
    return TensorDescriptor.from_tensor(x.reshape(B * H, L, D), [1, rows, D])


def _check(q, k, v, kv_num_blocks, kv_indices, compact, scale):
    if not (q.shape == k.shape == v.shape and q.dim() == 4):
        raise ValueError(f"q, k, v must be [B, H, L, D] of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, L, D = q.shape
    if D not in (64, 128):
        raise ValueError(f"head dim must be 64 or 128, got {D}")
    if L != compact.num_tokens:
        raise ValueError(f"compact tile-major inputs hold the layout's {compact.num_tokens} rows, got {L}")
    if scale <= 0:
        raise ValueError(f"scale must be positive (it is applied to the row maximum), got {scale}")
    M = compact.num_tiles
    if tuple(kv_num_blocks.shape) != (B, H, M) or tuple(kv_indices.shape[:3]) != (B, H, M):
        raise ValueError(f"kv_num_blocks must be [B, H, M] = {(B, H, M)} and kv_indices [B, H, M, K]; got "
                         f"{tuple(kv_num_blocks.shape)} and {tuple(kv_indices.shape)}")


def tma_packed_block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, compact: CompactLayout, scale=None, *,
                                      out_order: str = "tile", boxes=None, q_in_registers: bool = False,
                                      num_warps: int = 4, num_stages: int = 2):
    """Block-sparse attention over compact tile-major ``q, k, v`` (``[B, H, L, D]``, :func:`to_compact`):
    query tile ``i`` of head ``(b, h)`` attends to the tokens of KV tiles
    ``kv_indices[b, h, i, :kv_num_blocks[b, h, i]]`` (any order; every entry stored).

    ``boxes``: :func:`kv_boxes_by_class` of these lists, when the caller has it (computed
    otherwise, with adjacent tiles merged). Returns ``(out, lse)``: ``out`` like ``q`` and fp32 ``lse [B, H, L]`` (natural log),
    both in compact tile-major order (``out_order="tile"``) or in sequence order (``"sequence"``).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    _check(q, k, v, kv_num_blocks, kv_indices, compact, scale)
    if out_order not in ("tile", "sequence"):
        raise ValueError(f"out_order must be 'tile' or 'sequence', got {out_order!r}")
    from sparse_inductor.triton_launch import kernel_flags

    q, k, v = (x.contiguous() for x in (q, k, v))
    B, H, L, D = q.shape
    starts, rows, ends = boxes if boxes is not None else kv_boxes_by_class(kv_num_blocks, kv_indices, compact)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    block = compact.block
    # Half and quarter boxes exist only from 16 rows (tl.dot's minimum); the full ones stand in.
    half, quarter = (r if r >= MIN_BOX else block for r in (block // 2, block // 4))
    descriptors = [_descriptor(q, block), _descriptor(k, block), _descriptor(v, block), _descriptor(k, half),
                   _descriptor(v, half), _descriptor(k, quarter), _descriptor(v, quarter)]
    _tma_packed_fwd[(compact.num_tiles, B * H)](
        *descriptors, out, lse, starts, rows, ends, compact.tile_offsets, compact.counts, compact.positions, L,
        compact.num_tiles, starts.shape[-1], scale * 1.4426950408889634, HEAD_DIM=D, BLOCK=block,
        SEQUENCE_ORDER=out_order == "sequence", Q_IN_REGISTERS=q_in_registers, **kernel_flags(q.dtype),
        num_warps=num_warps, num_stages=num_stages)
    return out, lse
