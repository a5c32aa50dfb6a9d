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
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import HAS_TRITON, KERNEL_DEVICE, REL_TOL, assert_close_rel
from sparse_inductor.layout import tile_layout
from sparse_inductor.reference import reference_attention, tile_ids, token_mask
from test_tma_block_sparse import DTYPES, TILES, grid_for, random_lists

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# The dK/dV kernel's variants and the ways dQ is computed (tma_block_sparse_bwd.DKDV_VARIANTS,
# DQ_MODES and ATOMIC_VARIANTS, spelled out so that collecting this file needs no triton;
# test_backward_bad_inputs checks they agree).
DKDV_VARIANTS = ("default", "half_boxes", "two_pass", "stats_in_acc", "half_steps")
DQ_MODES = ("separate", "atomic", "atomic_tma")
ATOMIC_VARIANTS = ("half_steps", "default", "two_pass")
#: (dq_mode, dkdv_variant) pairs: every variant with the dQ kernel, and dQ fused into the dK/dV
#: kernel by atomic adds (NOTES v22): "atomic" with each variant it takes, "atomic_tma" (TMA reduces;
#: emulated under the interpreter, see emulate_descriptor_reduce) with one per box descriptor kind.
SEPARATE = [("separate", v) for v in DKDV_VARIANTS]
FUSED = [("atomic", v) for v in ATOMIC_VARIANTS] + [("atomic_tma", "half_steps"), ("atomic_tma", "default")]
#: What the reference test draws fewer examples for (v22's additions; each compiles new kernels).
NEW = [("separate", "half_steps")] + FUSED[:4]


def emulate_descriptor_reduce():
    """The Triton interpreter has no tensor-descriptor reduce (``desc.atomic_add``, TMA's
    ``cp.reduce.async.bulk.tensor``): give it one with that instruction's semantics, an atomic add
    of each element of the box that lies inside the tensor (rows past its extent are dropped)."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if hasattr(builder, "create_descriptor_reduce"):
        return

    def create_descriptor_reduce(self, kind, desc, value, indices):
        assert kind == interpreter._ir.DESCRIPTOR_REDUCE_KIND.ADD, kind
        ptrs, mask = desc.materialize_pointers(indices)
        return self.create_atomic_rmw(interpreter._ir.ATOMIC_OP.FADD, ptrs, value, mask,
                                      interpreter._ir.MEM_SEMANTIC.RELAXED, interpreter._ir.MEM_SYNC_SCOPE.GPU)

    builder.create_descriptor_reduce = create_descriptor_reduce


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
                 dkdv_variant="default", dq_mode="separate"):
    """The backward on raster-order tensors: permuted to compact tile-major, run, gradients back in
    raster order. ``merge``: pass box lists made with ``merge_adjacent=merge`` (both directions)
    instead of letting the function make its own (merged). ``dkdv_variant``, ``dq_mode``: the
    function's."""
    from kernel_templates.tma_block_sparse_bwd import tma_packed_block_sparse_attention_backward
    from sparse_inductor.compact_layout import compact_layout, from_compact, kv_boxes_by_class, to_compact
    from sparse_inductor.ops import transpose_block_lists

    compact = compact_layout(tile_layout(grid, tile, KERNEL_DEVICE))
    if dq_mode == "atomic_tma" and KERNEL_DEVICE == "cpu":
        emulate_descriptor_reduce()
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
                                                       dkdv_variant=dkdv_variant, dq_mode=dq_mode)
    for g in grads:
        assert g.dtype == dtype and g.shape == q.shape
    return tuple(from_compact(g, compact).cpu() for g in grads)


def make_inputs(B, H, N, D, dtype, seed, with_grad_lse):
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad_out = (torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(4))
    grad_lse = torch.randn(B, H, N, generator=g) if with_grad_lse else None
    return g, q, k, v, grad_out, grad_lse


