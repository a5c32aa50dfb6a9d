"""The backward of the compact tile-major TMA forward (kernel_templates/tma_block_sparse_bwd.py)
against float64 autograd of the reference attention of DESIGN.md §3 under the same per-head tile
mask: grids that do and do not divide by the tile (1-frame and 2-row border tiles included), random
per-head KV lists of every length and order (a row listing every tile, a row listing one), a query
tile listing nothing and a KV tile listed by nobody, with and without a gradient on the LSE.

On CPU under TRITON_INTERPRET=1 (bf16 through the kernels' fp32 upcast), natively on CUDA.
Tolerances: helpers.REL_TOL[dtype]["grad"] (relative L2 error of each of dQ, dK, dV), the ones the
gather kernels' gradients are held to in test_kernels.py: fp32 5e-5, fp16 6e-3, bf16 3e-2.

The reference of a query tile that lists nothing: its rows have output 0 and LSE -inf and must
contribute nothing, which float64 softmax cannot express (an all-masked row is NaN). So such rows
are given every key in the reference and a zero incoming gradient (dO and dLSE): they then add
exactly 0 to dK and dV and get dQ = 0, the gradient of "output 0". The kernel gets the real
incoming gradients for those rows (nonzero), with output 0 and LSE -inf, as the forward writes them.
"""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import HAS_TRITON, KERNEL_DEVICE, REL_TOL, assert_close_rel
from sparse_inductor.layout import tile_layout
from sparse_inductor.reference import reference_attention, tile_ids, token_mask
from test_tma_block_sparse import DTYPES, TILES, grid_for, random_lists

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# The dK/dV kernel's variants (tma_block_sparse_bwd.DKDV_VARIANTS, spelled out so that collecting
# this file needs no triton; test_backward_bad_inputs checks the two agree).
DKDV_VARIANTS = ("default", "half_boxes", "two_pass", "stats_in_acc")


def reference_gradients(q, k, v, grad_out, grad_lse, selected, grid, tile, scale):
    """float64 ``(out, lse, dq, dk, dv)`` in raster order for the tile mask ``selected [B, H, M, M]``;
    rows of a query tile that selects nothing get output 0, LSE -inf, dQ 0 and add nothing (see the
    module docstring for how)."""
    ids = tile_ids(grid, tile)
    empty = (~selected.any(-1))[:, :, ids]  # [B, H, N]: rows of tiles listing nothing
    mask = token_mask(selected, grid, tile) | empty[..., None]
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    out, lse = reference_attention(q64, k64, v64, mask, scale)
    go = torch.where(empty[..., None], 0.0, grad_out.double())
    outputs, grads = [out], [go]
    if grad_lse is not None:
        outputs.append(lse)
        grads.append(torch.where(empty, 0.0, grad_lse.double()))
    dq, dk, dv = torch.autograd.grad(outputs, (q64, k64, v64), grads)
    out = torch.where(empty[..., None], 0.0, out.detach())
    lse = torch.where(empty, float("-inf"), lse.detach())
    return out, lse, dq, dk, dv


def run_backward(q, k, v, grad_out, grad_lse, out, lse, grid, tile, num, idx, scale, merge=None,
                 dkdv_variant="default"):
    """The backward on raster-order tensors: permuted to compact tile-major, run, gradients back in
    raster order. ``merge``: pass box lists made with ``merge_adjacent=merge`` (both directions)
    instead of letting the function make its own (merged). ``dkdv_variant``: the function's."""
    from kernel_templates.tma_block_sparse_bwd import tma_packed_block_sparse_attention_backward
    from sparse_inductor.compact_layout import compact_layout, from_compact, kv_boxes_by_class, to_compact
    from sparse_inductor.ops import transpose_block_lists

    compact = compact_layout(tile_layout(grid, tile, KERNEL_DEVICE))
    dtype = q.dtype
    go, qc, kc, vc, oc = (to_compact(x.to(KERNEL_DEVICE), compact) for x in (grad_out, q, k, v, out.to(dtype)))
    lse_c = to_compact(lse.float().to(KERNEL_DEVICE), compact, dim=-1)
    gl = None if grad_lse is None else to_compact(grad_lse.to(KERNEL_DEVICE), compact, dim=-1)
    num, idx = num.to(KERNEL_DEVICE), idx.to(KERNEL_DEVICE)
    boxes = q_boxes = None
    if merge is not None:
        boxes = kv_boxes_by_class(num, idx, compact, merge_adjacent=merge)
        q_boxes = kv_boxes_by_class(*transpose_block_lists(num, idx, compact.num_tiles), compact,
                                    merge_adjacent=merge)
    grads = tma_packed_block_sparse_attention_backward(go, qc, kc, vc, oc, lse_c, num, idx, compact, scale,
                                                       boxes=boxes, q_boxes=q_boxes, grad_lse=gl,
                                                       dkdv_variant=dkdv_variant)
    for g in grads:
        assert g.dtype == dtype and g.shape == q.shape
    return tuple(from_compact(g, compact).cpu() for g in grads)


