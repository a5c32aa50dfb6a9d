"""The compiler path on CPU: backend="sparse_inductor", the sparsity() context, layers
overrides, dynamic shapes, training, cache keys, the entry point."""
import copy
import subprocess
import sys

import conftest
import pytest
import torch
import torch.nn.functional as F

import sparse_inductor as si
from sparse_inductor.attention import sparse_attention
from sparse_inductor.backend import cache_pass, sparse_inductor_backend
from video_dit import TinyVideoDiT

B, T, H, W, L_TEXT = 3, 5, 12, 20, 19  # pairwise distinct sizes (no duck-specialisation)
GRID = (5, 6, 10)  # patch (1, 2, 2)


def inputs(t=T, h=H, w=W, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, t, h, w, generator=g), torch.randn(B, L_TEXT, 16, generator=g)


def eager_sparse(model, grid, sparsity, joint=None, dense_blocks=()):
    """A copy of the model with its self-attention replaced by the eager op (the test's oracle;
    a copy, so the compiled original keeps its guards)."""
    model = copy.deepcopy(model)
    for i, block in enumerate(model.blocks):
        if i in dense_blocks:
            block.self_attention_fn = F.scaled_dot_product_attention
        elif joint is None:
            block.self_attention_fn = lambda q, k, v: si.video_sparse_attention(q, k, v, grid, sparsity=sparsity)
        else:
            before, after = (L_TEXT, 0) if joint == "before" else (0, L_TEXT)
            block.self_attention_fn = lambda q, k, v: sparse_attention(
                q, k, v, grid, sparsity=sparsity, tile=(4, 4, 4), text_before=before, text_after=after)
    return model


class Recorder:
    """A backend that keeps the per-graph dispatchers so tests can count variants."""

    def __init__(self, **options):
        self.graphs, self.options = [], options

    def __call__(self, gm, example_inputs, **kwargs):
        graph = sparse_inductor_backend(gm, example_inputs, options=self.options or None)
        self.graphs.append(graph)
        return graph

    @property
    def variants(self):
        return sum(len(g.variants) for g in self.graphs)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("joint", [None, "before"])
def test_compiled_equals_eager_sparse_op(joint):
    torch.manual_seed(0)
    model = TinyVideoDiT(joint=joint).eval()
    x, text = inputs()
    compiled = torch.compile(model, backend="sparse_inductor", options={"sparsity": 0.5, "min_tokens": 0})
    with torch.no_grad():
        out = compiled(x, text)
        ref = eager_sparse(model, GRID, 0.5, joint)(x, text)
        dense = eager_sparse(model, GRID, 0.0, joint)(x, text)
    assert rel(out, ref) < 1e-5
    assert rel(out, dense) > 1e-3  # really sparse: far from dense


def test_sparsity_zero_is_plain_inductor_and_switching_compiles_one_variant_per_value():
    torch.manual_seed(1)
    model = TinyVideoDiT().eval()
    x, text = inputs()
    recorder = Recorder()
    compiled = torch.compile(model, backend=recorder)
    with torch.no_grad():
        with si.sparsity(0.0):
            dense = compiled(x, text)
        reference = torch.compile(model, backend="inductor")(x, text)
        torch.testing.assert_close(dense, reference, rtol=1e-5, atol=1e-5)
        assert recorder.graphs[0].compiled_keys == [("dense",)]
        outs = {}
        for s in (0.5, 0.75, 0.5, 0.0, 0.75):
            with si.sparsity(s, min_tokens=0):
                outs[s] = compiled(x, text)
        assert recorder.variants == 3  # dense, 0.5, 0.75: no recompiles on repeats
        for s in (0.5, 0.75):
            want = eager_sparse(model, GRID, s)(x, text)
            assert rel(outs[s], want) < 1e-5, s
        assert rel(outs[0.5], outs[0.75]) > 1e-4
        torch.testing.assert_close(outs[0.0], dense)


def test_layers_override_applies_to_matched_layers_only():
    torch.manual_seed(2)
    model = TinyVideoDiT(layers=3).eval()
    x, text = inputs()
    compiled = torch.compile(model, backend="sparse_inductor")
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0, layers={"blocks.1.*": 0.0}):
        out = compiled(x, text)
        explanation = si.explain(model, x, text)
    want = eager_sparse(model, GRID, 0.5, dense_blocks=(1,))(x, text)
    assert rel(out, want) < 1e-5
    self_rows = [r for r in explanation if r["k"] == r["q"]]
    assert [r["decision"] for r in self_rows] == ["sparse", "dense", "sparse"]
    assert "sparsity 0" in self_rows[1]["reason"]


