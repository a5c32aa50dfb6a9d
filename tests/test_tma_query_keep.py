"""query_keep < 1 on the compact TMA kernels (issue 15, benchmarks/NOTES.md v23).

``sparse_attention(..., query_keep=r, forward_kernel="tma")`` gathers each head's kept query rows
into a *kept layout* (tile ``i`` holds its ``num_kept(r, n_i)`` kept rows, the centre first; the
counts and offsets are the same for every head, the rows they hold are not), runs the TMA forward
and backward with the query side on that layout and the KV side on the full compact layout, and
gives every dropped row its centre's output (its dO summed into the centre's). Outputs and
gradients against the float64 definition of DESIGN.md §3.7 (``reference_query_keep``,
``reference_attention_query_keep``) with helpers.REL_TOL per dtype; the kept layout itself against
the reference's choice of rows; the TMA path against the gather path; under torch.compile."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import HAS_TRITON, REL_TOL, assert_close_rel, grids, slow_on_cpu, tiles
import sparse_inductor as si
from sparse_inductor.attention import sparse_attention
from sparse_inductor.layout import build_layout
from sparse_inductor.reference import reference_attention_query_keep, reference_query_keep, token_mask
from test_tma_forward_path import DEVICE, POLICIES, TMA_TILES, _inputs, counting_tma_calls

KEEPS = st.sampled_from([0.25, 0.5, 0.75, 1.0])


def _reference(q, k, v, grad, grid, tile, policy, r, live):
    """Float64 output and gradients of the definition, on the live (not skipped) heads."""
    selected = si.select_blocks(q, k, grid, policy=policy, tile=tile).dense_mask()
    q64, k64, v64 = (x.detach()[:, live].double().requires_grad_() for x in (q, k, v))
    _, source = reference_query_keep(q64, grid, tile, r)
    mask = token_mask(selected[:, live].cpu(), grid, tile).to(DEVICE)
    ref = reference_attention_query_keep(q64, k64, v64, mask, source.to(DEVICE))
    return (ref, *torch.autograd.grad(ref, (q64, k64, v64), grad[:, live].double()))


@settings(max_examples=max(4, settings.default.max_examples // 2))
@given(grid=grids(320), tile=TMA_TILES, policy=POLICIES, r=KEEPS,
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), B=st.integers(1, 2),
       D=st.sampled_from([64, 128]), seed=st.integers(0, 2**16))
def test_tma_query_keep_matches_reference_with_gradients(grid, tile, policy, r, dtype, B, D, seed):
    H = 2  # PerHead([...]) among the policies names two heads
    q, k, v = _inputs(B, H, math.prod(grid), D, dtype, seed)
    with counting_tma_calls() as calls:
        out = sparse_attention(q, k, v, grid, tile=tile, policy=policy, query_keep=r, forward_kernel="tma")
    assert calls, "the call did not take the TMA path"
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    live = [h for h, skip in enumerate(policy.skip_heads(H)) if not skip]
    for h in set(range(H)) - set(live):
        assert all((x[:, h] == 0).all() for x in (out, dq, dk, dv)), f"skipped head {h} is not exactly 0"
    ref, rq, rk, rv = _reference(q, k, v, grad, grid, tile, policy, r, live)
    tol = REL_TOL[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_rel(out[:, live], ref, tol["out"], "out")
    for name, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_close_rel(got[:, live], want, tol["grad"], name)
    # A dropped row's query takes no part: its gradient is exactly 0 (the ranking is a discrete choice).
    kept, _ = reference_query_keep(q.detach().double(), grid, tile, r)
    assert (dq.detach().cpu()[~kept.cpu()] == 0).all()


@settings(max_examples=max(20, settings.default.max_examples * 4))
@given(grid=grids(400), tile=tiles, r=st.sampled_from([0.1, 0.25, 1 / 3, 0.5, 2 / 3, 0.75, 0.9, 1.0]),
       B=st.integers(1, 2), H=st.integers(1, 3), spare_rows=st.booleans(), seed=st.integers(0, 2**16))
def test_kept_layout_holds_the_reference_rows(grid, tile, r, B, H, spare_rows, seed):
    """The kept layout of every head: tile i's kept rows at [offset_i, offset_i + c_i), the centre
    first, the same counts and offsets for every head, the rows the reference keeps; each sequence
    position's source row is its own kept row or its tile's centre; its size comes from the grid
    alone (no tensor read). With spare rows (traced calls) the same rows come first, then L - Lq
    rows that no tile holds, holding position 0 and never a source."""
    from sparse_inductor.query_keep import kept_layout, kept_rows_total, num_kept

    g = torch.Generator().manual_seed(seed)
    L = math.prod(grid)
    q = torch.randn(B, H, L, 16, generator=g, dtype=torch.float64)
    layout = build_layout(grid, tile)
    kl = kept_layout(q, layout, r, spare_rows=spare_rows)
    counts = num_kept(r, layout.counts.long())
    Lq = int(counts.sum())
    assert kept_rows_total(grid, tile, r) == Lq
    assert torch.equal(kl.compact.counts.long(), counts)
    assert torch.equal(kl.compact.tile_offsets.long(), torch.cumsum(counts, 0) - counts)
    rows = L if spare_rows else Lq
    assert kl.compact.num_tokens == rows and kl.compact.block == layout.block_size
    assert tuple(kl.positions.shape) == (B, H, rows)
    if spare_rows:
        assert torch.equal(kl.row_valid, torch.arange(L) < Lq)
        assert (kl.positions[:, :, Lq:] == 0).all() and not kl.is_centre_row[Lq:].any()
    else:
        assert kl.row_valid is None
    assert (kl.source_rows < Lq).all()
    kept, source = reference_query_keep(q, grid, tile, r)
    assert torch.equal(kl.kept, kept)
    for b in range(B):
        for h in range(H):
            assert torch.equal(torch.sort(kl.positions[b, h, :Lq]).values, torch.nonzero(kept[b, h]).flatten())
    # Each tile's first kept row is its centre: every dropped position's source.
    assert torch.equal(torch.gather(kl.positions, 2, kl.source_rows), source)
    assert torch.equal(kl.is_centre_row[:Lq], torch.isin(torch.arange(Lq), kl.compact.tile_offsets.long()))


def _case(r, dtype=torch.float32, D=64, seed=0, grid=(5, 6, 7)):
    q, k, v = _inputs(1, 2, math.prod(grid), D, dtype, seed)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    return grid, q, k, v, grad


@pytest.mark.parametrize("r", [0.25, 0.5])
def test_tma_query_keep_equals_gather_path(r):
    """The TMA path and the gather path (32- / 16-row query blocks) give the same outputs and
    gradients on a grid with partial tiles."""
    grid, q, k, v, grad = _case(r)
    results = {}
    for kernel in ("tma", "gather"):
        with counting_tma_calls() as calls:
            out = sparse_attention(q, k, v, grid, tile=(4, 4, 4), sparsity=0.5, query_keep=r, forward_kernel=kernel)
        assert bool(calls) == (kernel == "tma")
        results[kernel] = (out, *torch.autograd.grad(out, (q, k, v), grad))
    tol = REL_TOL[torch.float32]
    for name, a, b in zip(("out", "dq", "dk", "dv"), results["tma"], results["gather"]):
        assert_close_rel(a, b, tol["out" if name == "out" else "grad"], f"tma vs gather {name}")


@pytest.mark.parametrize("dynamic", [False, slow_on_cpu(True)])  # True: 103 s on CPU
def test_tma_query_keep_compiles_and_equals_eager(dynamic):
    """Under torch.compile (fullgraph, static and dynamic shapes) the kept layout, the gathers and
    the ops trace; outputs and gradients equal the eager TMA path's."""
    grid, q, k, v, grad = _case(0.5, seed=3)

    def f(q, k, v):
        return sparse_attention(q, k, v, grid, tile=(4, 4, 4), sparsity=0.5, query_keep=0.5, forward_kernel="tma")

    with counting_tma_calls() as calls:
        want = f(q, k, v)
        want_grads = torch.autograd.grad(want, (q, k, v), grad)
        torch.compiler.reset()
        try:
            got = torch.compile(f, fullgraph=True, dynamic=dynamic)(q, k, v)
            got_grads = torch.autograd.grad(got, (q, k, v), grad)
        finally:
            torch.compiler.reset()
    assert len(calls) == 2  # the eager call and the trace
    tol = REL_TOL[torch.float32]
    assert_close_rel(got, want, tol["out"], "compiled out")
    for name, a, b in zip(("dq", "dk", "dv"), got_grads, want_grads):
        assert_close_rel(a, b, tol["grad"], f"compiled {name}")