def check_gradients(q, k, v, grad_out, grad_lse, grid, tile, num, idx, selected, scale, through_forward=False,
                    merge=None, dkdv_variant="default", dq_mode="separate"):
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
                              dkdv_variant, dq_mode)
    tol = REL_TOL[q.dtype]["grad"]
    for name, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_close_rel(got, want, tol, name)
    return dq, dk, dv


def check_drawn(dq_mode, dkdv_variant, data, tile, dtype, B, H, D, seed, with_grad_lse, merge):
    grid = data.draw(grid_for(tile), label="grid")
    N, M = math.prod(grid), tile_layout(grid, tile).num_tiles
    g, q, k, v, grad_out, grad_lse = make_inputs(B, H, N, D, dtype, seed, with_grad_lse)
    num, idx, selected = random_lists(B, H, M, g)
    check_gradients(q, k, v, grad_out, grad_lse, grid, tile, num, idx, selected, 1.0 / math.sqrt(D), merge=merge,
                    dkdv_variant=dkdv_variant, dq_mode=dq_mode)


DRAWN = dict(data=st.data(), tile=st.sampled_from(TILES), dtype=st.sampled_from(DTYPES), B=st.integers(1, 2),
             H=st.integers(1, 2), D=st.sampled_from([64, 128]), seed=st.integers(0, 2**16),
             with_grad_lse=st.booleans(), merge=st.sampled_from([None, False]))


@pytest.mark.parametrize("dq_mode, dkdv_variant", [mode for mode in SEPARATE if mode not in NEW])
@given(**DRAWN)
def test_backward_matches_reference(dq_mode, dkdv_variant, data, tile, dtype, B, H, D, seed, with_grad_lse, merge):
    """``merge`` None: the function's own (merged) box lists; False: one box per listed tile, passed in.
    Every ``dkdv_variant`` (the dK/dV kernel's compiled variants) is held to the same tolerance."""
    check_drawn(dq_mode, dkdv_variant, data, tile, dtype, B, H, D, seed, with_grad_lse, merge)


