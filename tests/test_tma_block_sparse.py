"""The compact tile-major TMA forward (kernel_templates/tma_block_sparse.py, issue 22 item 2) against
the float64 reference of DESIGN.md §3: grids that do and do not divide by the tile (1-frame and
2-row border tiles included), random per-head KV lists of every length (a row listing every tile,
a row listing one), in any order. On CPU under TRITON_INTERPRET=1 (bf16 through the kernels' fp32
upcast), natively on CUDA. Tolerances: helpers.REL_TOL."""
import math

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

from helpers import HAS_TRITON, KERNEL_DEVICE, REL_TOL, assert_close_rel
from sparse_inductor.layout import tile_layout, to_tiles
from sparse_inductor.reference import reference_attention, token_mask

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (4, 4, 4) and (2, 4, 8): 64-slot tiles (box classes 64 / 32 / 16); (2, 4, 4): 32-slot tiles.
TILES = [(4, 4, 4), (2, 4, 8), (2, 4, 4)]


@st.composite
def grid_for(draw, tile, max_tokens=320):
    """Per axis 0-2 whole tiles plus a remainder of 0, 1 (one frame), 2 (two rows) or t - 1 tokens:
    the border tiles of the 21-frame, 30-row Wan grids and their neighbours."""
    grid = tuple(draw(st.integers(0, 2)) * t + draw(st.sampled_from(sorted({0, 1, 2, t - 1} & set(range(t)))))
                 for t in tile)
    assume(min(grid) >= 1 and math.prod(grid) <= max_tokens)
    return grid


def random_lists(B, H, M, generator, width=None):
    """Per-(batch, head, query tile) KV lists of random length and order: row (0, 0, 0) lists every
    tile, the last row one tile; entries past a row's length are junk (-1) that must never be read."""
    num = torch.randint(1, M + 1, (B, H, M), generator=generator, dtype=torch.int32)
    num[0, 0, 0] = M
    num[-1, -1, -1] = 1
    order = torch.argsort(torch.rand(B, H, M, M, generator=generator), dim=-1).to(torch.int32)
    live = torch.arange(M) < num[..., None]
    idx = torch.where(live, order, -1)[..., : width or M]
    selected = torch.zeros(B, H, M, M, dtype=torch.bool)
    selected.scatter_(-1, order.long(), live)
    return num, idx.contiguous(), selected


def run_packed(q, k, v, grid, tile, num, idx, out_order, q_in_registers=False, device_descriptors=False,
               step=None, query_rows=None):
    """The packed kernel on raster-order inputs: permute to compact tile-major, run, and return
    output and LSE in raster order (through from_compact, or written so by the kernel)."""
    from sparse_inductor.compact_layout import compact_layout, from_compact, to_compact
    from kernel_templates.tma_block_sparse import tma_packed_block_sparse_attention

    compact = compact_layout(tile_layout(grid, tile, KERNEL_DEVICE))
    tiles = [to_compact(x.to(KERNEL_DEVICE), compact) for x in (q, k, v)]
    out, lse = tma_packed_block_sparse_attention(*tiles, num.to(KERNEL_DEVICE), idx.to(KERNEL_DEVICE), compact,
                                                 out_order=out_order, q_in_registers=q_in_registers,
                                                 device_descriptors=device_descriptors, step=step,
                                                 query_rows=query_rows)
    if out_order == "tile":
        out, lse = from_compact(out, compact), from_compact(lse, compact, dim=-1)
    return out, lse


def check_against_reference(grid, tile, dtype, B, H, D, seed, out_order, q_in_registers=False,
                            device_descriptors=False, step=None, query_rows=None):
    g = torch.Generator().manual_seed(seed)
    N = math.prod(grid)
    M = tile_layout(grid, tile).num_tiles
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(3))
    num, idx, selected = random_lists(B, H, M, g)
    out, lse = run_packed(q, k, v, grid, tile, num, idx, out_order, q_in_registers, device_descriptors, step,
                          query_rows)
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), token_mask(selected, grid, tile),
                                       1.0 / math.sqrt(D))
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (B, H, N)
    assert_close_rel(out, ref, REL_TOL[dtype]["out"], "out")
    assert_close_rel(lse, ref_lse, REL_TOL[dtype]["lse"], "lse")


