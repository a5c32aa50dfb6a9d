"""Calibration (Sparse-vDiT's offline search): on synthetic attention with a planted pattern per
head (a local window, the same place in every frame, one global tile, a head with no output)
calibrate() recovers each; the budget is met; the plan round-trips and applies under the
backend; the CLI writes a plan; bad arguments name themselves."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_inductor as si
from sparse_inductor.calibrate import _allocate, _allocate_per_head, tile_mass
from sparse_inductor.layout import build_layout
from sparse_inductor.reference import tile_ids
from helpers import needs_unbacked_text

STRIPE_TILE = (0, 1, 1)


class Planted(nn.Module):
    """One attention site with 4 heads of known patterns (scale 1): head 0 attends within its
    own tile (a window), head 1 to its spatial tile in every frame (temporal), head 2 to the
    tile at ``STRIPE_TILE`` (a stripe), head 3 has zero values (nothing to keep)."""

    def __init__(self, grid, tile, sharp=30.0, D=16):
        super().__init__()
        self.embed = nn.Conv3d(3, 8, 1)
        self.proj = nn.Linear(8, 4 * D)
        T, H, W = grid
        t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
        c = torch.stack([t // tile[0], h // tile[1], w // tile[2]], -1).reshape(-1, 3).float()

        def close(coords):  # q·k = -sharp |c_q - c_k|² / 2: peaked on equal coordinates
            sq = (coords ** 2).sum(-1, keepdim=True)
            q = torch.cat([coords, torch.ones_like(sq), -sq / 2], -1) * sharp
            return q, torch.cat([coords, -sq / 2, torch.ones_like(sq)], -1)

        def pad(x):
            return F.pad(x, (0, D - x.shape[-1]))

        q0, k0 = close(c)
        q1, k1 = close(c[:, 1:])
        N = c.shape[0]
        q2 = torch.full((N, 1), sharp)
        k2 = (c == torch.tensor(STRIPE_TILE, dtype=torch.float)).all(-1, keepdim=True).float()
        self.register_buffer("q", torch.stack([pad(q0), pad(q1), pad(q2), pad(q2)]))
        self.register_buffer("k", torch.stack([pad(k0), pad(k1), pad(k2), pad(k2)]))
        self.D = D

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        B, N, _ = tokens.shape
        z = self.proj(tokens).view(B, N, 4, self.D).transpose(1, 2)
        v = z * torch.tensor([1.0, 1.0, 1.0, 0.0]).view(1, 4, 1, 1)
        o = F.scaled_dot_product_attention(z * 0 + self.q, z * 0 + self.k, v, scale=1.0)
        return o.transpose(1, 2).reshape(B, N, -1)


@settings(max_examples=4)
@given(grid=st.sampled_from([(4, 8, 8), (5, 6, 10), (3, 7, 9)]), tile=st.sampled_from([(2, 2, 2), (1, 3, 3)]))
def test_calibration_recovers_planted_patterns(grid, tile):
    torch.manual_seed(0)
    model = Planted(grid, tile).eval()
    x = torch.randn(2, 3, *grid)
    result = si.calibrate(model, x, budget=0.25, tile=tile, progress=False)
    heads = {h["head"]: h for h in result.heads}
    assert [heads[i]["mode"] for i in range(4)] == ["window", "temporal", "stripe", "skip"], result.heads
    assert heads[0]["policy"] == "Window(0, 0, 0)" and heads[1]["policy"] == "Temporal(0, 0)"
    per_head = result.plan.policy_for("").policies
    nt, nh, nw = (-(-g // t) for g, t in zip(grid, tile))
    assert per_head[2].tile_indices((nt, nh, nw)) == [(STRIPE_TILE[0] * nh + STRIPE_TILE[1]) * nw + STRIPE_TILE[2]]
    for i in range(3):
        assert heads[i]["mass"] > 0.999
    assert sum(h["flops"] for h in result.heads) / 4 <= 0.25 + 1e-9
    assert "skip" in str(result)


def test_budget_is_met_and_spent_where_the_mass_is():
    # Diffuse random attention: every head wants more FLOPs; the mean stays within each budget
    # and more budget keeps more mass.
    torch.manual_seed(1)
    model = Planted((4, 8, 8), (2, 2, 2), sharp=0.3).eval()
    x = torch.randn(1, 3, 4, 8, 8)
    kept = []
    for budget in (0.125, 0.25, 0.5):
        result = si.calibrate(model, x, budget=budget, tile=(2, 2, 2), skip_threshold=0.0, progress=False)
        mean_flops = sum(h["flops"] for h in result.heads) / len(result.heads)
        assert mean_flops <= budget + 1e-9
        kept.append(sum(h["mass"] for h in result.heads) / len(result.heads))
    assert kept[0] <= kept[1] <= kept[2]


def test_allocation_is_the_knapsack_optimum_on_a_small_case():
    # Two heads, options (mass, flops): the best pair under a mean budget of 0.3 is (0.9, 0.4) +
    # (0.8, 0.2) = 1.7 at mean 0.3, which the Lagrangian search finds.
    options = [[(0.5, 0.1, "a0"), (0.9, 0.4, "a1"), (1.0, 1.0, "a2")], [(0.6, 0.05, "b0"), (0.8, 0.2, "b1")]]
    assert _allocate(options, 0.3) == [1, 1]
    assert _allocate(options, 1.0) == [2, 1]


def test_per_head_allocation_gives_every_head_the_budget():
    # The same options: per head the best value within the head's own share of the budget (the
    # cheapest option when none fits), so no head buys its FLOPs from another.
    options = [[(0.5, 0.1, "a0"), (0.9, 0.4, "a1"), (1.0, 1.0, "a2")], [(0.6, 0.05, "b0"), (0.8, 0.2, "b1")]]
    assert _allocate_per_head(options, 0.3) == [0, 1]
    assert _allocate_per_head(options, 0.4) == [1, 1]
    assert _allocate_per_head(options, 0.01) == [0, 0]
    assert _allocate_per_head(options, 1.0) == [2, 1]


def test_per_head_calibration_keeps_each_head_within_the_budget():
    # Diffuse attention: the global allocation gives some heads more than the budget; per head,
    # none exceeds it (the plan's mean is then at most the budget too).
    torch.manual_seed(1)
    model = Planted((4, 8, 8), (2, 2, 2), sharp=0.3).eval()
    x = torch.randn(1, 3, 4, 8, 8)
    result = si.calibrate(model, x, budget=0.25, tile=(2, 2, 2), skip_threshold=0.0, progress=False,
                          allocation="per_head", dynamic=True)
    assert all(h["flops"] <= 0.25 + 1e-9 for h in result.heads), result.heads
    assert ("allocation", "per_head") in result.plan.info
    with pytest.raises(ValueError, match="allocation"):
        si.calibrate(model, x, budget=0.25, tile=(2, 2, 2), progress=False, allocation="uniform")


@given(grid=st.sampled_from([(3, 5, 6), (4, 4, 4)]), text=st.sampled_from([(0, 0), (5, 0), (0, 3)]),
       seed=st.integers(0, 2**16))
def test_tile_mass_matches_brute_force(grid, text, seed):
    g = torch.Generator().manual_seed(seed)
    N = math.prod(grid)
    L = text[0] + N + text[1]
    q, k = (2 * torch.randn(2, 2, L, 8, generator=g, dtype=torch.float64) for _ in range(2))
    tile = (2, 2, 2)
    layout = build_layout(grid, tile, *text)
    mass, text_mass = tile_mass(q, k, layout, 0.35)
    p = torch.softmax(q @ k.transpose(-1, -2) * 0.35, -1)[:, :, text[0]: text[0] + N]
    ids = tile_ids(grid, tile)
    M = int(ids.max()) + 1
    want = torch.zeros(2, 2, M, M, dtype=torch.float64)
    for i in range(M):
        for j in range(M):
            want[:, :, i, j] = p[:, :, ids == i][..., text[0]: text[0] + N][..., ids == j].sum((-1, -2))
    torch.testing.assert_close(mass, want, rtol=1e-5, atol=1e-6)  # fp32 softmax
    rows_total = p.sum(-1)
    want_text = torch.stack([(rows_total[:, :, ids == i]).sum(-1) for i in range(M)], -1) - want.sum(-1)
    torch.testing.assert_close(text_mass, want_text, rtol=1e-5, atol=1e-6)


def test_plan_from_calibration_applies_under_the_backend(tmp_path):
    torch.manual_seed(2)
    grid, tile = (4, 8, 8), (2, 2, 2)
    model = Planted(grid, tile).eval()
    x = torch.randn(2, 3, *grid)
    plan = si.calibrate(model, x, budget=0.25, tile=tile, progress=False).plan
    path = tmp_path / "plan.json"
    plan.save(str(path))
    plan = si.Plan.load(str(path))
    with torch.no_grad():
        dense = model(x)
        with si.sparsity(plan=plan, tile=tile, min_tokens=0):
            out = torch.compile(model, backend="sparse_inductor")(x)
            rows = si.explain(model, x).rows
    # The planted patterns hold (nearly) all the mass, so the plan is nearly exact.
    assert ((out - dense).norm() / dense.norm()).item() < 1e-4
    assert rows[0]["policy"].startswith("PerHead(")


def test_cli_writes_a_plan(tmp_path, capsys):
    from sparse_inductor.__main__ import main

    setup = tmp_path / "setup.py"
    setup.write_text(
        "import torch\nfrom test_calibrate import Planted\n"
        "def setup():\n    torch.manual_seed(0)\n"
        "    return {'model': Planted((4, 8, 8), (2, 2, 2)).eval(), 'inputs': (torch.randn(1, 3, 4, 8, 8),)}\n")
    out = tmp_path / "plan.json"
    assert main(["calibrate", f"{setup}:setup", "--out", str(out), "--budget", "0.25", "--tile", "2,2,2"]) == 0
    data = json.loads(out.read_text())
    assert data["schema_version"] == 1 and len(data["sites"][""]) == 4
    assert "plan written to" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs,match", [(dict(budget=0), "budget"), (dict(budget=1.5), "budget"),
                                          (dict(skip_threshold=-1), "skip_threshold"), (dict(tile=(4, 4)), "tile")])
def test_bad_arguments_name_the_argument(kwargs, match):
    model = Planted((4, 8, 8), (2, 2, 2)).eval()
    with pytest.raises(ValueError, match=match):
        si.calibrate(model, torch.randn(1, 3, 4, 8, 8), progress=False, **kwargs)


def test_plan_map_census_counts_each_mode_per_site(tmp_path, capsys):
    """``plan_map.py --census``: per site and plan, the heads of each mode, and a total row."""
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("plan_map", os.path.join(root, "examples", "plan_map.py"))
    plan_map = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan_map)
    a = si.Plan(sites={"blocks.0": si.PerHead([si.Window(1, 1, 1), si.TopK(0.5), si.TopK(0.75), si.Skip()]),
                       "blocks.1": si.PerHead([si.Window(1, 1, 1) | si.Temporal(0, 0)] * 2 + [si.Full()] * 2)},
                grid=(4, 8, 8), tile=(2, 2, 2))
    b = si.Plan(sites={"blocks.0": si.PerHead([si.TopK(0.5)] * 4), "blocks.1": si.PerHead([si.TopK(0.5)] * 4)},
                grid=(4, 8, 8), tile=(2, 2, 2))
    a.save(str(tmp_path / "a.json"))
    b.save(str(tmp_path / "b.json"))
    plan_map.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--census"])
    table = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| blocks") or line.startswith("| all")}
    assert rows["blocks.0"] == ["2 topk, 1 skip, 1 window", "4 topk"], table
    assert rows["blocks.1"] == ["2 full, 2 temporal+window", "4 topk"], table
    assert rows["all"] == ["2 full, 2 temporal+window, 2 topk, 1 skip, 1 window", "8 topk"], table

    # Plans of one name from two runs (runs/a/plan_0.125.json, runs/b/plan_0.125.json): one column
    # each, labelled by path, not one silently dropped.
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a.save(str(tmp_path / "a" / "plan.json"))
    b.save(str(tmp_path / "b" / "plan.json"))
    plan_map.main([str(tmp_path / "a" / "plan.json"), str(tmp_path / "b" / "plan.json"), "--census"])
    table = capsys.readouterr().out
    header = [c.strip() for c in table.splitlines()[0].split("|")[2:-1]]
    assert header == [str(tmp_path / "a" / "plan.json"), str(tmp_path / "b" / "plan.json")], table
    assert "| all | 2 full, 2 temporal+window, 2 topk, 1 skip, 1 window | 8 topk |" in table, table


def test_plan_map_example_draws_each_head(tmp_path):
    import importlib.util
    import os

    from sparse_inductor.reference import reference_pattern

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("plan_map", os.path.join(root, "examples", "plan_map.py"))
    plan_map = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan_map)
    grid = (4, 8, 8)
    plan = si.Plan(sites={"blocks.0": si.PerHead([si.Window(1, 1, 1), si.Temporal(0, 0), si.TopK(0.5), si.Skip()])},
                   grid=grid, tile=(2, 2, 2))
    heads = plan_map.head_masks(plan, "blocks.0")
    assert torch.equal(heads[0][1], reference_pattern("window", grid, (2, 2, 2), rt=1, rh=1, rw=1))
    assert torch.equal(heads[1][1], reference_pattern("temporal", grid, (2, 2, 2), rh=0, rw=0))
    assert heads[2][1] is None and heads[2][2] == 0.5  # dynamic: drawn as its budget
    assert not heads[3][1].any()
    out = tmp_path / "map.png"
    plan_map.main([str(tmp_path / "p.json") if plan.save(str(tmp_path / "p.json")) is None else "", "--out", str(out)])
    assert out.stat().st_size > 1000
    with pytest.raises(ValueError, match="no site 'x'"):
        plan_map.head_masks(plan, "x")


@pytest.mark.parametrize("case", [pytest.param("data-dependent text", marks=needs_unbacked_text), "outer-product mask"])
def test_calibrate_on_joint_layouts(case):
    """Mochi's data-dependent prompt length (each call its own text length) and HunyuanVideo 1.5's
    ``m_i & m_j`` mask: calibration measures every head of the site within the budget; the mass a
    Full() head keeps is all of it."""
    from joint_models import JointTokens, ValidPromptTokens, joint_inputs

    if case == "outer-product mask":
        model, inputs = JointTokens(graph_break=True, mask="outer").eval(), joint_inputs((4, 4, 6), 5)
    else:
        g = torch.Generator().manual_seed(0)
        inputs = (torch.randn(2, 4, 3, 8, 10, generator=g), torch.randn(2, 9, 8, generator=g),
                  torch.tensor([[1] * 9, [1] * 5 + [0] * 4], dtype=torch.bool))
        model = ValidPromptTokens("after").eval()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        result = si.calibrate(model, *inputs, budget=0.5, tile=(2, 2, 2), skip_threshold=0.0, progress=False)
    sites = 2 if case == "data-dependent text" else 1  # Mochi-like: one attention per sample
    assert len(result.heads) == 2 * sites, result.heads  # 2 heads each
    assert sum(h["flops"] for h in result.heads) / len(result.heads) <= 0.5 + 1e-9
    assert all(h["mass"] > 0.999 for h in result.heads if h["mode"] == "full"), result.heads
