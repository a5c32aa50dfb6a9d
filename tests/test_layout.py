"""(c) The tile-major permutation: round trip, tile order, valid-first border tiles, counts."""
import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import grids, tiles
from sparse_inductor.layout import block_size_for, from_tiles, tile_layout, to_tiles
from sparse_inductor.reference import tile_ids


@given(grid=grids(2000), tile=tiles, width=st.integers(1, 3))
def test_round_trip_and_padding(grid, tile, width):
    layout = tile_layout(grid, tile)
    N = math.prod(grid)
    x = torch.randn(2, N, width)
    tiled = to_tiles(x, layout, dim=1)
    assert tiled.shape == (2, layout.num_tiles * layout.block_size, width)
    assert torch.equal(from_tiles(tiled, layout, dim=1), x)
    # Every token appears exactly once; padding slots hold zeros.
    is_pad = layout.gather_index == N
    assert int((~is_pad).sum()) == N
    assert torch.equal(tiled[:, is_pad], torch.zeros_like(tiled[:, is_pad]))


@given(grid=grids(2000), tile=tiles)
def test_tile_order_and_counts(grid, tile):
    layout = tile_layout(grid, tile)
    N = math.prod(grid)
    S = layout.block_size
    assert S == block_size_for(tile) and S >= math.prod(tile) and S >= 16 and (S & (S - 1)) == 0
    ids = tile_ids(grid, tile)  # independent derivation: tile of each raster token
    assert layout.num_tiles == int(ids.max()) + 1
    assert torch.equal(layout.counts.long(), torch.bincount(ids, minlength=layout.num_tiles))
    slots = layout.gather_index.view(layout.num_tiles, S)
    for m in range(layout.num_tiles):
        c = int(layout.counts[m])
        tokens = slots[m, :c]
        # valid tokens first, all of tile m, in raster order; the rest is padding
        assert torch.equal(tokens, torch.nonzero(ids == m).squeeze(1))
        assert (slots[m, c:] == N).all()


def test_known_small_layout():
    # grid (1, 2, 3), tile (1, 2, 2): tiles [(0,0),(0,1),(1,0),(1,1)] | [(0,2),(1,2)] in raster ids
    layout = tile_layout((1, 2, 3), (1, 2, 2))
    assert layout.counts.tolist() == [4, 2]
    slots = layout.gather_index.view(2, 16)
    assert slots[0, :4].tolist() == [0, 1, 3, 4]
    assert slots[1, :2].tolist() == [2, 5]
    assert layout.scatter_index.tolist() == [0, 1, 16, 2, 3, 17]