@given(data=st.data(), tile=st.sampled_from(TILES), dtype=st.sampled_from(DTYPES), B=st.integers(1, 2),
       H=st.integers(1, 2), D=st.sampled_from([64, 128]), seed=st.integers(0, 2**16),
       out_order=st.sampled_from(["tile", "sequence"]), q_in_registers=st.booleans(),
       device_descriptors=st.booleans(), half_step=st.booleans(), half_query=st.booleans())
def test_packed_matches_reference(data, tile, dtype, B, H, D, seed, out_order, q_in_registers, device_descriptors,
                                  half_step, half_query):
    """``half_step``: KV walked in steps of half a tile (boxes cut at S / 2 rows); ``half_query``:
    query boxes of half a tile (a program computes its tile in two boxes)."""
    grid = data.draw(grid_for(tile), label="grid")
    half = math.prod(tile) // 2
    check_against_reference(grid, tile, dtype, B, H, D, seed, out_order, q_in_registers, device_descriptors,
                            half if half_step else None, half if half_query else None)


# The border structure of Wan 480p (21 x 30 x 52 under (4, 4, 4): tiles of 64, 32, 16 and 8 tokens)
# and of the dividing grid, at a size the interpreter runs in about a second.
@pytest.mark.parametrize("grid, tile, dtype, D", [
    ((5, 6, 8), (4, 4, 4), torch.bfloat16, 128),
    ((4, 8, 8), (4, 4, 4), torch.float16, 128),
    ((3, 6, 16), (2, 4, 8), torch.float32, 64),
])
def test_packed_border_structures(grid, tile, dtype, D):
    check_against_reference(grid, tile, dtype, 1, 2, D, 0, "tile")
    check_against_reference(grid, tile, dtype, 1, 2, D, 0, "sequence", device_descriptors=True)


# 128-token tiles (4, 4, 8): 128-row query boxes over 64-row KV steps (the TMA probe's 6.9x structure,
# issue 22), 64-row query boxes, and both at the tile's size.
@pytest.mark.parametrize("step, query_rows", [(64, None), (64, 64), (None, 64), (None, None)])
def test_packed_128_slot_tiles(step, query_rows):
    check_against_reference((6, 6, 12), (4, 4, 8), torch.bfloat16, 1, 2, 128, 0, "sequence", True, False, step,
                            query_rows)


@pytest.mark.parametrize("r", [0.5, 0.75])
def test_packed_kept_query_rows_in_half_tile_boxes(r):
    """query_keep's kept layout on 128-slot tiles in 64-row query boxes over 64-row KV steps: at
    r = 0.5 a tile's kept rows fit one box, at 0.75 (96 rows) the program runs two."""
    from kernel_templates.tma_block_sparse import tma_packed_block_sparse_attention
    from sparse_inductor.compact_layout import compact_layout, to_compact
    from sparse_inductor.query_keep import kept_layout

    grid, tile, D = (6, 6, 12), (4, 4, 8), 64
    g = torch.Generator().manual_seed(5)
    N, M = math.prod(grid), tile_layout(grid, tile).num_tiles
    q, k, v = (torch.randn(1, 2, N, D, generator=g).to(KERNEL_DEVICE) for _ in range(3))
    num, idx, selected = random_lists(1, 2, M, g)
    layout = tile_layout(grid, tile, KERNEL_DEVICE)
    compact, kl = compact_layout(layout), kept_layout(q, layout, r)
    rows = kl.positions[..., None].expand(-1, -1, -1, D)
    out, lse = tma_packed_block_sparse_attention(q.gather(2, rows), to_compact(k, compact), to_compact(v, compact),
                                                 num.to(KERNEL_DEVICE), idx.to(KERNEL_DEVICE), compact,
                                                 q_layout=kl.compact, step=64, query_rows=64)
    ref, ref_lse = reference_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                       token_mask(selected, grid, tile), 1.0 / math.sqrt(D))
    assert_close_rel(out, ref.gather(2, rows.cpu()), REL_TOL[torch.float32]["out"], "out")
    assert_close_rel(lse, ref_lse.gather(2, kl.positions.cpu()), REL_TOL[torch.float32]["lse"], "lse")