def make_inputs(B, H, N, D, dtype, seed, with_grad_lse):
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad_out = (torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(4))
    grad_lse = torch.randn(B, H, N, generator=g) if with_grad_lse else None
    return g, q, k, v, grad_out, grad_lse


def check_gradients(q, k, v, grad_out, grad_lse, grid, tile, num, idx, selected, scale, through_forward=False,
                    merge=None, dkdv_variant="default"):
    """Backward kernels against the reference; ``through_forward``: out and LSE from the forward
    kernel (as in training) instead of from the reference (which isolates the backward)."""
    ref_out, ref_lse, rq, rk, rv = reference_gradients(q, k, v, grad_out, grad_lse, selected, grid, tile, scale)
    if through_forward:
        from test_tma_block_sparse import run_packed

        out, lse = run_packed(q, k, v, grid, tile, num, idx, "tile")
        out, lse = out.cpu(), lse.cpu()
    else:
        out, lse = ref_out.to(q.dtype), ref_lse.float()
    dq, dk, dv = run_backward(q, k, v, grad_out, grad_lse, out, lse, grid, tile, num, idx, scale, merge,
                              dkdv_variant)
    tol = REL_TOL[q.dtype]["grad"]
    for name, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_close_rel(got, want, tol, name)
    return dq, dk, dv


@pytest.mark.parametrize("dkdv_variant", DKDV_VARIANTS)
@given(data=st.data(), tile=st.sampled_from(TILES), dtype=st.sampled_from(DTYPES), B=st.integers(1, 2),
       H=st.integers(1, 2), D=st.sampled_from([64, 128]), seed=st.integers(0, 2**16), with_grad_lse=st.booleans(),
       merge=st.sampled_from([None, False]))
def test_backward_matches_reference(dkdv_variant, data, tile, dtype, B, H, D, seed, with_grad_lse, merge):
    """``merge`` None: the function's own (merged) box lists; False: one box per listed tile, passed in.
    Every ``dkdv_variant`` (the dK/dV kernel's compiled variants) is held to the same tolerance."""
    grid = data.draw(grid_for(tile), label="grid")
    N, M = math.prod(grid), tile_layout(grid, tile).num_tiles
    g, q, k, v, grad_out, grad_lse = make_inputs(B, H, N, D, dtype, seed, with_grad_lse)
    num, idx, selected = random_lists(B, H, M, g)
    check_gradients(q, k, v, grad_out, grad_lse, grid, tile, num, idx, selected, 1.0 / math.sqrt(D), merge=merge,
                    dkdv_variant=dkdv_variant)


# The border structure of Wan 480p (21 x 30 x 52 under (4, 4, 4): tiles of 64, 32, 16 and 8 tokens)
# and of a dividing grid, chained through the forward kernel's own output and LSE.
@pytest.mark.parametrize("grid, tile, dtype, D", [
    ((5, 6, 8), (4, 4, 4), torch.bfloat16, 128),
    ((4, 4, 16), (4, 4, 4), torch.float16, 64),
    ((3, 6, 9), (2, 4, 8), torch.float32, 128),
])
def test_backward_through_the_forward(grid, tile, dtype, D):
    N, M = math.prod(grid), tile_layout(grid, tile).num_tiles
    g, q, k, v, grad_out, grad_lse = make_inputs(1, 2, N, D, dtype, 5, True)
    num, idx, selected = random_lists(1, 2, M, g)
    check_gradients(q, k, v, grad_out, grad_lse, grid, tile, num, idx, selected, 1.0 / math.sqrt(D),
                    through_forward=True)  # run_packed: the default scale


