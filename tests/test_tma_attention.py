"""The TMA-descriptor attention forwards of issue 22 (the ceiling kernels) against the float64
reference: dense over any N (the last block's rows past N masked), and block lists over tile-major
inputs with partial border tiles. On CPU under TRITON_INTERPRET=1 (fp32 and fp16: the interpreter's
bf16 dot is unreliable), on CUDA natively with bf16 too. Tolerances: helpers.REL_TOL."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import HAS_CUDA, HAS_TRITON, KERNEL_DEVICE, REL_TOL, assert_close_rel, grids, sparsities
from sparse_inductor.layout import from_tiles, tile_layout, to_tiles
from sparse_inductor.reference import reference_attention, reference_selection, token_mask
from sparse_inductor.selection import lists_from_mask

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


@settings(max_examples=6)
@given(N=st.integers(1, 300), dtype=st.sampled_from(DTYPES), H=st.integers(1, 2), D=st.sampled_from([64, 128]),
       block=st.sampled_from([32, 64]), seed=st.integers(0, 2**16))
def test_tma_dense_matches_reference(N, dtype, H, D, block, seed):
    from kernel_templates.tma_attention import tma_dense_attention

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, H, N, D, generator=g).to(dtype) for _ in range(3))
    out = tma_dense_attention(*(x.to(KERNEL_DEVICE) for x in (q, k, v)), block_m=block, block_n=block)
    ref, _ = reference_attention(q.double(), k.double(), v.double(), None, 1.0 / math.sqrt(D))
    assert out.dtype == dtype
    assert_close_rel(out, ref, REL_TOL[dtype]["out"], "out")


@settings(max_examples=6)
@given(grid=grids(300), sparsity=sparsities, dtype=st.sampled_from(DTYPES), H=st.integers(1, 2),
       seed=st.integers(0, 2**16))
def test_tma_block_lists_match_reference(grid, sparsity, dtype, H, seed):
    from kernel_templates.tma_attention import tma_block_list_attention

    tile, D = (4, 4, 4), 64  # 64-token tiles: one TMA block per tile
    g = torch.Generator().manual_seed(seed)
    N = math.prod(grid)
    q, k, v = (torch.randn(1, H, N, D, generator=g).to(dtype) for _ in range(3))
    selected = reference_selection(q, k, grid, sparsity, tile)
    layout = tile_layout(grid, tile, KERNEL_DEVICE)
    kv_num, kv_idx = lists_from_mask(selected.to(KERNEL_DEVICE))
    tiles = [to_tiles(x.to(KERNEL_DEVICE), layout) for x in (q, k, v)]
    out = from_tiles(tma_block_list_attention(*tiles, kv_num, kv_idx, layout.counts), layout)
    ref, _ = reference_attention(q.double(), k.double(), v.double(), token_mask(selected, grid, tile), 1.0 / math.sqrt(D))
    assert_close_rel(out, ref, REL_TOL[dtype]["out"], "out")


def test_tma_bad_inputs():
    from kernel_templates.tma_attention import tma_block_list_attention, tma_dense_attention

    x = torch.zeros(1, 1, 64, 32)
    with pytest.raises(ValueError, match="head dim must be 64 or 128"):
        tma_dense_attention(x, x, x)
    y = torch.zeros(1, 1, 100, 64)
    with pytest.raises(ValueError, match="multiple of block=64"):
        tma_block_list_attention(y, y, y, torch.ones(1, 1, 1), torch.zeros(1, 1, 1, 1), torch.ones(1))