def test_packed_rows_without_keys():
    """A head whose rows list nothing (a skipped head) gets output 0 and LSE -inf; the other head's
    rows are unaffected."""
    grid, tile, D = (5, 6, 8), (4, 4, 4), 64
    g = torch.Generator().manual_seed(1)
    N, M = math.prod(grid), tile_layout(grid, tile).num_tiles
    q, k, v = (torch.randn(1, 2, N, D, generator=g) for _ in range(3))
    num, idx, selected = random_lists(1, 2, M, g)
    num[0, 1] = 0
    selected[0, 1] = False
    out, lse = run_packed(q, k, v, grid, tile, num, idx, "sequence")
    assert torch.equal(out[0, 1].cpu(), torch.zeros(N, D))
    assert torch.isneginf(lse[0, 1].cpu()).all()
    ref, _ = reference_attention(q[:, :1].double(), k[:, :1].double(), v[:, :1].double(),
                                 token_mask(selected[:, :1], grid, tile), 1.0 / math.sqrt(D))
    assert_close_rel(out[:, :1], ref, REL_TOL[torch.float32]["out"], "out")


@given(data=st.data(), tile=st.sampled_from(TILES))
@example(data=None, tile=(4, 4, 4))
def test_compact_permutation(data, tile):
    """Compact tile-major rows are the valid slots of the padded tile-major layout, tile after tile
    with no gap; from_compact inverts to_compact."""
    from sparse_inductor.compact_layout import compact_layout, from_compact, to_compact

    grid = (5, 6, 8) if data is None else data.draw(grid_for(tile), label="grid")
    layout = tile_layout(grid, tile)
    compact = compact_layout(layout)
    N = math.prod(grid)
    x = torch.randn(2, 3, N, 5)
    xc = to_compact(x, compact)
    padded = to_tiles(x, layout)
    S = layout.block_size
    offsets = torch.cumsum(layout.counts, 0) - layout.counts
    assert torch.equal(compact.tile_offsets.cpu(), offsets.to(torch.int32))
    for m, n in enumerate(layout.counts.tolist()):
        assert torch.equal(xc[:, :, offsets[m]: offsets[m] + n], padded[:, :, m * S: m * S + n])
    assert torch.equal(from_compact(xc, compact), x)
    assert torch.equal(from_compact(to_compact(x[..., 0], compact, dim=-1), compact, dim=-1), x[..., 0])


@given(tile=st.sampled_from(TILES), seed=st.integers(0, 2**16), merge=st.booleans(), half_step=st.booleans(),
       data=st.data())
