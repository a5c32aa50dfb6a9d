"""benchmarks/bench_attention.py's setup of the compact-layout TMA rows (``packed_setup``), on CPU
(the kernel under the interpreter): the rows it returns compute the selection's attention, and a
kernel that fails leaves the case's other rows to run (its rows are dropped with the error
printed), as FlexAttention's setup does."""
import importlib.util
import math
import os

import pytest
import torch

from helpers import HAS_TRITON
from sparse_inductor.reference import reference_attention, token_mask

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_attention", os.path.join(ROOT, "benchmarks",
                                                                                  "bench_attention.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_case():
    import sparse_inductor as si
    from sparse_inductor.layout import tile_layout

    grid, tile, D = (5, 6, 8), (4, 4, 4), 64  # border tiles of 64, 32, 16 and 8 tokens
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, math.prod(grid), D, generator=g) for _ in range(3))
    selection = si.select_blocks(q, k, grid, sparsity=0.5)
    mask = token_mask(selection.dense_mask(), grid, tile)

    def sparse_kernel(q, k, v):  # the row the benchmark compares with, as the float64 reference
        return reference_attention(q, k, v, mask)[0].to(q.dtype)

    return tile_layout(grid, tile), selection, (q, k, v), sparse_kernel


def test_packed_rows_compute_the_selections_attention(bench, capsys):
    from sparse_inductor.compact_layout import compact_layout, from_compact

    layout, selection, (q, k, v), sparse_kernel = small_case()
    rows = bench.packed_setup(layout, selection, q, k, v, sparse_kernel)
    assert [name for name, _, _ in rows] == ["tma_packed_kernel", "tma_packed_kernel_qreg", "tma_packed_kernel_devdesc",
                                             "tma_packed_unmerged", "tma_packed_boxes", "tma_packed_boxes_torch",
                                             "tma_packed_permute"]
    out = capsys.readouterr().out
    assert out.count("vs sparse_kernel: relative L2") == 3 and "tma_packed_boxes triton == torch: True" in out, out
    compact = compact_layout(layout)
    want = sparse_kernel(q, k, v)
    for name, fn, inputs in rows[:4]:
        got = from_compact(fn(*inputs), compact)
        assert (got - want).norm() / want.norm() < 1e-4, name


def test_a_failing_packed_kernel_drops_its_rows_not_the_case(bench, monkeypatch, capsys):
    import kernel_templates.tma_block_sparse as tma_block_sparse

    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(tma_block_sparse, "tma_packed_block_sparse_attention", broken)
    layout, selection, (q, k, v), sparse_kernel = small_case()
    assert bench.packed_setup(layout, selection, q, k, v, sparse_kernel) == []
    out = capsys.readouterr().out
    assert "tma_packed" in out and "RuntimeError: PassManager::run failed" in out, out


def test_a_failing_box_kernel_leaves_the_kernel_rows_the_torch_lists(bench, monkeypatch, capsys):
    import sparse_inductor.compact_layout as compact_layout_module
    from sparse_inductor.compact_layout import compact_layout, from_compact

    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(compact_layout_module, "_kv_boxes_by_class_triton", broken)
    layout, selection, (q, k, v), sparse_kernel = small_case()
    rows = bench.packed_setup(layout, selection, q, k, v, sparse_kernel)
    assert [name for name, _, _ in rows][3:] == ["tma_packed_unmerged", "tma_packed_boxes_torch", "tma_packed_permute"]
    out = capsys.readouterr().out
    assert "box-list kernel failed (RuntimeError: PassManager::run failed)" in out, out
    got, want = from_compact(rows[0][1](*rows[0][2]), compact_layout(layout)), sparse_kernel(q, k, v)
    assert (got - want).norm() / want.norm() < 1e-4


def test_tile128_rows_compute_the_selections_attention(bench, capsys):
    """``tma_t128_setup``'s rows (128-token tiles: 128-column steps, 64-row steps, query_keep 0.5's
    kept rows in 64-row query boxes) each match the selection's attention; the kept rows' FLOP share
    is theirs."""
    import sparse_inductor as si
    from sparse_inductor.layout import tile_layout

    grid, tile, D = (6, 6, 12), (4, 4, 8), 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, math.prod(grid), D, generator=g) for _ in range(3))
    selection = si.select_blocks(q, k, grid, sparsity=0.5, tile=tile)
    mask = token_mask(selection.dense_mask(), grid, tile)

    def sparse_kernel(q, k, v):
        return reference_attention(q, k, v, mask)[0].to(q.dtype)

    rows = bench.tma_t128_setup(tile_layout(grid, tile), selection, q, k, v, sparse_kernel)
    out = capsys.readouterr().out
    names = [name for name, _, _, _ in rows]
    with_qreg = [f"{base}{qreg}" for base in ("tma_t128_w8", "tma_t128_s64_w4", "tma_t128_s64_w8")
                 for qreg in ("", "_qreg")]
    kept = [f"{base}{qreg}" for base in ("tma_t128_qk05_m64_w4", "tma_t128_qk05_m64_w8") for qreg in ("", "_qreg")]
    assert names == with_qreg + ["tma_t128_s64_w4_s3", "tma_t128_s64_w4_s4"] + kept, out
    errors = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "relative L2" in line]
    assert len(errors) == 12 and max(errors) < 1e-4, out
    shares = {name: share for name, _, _, share in rows}
    assert shares["tma_t128_s64_w4"] == 1.0 and 0.5 <= shares["tma_t128_qk05_m64_w4"] < 0.6
    # --only builds just the variants it names (each build compiles a kernel on the GPU).
    only = bench.tma_t128_setup(tile_layout(grid, tile), selection, q, k, v, sparse_kernel, only=["tma_t128_s64_w4_s"])
    assert [name for name, _, _, _ in only] == ["tma_t128_s64_w4_s3", "tma_t128_s64_w4_s4"]


def test_tma_op_row_computes_the_selections_attention_and_gradients(bench):
    """``tma_op`` (the same-process kernel-only fwd+bwd row against FastVideo's): the compact TMA op on
    compact inputs, whose output is in sequence order and whose gradients come back in compact order."""
    from sparse_inductor.compact_layout import compact_layout, to_compact

    layout, selection, (q, k, v), _ = small_case()
    mask = token_mask(selection.dense_mask(), layout.grid, layout.tile)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    name, fn, inputs, row_grad, _ = bench.tma_op_row(layout, selection, (q, k, v), q.shape[-1] ** -0.5, grad, 1.0)
    assert name == "tma_op" and row_grad is grad
    leaf = [x.detach().requires_grad_() for x in inputs]
    got = fn(*leaf)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    want = reference_attention(q64, k64, v64, mask)[0]
    assert (got.double() - want).norm() / want.norm() < 1e-4
    compact = compact_layout(layout)
    got_grads = torch.autograd.grad(got, leaf, grad)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), grad.double())
    for label, a, b in zip("qkv", got_grads, want_grads):
        b = to_compact(b, compact)
        assert (a.double() - b).norm() / b.norm() < 1e-4, f"d{label}"
