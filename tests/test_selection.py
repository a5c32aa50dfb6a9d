"""(e) The coarse selection: exactly k tiles per query tile, the top coarse scores, deterministic."""
import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import grids, sparsities, tiles
import sparse_inductor as si
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
