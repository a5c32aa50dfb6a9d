"""Policies under the backend (CPU): a compiled model under sparsity(policy=..., query_keep=...)
equals the model with the eager op in place of its self-attention, forward and gradients;
layers mix policies; plans apply per head and are checked against the model; stats() records
what the compiled sites kept; sparsity(0.0) inside a policy context is dense."""
import copy
import json

import pytest
import torch

import sparse_inductor as si
from helpers import slow_on_cpu
from test_backend import GRID, Recorder, inputs, rel
from video_dit import TinyVideoDiT

@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own model from scratch: without a reset, a model class compiled by an
    earlier test at other shapes makes Dynamo recompile it with dynamic shapes ("automatic
    dynamic"), which is not what these tests are about."""
    torch._dynamo.reset()
    yield


POLICIES = {
    "mass": si.CumulativeMass(0.7, min_tiles=2, max_fraction=0.5),
    "window+stripe": si.Window(1, 1, 1) | si.Stripe(first_frames=1),
    "per_head": si.PerHead([si.Temporal(1, 1), si.CumulativeMass(0.5, 1, 0.5)]),
    "skip+full": si.PerHead([si.Skip(), si.Full()]),
}


def eager_policy(model, policy_for_block, query_keep=1.0):
    """A copy of the model whose self-attention is the eager op with block i's policy."""
    model = copy.deepcopy(model)
    for i, block in enumerate(model.blocks):
        policy = policy_for_block(i)
        if policy is None:
            block.self_attention_fn = torch.nn.functional.scaled_dot_product_attention
        else:
            block.self_attention_fn = (lambda p: lambda q, k, v: si.video_sparse_attention(
                q, k, v, GRID, policy=p, query_keep=query_keep))(policy)
    return model


# On CPU (the suite's time budget, ~17-24 s a case) every policy runs at query_keep 0.5 and the
# dynamic one (mass) at 1.0 as well; the other 1.0 cases run where CUDA is.
@pytest.mark.parametrize("name,query_keep", [(n, 0.5) for n in POLICIES] + [("mass", 1.0)] + [
    slow_on_cpu(n, 1.0) for n in POLICIES if n != "mass"])
def test_compiled_policy_equals_eager_op_with_gradients(name, query_keep):
    torch.manual_seed(0)
    policy = POLICIES[name]
    model = TinyVideoDiT()
    x, text = inputs()
    compiled = torch.compile(model, backend="sparse_inductor")
    with si.sparsity(policy=policy, query_keep=query_keep, min_tokens=0):
        out = compiled(x, text)
        out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    oracle = eager_policy(model, lambda i: policy, query_keep)
    oracle.zero_grad()
    want = oracle(x, text)
    want.square().mean().backward()
    assert rel(out.detach(), want.detach()) < 1e-5
    dense = eager_policy(model, lambda i: None)(x, text)
    assert rel(out.detach(), dense.detach()) > 1e-4, "the sparse path was taken"
    for n, p in oracle.named_parameters():
        assert rel(grads[n], p.grad) < 1e-4, n


def test_layers_mix_policies_and_numbers():
    torch.manual_seed(1)
    model = TinyVideoDiT(layers=3).eval()
    x, text = inputs()
    compiled = torch.compile(model, backend="sparse_inductor")
    layers = {"blocks.0.*": si.CumulativeMass(0.6, 1, 0.5), "blocks.1.*": 0.0, "blocks.2.*": si.Window(0, 1, 1)}
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0, layers=layers):
        out = compiled(x, text)
        explanation = si.explain(model, x, text)
    want = eager_policy(model, lambda i: [layers["blocks.0.*"], None, layers["blocks.2.*"]][i])(x, text)
    assert rel(out, want) < 1e-5
    rows = [r for r in explanation if r["k"] == r["q"]]
    assert [r["decision"] for r in rows] == ["sparse", "dense", "sparse"]
    assert rows[0]["policy"] == layers["blocks.0.*"].describe() and rows[2]["policy"] == "Window(0, 1, 1)"
    assert "policy" in str(explanation).splitlines()[0]


def test_sparsity_zero_inside_a_policy_context_is_dense():
    torch.manual_seed(2)
    model = TinyVideoDiT().eval()
    x, text = inputs()
    recorder = Recorder()
    compiled = torch.compile(model, backend=recorder)
    with torch.no_grad(), si.sparsity(policy=si.CumulativeMass(0.5), query_keep=0.5, min_tokens=0):
        compiled(x, text)
        with si.sparsity(0.0):  # a dense warm-up step
            cfg = si.current_config()
            assert cfg.policy is None and cfg.query_keep == 1.0
            dense = compiled(x, text)
    assert recorder.graphs[0].compiled_keys[-1] == ("dense",)
    torch.testing.assert_close(dense, eager_policy(model, lambda i: None)(x, text), rtol=1e-5, atol=1e-5)


