"""The custom ops and the eager API on the op's own device path (CPU here, CUDA on the GPU):
(a) sparsity 0 is SDPA, outputs and gradients equal the float64 reference, (d) poisoned
padding, (f) opcheck, and clear errors for bad input."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from helpers import (REL_TOL, assert_close_rel, grids, joint_token_mask, sparsities, text_key_keep, text_paddings,
                     tiles)
import sparse_inductor as si
from sparse_inductor.attention import sparse_attention
from sparse_inductor.layout import tile_layout
from sparse_inductor.ops import transpose_block_lists
from sparse_inductor.selection import lists_from_mask, mask_from_lists
from sparse_inductor.reference import reference_attention, reference_selection, token_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
op_dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16] + ([] if DEVICE == "cuda" else [torch.float64]))


def _inputs(B, H, N, D, dtype, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g).to(DEVICE, dtype).requires_grad_(requires_grad) for _ in range(3)]


@given(grid=grids(400), dtype=op_dtypes, B=st.integers(1, 2), H=st.integers(1, 3),
       D=st.sampled_from([16, 32, 64]), seed=st.integers(0, 2**16))
def test_sparsity_zero_is_sdpa(grid, dtype, B, H, D, seed):
    q, k, v = _inputs(B, H, math.prod(grid), D, dtype, seed)
    out = si.video_sparse_attention(q, k, v, grid, sparsity=0.0)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_rel(out, ref, REL_TOL[dtype]["out"], "out vs SDPA")


@given(grid=grids(400), tile=tiles, sparsity=sparsities, dtype=op_dtypes, B=st.integers(1, 2),
       H=st.integers(1, 3), D=st.sampled_from([16, 32, 64]), seed=st.integers(0, 2**16))
def test_op_matches_reference_with_gradients(grid, tile, sparsity, dtype, B, H, D, seed):
    q, k, v = _inputs(B, H, math.prod(grid), D, dtype, seed, requires_grad=True)
    out = si.video_sparse_attention(q, k, v, grid, sparsity=sparsity, tile=tile)
    grad = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    # The oracle takes the selection made from the same rounded inputs (DESIGN.md §3).
    selected = si.select_blocks(q, k, grid, sparsity=sparsity, tile=tile).dense_mask()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, _ = reference_attention(q64, k64, v64, token_mask(selected.cpu(), grid, tile).to(DEVICE))
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    tol = REL_TOL[dtype]
    assert_close_rel(out, ref, tol["out"], "out")
    for name, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_close_rel(got, want, tol["grad"], name)


@given(grid=grids(150), tile=tiles, sparsity=sparsities, dtype=op_dtypes, B=st.integers(1, 2),
       H=st.integers(1, 2), D=st.sampled_from([16, 32]), before=st.integers(0, 70), after=st.integers(0, 20),
       padding=text_paddings, seed=st.integers(0, 2**16))
def test_joint_text_and_key_padding_match_reference_with_gradients(grid, tile, sparsity, dtype, B, H, D, before,
                                                                    after, padding, seed):
    """Joint attention (text spans before/after the video span, DESIGN.md §3.5) with an optional
    key-padding mask over the text keys: output and gradients equal the float64 reference, and a
    hidden key gets dK = dV = 0."""
    N = math.prod(grid)
    L = before + N + after
    q, k, v = _inputs(B, H, L, D, dtype, seed, requires_grad=True)
    g = torch.Generator().manual_seed(seed + 1)
    keep = text_key_keep(B, before, N, after, padding, g)
    mask = None if padding == "none" else keep.view(B, 1, 1, L).to(DEVICE)
    out = sparse_attention(q, k, v, grid, sparsity=sparsity, tile=tile, text_before=before, text_after=after,
                           key_padding_mask=mask)
    grad = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    video = slice(before, before + N)
    selected = si.select_blocks(q[:, :, video], k[:, :, video], grid, sparsity=sparsity, tile=tile).dense_mask()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, _ = reference_attention(q64, k64, v64, joint_token_mask(selected, grid, tile, before, after, keep).to(DEVICE))
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    tol = REL_TOL[dtype]
    assert_close_rel(out, ref, tol["out"], "out")
    for name, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_close_rel(got, want, tol["grad"], name)
    hidden = ~keep.to(DEVICE)
    for got in (dk, dv):
        assert (got.transpose(1, 2)[hidden] == 0).all()


@given(grid=grids(300), tile=tiles, sparsity=sparsities, seed=st.integers(0, 2**16))
def test_selection_in_float64_equals_reference_selection(grid, tile, sparsity, seed):
    q, k, _ = _inputs(1, 2, math.prod(grid), 16, torch.float64 if DEVICE == "cpu" else torch.float32, seed)
    sel = si.select_blocks(q, k, grid, sparsity=sparsity, tile=tile)
    assert torch.equal(sel.dense_mask().cpu(), reference_selection(q.cpu(), k.cpu(), grid, sparsity, tile))


def _tables(layout, B):
    return layout.slots.expand(B, -1), layout.counts.expand(B, -1)


@given(grid=grids(300), keep=st.integers(1, 3), poison=st.sampled_from([float("nan"), float("inf"), 1e4]),
       seed=st.integers(0, 2**16))
def test_unlisted_blocks_and_list_padding_are_never_read(grid, keep, poison, seed):
    """(d) Every query tile lists the first ``keep`` tiles. Whatever the other tiles' K/V rows and
    the unused list entries hold, no output or gradient changes, nothing becomes non-finite,
    and the unlisted rows get dK = dV = 0 exactly."""
    q, k, v = _inputs(1, 2, math.prod(grid), 16, torch.float32, seed)
    layout = tile_layout(grid, (4, 4, 4), q.device)
    M = layout.num_tiles
    keep = min(keep, M)
    kv_num = torch.full((1, 2, M), keep, dtype=torch.int32, device=DEVICE)
    kv_idx = torch.arange(M, dtype=torch.int32, device=DEVICE).expand(1, 2, M, M).contiguous()
    slots, counts = _tables(layout, 1)
    unlisted = torch.zeros(math.prod(grid), dtype=torch.bool, device=DEVICE)
    listed_slots = slots[0, : keep * layout.block_size]
    unlisted[:] = True
    unlisted[listed_slots[listed_slots >= 0].long()] = False
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def run(fill):
        tk, tv = k.clone(), v.clone()
        idx = kv_idx.clone()
        if fill is not None:
            tk[:, :, unlisted] = fill
            tv[:, :, unlisted] = fill
            idx[..., keep:] = 10**6  # list padding: never read
        tq, tk, tv = (t.requires_grad_() for t in (q.clone(), tk, tv))
        out, lse = torch.ops.sparse_inductor.block_sparse_attn_fwd(
            tq, tk, tv, slots, slots, counts, counts, kv_num, idx, 0.25)
        return [out, lse, *torch.autograd.grad(out, (tq, tk, tv), grad)]

    clean = run(None)
    poisoned = run(poison)
    for a, b in zip(clean, poisoned):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for g in poisoned[3:]:
        assert (g[:, :, unlisted] == 0).all()


def test_lse_gradient_folds_into_delta():
    """A loss that uses the LSE output too gets the gradient of the reference."""
    grid, tile, D = (3, 5, 6), (2, 4, 4), 16
    dtype = torch.float64 if DEVICE == "cpu" else torch.float32
    q, k, v = (x.requires_grad_() for x in _inputs(1, 2, math.prod(grid), D, dtype, 0))
    layout = tile_layout(grid, tile, q.device)
    sel = si.select_blocks(q, k, grid, sparsity=0.5, tile=tile)
    slots, counts = _tables(layout, 1)
    out, lse = torch.ops.sparse_inductor.block_sparse_attn_fwd(
        q, k, v, slots, slots, counts, counts, sel.kv_num_blocks, sel.kv_indices, 0.25)
    weights = torch.linspace(0, 1, math.prod(grid), device=DEVICE, dtype=torch.float64)
    got = torch.autograd.grad((out.double() ** 2).sum() + (lse.double() * weights).sum(), (q, k, v))
    raster = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = reference_attention(*raster, token_mask(sel.dense_mask().cpu(), grid, tile).to(DEVICE), scale=0.25)
    want = torch.autograd.grad((ref ** 2).sum() + (ref_lse * weights).sum(), raster)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_close_rel(g, w, REL_TOL[dtype]["grad"], name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads_inner", [False, True])
def test_opcheck(dtype, heads_inner):
    grid, tile = (3, 5, 6), (2, 4, 4)
    q, k, v = _inputs(2, 2, math.prod(grid), 16, dtype, 3)
    if heads_inner:  # [B, N, H, D].transpose(1, 2): outputs keep that layout
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    layout = tile_layout(grid, tile, q.device)
    sel = si.select_blocks(q, k, grid, sparsity=0.5, tile=tile)
    slots, counts = _tables(layout, 2)
    fwd_args = (q, k, v, slots, slots, counts, counts, sel.kv_num_blocks, sel.kv_indices, 0.25)
    torch.library.opcheck(torch.ops.sparse_inductor.block_sparse_attn_fwd.default, fwd_args)
    out, lse = torch.ops.sparse_inductor.block_sparse_attn_fwd(*fwd_args)
    assert out.stride() == q.stride()
    q_num, q_idx = transpose_block_lists(sel.kv_num_blocks, sel.kv_indices, layout.num_tiles)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), lse.detach(),
                torch.randn_like(lse), slots, slots, counts, counts, sel.kv_num_blocks, sel.kv_indices,
                q_num, q_idx, 0.25)
    torch.library.opcheck(torch.ops.sparse_inductor.block_sparse_attn_bwd.default, bwd_args)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_transposed_lists(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    kv_num = torch.tensor([[[2, 1, 3]]], dtype=torch.int32, device=device)
    kv_idx = torch.tensor([[[[1, 3, 9], [0, 7, 7], [0, 1, 2]]]], dtype=torch.int32, device=device)
    q_num, q_idx = transpose_block_lists(kv_num, kv_idx, 4)
    assert q_num.tolist() == [[[2, 2, 1, 1]]]
    assert [q_idx[0, 0, j, : q_num[0, 0, j]].tolist() for j in range(4)] == [[1, 2], [0, 2], [2], [0]]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_full_rows_need_no_entries(device):
    # A row listing every KV block (a text query block) stores no entries: the lists may be
    # narrower than the number of blocks, and whatever its entries hold is not read.
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    kv_num = torch.tensor([[[2, 4, 1]]], dtype=torch.int32, device=device)
    kv_idx = torch.tensor([[[[1, 3], [3, 3], [2, 0]]]], dtype=torch.int32, device=device)
    mask = mask_from_lists(kv_num, kv_idx, 4)
    assert mask.int().tolist() == [[[[0, 1, 0, 1], [1, 1, 1, 1], [0, 0, 1, 0]]]]
    q_num, q_idx = transpose_block_lists(kv_num, kv_idx, 4)
    assert q_num.tolist() == [[[1, 2, 2, 2]]]
    assert [q_idx[0, 0, j, : q_num[0, 0, j]].tolist() for j in range(4)] == [[1], [0, 1], [1, 2], [0, 1]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@given(Mq=st.integers(1, 70), Mk=st.integers(1, 70), density=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_transposed_lists_cuda_matches_cpu(Mq, Mk, density, seed):
    g = torch.Generator().manual_seed(seed)
    kv_num, kv_idx = lists_from_mask(torch.rand(2, 3, Mq, Mk, generator=g) < density)
    kv_idx[..., -1] = Mk - 1  # garbage past the counts must not matter
    want_num, want_idx = transpose_block_lists(kv_num, kv_idx, Mk)
    got_num, got_idx = (x.cpu() for x in transpose_block_lists(kv_num.cuda(), kv_idx.cuda(), Mk))
    assert torch.equal(got_num, want_num)
    listed = torch.arange(Mq) < want_num.unsqueeze(-1)
    assert torch.equal(torch.where(listed, got_idx, 0), torch.where(listed, want_idx, 0))


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument and what is accepted.
# ---------------------------------------------------------------------------------------------
def _good():
    return [torch.randn(1, 2, 60, 16) for _ in range(3)]


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda a: a.update(q=a["q"][0]), ValueError, ["q", "4 dims"]),
        (lambda a: a.update(k=a["k"][:, :, :30]), ValueError, ["k", "same [B, H, N, D]"]),
        (lambda a: a.update(grid=(3, 4, 4)), ValueError, ["N=60", "T*H*W"]),
        (lambda a: a.update(grid=(3, 4)), ValueError, ["grid", "three positive ints"]),
        (lambda a: a.update(grid=(3, 0, 20)), ValueError, ["grid"]),
        (lambda a: a.update(tile=(8, 8, 8)), ValueError, ["tile", "256"]),
        (lambda a: a.update(sparsity=1.0), ValueError, ["sparsity", "[0, 1)"]),
        (lambda a: a.update(sparsity=-0.1), ValueError, ["sparsity", "[0, 1)"]),
        (lambda a: a.update(sparsity="high"), ValueError, ["sparsity"]),
        (lambda a: a.update(scale=0.0), ValueError, ["scale"]),
        (lambda a: a.update(q=a["q"].int(), k=a["k"].int(), v=a["v"].int()), TypeError, ["dtype", "torch.float16"]),
        (lambda a: a.update(v=a["v"].half()), TypeError, ["v", "one dtype"]),
        (lambda a: a.update(q=[1, 2]), TypeError, ["q", "torch.Tensor"]),
        (lambda a: a.update(q=a["q"].to("meta"), k=a["k"].to("meta"), v=a["v"].to("meta")), ValueError, ["device", "'cpu' and 'cuda'"]),
        (lambda a: a.update(q=torch.randn(1, 2, 60, 300), k=torch.randn(1, 2, 60, 300), v=torch.randn(1, 2, 60, 300)), ValueError, ["head dim", "256"]),
    ],
)
def test_bad_input_errors(change, error, words):
    q, k, v = _good()
    args = dict(q=q, k=k, v=v, grid=(3, 4, 5), sparsity=0.5, tile=(4, 4, 4), scale=None)
    change(args)
    with pytest.raises(error) as info:
        si.video_sparse_attention(args["q"], args["k"], args["v"], args["grid"], sparsity=args["sparsity"],
                                  tile=args["tile"], scale=args["scale"])
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"