@pytest.mark.parametrize("dq_mode, dkdv_variant", NEW)
@settings(max_examples=max(4, settings.default.max_examples // 3))  # the same draws, fewer of them
@given(**DRAWN)
def test_fused_backward_matches_reference(dq_mode, dkdv_variant, data, tile, dtype, B, H, D, seed, with_grad_lse,
                                          merge):
    """dQ fused into the dK/dV kernel by fp32 atomic adds (``dq_mode``), and the "half_steps"
    variant it is built for, held to the same tolerance ("atomic_tma" with "default" boxes: in
    test_empty_row_and_unlisted_kv_tile)."""
    check_drawn(dq_mode, dkdv_variant, data, tile, dtype, B, H, D, seed, with_grad_lse, merge)


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


# 128-slot tiles (4, 4, 8): the backward runs each as two 64-slot halves (v26); border tiles of 1 frame
# (at most 32 tokens: an empty second half), 2 rows or 4 columns among the drawn grids.
@settings(max_examples=max(4, settings.default.max_examples // 3))
@given(data=st.data(), dtype=st.sampled_from(DTYPES), B=st.integers(1, 2), H=st.integers(1, 2),
       D=st.sampled_from([64, 128]), seed=st.integers(0, 2**16), with_grad_lse=st.booleans(),
       mode=st.sampled_from([("separate", "default"), ("separate", "half_steps"), ("atomic", "half_steps")]))
def test_backward_of_128_slot_tiles(data, dtype, B, H, D, seed, with_grad_lse, mode):
    tile = (4, 4, 8)
    grid = data.draw(grid_for(tile, max_tokens=640), label="grid")
    N, M = math.prod(grid), tile_layout(grid, tile).num_tiles
    g, q, k, v, grad_out, grad_lse = make_inputs(B, H, N, D, dtype, seed, with_grad_lse)
    num, idx, selected = random_lists(B, H, M, g)
    check_gradients(q, k, v, grad_out, grad_lse, grid, tile, num, idx, selected, 1.0 / math.sqrt(D),
                    dq_mode=mode[0], dkdv_variant=mode[1])


def test_backward_of_128_slot_tiles_through_the_forward():
    """Wan's 480p border structure at (4, 4, 8) in small (1-frame, 2-row and 4-column border tiles),
    out and LSE from the v25 forward (64-row steps), as in training."""
    grid, tile, D = (5, 6, 12), (4, 4, 8), 128
    N, M = math.prod(grid), tile_layout(grid, tile).num_tiles
    g, q, k, v, grad_out, grad_lse = make_inputs(1, 2, N, D, torch.bfloat16, 9, True)
    num, idx, selected = random_lists(1, 2, M, g)
    check_gradients(q, k, v, grad_out, grad_lse, grid, tile, num, idx, selected, 1.0 / math.sqrt(D),
                    through_forward=True)


@pytest.mark.parametrize("dtype, dq_mode, dkdv_variant",
                         [(dtype, *mode) for dtype in DTYPES for mode in SEPARATE[:4]]
                         + [(torch.bfloat16, *mode) for mode in SEPARATE[4:] + FUSED])
def test_empty_row_and_unlisted_kv_tile(dtype, dq_mode, dkdv_variant):
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
                                 dkdv_variant=dkdv_variant, dq_mode=dq_mode)
    ids = tile_ids(grid, tile)
    assert torch.equal(dq[0, 0, ids == 3], torch.zeros(int((ids == 3).sum()), D, dtype=dtype))
    for grad in (dk, dv):
        assert torch.equal(grad[0, 0, ids == 2], torch.zeros(int((ids == 2).sum()), D, dtype=dtype))
        assert grad[0, 0, ids != 2].abs().sum() > 0


@pytest.mark.parametrize("dq_mode, dkdv_variant", [("separate", "default"), ("separate", "half_steps"),
                                                   ("atomic", "half_steps"), ("atomic_tma", "half_steps")])
def test_skipped_head(dq_mode, dkdv_variant):
    """A head listing nothing at all: every gradient of it is exactly 0; the other head's are right."""
    grid, tile, D = (3, 6, 9), (2, 4, 8), 128
    N, M = math.prod(grid), tile_layout(grid, tile).num_tiles
    g, q, k, v, grad_out, grad_lse = make_inputs(1, 2, N, D, torch.float32, 11, False)
    num, idx, selected = random_lists(1, 2, M, g)
    num[0, 1] = 0
    selected[0, 1] = False
    grads = check_gradients(q, k, v, grad_out, grad_lse, grid, tile, num, idx, selected, 1.0 / math.sqrt(D),
                            dkdv_variant=dkdv_variant, dq_mode=dq_mode)
    for grad in grads:
        assert torch.equal(grad[0, 1], torch.zeros(N, D))


@pytest.mark.parametrize("dq_mode", ["atomic", "atomic_tma"])
@pytest.mark.parametrize("where", ["k", "v"])
def test_fused_dq_drops_non_finite_keys_of_another_tile(where, dq_mode):
    """Grid (5, 6, 7), tiles (4, 4, 4): tile 1 is partial (48 tokens), so its K/V rows in the dK/dV
    program hold the first rows of tile 2, which here holds an inf; every tile lists itself only.
    The fused dQ (a sum over KV rows) must drop them, as the dQ kernel does (v21): the same
    gradients as dq_mode "separate", finite wherever those are."""
    grid, tile, D = (5, 6, 7), (4, 4, 4), 64
    layout = tile_layout(grid, tile)
    N, M = math.prod(grid), layout.num_tiles
    g, q, k, v, grad_out, grad_lse = make_inputs(1, 1, N, D, torch.float32, 3, False)
    ids = tile_ids(grid, tile)
    {"k": k, "v": v}[where][0, 0, (ids == 2).nonzero()[0, 0]] = float("inf")
    num = torch.ones(1, 1, M, dtype=torch.int32)
    idx = torch.arange(M, dtype=torch.int32).view(1, 1, M, 1)
    from test_tma_block_sparse import run_packed

    out, lse = (x.cpu() for x in run_packed(q, k, v, grid, tile, num, idx, "tile"))  # exact since v21
    grads = {mode: run_backward(q, k, v, grad_out, None, out, lse, grid, tile, num, idx, 1.0 / math.sqrt(D),
                                dq_mode=mode, dkdv_variant="half_steps") for mode in ("separate", dq_mode)}
    assert torch.isfinite(grads["separate"][0][0, 0, ids == 1]).all()
    for want, got in zip(grads["separate"], grads[dq_mode]):
        assert torch.equal(torch.isfinite(got), torch.isfinite(want))
        finite = torch.isfinite(want)
        assert_close_rel(got[finite], want[finite], REL_TOL[torch.float32]["grad"], f"{dq_mode} vs separate")


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
    with pytest.raises(ValueError, match="dq_mode must be one of 'separate', 'atomic', 'atomic_tma', got 'atomics'"):
        tma_packed_block_sparse_attention_backward(x, x, x, x, x, lse, *lists, compact, dq_mode="atomics")
    with pytest.raises(ValueError, match="dq_mode 'atomic' takes dkdv_variant one of 'half_steps', .*got 'half_boxes'"):
        tma_packed_block_sparse_attention_backward(x, x, x, x, x, lse, *lists, compact, dq_mode="atomic",
                                                   dkdv_variant="half_boxes")
    # 128-slot tiles are split into 64-slot halves inside: box lists of the whole tiles do not apply.
    compact128 = compact_layout(tile_layout((4, 4, 8), (4, 4, 8)))
    x128, lse128 = torch.zeros(1, 1, 128, 64), torch.zeros(1, 1, 128)
    with pytest.raises(ValueError, match="split_tiles takes tiles of at least 32 slots"):
        tma_packed_block_sparse_attention_backward(x[..., :16, :], x[..., :16, :], x[..., :16, :], x[..., :16, :],
                                                   x[..., :16, :], lse[..., :16], *lists,
                                                   compact_layout(tile_layout((1, 4, 4), (1, 4, 4))), split_tiles=True)
    with pytest.raises(ValueError, match="boxes and q_boxes must be None for 128-slot tiles"):
        tma_packed_block_sparse_attention_backward(x128, x128, x128, x128, x128, lse128, *lists, compact128,
                                                   boxes=(lists[1], lists[1], lists[1]))
    assert tma_block_sparse_bwd.DKDV_VARIANTS == DKDV_VARIANTS
    assert tma_block_sparse_bwd.DQ_MODES == DQ_MODES
    assert tma_block_sparse_bwd.ATOMIC_VARIANTS == ATOMIC_VARIANTS


def test_backward_dq_mode(monkeypatch):
    """The atomic dQ adds in no fixed order: never chosen while deterministic algorithms are on."""
    from kernel_templates.tma_block_sparse_bwd import backward_dq_mode

    monkeypatch.delenv("SPARSE_INDUCTOR_BACKWARD_DQ", raising=False)
    assert backward_dq_mode() == "separate"
    monkeypatch.setenv("SPARSE_INDUCTOR_BACKWARD_DQ", "atomic")
    assert backward_dq_mode() == "atomic"
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert backward_dq_mode() == "separate"
    finally:
        torch.use_deterministic_algorithms(deterministic)
    monkeypatch.setenv("SPARSE_INDUCTOR_BACKWARD_DQ", "fused")
    with pytest.raises(ValueError, match="SPARSE_INDUCTOR_BACKWARD_DQ must be one of 'separate', 'atomic'"):
        backward_dq_mode()