def test_stats_records_compiled_sites_and_nothing_outside():
    torch.manual_seed(3)
    model = TinyVideoDiT().eval()
    x, text = inputs()
    compiled = torch.compile(model, backend="sparse_inductor")
    with torch.no_grad(), si.sparsity(0.5, query_keep=0.5, min_tokens=0):
        compiled(x, text)  # not recorded
        with si.stats() as rec:
            compiled(x, text)
            compiled(x, text)
        compiled(x, text)
    sites = rec.sites()
    assert sorted(site for site, _ in sites) == ["blocks.0", "blocks.1"]
    M = 2 * 2 * 3  # tiles of the (5, 6, 10) grid under (4, 4, 4)
    for (_, policy), s in sites.items():
        assert policy == "TopK(0.5)" and s["calls"] == 2 and s["num_tiles"] == M
        assert s["tiles_min"] == s["tiles_max"] == 6
        assert 0.5 <= s["query_keep"] < 0.6  # ceil(n/2) of each tile's n tokens
    assert 0.2 < rec.kept() < 0.3  # about half the tiles times about half the rows
    assert len(rec.rows) == 4
    assert "blocks.0" in str(rec)


def _plan(heads=2):
    return si.Plan(sites={"blocks.0": si.PerHead([si.Window(1, 1, 1), si.Skip()][:heads]),
                          "blocks.1": si.PerHead([si.Full(), si.Temporal(0, 1)][:heads])}, grid=GRID)


def test_plan_applies_per_head_and_round_trips(tmp_path):
    torch.manual_seed(4)
    model = TinyVideoDiT().eval()
    x, text = inputs()
    plan = _plan()
    path = tmp_path / "plan.json"
    plan.save(str(path))
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1 and data["sites"]["blocks.0"][1] == {"kind": "skip"}
    loaded = si.Plan.load(str(path))
    assert loaded == plan and hash(loaded) == hash(plan)
    compiled = torch.compile(model, backend="sparse_inductor")
    with torch.no_grad(), si.sparsity(plan=loaded, min_tokens=0):
        out = compiled(x, text)
        explanation = si.explain(model, x, text)
    want = eager_policy(model, lambda i: plan.policy_for(f"blocks.{i}"))(x, text)
    assert rel(out, want) < 1e-5
    rows = [r for r in explanation if r["k"] == r["q"]]
    assert rows[0]["policy"] == "PerHead(1x Window(1, 1, 1), 1x Skip())"
    # layers= overrides the plan; a site the plan does not name keeps the context's policy.
    with torch.no_grad(), si.sparsity(0.5, plan=si.Plan(sites={"blocks.0": plan.policy_for("blocks.0")}),
                                      layers={"blocks.0*": 0.75}, min_tokens=0):
        rows = [r for r in si.explain(model, x, text) if r["k"] == r["q"]]
    assert [r["policy"] for r in rows] == ["TopK(0.75)", "TopK(0.5)"]


def test_plan_that_does_not_fit_is_a_clear_error():
    model = TinyVideoDiT().eval()
    x, text = inputs()
    wrong_site = si.Plan(sites={"blocks.7": si.PerHead([si.Full(), si.Full()])})
    with torch.no_grad(), si.sparsity(plan=wrong_site, min_tokens=0):
        with pytest.raises(Exception, match="blocks.7.*does not have"):
            torch.compile(model, backend="sparse_inductor")(x, text)
    wrong_heads = si.Plan(sites={"blocks.0": si.PerHead([si.Full()] * 3)})
    torch._dynamo.reset()
    with torch.no_grad(), si.sparsity(plan=wrong_heads, min_tokens=0):
        with pytest.raises(Exception, match="blocks.0.*3 heads.*2"):
            torch.compile(model, backend="sparse_inductor")(x, text)


def test_stats_of_an_empty_batch():
    q = torch.randn(0, 2, 64, 16)
    with si.stats() as rec:
        out = si.video_sparse_attention(q, q, q, (4, 4, 4), policy=si.CumulativeMass(0.5, 1, 1.0), tile=(2, 2, 2))
    assert out.shape == q.shape and len(rec.rows) == 1 and rec.rows[0]["pairs"] == 0
    assert "eager" in str(rec)
