"""Compact tile-major layout of a video grid and the box lists of the TMA block-sparse forward
(``kernel_templates/tma_block_sparse.py``; issue 22, item 2).

Tile ``j``'s ``n_j`` valid tokens are rows ``[off_j, off_j + n_j)`` (no gaps), so a TMA box may
start at any tile; each row's KV list becomes boxes of 64, 32 or 16 rows grouped by class so the
kernel's loops stay branch-free. Torch code (host side): under the backend the permutation belongs
in the pointwise kernel that produces Q/K/V and the class order in the selection's list writer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

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
    padding slots dropped (a tile's valid slots come first, so tiles stay in order).

    Index arithmetic on the layout's tables only (no boolean indexing, no host sync), so it also
    traces inside a compiled graph, symbolic sizes included."""
    if layout.num_tiles != layout.num_video_tiles:
        raise ValueError("compact_layout covers video-only layouts; text blocks are out of scope")
    S = layout.block_size
    counts = layout.counts.to(torch.int32)
    tile_offsets = (torch.cumsum(counts, 0) - counts).to(torch.int32)
    slot = layout.scatter_index  # [L]: the slot of each sequence position
    rows = tile_offsets.long().index_select(0, slot // S) + slot % S
    positions = torch.zeros_like(rows).scatter_(0, rows, torch.arange(rows.shape[0], device=rows.device))
    return CompactLayout(block=S, num_tiles=layout.num_tiles, num_tokens=layout.num_tokens, counts=counts,
                         tile_offsets=tile_offsets, positions=positions, rows=rows)


def compact_slots(compact: CompactLayout) -> torch.Tensor:
    """int32 ``[num_tiles * block]``: the compact row each slot of the padded layout holds, ``-1``
    for padding (the slot table of the gather kernels over compact tensors)."""
    S = compact.block
    slot = torch.arange(compact.num_tiles * S, device=compact.counts.device)
    m, j = slot // S, slot % S
    return torch.where(j < compact.counts.long().index_select(0, m),
                       compact.tile_offsets.long().index_select(0, m) + j, -1).to(torch.int32)


def half_tiles(compact: CompactLayout) -> CompactLayout:
    """The same rows as ``2 * num_tiles`` tiles of ``block // 2`` slots: tile ``j``'s first
    ``block // 2`` rows are tile ``2 j``, the rest tile ``2 j + 1`` (empty when ``n_j <= block // 2``,
    at offset ``off_j + n_j``). The TMA backward's kernels take tiles of at most 64 slots; attending
    to a tile is attending to both its halves, so 128-slot tiles run as these (benchmarks/NOTES.md v26)."""
    half = compact.block // 2
    first = compact.counts.clamp(max=half)
    counts = torch.stack([first, compact.counts - first], -1).flatten().to(torch.int32)
    offsets = torch.stack([compact.tile_offsets, compact.tile_offsets + first], -1).flatten().to(torch.int32)
    return CompactLayout(block=half, num_tiles=2 * compact.num_tiles, num_tokens=compact.num_tokens, counts=counts,
                         tile_offsets=offsets, positions=compact.positions, rows=compact.rows)


def half_tile_lists(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, kv_counts: torch.Tensor,
                    q_counts: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-major lists over :func:`half_tiles`: query halves ``2 i`` and ``2 i + 1`` list the
    non-empty halves of every tile query tile ``i`` lists (in its list's order, the first half
    before the second), and a query half with no rows (``q_counts[i] <= block // 2`` for ``2 i + 1``)
    lists nothing. ``kv_num_blocks [B, H, M]``, ``kv_indices [B, H, M, K]`` (any order, entries past
    a row's length never read); ``kv_counts``, ``q_counts`` int32 ``[M]``: rows per tile of the KV
    and query layouts. Returns ``[B, H, 2 M]`` and ``[B, H, 2 M, 2 K]`` int32 (entries past a row's
    length 0). No host sync, no sort: the empty halves are squeezed out by a search of the running
    count (a sort of the rows cost 0.056 ms at 480p, NOTES v26)."""
    half = block // 2
    K = kv_indices.shape[-1]
    live = torch.arange(K, device=kv_indices.device) < kv_num_blocks[..., None]
    # int32 throughout: at 720p (H = 40) these [B, H, M, 2K] tables are the backward's largest temporaries.
    tiles = torch.where(live, kv_indices, 0).to(torch.int32)
    second = live & (kv_counts[tiles] > half)
    valid = torch.stack([live, second], -1).flatten(-2)  # [B, H, M, 2K], entry e's halves at 2e, 2e + 1
    halves = torch.stack([2 * tiles, 2 * tiles + 1], -1).flatten(-2)
    running = torch.cumsum(valid, -1, dtype=torch.int32)
    num = running[..., -1] if K else torch.zeros_like(kv_num_blocks, dtype=torch.int32)
    # The s-th valid entry is the first whose running count reaches s + 1.
    wanted = torch.arange(1, 2 * K + 1, device=kv_indices.device, dtype=torch.int32).expand_as(running).contiguous()
    source = torch.searchsorted(running.contiguous(), wanted).clamp(max=max(2 * K - 1, 0))
    idx = torch.where(wanted <= num[..., None], halves.gather(-1, source), 0)
    num = torch.stack([num, torch.where(q_counts > half, num, 0)], -1).flatten(-2)
    return num.contiguous(), idx.repeat_interleave(2, dim=-2).contiguous()


def to_compact(x: torch.Tensor, compact: CompactLayout, dim: int = -2) -> torch.Tensor:
    """Sequence order -> compact tile-major order along ``dim`` (one gather)."""
    return x.index_select(dim % x.dim(), compact.positions)


def from_compact(x: torch.Tensor, compact: CompactLayout, dim: int = -2) -> torch.Tensor:
    """Compact tile-major order -> sequence order along ``dim``."""
    return x.index_select(dim % x.dim(), compact.rows)


def kv_boxes_by_class(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, compact: CompactLayout,
                      merge_adjacent: bool = True, impl: str | None = None, lists_sorted: bool = False,
                      step: int | None = None):
    """The boxes that cover each row's listed tiles, in box-class order (stable within a class).

    One box per listed tile; with ``merge_adjacent``, listed tiles that are neighbours in memory
    (tile ``j + 1`` right after tile ``j``) form one run of rows, cut into ``BLOCK``-row boxes and a
    remainder, whatever the tile boundaries (at 480p four listed 16-token tiles in a row are one
    full, unmasked box). A box never holds a row of an unlisted tile.

    Returns ``(starts, rows, class_ends)``: ``starts [B, H, M, K]`` int32, the compact row where each
    box begins, ``rows [B, H, M, K]`` int32, its valid rows, and ``class_ends [B, H, M, 4]`` int32:
    class ``c``'s boxes are ``[class_ends[..., c - 1], class_ends[..., c])`` (from 0 for ``c = 0``).
    A row has at most as many boxes as list entries (a run of ``n`` listed tiles holds at most
    ``n * BLOCK`` rows, so at most ``n`` pieces); entries past ``class_ends[..., -1]`` are never
    read (both implementations write them alike: ``starts`` and ``rows`` 0).

    ``impl``: ``"triton"``, one program per list row (``kernel_templates/box_lists.py``; CUDA
    tensors, or CPU ones under ``TRITON_INTERPRET=1``), ``"torch"``, these torch ops, or ``None``:
    Triton on CUDA, torch otherwise (as the ops of ``sparse_inductor.ops`` choose). Identical
    results. The layout's tiles must not be empty (a ``TileLayout``'s never are).

    ``lists_sorted``: the caller promises every row's live entries strictly increase (as
    :func:`sparse_inductor.ops.transpose_block_lists` returns them), so the Triton version skips
    its per-row sort; the result is the same. Unsorted lists with ``lists_sorted=True`` give wrong
    boxes (not checked: that would cost the pass the sort saves).

    ``step``: the rows of a full box, the kernel's KV step: ``compact.block`` (``None``) or half of
    it (128-slot tiles walked in 64-row steps, so that a 128-row query box keeps its S tile at
    128 x 64). With half steps every listed tile is up to two boxes, the lists are twice as wide
    (``K * block // step``), and the classes are those of ``step``-row boxes.
    """
    step = check_step(step, compact.block)
    if impl is None:
        impl = "triton" if kv_indices.is_cuda else "torch"
    if impl == "triton":
        return _kv_boxes_by_class_triton(kv_num_blocks, kv_indices, compact, merge_adjacent, lists_sorted, step)
    if impl != "torch":
        raise ValueError(f"impl must be 'triton', 'torch' or None, got {impl!r}")
    K = kv_indices.shape[-1]
    pieces = compact.block // step
    live = torch.arange(K, device=kv_indices.device) < kv_num_blocks[..., None]
    tiles = torch.where(live, kv_indices, 0).long()
    starts = compact.tile_offsets[tiles].long()
    rows = torch.where(live, compact.counts[tiles].long(), 0)
    if merge_adjacent:
        starts, rows = _merged_runs(starts, rows, live, step, K * pieces)
    elif pieces == 2:  # entry e's tile as pieces 2e (its first step rows) and 2e + 1 (the rest)
        starts = torch.stack([starts, starts + step], -1).flatten(-2)
        rows = torch.stack([rows.clamp(max=step), (rows - step).clamp(0, step)], -1).flatten(-2)
    classes = _box_classes(rows, step)
    key, order = torch.sort(torch.where(rows > 0, classes, NUM_CLASSES), dim=-1, stable=True)
    rows = rows.gather(-1, order)
    # Past the last box (never read): start 0, rows 0.
    starts = torch.where(rows > 0, starts.gather(-1, order), 0).to(torch.int32).contiguous()
    rows = rows.to(torch.int32).contiguous()
    ends = torch.stack([(key <= c).sum(-1) for c in range(NUM_CLASSES)], dim=-1).to(torch.int32).contiguous()
    return starts, rows, ends


def check_step(step: int | None, block: int) -> int:
    """``step`` (rows of a full box) for ``block``-slot tiles: the tile, or half of it where that
    is at least ``tl.dot``'s 16; ``None`` is the tile."""
    if step is None:
        return block
    allowed = [block] + ([block // 2] if block // 2 >= MIN_BOX else [])
    if step not in allowed:
        raise ValueError(f"step must be {' or '.join(map(str, allowed))} (rows of a full box for {block}-slot "
                         f"tiles: the tile or half of it, at least {MIN_BOX}), got {step}")
    return step


def _box_classes(rows: torch.Tensor, block: int) -> torch.Tensor:
    """:func:`box_class` of every box of ``rows`` valid rows (int64)."""
    cls = torch.full_like(rows, WHOLE_BOX)
    if block // 2 >= MIN_BOX:
        cls = torch.where(rows <= block // 2, HALF_BOX, cls)
    if block // 4 >= MIN_BOX:
        cls = torch.where(rows <= block // 4, QUARTER_BOX, cls)
    return torch.where(rows == block, FULL, cls)


def _merged_runs(starts, rows, live, block, width):
    """Boxes over runs of adjacent listed tiles: the live entries sorted by start, runs where a
    tile begins where the previous one ends, each run cut into ``block``-row pieces. Returns
    ``(starts, rows)`` of the pieces, ``width`` wide (``rows`` 0 past a row's last piece)."""
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
    slot = torch.arange(width, device=rows.device).expand(*rows.shape[:-1], width).contiguous()
    piece_run = torch.searchsorted(last_piece, slot, right=True).clamp(max=K - 1)
    p = slot - (last_piece.gather(-1, piece_run) - pieces.gather(-1, piece_run))
    piece_start = run_start.gather(-1, piece_run) + p * block
    piece_rows = (run_rows.gather(-1, piece_run) - p * block).clamp(0, block)
    piece_rows = torch.where(slot < last_piece[..., -1:], piece_rows, 0)
    return piece_start, piece_rows


def _kv_boxes_by_class_triton(kv_num_blocks, kv_indices, compact: CompactLayout, merge_adjacent: bool,
                              lists_sorted: bool = False, step: int | None = None):
    """:func:`kv_boxes_by_class` as one launch of ``kv_boxes_kernel``: one program per list row."""
    shape, K = kv_indices.shape[:-1], kv_indices.shape[-1]
    pieces = compact.block // (step or compact.block)
    starts = torch.empty(*shape, K * pieces, dtype=torch.int32, device=kv_indices.device)
    rows = torch.empty_like(starts)
    if K == 0 or starts.numel() == 0:  # nothing listed (Triton rejects a grid with a 0)
        return starts, rows, torch.zeros(*shape, NUM_CLASSES, dtype=torch.int32, device=kv_indices.device)
    ends = torch.empty(*shape, NUM_CLASSES, dtype=torch.int32, device=kv_indices.device)
    num_rows = ends.numel() // NUM_CLASSES
    from kernel_templates.box_lists import kv_boxes_kernel

    num = kv_num_blocks.expand(shape).to(torch.int32).contiguous()
    idx = kv_indices.to(torch.int32).contiguous()
    width = max(16, 1 << (K - 1).bit_length())
    kv_boxes_kernel[(num_rows,)](num, idx, compact.tile_offsets, compact.counts, starts, rows, ends, K,
                                 BLOCK=compact.block, KP=width, MERGE=merge_adjacent, SORTED=lists_sorted,
                                 PIECES=pieces,
                                 num_warps=1 if width <= 1024 else 4)  # 1 warp: fewest instructions
    return starts, rows, ends