def test_query_keep_as_an_argument_of_a_compiled_function_on_the_tma_path():
    """A query_keep that changes between calls of a compiled function: Dynamo would make it symbolic
    (the trace then failed in lifting a size derived from the float into the autograd.Function, and
    later built the kept layout per call); it is a graph constant per value now
    (test_policies.py::test_float_arguments_of_a_compiled_function_are_graph_constants), and each
    value gives the eager result, gradients included (aot_eager: Inductor is covered above)."""
    grid, q, k, v, grad = _case(0.5, seed=5, grid=(4, 8, 8))

    def attend(q, k, v, r):
        return sparse_attention(q, k, v, grid, tile=(4, 4, 4), sparsity=0.5, query_keep=r, forward_kernel="tma")

    torch.compiler.reset()
    try:
        compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
        for r in (0.5, 0.25, 2 / 3):  # one graph each
            got = compiled(q, k, v, r)
            want = attend(q, k, v, r)
            for a, b in zip((got, *torch.autograd.grad(got, (q, k, v), grad)),
                            (want, *torch.autograd.grad(want, (q, k, v), grad))):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    finally:
        torch.compiler.reset()


def test_tma_query_keep_double_backward_equals_gather_path():
    """create_graph=True: the backward runs as differentiable torch on the kept tensors, so a
    gradient of the gradient equals the gather path's."""
    grid, q, k, v, _ = _case(0.5, seed=9, grid=(3, 5, 6))
    results = []
    for kernel in ("tma", "gather"):
        out = sparse_attention(q, k, v, grid, tile=(4, 4, 4), sparsity=0.5, query_keep=0.5, forward_kernel=kernel)
        dq, dk, dv = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
        results.append(torch.autograd.grad((dq.square().sum() + dk.sum() + dv.square().sum()), (q, k, v)))
    for name, a, b in zip(("q", "k", "v"), *results):
        assert_close_rel(a, b, REL_TOL[torch.float32]["grad"], f"second-order grad of {name}")


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_tma_query_keep_propagates_non_finite_values_as_the_gather_path(where):
    """A NaN in tile 2 (the centre's query, always kept, or a key / value row) reaches the outputs
    the gather path gives NaN, no others: tile 1's query boxes hold tile 2's first kept rows, its KV
    boxes tile 2's first rows (grid (5, 6, 7), Window(0, 0, 0): every tile attends to itself). The
    gradients too for keys and values; a non-finite query or dO row is the dK/dV kernel's known gap
    (tests/test_tma_forward_path.py, NOTES v21), wider under query_keep (README)."""
    from sparse_inductor.compact_layout import compact_layout

    grid, tile = (5, 6, 7), (4, 4, 4)
    compact = compact_layout(build_layout(grid, tile))
    start, count = compact.tile_offsets[2].item(), compact.counts[2].item()
    poisoned = compact.positions[start + (count // 2 if where == "q" else 0)].item()
    q, k, v = _inputs(1, 2, math.prod(grid), 64, torch.float32, 4)
    with torch.no_grad():
        {"q": q, "k": k, "v": v}[where][:, :, poisoned] = float("nan")
    results = {}
    for kernel in ("gather", "tma"):
        out = sparse_attention(q, k, v, grid, tile=tile, policy=si.Window(0, 0, 0), query_keep=0.5,
                               forward_kernel=kernel)
        results[kernel] = (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    assert not torch.isfinite(results["gather"][0]).all()
    checked = ("out",) if where == "q" else ("out", "dq", "dk", "dv")
    for name, got, want in zip(("out", "dq", "dk", "dv"), results["tma"], results["gather"]):
        if name in checked:
            assert torch.equal(torch.isfinite(got), torch.isfinite(want)), name


def test_kept_kernels_refuse_mismatched_layouts():
    """The kernels' host functions check the query layout against q and the KV layout."""
    from kernel_templates.tma_block_sparse import tma_packed_block_sparse_attention
    from sparse_inductor.compact_layout import compact_layout
    from sparse_inductor.query_keep import kept_layout

    grid, tile = (4, 8, 8), (4, 4, 4)
    q, k, v = (x.detach() for x in _inputs(1, 1, math.prod(grid), 64, torch.float32, 0))
    layout = build_layout(grid, tile, device=q.device)
    kl = kept_layout(q, layout, 0.5)
    num = torch.ones(1, 1, layout.num_tiles, dtype=torch.int32, device=q.device)
    idx = torch.arange(layout.num_tiles, dtype=torch.int32, device=q.device).view(1, 1, -1, 1)
    with pytest.raises(ValueError, match="query layout"):
        tma_packed_block_sparse_attention(q, k, v, num, idx, compact_layout(layout), q_layout=kl.compact)
    with pytest.raises(ValueError, match="out_order"):
        tma_packed_block_sparse_attention(q[:, :, : kl.compact.num_tokens], k, v, num, idx, compact_layout(layout),
                                          q_layout=kl.compact, out_order="sequence")


@pytest.mark.tier
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU tier needs CUDA")
@pytest.mark.parametrize("r", [0.25, 0.5])
def test_tier_tma_query_keep(r):
    """The GPU tier's case of this path (``pytest -m tier -n 4``): Wan's border structures (1-frame,
    2-row tiles), bf16, D = 128, a skipped head. (tests/test_gpu_tier.py's ``(0.5, "auto")`` template
    case runs this path on Hopper since v23.)"""
    check = test_tma_query_keep_matches_reference_with_gradients
    check.hypothesis.inner_test(grid=(5, 6, 10), tile=(4, 4, 4), policy=si.PerHead([si.TopK(0.75), si.Skip()]), r=r,
                                dtype=torch.bfloat16, B=2, D=128, seed=7)