def test_dynamic_shapes_three_resolutions_one_variant():
    torch.manual_seed(3)
    model = TinyVideoDiT().eval()
    recorder = Recorder(sparsity=0.5, min_tokens=0)
    compiled = torch.compile(model, backend=recorder, dynamic=True)
    resolutions = [(5, 12, 20), (7, 16, 24), (9, 20, 28)]
    with torch.no_grad():
        for t, h, w in resolutions:
            x, text = inputs(t, h, w)
            out = compiled(x, text)
            want = eager_sparse(model, (t, h // 2, w // 2), 0.5)(x, text)
            assert rel(out, want) < 1e-5, (t, h, w)
    assert len(recorder.graphs) == 1, "a new resolution recompiled the graph"
    assert recorder.variants == 1
    site = recorder.graphs[0].sites[0]
    assert all(isinstance(s, torch.SymInt) for s in site.grid), site.grid


def test_training_gradients_match_eager_op():
    torch.manual_seed(4)
    model = TinyVideoDiT()
    x, text = inputs()
    compiled = torch.compile(model, backend="sparse_inductor")
    with si.sparsity(0.5, min_tokens=0):
        compiled(x, text).square().mean().backward()
    oracle = eager_sparse(model, GRID, 0.5)
    oracle.zero_grad()
    oracle(x, text).square().mean().backward()
    want = dict(oracle.named_parameters())
    for name, p in model.named_parameters():
        assert rel(p.grad, want[name].grad) < 1e-4, name


def test_dense_sites_are_explained_and_logged(caplog):
    model = TinyVideoDiT().eval()
    x, text = inputs()
    with caplog.at_level("INFO", logger="sparse_inductor"), si.sparsity(0.5):  # default min_tokens
        explanation = si.explain(model, x, text)
    assert len(explanation) == 4 and not explanation.sparse_rows
    reasons = [r["reason"] for r in explanation]
    assert reasons.count("300 video tokens < min_tokens=12288") == 2
    assert sum("cross-attention" in r for r in reasons) == 2
    assert "stays dense" in caplog.text and "min_tokens" in caplog.text
    table = str(explanation)
    assert "blocks.0" in table and "(5, 6, 10)" in table and "4 attention site(s): 0 sparse, 4 dense" in table


def test_cache_key_covers_plan_and_sources(monkeypatch):
    from sparse_inductor import backend

    a, b = cache_pass((((0, 0.5, None),), (4, 4, 4))), cache_pass((((0, 0.75, None),), (4, 4, 4)))
    assert a.uuid() != b.uuid()
    assert a.uuid() == cache_pass((((0, 0.5, None),), (4, 4, 4))).uuid()
    before = a.uuid()
    monkeypatch.setattr(backend, "_source_hash", lambda: "a changed template source")
    assert a.uuid() != before


def test_kernel_sources_are_part_of_the_graph_plain_inductor_caches(monkeypatch):
    """Inductor's FX-graph cache keys a graph on its code, not on our lowering: the attention ops
    carry a hash of the kernel sources, forward and backward, so a graph compiled with plain
    ``backend="inductor"`` (e.g. VideoSparseAttention in a model) is not served a stale kernel."""
    from torch._dynamo.backends.common import aot_autograd

    from sparse_inductor import ops
    from sparse_inductor.attention import sparse_attention

    q = torch.randn(1, 2, 4 * 4 * 8, 16, requires_grad=True)
    codes = {"fwd": [], "bwd": []}

    def capture(kind):
        def compiler(gm, example_inputs):
            codes[kind].append(gm.code)
            return gm
        return compiler

    def attend(q):
        return sparse_attention(q, q, q, (4, 4, 8), sparsity=0.5, tile=(4, 4, 4))

    for version in (ops.KERNEL_VERSION, ops.KERNEL_VERSION + 1):
        monkeypatch.setattr(ops, "KERNEL_VERSION", version)
        torch._dynamo.reset()
        backend = aot_autograd(fw_compiler=capture("fwd"), bw_compiler=capture("bwd"))
        torch.compile(attend, backend=backend, fullgraph=True)(q).sum().backward()
        for kind in ("fwd", "bwd"):
            assert f"block_sparse_attn_{kind}" in codes[kind][-1] and str(version) in codes[kind][-1], kind
    assert codes["fwd"][0] != codes["fwd"][1] and codes["bwd"][0] != codes["bwd"][1]


def test_config_change_never_reuses_a_stale_artifact():
    """With Inductor's FX graph cache on, a second model compiled at another sparsity must not be
    served the first one's artifact."""
    from torch._inductor import config as inductor_config

    torch.manual_seed(5)
    model = TinyVideoDiT(layers=1).eval()
    x, text = inputs()
    with inductor_config.patch(fx_graph_cache=True), torch.no_grad():
        for s in (0.5, 0.75):
            torch._dynamo.reset()
            with si.sparsity(s, min_tokens=0):
                out = torch.compile(model, backend="sparse_inductor")(x, text)
            assert rel(out, eager_sparse(model, GRID, s)(x, text)) < 1e-5


@pytest.mark.skipif(not conftest.BACKEND_INSTALLED, reason="package not pip-installed (running from PYTHONPATH)")
def test_entry_point_needs_no_import():
    code = ("import sys, torch; fn = torch._dynamo.lookup_backend('sparse_inductor'); "
            "assert 'sparse_inductor' not in sys.modules or fn.__module__ == 'sparse_inductor.backend'; "
            "print(fn.__module__, fn.__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "sparse_inductor.backend sparse_inductor_backend" in result.stdout



def test_source_tree_import_registers_the_backend():
    """Without the entry point (a source tree on PYTHONPATH, as on the GPU machine), importing the
    package registers backend="sparse_inductor"; with it, importing registers nothing (Dynamo would
    refuse a second registration of the name)."""
    code = ("import importlib.metadata as md, torch\n"
            "real = md.entry_points\n"
            "md.entry_points = lambda **kw: md.EntryPoints([]) if kw.get('group') == 'torch_dynamo_backends' else real(**kw)\n"
            "import sparse_inductor\n"
            "fn = torch._dynamo.lookup_backend('sparse_inductor')\n"
            "print(fn.__module__, fn.__name__)\n"
            "out = torch.compile(lambda x: x * 2, backend='sparse_inductor')(torch.ones(3))\n"
            "assert out.tolist() == [2.0, 2.0, 2.0]\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "sparse_inductor.backend sparse_inductor_backend" in result.stdout

def test_bad_options_and_context_arguments():
    with pytest.raises(ValueError, match="unknown sparse_inductor option"):
        sparse_inductor_backend(None, [], options={"sparsty": 0.5})
    with pytest.raises(ValueError, match="sparsity must be a number in"):
        with si.sparsity(1.5):
            pass
    with pytest.raises(ValueError, match="layers must be a dict"):
        with si.sparsity(0.5, layers=["blocks.0"]):
            pass
    with pytest.raises(ValueError, match="tile"):
        with si.sparsity(0.5, tile=(4, 4)):
            pass


def test_context_nesting_and_defaults():
    assert si.current_config().sparsity == 0.875
    with si.sparsity(0.5, tile=(2, 4, 4)):
        with si.sparsity(min_tokens=0):
            cfg = si.current_config()
            assert (cfg.sparsity, cfg.tile, cfg.min_tokens) == (0.5, (2, 4, 4), 0)
        assert si.current_config().min_tokens == 12288
    assert si.current_config().tile == (4, 4, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("joint", [None, "after"])
def test_compiled_equals_eager_sparse_op_cuda_bf16(joint):
    torch.manual_seed(6)
    model = TinyVideoDiT(dim=128, heads=2, joint=joint).to("cuda", torch.bfloat16).eval()
    x, text = (t.to("cuda", torch.bfloat16) for t in inputs(9, 28, 44))
    grid = (9, 14, 22)
    with torch.no_grad(), si.sparsity(0.75, min_tokens=0):
        torch._dynamo.reset()
        out = torch.compile(model, backend="sparse_inductor")(x, text)
        want = eager_sparse(model, grid, 0.75, joint)(x, text)
        dense = eager_sparse(model, grid, 0.0, joint)(x, text)
    err = rel(out.float(), want.float())
    assert err < 2e-2, err  # bf16: rounding differs between compiled and eager surroundings
    assert rel(out.float(), dense.float()) > 2 * err