@pytest.mark.parametrize("dkdv_variant", DKDV_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_row_and_unlisted_kv_tile(dtype, dkdv_variant):
    """Query tile 3 lists nothing (its dQ is exactly 0 and it adds nothing to dK, dV, though its
    incoming gradients are not 0); KV tile 2, a partial border tile, is listed by nobody in head 0
    (dK = dV = 0 there exactly), while head 1 lists everything (the dense case)."""
    grid, tile, D = (5, 6, 8), (4, 4, 4), 64  # 8 tiles: 64, 32, 32, 16-token ones
    layout = tile_layout(grid, tile)
    N, M = math.prod(grid), layout.num_tiles
    g, q, k, v, grad_out, grad_lse = make_inputs(1, 2, N, D, dtype, 7, True)
    num, idx, selected = random_lists(1, 2, M, g)
    selected[0, 0, :, 2] = False
    selected[0, 0, 3] = False
    selected[0, 0, 0] = True
    selected[0, 0, 0, 2] = False  # row 0 of head 0: every tile but the unlisted one
    selected[0, 1] = True
    # Lists from the mask, in a shuffled order, junk past each row's length.
    num = selected.sum(-1, dtype=torch.int32)
    order = torch.argsort(torch.rand(1, 2, M, M, generator=g) - 2.0 * selected, dim=-1).to(torch.int32)
    idx = torch.where(torch.arange(M) < num[..., None], order, -1)
    dq, dk, dv = check_gradients(q, k, v, grad_out, grad_lse, grid, tile, num, idx, selected, 1.0 / math.sqrt(D),
                                 dkdv_variant=dkdv_variant)
    ids = tile_ids(grid, tile)
    assert torch.equal(dq[0, 0, ids == 3], torch.zeros(int((ids == 3).sum()), D, dtype=dtype))
    for grad in (dk, dv):
        assert torch.equal(grad[0, 0, ids == 2], torch.zeros(int((ids == 2).sum()), D, dtype=dtype))
        assert grad[0, 0, ids != 2].abs().sum() > 0


def test_skipped_head():
    """A head listing nothing at all: every gradient of it is exactly 0; the other head's are right."""
    grid, tile, D = (3, 6, 9), (2, 4, 8), 128
    N, M = math.prod(grid), tile_layout(grid, tile).num_tiles
    g, q, k, v, grad_out, grad_lse = make_inputs(1, 2, N, D, torch.float32, 11, False)
    num, idx, selected = random_lists(1, 2, M, g)
    num[0, 1] = 0
    selected[0, 1] = False
    grads = check_gradients(q, k, v, grad_out, grad_lse, grid, tile, num, idx, selected, 1.0 / math.sqrt(D))
    for grad in grads:
        assert torch.equal(grad[0, 1], torch.zeros(N, D))


def test_backward_bad_inputs():
    from kernel_templates import tma_block_sparse_bwd
    from kernel_templates.tma_block_sparse_bwd import tma_packed_block_sparse_attention_backward
    from sparse_inductor.compact_layout import compact_layout

    compact = compact_layout(tile_layout((4, 4, 4), (4, 4, 4)))
    x = torch.zeros(1, 1, 64, 64)
    lse = torch.zeros(1, 1, 64)
    lists = (torch.ones(1, 1, 1, dtype=torch.int32), torch.zeros(1, 1, 1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="head dim"):
        y = x[..., :32]
        tma_packed_block_sparse_attention_backward(y, y, y, y, y, lse, *lists, compact)
    with pytest.raises(ValueError, match="grad_out"):
        tma_packed_block_sparse_attention_backward(x[..., :32, :], x, x, x, x, lse, *lists, compact)
    with pytest.raises(ValueError, match="lse"):
        tma_packed_block_sparse_attention_backward(x, x, x, x, x, lse[..., :32], *lists, compact)
    with pytest.raises(ValueError, match="grad_lse"):
        tma_packed_block_sparse_attention_backward(x, x, x, x, x, lse, *lists, compact, grad_lse=lse[..., :32])
    with pytest.raises(ValueError, match="dkdv_variant must be one of 'default', 'half_boxes'"):
        tma_packed_block_sparse_attention_backward(x, x, x, x, x, lse, *lists, compact, dkdv_variant="halves")
    assert tma_block_sparse_bwd.DKDV_VARIANTS == DKDV_VARIANTS
