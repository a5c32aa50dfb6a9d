"""BSA's query sparsity, ``query_keep=r`` (arXiv 2509.01085; DESIGN.md §3.7).

In each video tile of ``n`` valid tokens (tile raster order) the centre token ``c = n // 2`` is
computed, plus the ``ceil(r·n) − 1`` tokens whose query has the lowest cosine similarity to
``q_c`` (ties to the lower index; a NaN similarity ranks as the most similar, so it is dropped
first). Every other token of the tile receives the centre's output: dropped tokens are by
construction the ones most like it. (FastVideo's inference port copies from the nearest kept
token instead.) Text queries are always computed. The KV selection does not change.

The backward is the exact gradient of this definition: a dropped row's dO adds into its
centre's row (a deterministic per-tile sum, no atomics), dropped rows get dQ = 0, and dK/dV come
from the kept rows with the summed dO.

How the kernels see it: each head gets its own query slot table in which a video tile's kept
tokens come first (the centre first), with the tile's count set to the number kept. The query
side is laid out in blocks of ``Sq`` slots, the smallest power of two >= ``ceil(r · tile
tokens)`` (at least 16): a 64-token tile with ``r = 0.5`` is two query blocks of 32 slots, the
first holding the kept rows and the second none (its programs exit at once), so the kernels run
32-row MMAs instead of 64-row ones. KV blocks keep their ``S`` slots.

On the compact TMA kernels (Hopper; :func:`kept_layout`, benchmarks/NOTES.md v23) the query side is a
*kept layout* instead: a compact tile-major layout whose tile ``i`` holds only its ``c_i =
num_kept(r, n_i)`` kept rows, in the rank order above (the centre first), with no gap between
tiles. The counts ``c_i`` depend only on the tile's size and ``r``, so the counts and offsets are
one table shared by every batch and head, and only which token each row holds differs per (batch,
head) (the ranking is per head): each head's Q rows are gathered into kept order (``[B, H, Lq, D]``,
``Lq = Σ c_i``, a size known from the grid alone). The TMA programs then take ``BLOCK``-row query
boxes at the kept offsets exactly as they take partial tiles (rows past ``c_i`` are the next tile's
kept rows: computed, never stored), and the dK/dV kernel's query boxes merge neighbouring kept
tiles, so at ``r = 0.5`` two listed query tiles are one 64-row box: its work halves. Per-(batch,
head) tables would buy nothing: the FLOPs and the boxes are the same for every head.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _compat
from .layout import MAX_BLOCK_SIZE, TileLayout
from .policies.base import check_fraction


def check_query_keep(value) -> float:
    """``query_keep`` validated: a number in ``(0, 1]``."""
    return check_fraction(value, "query_keep")


def num_kept(query_keep: float, n):
    """``max(1, ceil(r · n))`` for a tile of ``n`` valid tokens, with ``r`` cut to 12 decimal places
    (:func:`sparse_inductor.selection.decimal_numerator`) and the ceiling in integer arithmetic: the
    float64 reference's ``ceil(round(r · n, 9))`` for any ``r`` of up to 9 decimal places and for
    fractions like 1/3 or 2/3; ``n`` may be a tensor of any integer dtype (counts of one block,
    at most ``MAX_BLOCK_SIZE``)."""
    from .selection import DECIMALS, decimal_numerator

    num = decimal_numerator(query_keep)
    if isinstance(n, Tensor):
        if isinstance(num, int):
            # A lookup table over every count a block can hold (a graph constant): Inductor fused
            # ``n * num`` into an int32 index expression on the GPU, where 5 * 10^11 overflowed.
            return _kept_table(num, n.device)[n.long()]
        return ((n.long() * num + DECIMALS - 1) // DECIMALS).clamp(min=1)
    return max(1, (n * num + DECIMALS - 1) // DECIMALS)


_KEPT_TABLES: dict = {}


def _kept_table(num: int, device) -> Tensor:
    """int64 ``[MAX_BLOCK_SIZE + 1]``: the kept count of every block count at numerator ``num``.
    Cached for eager calls (no host-to-device copy per call, none while a CUDA graph captures);
    a traced graph builds it as a constant."""
    from .selection import DECIMALS

    def build():
        return torch.tensor([max(1, (i * num + DECIMALS - 1) // DECIMALS) for i in range(MAX_BLOCK_SIZE + 1)],
                            dtype=torch.int64, device=device)

    if torch.compiler.is_compiling() or _compat.dispatch_mode_active():
        return build()
    key = (num, torch.device(device))
    table = _KEPT_TABLES.get(key)
    if table is None:
        table = _KEPT_TABLES.setdefault(key, build())
    return table


def query_block_size(query_keep: float, tile) -> int:
    """``Sq``: slots per query block, the smallest power of two (>= 16) holding a full tile's kept
    rows."""
    return max(16, 1 << (num_kept(query_keep, math.prod(tile)) - 1).bit_length())


class QueryKeep:
    """The kept query rows of one call: per-head query tables for the kernels, and what the
    output and dQ need to follow the definition."""

    def __init__(self, q_slots: Tensor, q_counts: Tensor, kept: Tensor, layout: TileLayout, block: int):
        self.q_slots, self.q_counts = q_slots, q_counts  # [B, H, Mq' * Sq], [B, H, Mq']
        self.kept = kept  # bool [B, H, L]: the row is computed
        self.layout, self.block = layout, block

    @property
    def rows_per_tile(self) -> int:
        """Query blocks per tile (``S / Sq``)."""
        return self.layout.block_size // self.block

    def rows_per_tile_counts(self) -> Tensor:
        """int32 ``[B, H, M]``: query rows computed per block (tile / text block)."""
        B, H = self.q_counts.shape[:2]
        return self.q_counts.view(B, H, -1, self.rows_per_tile).sum(-1, dtype=torch.int32)

    def query_lists(self, kv_num_blocks: Tensor, kv_indices: Tensor) -> tuple[Tensor, Tensor]:
        """The per-tile KV lists laid out per query block: a video tile's list goes to its first
        block and its other blocks (no rows) list nothing; a text block's full row goes to each of
        its blocks."""
        R = self.rows_per_tile
        if R == 1:
            return kv_num_blocks, kv_indices
        Mv = self.layout.num_video_tiles
        num = kv_num_blocks.repeat_interleave(R, dim=2)
        first = (torch.arange(num.shape[2], device=num.device) % R) == 0
        video = torch.arange(num.shape[2], device=num.device) < Mv * R
        num = torch.where(first | ~video, num, 0)
        return num.contiguous(), kv_indices.repeat_interleave(R, dim=2).contiguous()


def rank_query_rows_torch(q: Tensor, video_slots: Tensor, counts: Tensor, n_kept: Tensor) -> tuple[Tensor, Tensor]:
    """The query ranking of every video tile, in torch (the CPU path of ``ops.rank_query_rows``).

    ``q`` ``[B, H, L, D]``; ``video_slots`` int32 ``[Mv * S]`` (sequence position per slot, -1 past
    a tile's count); ``counts``, ``n_kept`` int32 ``[Mv]``. Returns the query tables int32 ``[B, H,
    Mv, S]`` (a tile's slots in rank order: the centre, then the lowest cosine similarity to it,
    NaN as the most similar, padding last, ties to the lower slot; ranks past ``n_kept`` hold
    ``-(slot + 2)``: not computed) and ``kept`` bool ``[B, H, Mv, S]`` by slot."""
    B, H, _, D = q.shape
    Mv = counts.shape[0]
    S = video_slots.shape[0] // Mv
    device = q.device
    counts, slots = counts.long(), video_slots.long()
    valid = torch.arange(S, device=device) < counts[:, None]  # [Mv, S]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        qt = q.detach().index_select(2, slots.clamp(min=0)).to(work).view(B, H, Mv, S, D)
        centre = (counts // 2).view(1, 1, Mv, 1, 1).expand(B, H, Mv, 1, D)
        qc = torch.gather(qt, 3, centre)  # [B, H, Mv, 1, D]
        dot = (qt * qc).sum(-1)
        norms = qt.norm(dim=-1) * qc.norm(dim=-1)
        cos = dot / norms.clamp_min(1e-30)
        # Rank: the centre first, then the lowest similarity (NaN ranks as the most similar),
        # padding last; a stable sort breaks ties to the lower slot.
        is_centre = torch.arange(S, device=device).view(1, 1, 1, S) == (counts // 2).view(1, 1, Mv, 1)
        rank = torch.where(torch.isnan(cos), 2.0, cos)
        rank = torch.where(is_centre, -3.0, torch.where(valid, rank, 3.0))
        order = torch.sort(rank, dim=-1, stable=True).indices  # [B, H, Mv, S]
    tables = torch.gather(slots.view(1, 1, Mv, S).expand(B, H, Mv, S), 3, order)
    dropped = (torch.arange(S, device=device) >= n_kept.long().view(Mv, 1)) & (tables >= 0)
    tables = torch.where(dropped, -tables - 2, tables).to(torch.int32)
    kept_rank = torch.arange(S, device=device) < n_kept.long().view(Mv, 1)  # by rank
    kept = torch.zeros(B, H, Mv, S, dtype=torch.bool, device=device)
    kept.scatter_(3, order, kept_rank.expand(B, H, Mv, S))
    return tables, kept


def select_queries(q: Tensor, layout: TileLayout, query_keep: float) -> QueryKeep:
    """Choose the kept query rows of every video tile of every head (no gradient)."""
    from . import ops

    B, H, L, D = q.shape
    S, Mv, M = layout.block_size, layout.num_video_tiles, layout.num_tiles
    device = q.device
    counts = layout.counts.long()
    n_kept = num_kept(query_keep, counts[:Mv])  # [Mv]
    Sq = query_block_size(query_keep, layout.tile)
    R = S // Sq
    # Video query tables: tile m's kept slots (in rank order) fill its first block; the dropped
    # positions follow, marked excluded (-(p + 2): not computed or written, dQ = 0; see
    # kernel_templates/block_sparse_attention.py).
    slots = layout.slots  # (computed per access)
    video_tables, kept_slot = ops.rank_query_rows(q.detach(), slots[: Mv * S], layout.counts[:Mv],
                                                  n_kept.to(torch.int32))
    video_counts = torch.zeros(B, H, Mv, R, dtype=torch.int32, device=device)
    video_counts[..., 0] = n_kept.to(torch.int32)
    # Text blocks: all rows kept, split into blocks of Sq slots.
    text_slots = slots[Mv * S:].view(1, 1, -1).expand(B, H, -1)
    text_counts = (counts[Mv:].view(-1, 1) - torch.arange(R, device=device) * Sq).clamp(0, Sq)
    q_slots = torch.cat([video_tables.reshape(B, H, -1), text_slots], dim=2).contiguous()
    q_counts = torch.cat([video_counts.reshape(B, H, -1),
                          text_counts.reshape(1, 1, -1).expand(B, H, -1).to(torch.int32)], dim=2).contiguous()
    # kept[b, h, position]: rank < n_kept within its tile; text rows always.
    kept_slot = torch.cat([kept_slot.reshape(B, H, -1), torch.ones(B, H, (M - Mv) * S, dtype=torch.bool,
                                                                      device=device)], dim=2)
    kept = kept_slot.index_select(2, layout.scatter_index)
    return QueryKeep(q_slots, q_counts, kept, layout, Sq)


def _centre_maps(layout: TileLayout, device):
    """Per sequence position: the position of its tile's centre (itself for text), whether it is
    a centre, and its video tile (0 for text)."""
    S, Mv = layout.block_size, layout.num_video_tiles
    pos = torch.arange(layout.num_tokens, device=device)
    slot = layout.scatter_index
    is_video = slot < Mv * S
    tile = torch.where(is_video, slot // S, 0)
    centre_slot = tile * S + layout.counts[:Mv].long()[tile] // 2
    centre_pos = torch.where(is_video, layout.gather_index[centre_slot], pos)
    return centre_pos, is_video & (centre_pos == pos), tile


class _CentreBroadcast(torch.autograd.Function):
    """``out[row] = attn[row]`` for kept rows, ``attn[centre(row)]`` for dropped ones; the
    backward sums each tile's dropped dO into its centre's row in a fixed order."""

    @staticmethod
    def forward(ctx, attn, kept, centre_pos, is_centre, tile, video_slots):
        ctx.save_for_backward(kept, is_centre, tile, video_slots)
        return torch.where(kept.unsqueeze(-1), attn, attn.index_select(2, centre_pos))

    @staticmethod
    def backward(ctx, grad):
        kept, is_centre, tile, video_slots = ctx.saved_tensors
        B, H, L, D = grad.shape
        dropped = torch.where(kept.unsqueeze(-1), 0, grad)
        Mv = video_slots.shape[0]
        # Tile-major, padding slots gather a zero row: a deterministic reduction over the tile.
        padded = torch.cat([dropped, dropped.new_zeros(B, H, 1, D)], dim=2)
        per_tile = padded.index_select(2, torch.where(video_slots >= 0, video_slots, L).flatten())
        per_tile = per_tile.view(B, H, Mv, -1, D).sum(3)
        into_centre = torch.where(is_centre.view(1, 1, L, 1), per_tile.index_select(2, tile), 0)
        return torch.where(kept.unsqueeze(-1), grad, 0) + into_centre, None, None, None, None, None


def broadcast_centres(attn: Tensor, keep: QueryKeep) -> Tensor:
    """The full output from the attention of the kept rows (see :class:`_CentreBroadcast`)."""
    layout = keep.layout
    centre_pos, is_centre, tile = _centre_maps(layout, attn.device)
    video_slots = layout.slots[: layout.num_video_tiles * layout.block_size].long().view(layout.num_video_tiles, -1)
    return _CentreBroadcast.apply(attn, keep.kept, centre_pos, is_centre, tile, video_slots)


# ---------------------------------------------------------------------------------------------
# The kept layout of the compact TMA kernels
# ---------------------------------------------------------------------------------------------
def _kept_count(num, n):
    """``max(1, ceil(n · num / 10^12))`` of a Python int or SymInt ``n`` (no tensor)."""
    from .selection import DECIMALS

    c = (n * num + DECIMALS - 1) // DECIMALS
    return torch.sym_max(1, c) if isinstance(c, torch.SymInt) else max(1, c)


def kept_rows_total(grid, tile, query_keep: float):
    """``Lq = Σ_i num_kept(r, n_i)`` over the video tiles of ``grid`` under ``tile``, from the grid
    alone (Python ints, or SymInts while Dynamo traces symbolic sizes or a symbolic ``r``): the
    number of rows of the kept layout, a size that must not come from reading a tensor."""
    from .selection import decimal_numerator

    num = decimal_numerator(query_keep)
    # Per axis: g // t whole tiles of extent t and (ceil(g / t) - g // t) border tiles of g % t.
    axes = [((g // t, t), ((g + t - 1) // t - g // t, g % t)) for g, t in zip(grid, tile)]
    total = 0
    for ct, et in axes[0]:
        for ch, eh in axes[1]:
            for cw, ew in axes[2]:
                total = total + ct * ch * cw * _kept_count(num, et * eh * ew)
    return total


class KeptLayout:
    """The kept rows of one call in the compact form of the TMA kernels (:func:`kept_layout`).

    Attributes:
        compact: the query side's :class:`~sparse_inductor.compact_layout.CompactLayout`: ``counts``
            ``c_i`` and ``tile_offsets`` (int32 ``[M]``, shared by every head), ``block`` the KV
            layout's ``S``, ``num_tokens`` ``Lq``; ``positions`` / ``rows`` are ``None`` (per head
            here instead).
        positions: int64 ``[B, H, Lq]``, the sequence position each kept row holds (per head).
        source_rows: int64 ``[B, H, L]``, the kept row whose output each sequence position receives:
            its own, or its tile's centre's (the tile's first kept row).
        kept: bool ``[B, H, L]``, the position is computed.
        tile_of_row: int64 ``[Lq]``, the tile of each kept row; ``is_centre_row``: bool ``[Lq]``.
        video_slots: int64 ``[M, S]``, the sequence position of each tile slot, ``-1`` for padding
            (the per-tile sums of the dropped rows' dO).
        row_valid: ``None``, or with a symbolic ``query_keep`` bool ``[L]``: the kept layout then has
            ``L`` rows, and those past ``Σ c_i`` are spare (no tile's; :func:`kept_layout`).
    """

    def __init__(self, compact, positions, source_rows, kept, tile_of_row, is_centre_row, video_slots,
                 row_valid=None):
        self.compact, self.positions, self.source_rows, self.kept = compact, positions, source_rows, kept
        self.tile_of_row, self.is_centre_row, self.video_slots = tile_of_row, is_centre_row, video_slots
        self.row_valid = row_valid

    def slots(self) -> Tensor:
        """int32 ``[M * S]``: the kept row each slot of the padded layout holds, ``-1`` past ``c_i``
        (the slot table of the CPU implementation over kept tensors)."""
        from .compact_layout import compact_slots

        return compact_slots(self.compact)


def kept_layout(q: Tensor, layout: TileLayout, query_keep: float, spare_rows: bool | None = None) -> KeptLayout:
    """The kept layout of ``q`` (``[B, H, L, D]``, sequence order) for a video-only ``layout``: the
    rows :func:`select_queries` keeps, laid out for the compact TMA kernels (module docstring).
    Index arithmetic and one ranking op, no host sync, so it traces (symbolic sizes included).

    ``spare_rows`` (``None``: only for a symbolic ``query_keep``): the layout gets ``L`` rows, the kept
    rows first as always and ``L - Lq`` spare rows past them that no tile holds (``row_valid``: their
    q and dO are 0, their outputs never read), so no size derives from the float (Dynamo cannot lift
    such a size into an autograd.Function, torch 2.13: "Source of ... is None when lifting it to
    input of top-level"). The public entry points make every traced ``query_keep`` a graph constant
    (:func:`sparse_inductor._compat.specialize_float`), so traced calls take ``Lq`` rows too (until
    the ninth session they always took spare rows: ~0.2 GB more traffic per fwd+bwd at 480p, r = 0.5,
    NOTES v23). ``spare_rows=True`` remains for a caller that traces a symbolic ``query_keep`` itself
    (inside Dynamo such a float passes ``isinstance(r, float)``, so it must ask)."""
    from . import ops
    from .compact_layout import CompactLayout

    if layout.num_tiles != layout.num_video_tiles:
        raise ValueError("kept_layout covers video-only layouts; text blocks are out of scope")
    B, H, L, _ = q.shape
    S, M = layout.block_size, layout.num_tiles
    device = q.device
    n_kept = num_kept(query_keep, layout.counts.long())  # [M] int64
    from .selection import decimal_numerator

    if spare_rows is None:
        spare_rows = not isinstance(decimal_numerator(query_keep), int)
    Lq = L if spare_rows else kept_rows_total(layout.grid, layout.tile, query_keep)
    ends = torch.cumsum(n_kept, 0)
    offsets = ends - n_kept
    # Rank tables: tile m's slots in rank order (the centre first), ranks past n_kept marked dropped.
    tables, kept_slot = ops.rank_query_rows(q.detach(), layout.slots[: M * S], layout.counts, n_kept.to(torch.int32))
    row = torch.arange(Lq, device=device)
    tile_of_row = torch.searchsorted(ends, row, right=True)
    row_valid = None
    if spare_rows:  # rows past the last tile's: tile M - 1, rank past its count
        tile_of_row = tile_of_row.clamp(max=M - 1)
    rank = row - offsets.index_select(0, tile_of_row)
    if spare_rows:
        row_valid = rank < n_kept.index_select(0, tile_of_row)
        rank = torch.where(row_valid, rank, 0)
    positions = tables.view(B, H, M * S).index_select(2, tile_of_row * S + rank).long()
    kept = kept_slot.view(B, H, M * S).index_select(2, layout.scatter_index)
    # Every position takes its tile's centre row (the tile's first); kept ones their own row.
    centre_rows = offsets.index_select(0, layout.scatter_index // S)
    rows = row.view(1, 1, Lq).expand(B, H, Lq)
    if spare_rows:
        # Spare rows hold position 0 (never a source): they scatter into a column past L, cut off.
        source_rows = torch.cat([centre_rows, centre_rows.new_zeros(1)]).view(1, 1, L + 1).expand(B, H, L + 1)
        source_rows = source_rows.scatter(2, torch.where(row_valid, positions, L), rows)[:, :, :L]
        positions = torch.where(row_valid, positions, 0)
    else:
        source_rows = centre_rows.view(1, 1, L).expand(B, H, L).scatter(2, positions, rows)
    compact = CompactLayout(block=S, num_tiles=M, num_tokens=Lq, counts=n_kept.to(torch.int32),
                            tile_offsets=offsets.to(torch.int32), positions=None, rows=None)
    video_slots = layout.slots.long().view(M, S)
    is_centre_row = rank == 0 if row_valid is None else (rank == 0) & row_valid
    return KeptLayout(compact, positions, source_rows, kept, tile_of_row, is_centre_row, video_slots, row_valid)


class _KeptRows(torch.autograd.Function):
    """Each head's kept rows of ``[B, H, L, D]`` in kept order (``positions [B, H, Lq]``); the
    gradient goes back by a gather too (``source_rows``), 0 for dropped rows (no scatter)."""

    @staticmethod
    def forward(x, positions, source_rows, kept, row_valid):
        rows = torch.gather(x, 2, positions.unsqueeze(-1).expand(*positions.shape, x.shape[-1]))
        return rows if row_valid is None else torch.where(row_valid.view(-1, 1), rows, 0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[2], inputs[3])

    @staticmethod
    def backward(ctx, grad):
        source_rows, kept = ctx.saved_tensors
        index = source_rows.unsqueeze(-1).expand(*source_rows.shape, grad.shape[-1])
        return torch.where(kept.unsqueeze(-1), torch.gather(grad, 2, index), 0), None, None, None, None


class _FromKept(torch.autograd.Function):
    """The sequence-order output from the kept rows' (``out[p] = attn[source_rows[p]]``: a kept
    row's own, a dropped row its centre's). The backward is the exact gradient in a fixed order: a
    kept row's dO, plus for a centre row the sum of its tile's dropped rows' dO (over the tile's
    slots, accumulated in fp32), no atomics."""

    @staticmethod
    def forward(attn, source_rows, positions, kept, tile_of_row, is_centre_row, video_slots, row_valid):
        return torch.gather(attn, 2, source_rows.unsqueeze(-1).expand(*source_rows.shape, attn.shape[-1]))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[2:])

    @staticmethod
    def backward(ctx, grad):
        positions, kept, tile_of_row, is_centre_row, video_slots, row_valid = ctx.saved_tensors
        B, H, L, D = grad.shape
        M = video_slots.shape[0]
        acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
        dropped = torch.where(kept.unsqueeze(-1), 0, grad).to(acc)
        padded = torch.cat([dropped, dropped.new_zeros(B, H, 1, D)], dim=2)
        per_tile = padded.index_select(2, torch.where(video_slots >= 0, video_slots, L).flatten())
        per_tile = per_tile.view(B, H, M, -1, D).sum(3)  # [B, H, M, D]
        own = torch.gather(grad, 2, positions.unsqueeze(-1).expand(*positions.shape, D))
        if row_valid is not None:  # spare rows (symbolic query_keep): dO 0
            own = torch.where(row_valid.view(-1, 1), own, 0)
        into_centre = torch.where(is_centre_row.view(1, 1, -1, 1), per_tile.index_select(2, tile_of_row), 0)
        return (own.to(acc) + into_centre).to(grad.dtype), None, None, None, None, None, None, None


def to_kept(q: Tensor, kept: KeptLayout) -> Tensor:
    """``q`` ``[B, H, L, D]`` -> its kept rows ``[B, H, Lq, D]`` (differentiable)."""
    return _KeptRows.apply(q, kept.positions, kept.source_rows, kept.kept, kept.row_valid)


def from_kept(attn: Tensor, kept: KeptLayout) -> Tensor:
    """The kept rows' output ``[B, H, Lq, D]`` -> every position's ``[B, H, L, D]`` (differentiable)."""
    return _FromKept.apply(attn, kept.source_rows, kept.positions, kept.kept, kept.tile_of_row, kept.is_centre_row,
                           kept.video_slots, kept.row_valid)
