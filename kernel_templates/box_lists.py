"""The box-list pass of the compact-layout TMA forward as one Triton kernel (NOTES v16.1).

:func:`sparse_inductor.compact_layout.kv_boxes_by_class` turns each query row's KV tile list into
TMA boxes ordered by class; in torch ops it is ~25 launches over every row (1.02 ms at Wan 480p on
the H200, half the attention kernel's time). Here one program per list row does it in registers:

1. load the row's ``K`` entries (padded to ``KP``, a power of two) and, with ``MERGE``, sort them by
   tile (``tl.sort``; a compact layout's tile offsets strictly increase with the tile, so this is
   the order by start row that the torch version sorts into), unless the caller promises they
   already increase (``SORTED``: the backward's kv-major lists, up to 1024 wide at 480p, where the
   sort was most of the kernel's 0.1 ms per call);
2. ``MERGE``: a run head is a live entry whose tile does not begin where the previous entry's
   ends; every entry learns its run's first row (a running max), its place in the run (the same
   over positions) and its run's last row (a reversed running min over the run ends). Entry ``j``
   of a run holds the run's piece ``j`` (``BLOCK`` rows from ``run start + j * BLOCK``, at most
   what is left of the run), or nothing: a run of ``n`` tiles has at most ``n`` pieces, and its
   pieces stay in run order, so this is the torch version's piece layout with gaps;
3. the class of each box (``box_class``) and a stable counting sort by class (one ``tl.cumsum``
   per class), written with a scattered store; the entries past the last box are written as the
   torch version leaves them (``starts`` and ``rows`` 0), so both give identical tensors.

``PIECES = 2`` (KV steps of half a tile, ``STEP = BLOCK / 2`` rows): entry ``e`` yields two boxes,
at places ``2e`` and ``2e + 1`` of a row twice as wide (a tile's first ``STEP`` rows and the rest;
with ``MERGE``, pieces ``2j`` and ``2j + 1`` of its run), classed as ``STEP``-row boxes.
"""
import triton
import triton.language as tl

# The box classes of sparse_inductor.compact_layout (FULL, WHOLE_BOX, HALF_BOX, QUARTER_BOX), and the
# key of an entry that holds no box; tl.dot's smallest box.
_FULL = tl.constexpr(0)
_WHOLE_BOX = tl.constexpr(1)
_HALF_BOX = tl.constexpr(2)
_QUARTER_BOX = tl.constexpr(3)
_NUM_CLASSES = tl.constexpr(4)
_MIN_BOX = tl.constexpr(16)
_NO_TILE = tl.constexpr(2**31 - 1)


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min(a, b):
    return tl.minimum(a, b)


@triton.jit
def kv_boxes_kernel(NUM, IDX, TILE_OFFSETS, COUNTS, STARTS, ROWS, CLASS_ENDS, K,
                    BLOCK: tl.constexpr, KP: tl.constexpr, MERGE: tl.constexpr, SORTED: tl.constexpr = False,
                    PIECES: tl.constexpr = 1):
    """The boxes of list row ``program_id(0)``: ``NUM`` int32 ``[R]``, ``IDX`` int32 ``[R, K]``
    (entries past ``NUM`` never read), ``TILE_OFFSETS`` / ``COUNTS`` int32 ``[num_tiles]`` (every
    count at least 1); writes ``STARTS``, ``ROWS`` int32 ``[R, K * PIECES]`` and ``CLASS_ENDS``
    int32 ``[R, 4]``."""
    STEP = BLOCK // PIECES
    row = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, KP)
    n = tl.minimum(tl.load(NUM + row), K)
    live = e < n
    tile = tl.load(IDX + row * K + e, mask=live, other=0)
    if MERGE and not SORTED:
        # Live entries first, by tile (= by start row); the padding's sentinel sorts last.
        tile = tl.where(live, tl.sort(tl.where(live, tile, _NO_TILE), 0), 0)
    start = tl.load(TILE_OFFSETS + tile)  # dead entries read tile 0, as the torch version does
    rows = tl.where(live, tl.load(COUNTS + tile), 0)
    if MERGE:
        end = start + rows
        previous_end = tl.gather(end, tl.maximum(e - 1, 0), 0)
        head = live & ((e == 0) | (start != previous_end))
        next_head = tl.gather(head.to(tl.int32), tl.minimum(e + 1, KP - 1), 0) != 0
        last = live & ((e + 1 >= n) | next_head)
        run_start = tl.associative_scan(tl.where(head, start, -1), 0, _max)
        piece = e - tl.associative_scan(tl.where(head, e, -1), 0, _max)
        run_end = tl.associative_scan(tl.where(last, end, _NO_TILE), 0, _min, reverse=True)
        start = run_start + piece * BLOCK
        end = run_end
    else:
        end = start + rows
    if PIECES == 2:  # entry e's first STEP rows at place 2e, the rest at 2e + 1
        start = tl.reshape(tl.join(start, start + STEP), [2 * KP])
        end = tl.reshape(tl.join(end, end), [2 * KP])
        live = tl.reshape(tl.join(live, live), [2 * KP])
        e = tl.arange(0, 2 * KP)
    rows = tl.where(live, tl.minimum(tl.maximum(end - start, 0), STEP), 0)

    cls = tl.full([KP * PIECES], _WHOLE_BOX, tl.int32)
    if STEP // 2 >= _MIN_BOX:
        cls = tl.where(rows <= STEP // 2, _HALF_BOX, cls)
    if STEP // 4 >= _MIN_BOX:
        cls = tl.where(rows <= STEP // 4, _QUARTER_BOX, cls)
    cls = tl.where(rows == STEP, _FULL, cls)
    cls = tl.where(rows > 0, cls, _NUM_CLASSES)

    # Stable counting sort: a box's place is its class's first place plus the boxes of its class
    # before it.
    W = K * PIECES
    place = tl.zeros([KP * PIECES], tl.int32)
    first = 0
    for c in tl.static_range(_NUM_CLASSES):
        mine = (cls == c).to(tl.int32)
        place = tl.where(cls == c, first + tl.cumsum(mine, 0) - 1, place)
        first += tl.sum(mine, 0)
        tl.store(CLASS_ENDS + row * _NUM_CLASSES + c, first)
    boxed = rows > 0
    tl.store(STARTS + row * W + place, start, mask=boxed)
    tl.store(ROWS + row * W + place, rows, mask=boxed)
    # Past the last box: what the torch version writes there.
    tail = (e >= first) & (e < W)
    tl.store(STARTS + row * W + e, tl.zeros([KP * PIECES], tl.int32), mask=tail)
    tl.store(ROWS + row * W + e, tl.zeros([KP * PIECES], tl.int32), mask=tail)