def test_boxes_cover_the_listed_rows_class_by_class(tile, seed, merge, half_step, data):
    """kv_boxes_by_class covers each row's listed tiles with disjoint boxes of at most ``step`` rows
    (BLOCK, or half of it: ``half_step``), no row of an unlisted tile, ordered class by class; one
    box per tile (per ``step`` rows of a tile) unless ``merge``, then at most as many (and fewer
    where listed tiles are neighbours)."""
    from sparse_inductor.compact_layout import box_class, compact_layout, kv_boxes_by_class

    grid = data.draw(grid_for(tile), label="grid")
    compact = compact_layout(tile_layout(grid, tile))
    M, S = compact.num_tiles, compact.block
    g = torch.Generator().manual_seed(seed)
    num, idx, _ = random_lists(2, 2, M, g)
    step = S // 2 if half_step else S
    starts, rows, ends = kv_boxes_by_class(num, idx, compact, merge_adjacent=merge, step=step)
    assert starts.shape[-1] == idx.shape[-1] * (S // step)
    offsets, counts = compact.tile_offsets.tolist(), compact.counts.tolist()
    assert ends.shape == (2, 2, M, 4)
    for b, h, i in ((b, h, i) for b in range(2) for h in range(2) for i in range(M)):
        n, boxes = int(num[b, h, i]), int(ends[b, h, i, -1])
        listed = sorted(r for m in idx[b, h, i, :n].tolist() for r in range(offsets[m], offsets[m] + counts[m]))
        box = list(zip(starts[b, h, i, :boxes].tolist(), rows[b, h, i, :boxes].tolist()))
        assert sorted(r for start, count in box for r in range(start, start + count)) == listed
        assert all(0 < count <= step for _, count in box)
        pieces = sum(-(-counts[m] // step) for m in idx[b, h, i, :n].tolist())
        assert boxes == pieces if not merge else boxes <= pieces
        first = 0
        for c, end in enumerate(ends[b, h, i].tolist()):
            assert all(box_class(count, step) == c for _, count in box[first:end])
            first = end


def test_merged_boxes_of_neighbouring_border_tiles():
    """Four listed 16-token tiles in a row (a 1-frame border) make one full box; a lone one a
    quarter box; two neighbouring full tiles stay two full boxes."""
    from sparse_inductor.compact_layout import compact_layout, kv_boxes_by_class

    compact = compact_layout(tile_layout((5, 4, 20), (4, 4, 4)))  # tiles 0-4 full, 5-9 one frame
    idx = torch.tensor([[[[5, 6, 7, 8, 0, 1, 3]] * 10]], dtype=torch.int32)
    num = torch.full((1, 1, 10), 7, dtype=torch.int32)
    starts, rows, ends = kv_boxes_by_class(num, idx, compact)
    assert ends[0, 0, 0].tolist() == [4, 4, 4, 4]  # boxes: tiles 0-1 (2 full), 3, 5-8 (one full)
    assert sorted(zip(starts[0, 0, 0, :4].tolist(), rows[0, 0, 0, :4].tolist())) == [(0, 64), (64, 64),
                                                                                       (192, 64), (320, 64)]
    num[0, 0, 0] = 5  # tiles 5, 6, 7, 8, 0
    idx[0, 0, 0, 1] = 9  # 5, 9, 7, 8, 0: runs 5 | 7-9 (48 rows) | 0
    starts, rows, ends = kv_boxes_by_class(num, idx, compact)
    assert ends[0, 0, 0].tolist() == [1, 2, 2, 3]
    assert rows[0, 0, 0, :3].tolist() == [64, 48, 16] and starts[0, 0, 0, :3].tolist() == [0, 352, 320]


def test_box_classes_of_64_slot_tiles():
    from sparse_inductor.compact_layout import box_class, box_rows

    assert [box_class(n, 64) for n in (64, 63, 33, 32, 17, 16, 8, 1)] == [0, 1, 1, 2, 2, 3, 3, 3]
    assert [box_rows(c, 64) for c in range(4)] == [64, 64, 32, 16]
    # 32-slot tiles: no 8-row boxes (tl.dot takes 16 at least), so everything <= 16 takes a half box.
    assert [box_class(n, 32) for n in (32, 17, 16, 1)] == [0, 1, 2, 2]


def test_packed_bad_inputs():
    from sparse_inductor.compact_layout import compact_layout
    from kernel_templates.tma_block_sparse import tma_packed_block_sparse_attention

    with pytest.raises(ValueError, match="text"):
        compact_layout(tile_layout((4, 4, 4), (4, 4, 4), text_before=3))
    compact = compact_layout(tile_layout((4, 4, 4), (4, 4, 4)))
    x = torch.zeros(1, 1, 64, 64)
    lists = (torch.ones(1, 1, 1, dtype=torch.int32), torch.zeros(1, 1, 1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="head dim"):
        tma_packed_block_sparse_attention(x[..., :32], x[..., :32], x[..., :32], *lists, compact)
    with pytest.raises(ValueError, match="rows"):
        tma_packed_block_sparse_attention(x[:, :, :60], x[:, :, :60], x[:, :, :60], *lists, compact)
    with pytest.raises(ValueError, match="scale"):
        tma_packed_block_sparse_attention(x, x, x, *lists, compact, scale=-1.0)
    with pytest.raises(ValueError, match="kv_num_blocks"):
        tma_packed_block_sparse_attention(x, x, x, lists[0][..., :0], lists[1], compact)
    with pytest.raises(ValueError, match="step must be 64 or 32"):
        tma_packed_block_sparse_attention(x, x, x, *lists, compact, step=16)
    with pytest.raises(ValueError, match="query_rows must be 64 or 32"):
        tma_packed_block_sparse_attention(x, x, x, *lists, compact, query_rows=128)
    with pytest.raises(ValueError, match="boxes"):  # boxes of 64-row steps for a 32-row step
        from sparse_inductor.compact_layout import kv_boxes_by_class
        tma_packed_block_sparse_attention(x, x, x, *lists, compact, step=32, boxes=kv_boxes_by_class(*lists, compact))


@pytest.mark.slow
def test_packed_on_a_real_selection_with_wan_borders():
    """A larger 21-frame-like grid (1-frame and 2-row border tiles) with the selection's own TopK
    lists (sorted, ~1/8 of the tiles), bf16 at D = 128: the benchmark's configuration in small."""
    import sparse_inductor as si

    grid, tile, D = (9, 14, 20), (4, 4, 4), 128
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, math.prod(grid), D, generator=g).to(torch.bfloat16) for _ in range(3))
    sel = si.select_blocks(q, k, grid, sparsity=0.875)
    out, lse = run_packed(q, k, v, grid, tile, sel.kv_num_blocks, sel.kv_indices, "sequence")
    selected = sel.dense_mask().cpu()
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), token_mask(selected, grid, tile),
                                       1.0 / math.sqrt(D))
    assert_close_rel(out, ref, REL_TOL[torch.bfloat16]["out"], "out")
    assert_close_rel(lse, ref_lse, REL_TOL[torch.bfloat16]["lse"], "lse")


