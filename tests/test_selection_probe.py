"""benchmarks/selection_probe.py (the research probe of the policies' output error): its exact
sparse outputs through per-tile sums, against the float64 reference of DESIGN.md §3."""
import importlib.util
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_close_rel
from sparse_inductor.reference import reference_attention, reference_selection, token_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("selection_probe", os.path.join(ROOT, "benchmarks", "selection_probe.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@settings(max_examples=10, deadline=None)
@given(grid=st.sampled_from([(4, 4, 4), (2, 4, 6), (4, 2, 2)]), tile=st.sampled_from([(2, 2, 2), (1, 2, 2)]),
       H=st.integers(1, 3), keep=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_sparse_output_is_the_reference_topk_attention(probe, grid, tile, H, keep, seed):
    """TopK through the per-tile exponential and value sums equals masked dense attention on the
    reference's selection (full tiles: its ln n_j term is a constant). fp32 sums: rel 1e-5."""
    g = torch.Generator().manual_seed(seed)
    N, D = math.prod(grid), 16
    M = math.prod(a // b for a, b in zip(grid, tile))
    budget = min(keep, M)
    q, k, v = (torch.randn(1, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    got = probe.sparse_output(q, k, v, grid, tile, budget)
    selected = reference_selection(q, k, grid, 1 - budget / M, tile)
    assert int(selected.sum(-1).max()) == budget
    want, _ = reference_attention(q, k, v, token_mask(selected, grid, tile))
    assert_close_rel(got, want, 1e-5, "sparse output via tile sums")


def test_every_rule_at_the_budget_and_dense_when_all_tiles_kept(probe):
    """Each rule keeps the budget's pairs per head (the global ones on average); with every tile
    kept every rule is exact (rel-L2 0, mass 1)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, 8, 16, generator=g) for _ in range(3))  # [H, M, S, D] tile-major
    results = probe.site_errors(q, k, v, [2, 8])
    for rule in probe.RULES:
        assert results[(rule, 2)]["pairs"] == pytest.approx(2, abs=0.25), rule
        assert results[(rule, 8)]["rel_l2"] < 1e-6 and results[(rule, 8)]["mass"] == pytest.approx(1.0), rule
    assert results[("topk", 2)]["rel_l2"] > 0.05
