"""(e) The coarse selection: exactly k tiles per query tile, the top coarse scores, deterministic."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import HAS_TRITON, KERNEL_DEVICE, grids, kernel_dtypes, sparsities, tiles
import sparse_inductor as si
from sparse_inductor import triton_launch
from sparse_inductor.layout import tile_layout
from sparse_inductor.selection import lists_from_mask, pool_tiles, top_k_tiles
from sparse_inductor.reference import reference_selection, tile_ids
from sparse_inductor.selection import num_selected


@given(grid=grids(600), tile=tiles, sparsity=sparsities, B=st.integers(1, 2), H=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_selection_matches_reference(grid, tile, sparsity, B, H, seed):
    g = torch.Generator().manual_seed(seed)
    N = math.prod(grid)
    q = torch.randn(B, H, N, 16, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, N, 16, generator=g, dtype=torch.float64)
    sel = si.select_blocks(q, k, grid, sparsity=sparsity, tile=tile)
    M = int(tile_ids(grid, tile).max()) + 1
    kk = num_selected(sparsity, M)
    assert (sel.kv_num_blocks == kk).all()
    idx = sel.kv_indices[..., :kk]
    assert (idx.diff(dim=-1) > 0).all(), "indices are distinct and increasing"
    assert torch.equal(sel.dense_mask(), reference_selection(q, k, grid, sparsity, tile))
    # deterministic: the same inputs give the same selection
    assert torch.equal(si.select_blocks(q, k, grid, sparsity=sparsity, tile=tile).kv_indices, sel.kv_indices)


def test_num_selected_formula():
    assert num_selected(0.875, 64) == 8
    assert num_selected(0.0, 7) == 7
    assert num_selected(0.99, 10) == 1
    assert num_selected(0.7, 10) == 3  # not 4 from float noise
    assert num_selected(0.5, 7) == 4  # ceil(3.5)


def test_ties_go_to_lower_index():
    # Equal pooled keys for every tile: all scores tie, so the first k tiles are kept.
    grid = (4, 8, 8)
    q = torch.randn(1, 2, 256, 16)
    k = torch.ones(1, 2, 256, 16)
    sel = si.select_blocks(q, k, grid, sparsity=0.5)
    assert sel.kv_indices.shape[-1] == 2
    assert (sel.kv_indices == torch.tensor([0, 1], dtype=torch.int32)).all()


def test_padding_does_not_change_pooling():
    # A partial tile's mean is over its valid tokens only: a key tile made of one token with a
    # large value must win over full tiles of small values.
    grid = (1, 1, 17)  # tile (1,1,16) -> tiles of 16 and 1 tokens
    q = torch.ones(1, 1, 17, 16)
    k = torch.full((1, 1, 17, 16), 0.1)
    k[..., 16, :] = 1.0
    sel = si.select_blocks(q, k, grid, sparsity=0.5, tile=(1, 1, 16))
    assert sel.kv_indices[0, 0, :, 0].tolist() == [1, 1]


# The coarse-stage kernels (CUDA path of the pool_tiles / top_k_tiles ops), run under the
# interpreter on CPU, against the torch implementations the CPU ops use.
triton_only = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@triton_only
@given(grid=grids(300), tile=tiles, B=st.integers(1, 2), H=st.integers(1, 2), D=st.sampled_from([16, 40, 64]),
       dtype=kernel_dtypes, seed=st.integers(0, 2**16), heads_inner=st.booleans())
def test_pool_kernel_matches_torch(grid, tile, B, H, D, dtype, seed, heads_inner):
    g = torch.Generator().manual_seed(seed)
    N = math.prod(grid)
    shape = (B, N, H, D) if heads_inner else (B, H, N, D)
    q, k = (torch.randn(*shape, generator=g).to(dtype) for _ in range(2))
    if heads_inner:  # [B, N, H, D] viewed as [B, H, N, D], as DiTs pass it
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    layout = tile_layout(grid, tile)
    dev = KERNEL_DEVICE
    q_mean, k_mean = (torch.empty(B, H, layout.num_tiles, D, device=dev) for _ in range(2))
    triton_launch.pool_tiles(q.to(dev), k.to(dev), layout.slots.to(dev), layout.counts.to(dev), q_mean, k_mean)
    rows = layout.slots.clamp(min=0).long()
    for got, x in ((q_mean, q), (k_mean, k)):
        want = pool_tiles(x.double().index_select(2, rows), layout.counts, layout.block_size)
        # fp32 sums of at most 256 values: 1e-5 relative is ample for every input dtype.
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-5)


@triton_only
@given(grid=grids(300), tile=tiles, B=st.integers(1, 2), H=st.integers(1, 2), D=st.sampled_from([16, 40, 64]),
       dtype=kernel_dtypes, seed=st.integers(0, 2**16), heads_inner=st.booleans())
def test_compact_pool_kernel_is_the_permutation_and_the_pool(grid, tile, B, H, D, dtype, seed, heads_inner):
    """The fused kernel of the compact TMA path (v28): its compact copies are exactly
    ``index_select(2, positions)`` and its means exactly the pool kernel's (the selection must not
    depend on which pass pooled), both within fp32 rounding of the float64 means."""
    from sparse_inductor.compact_layout import compact_layout

    g = torch.Generator().manual_seed(seed)
    N = math.prod(grid)
    shape = (B, N, H, D) if heads_inner else (B, H, N, D)
    q, k = (torch.randn(*shape, generator=g).to(dtype).to(KERNEL_DEVICE) for _ in range(2))
    if heads_inner:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    layout = tile_layout(grid, tile, device=KERNEL_DEVICE)
    compact = compact_layout(layout)
    q_c, k_c = (torch.full((B, H, N, D), float("nan"), dtype=dtype, device=KERNEL_DEVICE) for _ in range(2))
    q_mean, k_mean, pq, pk = (torch.empty(B, H, layout.num_tiles, D, device=KERNEL_DEVICE) for _ in range(4))
    triton_launch.compact_pool(q, k, layout.slots, layout.counts, compact.tile_offsets, q_c, k_c, q_mean, k_mean)
    triton_launch.pool_tiles(q, k, layout.slots, layout.counts, pq, pk)
    rows = layout.slots.clamp(min=0).long()
    for x, got, mean, pooled in ((q, q_c, q_mean, pq), (k, k_c, k_mean, pk)):
        assert torch.equal(got, x.index_select(2, compact.positions)), "compact rows differ from index_select"
        assert torch.equal(mean, pooled), "the fused pass pools differently from the pool kernel"
        want = pool_tiles(x.double().index_select(2, rows), layout.counts, layout.block_size)
        torch.testing.assert_close(mean.double(), want, rtol=1e-5, atol=1e-5)


@triton_only
@given(rows=st.integers(1, 6), cols=st.integers(1, 300), data=st.data(), seed=st.integers(0, 2**16),
       levels=st.sampled_from([3, 50, None]))
def test_top_k_kernel_matches_sort(rows, cols, data, seed, levels):
    """Same columns as the stable-sort definition, ties (few distinct levels) to the lower index."""
    k = data.draw(st.integers(1, cols))
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, cols, generator=g)
    if levels is not None:
        scores = torch.round(scores * levels / 4) / levels  # many exact ties, incl. -0.0 vs 0.0
        scores[scores == 0] = torch.where(torch.rand(int((scores == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
    out = torch.empty(rows, k, dtype=torch.int32, device=KERNEL_DEVICE)
    triton_launch.top_k_tiles(scores.to(KERNEL_DEVICE), k, out)
    assert torch.equal(out.cpu(), top_k_tiles(scores, k))


@triton_only
@given(rows=st.integers(1, 5), cols=st.integers(1, 300), density=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_compact_rows_kernel(rows, cols, density, seed):
    """Row compaction used for the kv-major lists: count and set columns in increasing order."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < density
    num = torch.empty(rows, dtype=torch.int32, device=KERNEL_DEVICE)
    idx = torch.full((rows, cols), -7, dtype=torch.int32, device=KERNEL_DEVICE)
    triton_launch.compact_rows(mask.to(torch.int8).to(KERNEL_DEVICE), num, idx)
    want_num, want_idx = lists_from_mask(mask)
    assert torch.equal(num.cpu(), want_num)
    for r in range(rows):
        n = int(want_num[r])
        assert torch.equal(idx[r, :n].cpu(), want_idx[r, :n])
        assert (idx[r, n:] == -7).all(), "columns past the count are left untouched"
