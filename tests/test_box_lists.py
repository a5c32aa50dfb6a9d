"""The box-list pass as a Triton kernel (kernel_templates/box_lists.py, NOTES v16.1) against the torch
version (``kv_boxes_by_class(..., impl="torch")``): identical ``(starts, rows, class_ends)``, every
entry compared, those past a row's last box included. Grids with border tiles of 64/32/16/8 tokens
(21-frame-like), tiles of 128, 64, 32 and 16 slots (every set of box classes), lists of any width
and length (0, the full width, more than the width), sorted (TopK's form), shuffled, made of runs
of neighbouring tiles, or with repeated tiles; both merge settings. On CPU under TRITON_INTERPRET=1
(tests/conftest.py sets it), natively on CUDA."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import HAS_TRITON, KERNEL_DEVICE
from sparse_inductor.compact_layout import compact_layout, kv_boxes_by_class
from sparse_inductor.layout import tile_layout
from sparse_inductor.ops import transpose_block_lists
from test_tma_block_sparse import grid_for

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# 64 slots (classes full / whole / half / quarter), 32 (no quarter box), 16 (full / whole only), 128.
TILES = [(4, 4, 4), (2, 4, 8), (2, 4, 4), (1, 4, 4), (4, 4, 8)]
ORDERS = ["sorted", "shuffled", "runs", "repeats"]


def make_lists(shape, M, K, order, generator):
    """``(num, idx)`` of ``shape`` rows of width ``K`` over ``M`` tiles: row 0 lists ``K`` entries,
    row 1 none, the last row claims ``K + 1`` (the width counts); the others 0 to ``K + 1``.
    ``order``: distinct tiles ``sorted`` or ``shuffled``; ``runs``: ``K`` tiles of a window of at most
    ``K + K // 4`` neighbours, shuffled (long runs cut by a few gaps); ``repeats``: drawn with
    replacement (``K`` may exceed ``M``). Entries past a row's length are junk that must never be read."""
    R = math.prod(shape)
    num = torch.randint(0, K + 2, (R,), generator=generator, dtype=torch.int32)
    num[0] = K
    if R > 1:
        num[1], num[-1] = 0, K + 1
    if order == "repeats":
        idx = torch.randint(0, M, (R, K), generator=generator)
    elif order == "runs":
        window = min(M, K + K // 4)
        first = torch.randint(0, M - window + 1, (R, 1), generator=generator)
        pick = torch.argsort(torch.rand(R, window, generator=generator), dim=-1)[:, :K]
        idx = first + pick
    else:
        idx = torch.argsort(torch.rand(R, M, generator=generator), dim=-1)[:, :K]
        if order == "sorted":
            idx = torch.sort(idx, dim=-1).values
    junk = torch.where(torch.rand(R, K, generator=generator) < 0.5, -1, 2**30)
    idx = torch.where(torch.arange(K) < num[:, None], idx, junk)
    return num.view(shape), idx.to(torch.int32).view(*shape, K)


def assert_same_boxes(num, idx, grid, tile, merge, lists_sorted=False, step=None):
    """The kernel's boxes (on the kernel device) equal the torch version's (on CPU), entry for entry;
    ``lists_sorted``: the kernel is told the live entries are increasing (it skips its sort);
    ``step``: boxes of at most that many rows (half a tile: two pieces per listed tile)."""
    want = kv_boxes_by_class(num, idx, compact_layout(tile_layout(grid, tile)), merge_adjacent=merge, impl="torch",
                             step=step)
    compact = compact_layout(tile_layout(grid, tile, KERNEL_DEVICE))
    got = kv_boxes_by_class(num.to(KERNEL_DEVICE), idx.to(KERNEL_DEVICE), compact, merge_adjacent=merge, impl="triton",
                            lists_sorted=lists_sorted, step=step)
    for name, g, w in zip(("starts", "rows", "class_ends"), got, want):
        assert g.dtype == w.dtype == torch.int32 and g.shape == w.shape, name
        assert torch.equal(g.cpu(), w), f"{name} differ at {(g.cpu() != w).nonzero()[:4].tolist()}"


@given(data=st.data(), tile=st.sampled_from(TILES), B=st.integers(1, 2), H=st.integers(1, 2),
       rows=st.integers(1, 6), order=st.sampled_from(ORDERS), merge=st.booleans(), half_steps=st.booleans(),
       seed=st.integers(0, 2**16))
def test_kernel_matches_torch(data, tile, B, H, rows, order, merge, half_steps, seed):
    grid = data.draw(grid_for(tile), label="grid")
    M, S = tile_layout(grid, tile).num_tiles, math.prod(tile)
    K = data.draw(st.integers(1, M + 4 if order == "repeats" else M), label="K")
    num, idx = make_lists((B, H, rows), M, K, order, torch.Generator().manual_seed(seed))
    assert_same_boxes(num, idx, grid, tile, merge, step=S // 2 if half_steps and S // 2 >= 16 else None)


@pytest.mark.parametrize("merge", [True, False])
def test_half_steps_of_128_slot_tiles(merge):
    """(4, 4, 8) tiles walked in 64-row steps (the 128-row query box kernel): every listed tile is two
    boxes of at most 64 rows; runs of neighbours are cut at 64 rows."""
    grid, tile = (6, 6, 12), (4, 4, 8)  # borders of 2 frames, 2 rows, 4 columns: tiles of 128 down to 16
    M = tile_layout(grid, tile).num_tiles
    for order in ("sorted", "runs", "shuffled"):
        num, idx = make_lists((1, 2, 3), M, max(1, M // 2), order, torch.Generator().manual_seed(3))
        assert_same_boxes(num, idx, grid, tile, merge, step=64)
    starts, rows, ends = kv_boxes_by_class(num, idx, compact_layout(tile_layout(grid, tile)), step=64)
    assert starts.shape[-1] == 2 * idx.shape[-1] and int(rows.max()) == 64


def test_steps_other_than_a_tile_or_half_a_tile_are_refused():
    compact = compact_layout(tile_layout((5, 6, 8), (4, 4, 4)))
    num, idx = torch.ones(1, 2, dtype=torch.int32), torch.zeros(1, 2, 1, dtype=torch.int32)
    for step in (16, 48, 128):
        with pytest.raises(ValueError, match="step must be 64 or 32"):
            kv_boxes_by_class(num, idx, compact, step=step)
    with pytest.raises(ValueError, match="step must be 16"):  # 8-row boxes: under tl.dot's 16
        kv_boxes_by_class(num, idx, compact_layout(tile_layout((2, 4, 4), (1, 4, 4))), step=8)


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("order", ["sorted", "shuffled", "runs"])
def test_kernel_matches_torch_at_480p(order, merge):
    """The benchmark's structure: Wan 480p's 624 tiles (21 x 30 x 52 under (4, 4, 4): 64, 32, 16 and
    8 tokens), lists of 78 (a 128-wide register row), on a few rows (the interpreter's sort is slow)."""
    grid, tile = (21, 30, 52), (4, 4, 4)
    num, idx = make_lists((1, 2, 3), tile_layout(grid, tile).num_tiles, 78, order, torch.Generator().manual_seed(7))
    assert_same_boxes(num, idx, grid, tile, merge)


def test_kernel_matches_torch_on_a_selection():
    """The selection's own lists, ``[B, H, M, K]`` with one row per query tile."""
    import sparse_inductor as si

    grid, tile = (5, 6, 8), (4, 4, 4)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 2, math.prod(grid), 64, generator=g) for _ in range(2))
    sel = si.select_blocks(q, k, grid, sparsity=0.5)
    for merge in (True, False):
        assert_same_boxes(sel.kv_num_blocks.cpu(), sel.kv_indices.cpu(), grid, tile, merge)


@given(data=st.data(), tile=st.sampled_from(TILES), H=st.integers(1, 2), sparsity=st.sampled_from([0.0, 0.5, 0.9]),
       merge=st.booleans(), seed=st.integers(0, 2**16))
def test_sorted_lists_skip_the_sort(data, tile, H, sparsity, merge, seed):
    """The backward's kv-major lists (``transpose_block_lists``: increasing query tiles) with
    ``lists_sorted=True``, which skips the kernel's sort, give the torch version's boxes; so do
    TopK's sorted query-major lists."""
    import sparse_inductor as si
    from sparse_inductor.ops import transpose_block_lists

    grid = data.draw(grid_for(tile), label="grid")
    M = tile_layout(grid, tile).num_tiles
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, H, math.prod(grid), 16, generator=g) for _ in range(2))
    sel = si.select_blocks(q, k, grid, sparsity=sparsity, tile=tile)
    num, idx = transpose_block_lists(sel.kv_num_blocks, sel.kv_indices, M)
    assert_same_boxes(num, idx, grid, tile, merge, lists_sorted=True)
    num, idx = make_lists((1, H, 3), M, max(1, M // 2), "sorted", g)
    assert_same_boxes(num, idx, grid, tile, merge, lists_sorted=True)


def test_empty_lists_and_impl_choice():
    compact = compact_layout(tile_layout((5, 6, 8), (4, 4, 4)))
    num, idx = torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, 2, 0, dtype=torch.int32)
    for impl in ("triton", "torch"):
        starts, rows, ends = kv_boxes_by_class(num, idx, compact, impl=impl)
        assert starts.shape == rows.shape == (1, 2, 0) and torch.equal(ends, torch.zeros(1, 2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="impl"):
        kv_boxes_by_class(num, idx, compact, impl="cuda")


def compact_pairs(num, idx, q_layout, kv_layout):
    """bool ``[B, H, Lq, L]``: the (query row, KV row) pairs that lists over compact layouts stand for
    (query tile ``i``'s rows attend to every row of each listed tile)."""
    B, H, M = num.shape
    pairs = torch.zeros(B, H, q_layout.num_tokens, kv_layout.num_tokens, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(M):
                q0, nq = int(q_layout.tile_offsets[i]), int(q_layout.counts[i])
                for j in idx[b, h, i, : int(num[b, h, i])].tolist():
                    k0, nk = int(kv_layout.tile_offsets[j]), int(kv_layout.counts[j])
                    pairs[b, h, q0:q0 + nq, k0:k0 + nk] = True
    return pairs


@given(data=st.data(), B=st.integers(1, 2), H=st.integers(1, 2), kept_half=st.booleans(), seed=st.integers(0, 2**16))
def test_half_tiles_stand_for_the_same_pairs(data, B, H, kept_half, seed):
    """128-slot tiles as 64-slot halves (how the TMA backward runs them, v26): the same rows, the
    same (query row, KV row) pairs; no live entry names an empty half, an empty query half lists
    nothing, and each row keeps its list's order. ``kept_half``: a query side holding ceil(n / 2) rows a
    tile, as query_keep 0.5's kept layout does (its second halves are all empty)."""
    from sparse_inductor.compact_layout import CompactLayout, half_tile_lists, half_tiles

    grid = data.draw(grid_for((4, 4, 8), max_tokens=1200), label="grid")
    kv = compact_layout(tile_layout(grid, (4, 4, 8)))
    q = kv
    if kept_half:
        counts = (kv.counts + 1) // 2
        q = CompactLayout(block=128, num_tiles=kv.num_tiles, num_tokens=int(counts.sum()), counts=counts,
                          tile_offsets=(torch.cumsum(counts, 0) - counts).to(torch.int32), positions=None, rows=None)
    g = torch.Generator().manual_seed(seed)
    M = kv.num_tiles
    # Half the width, or the full width (row 0 then lists every tile: on a grid of full tiles the half
    # row lists all 2M halves, which transpose_block_lists reads as a full row, the same pairs).
    num, idx = make_lists((B, H, M), M, data.draw(st.sampled_from([max(1, M // 2), M]), label="K"), "shuffled", g)
    num = num.clamp(max=idx.shape[-1])
    half_q, half_kv = half_tiles(q), half_tiles(kv)
    hnum, hidx = half_tile_lists(num, idx, kv.counts, q.counts, 128)
    for half, whole in ((half_q, q), (half_kv, kv)):
        assert half.block == 64 and half.num_tiles == 2 * whole.num_tiles and half.num_tokens == whole.num_tokens
        assert torch.equal(half.counts.view(-1, 2).sum(-1), whole.counts)
        assert torch.equal(half.tile_offsets, (torch.cumsum(half.counts, 0) - half.counts).to(torch.int32))
        assert half.counts.dtype == half.tile_offsets.dtype == torch.int32
    assert hnum.shape == (B, H, 2 * M) and hidx.shape == (B, H, 2 * M, 2 * idx.shape[-1])
    assert hnum.dtype == hidx.dtype == torch.int32  # the kernels' tables
    live = torch.arange(hidx.shape[-1]) < hnum[..., None]
    assert (half_kv.counts[hidx.long()][live] > 0).all(), "a live entry names an empty half"
    assert (hnum[..., half_q.counts == 0] == 0).all(), "an empty query half lists something"
    # In the list's order, first half before second: the halves of row i's e-th listed tile.
    for b, h, i in [(0, 0, 0), (B - 1, H - 1, M - 1), (0, H - 1, M // 2)]:
        want = [x for j in idx[b, h, i, : int(num[b, h, i])].tolist() for x in (2 * j, 2 * j + 1)
                if half_kv.counts[x] > 0]
        assert hidx[b, h, 2 * i, : int(hnum[b, h, 2 * i])].tolist() == want
    pairs = compact_pairs(num, idx, q, kv)
    assert torch.equal(compact_pairs(hnum, hidx, half_q, half_kv), pairs)
    # The backward's kv-major transpose of the half lists holds the same pairs.
    tnum, tidx = transpose_block_lists(hnum, hidx, 2 * M)
    assert torch.equal(compact_pairs(tnum, tidx, half_kv, half_q).transpose(-1, -2), pairs)


def test_half_lists_of_a_row_listing_every_tile():
    """Grid (4, 8, 16) at (4, 4, 8): four full tiles; a row listing all of them lists all eight halves
    (num == 2M with its entries stored), which the transpose reads as a full row: every KV half lists
    both query halves of that tile."""
    from sparse_inductor.compact_layout import half_tile_lists, half_tiles

    kv = compact_layout(tile_layout((4, 8, 16), (4, 4, 8)))
    num = torch.tensor([[[4, 1, 0, 2]]], dtype=torch.int32)
    idx = torch.tensor([[[[3, 1, 0, 2], [2, -1, -1, -1], [-1, -1, -1, -1], [0, 3, -1, -1]]]], dtype=torch.int32)
    hnum, hidx = half_tile_lists(num, idx, kv.counts, kv.counts, 128)
    assert hnum.tolist() == [[[8, 8, 2, 2, 0, 0, 4, 4]]]
    assert hidx[0, 0, 0].tolist() == [6, 7, 2, 3, 0, 1, 4, 5]
    tnum, tidx = transpose_block_lists(hnum, hidx, 8)
    half = half_tiles(kv)
    assert torch.equal(compact_pairs(tnum, tidx, half, half).transpose(-1, -2), compact_pairs(num, idx, kv, kv))