def test_q_stays_in_registers_by_default_for_query_boxes_of_up_to_64_rows():
    """The wrapper's default (``q_in_registers=None``): registers for query boxes of 16-64 rows (NOTES v16),
    shared memory for 128-row ones, which spill in registers at 4 warps (2.208 vs 1.819 ms at 480p, v25)."""
    from kernel_templates.tma_block_sparse import q_in_registers_default

    assert [q_in_registers_default(r) for r in (16, 32, 64, 128)] == [True, True, True, False]


@pytest.mark.parametrize("tile, query_rows, expected", [((4, 4, 4), None, True), ((4, 4, 8), None, False),
                                                        ((4, 4, 8), 64, True)])
def test_the_wrapper_launches_with_that_default(monkeypatch, tile, query_rows, expected):
    """What the forward wrapper hands the kernel when ``q_in_registers`` is not given (the compiled path
    does not give it): the launch is intercepted, its ``Q_IN_REGISTERS`` and ``BLOCK_M`` read."""
    import kernel_templates.tma_block_sparse as module
    from sparse_inductor.compact_layout import compact_layout

    launched = {}

    class Intercepted:
        def __getitem__(self, grid):
            return lambda *args, **meta: launched.update(meta)

    monkeypatch.setattr(module, "_tma_packed_fwd", Intercepted())
    grid = (4, 4, 8)
    compact = compact_layout(tile_layout(grid, tile, KERNEL_DEVICE))
    x = torch.zeros(1, 1, math.prod(grid), 64, device=KERNEL_DEVICE)
    M = compact.num_tiles
    num = torch.ones(1, 1, M, dtype=torch.int32, device=KERNEL_DEVICE)
    idx = torch.zeros(1, 1, M, 1, dtype=torch.int32, device=KERNEL_DEVICE)
    module.tma_packed_block_sparse_attention(x, x, x, num, idx, compact, query_rows=query_rows)
    assert launched["Q_IN_REGISTERS"] is expected
    assert launched["BLOCK_M"] == (query_rows or compact.block)
