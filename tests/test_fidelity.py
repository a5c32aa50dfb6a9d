"""sparse_inductor.fidelity: recall, kept share and site error against brute-force float64
computations from the reference semantics; the whole tool on tiny models (both backends);
the CLI; clear errors."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from helpers import grids, needs_unbacked_text, sparsities, tiles
import sparse_inductor as si
from sparse_inductor.__main__ import main as cli_main
from sparse_inductor.fidelity import _measure_site, attention_recall, psnr
from sparse_inductor.reference import reference_attention, reference_selection, tile_ids, token_mask
from video_dit import TinyVideoDiT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def brute_force(q, k, v, grid, sparsity, tile, text_before=0, text_after=0):
    """Recall, kept share and site rel-L2 from the oracle: the token mask of the reference
    selection (video rows: kept video tiles + every text key; text rows: everything), dense
    softmax in float64 over the full sequence."""
    N = math.prod(grid)
    L = q.shape[2]
    video = slice(text_before, text_before + N)
    selected = reference_selection(q[:, :, video], k[:, :, video], grid, sparsity, tile)
    mask = torch.ones(q.shape[0], q.shape[1], L, L, dtype=torch.bool)
    mask[:, :, video, video] = token_mask(selected, grid, tile)
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    recall = (p[:, :, video] * mask[:, :, video]).sum(-1).mean().item()
    kept = mask.double().mean().item()
    dense, _ = reference_attention(q, k, v)
    sparse, _ = reference_attention(q, k, v, mask)
    # Best k: per query tile, the k KV tiles with the most mass of the tile's rows (and text).
    ids = tile_ids(grid, tile)
    M, keep = int(ids.max()) + 1, int(selected.sum(-1).max())
    rows_video = p[:, :, video]
    per_tile = torch.zeros(*p.shape[:2], M, M, dtype=torch.float64)
    for i in range(M):
        for j in range(M):
            per_tile[:, :, i, j] = rows_video[:, :, ids == i][..., video][..., ids == j].sum((-1, -2))
    text_mass = (rows_video.sum(-1) - rows_video[..., video].sum(-1)).sum((-1))
    best = (per_tile.topk(keep, -1).values.sum((-1, -2)) + text_mass).sum() / (p.shape[0] * p.shape[1] * N)
    return recall, kept, ((sparse - dense).norm() / dense.norm()).item(), best.item()


# Tolerances: float64 inputs -> everything in float64 (1e-9 covers summation order over <= 400
# keys); float32 inputs -> softmax and sums in float32 (recall/kept 1e-5 absolute); the site
# rel-L2 compares the op to the reference and carries the op's fp32 error (2e-5 relative to the
# dense output, so <= 1e-4 absolute on a rel-L2).
TOL = {torch.float64: dict(recall=1e-9, rel=1e-9), torch.float32: dict(recall=1e-5, rel=1e-4)}


@given(grid=grids(300), tile=tiles, sparsity=sparsities, dtype=st.sampled_from([torch.float32, torch.float64]),
       text=st.sampled_from([(0, 0), (5, 0), (0, 7)]), seed=st.integers(0, 2**16))
def test_site_measures_match_brute_force(grid, tile, sparsity, dtype, text, seed):
    g = torch.Generator().manual_seed(seed)
    L = text[0] + math.prod(grid) + text[1]
    # Scaled inputs: peaked attention, where recall is far from the kept share.
    q, k, v = (3 * torch.randn(2, 2, L, 16, generator=g, dtype=dtype) for _ in range(3))
    tally = _measure_site(q, k, v, None, None, grid, text[0], text[1], [tile], [sparsity])[(tile, sparsity)]
    recall, kept, rel, best = brute_force(q, k, v, grid, sparsity, tile, *text)
    tol = TOL[dtype]
    assert abs(tally.recall - recall) <= tol["recall"], (tally.recall, recall)
    assert abs(tally.oracle - best) <= tol["recall"], (tally.oracle, best)
    assert tally.oracle >= tally.recall - tol["recall"]
    assert abs(tally.kept - kept) <= 1e-12, (tally.kept, kept)  # exact counting
    assert abs(tally.rel_l2 - rel) <= tol["rel"] * max(1.0, rel), (tally.rel_l2, rel)


@given(grid=grids(300), tile=tiles, seed=st.integers(0, 2**16))
def test_recall_is_one_dense_and_never_grows_with_sparsity(grid, tile, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = (2 * torch.randn(1, 3, math.prod(grid), 16, generator=g, dtype=torch.float64) for _ in range(2))
    values = [attention_recall(q, k, grid, sparsity=s, tile=tile) for s in (0.0, 0.3, 0.5, 0.75, 0.875, 0.95)]
    assert abs(values[0] - 1.0) <= 1e-12
    assert all(0.0 <= r <= 1.0 + 1e-12 for r in values)
    # The kept sets nest (top-k by the same scores, stable ties), so recall cannot increase.
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:])), values


def test_recall_chunking_does_not_change_the_result(monkeypatch):
    g = torch.Generator().manual_seed(3)
    grid = (4, 6, 9)
    q, k = (torch.randn(2, 2, math.prod(grid), 8, generator=g, dtype=torch.float64) for _ in range(2))
    whole = attention_recall(q, k, grid, sparsity=0.75)
    module = sys.modules["sparse_inductor.fidelity"]  # the attribute of the package is the function
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 4 * 216 * 7)  # 7 rows per chunk
    assert abs(attention_recall(q, k, grid, sparsity=0.75) - whole) <= 1e-12


def test_psnr():
    ref = torch.rand(2, 3, 4, 5, 6, dtype=torch.float64)
    assert psnr(ref.clone(), ref) == math.inf
    assert psnr(ref + 0.1, ref) == pytest.approx(20.0, abs=1e-9)  # MSE 0.01, peak 1
    assert psnr(ref + 0.1, ref, peak=2.0) == pytest.approx(20.0 + 20 * math.log10(2), abs=1e-9)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(ref[0], ref)


# ---------------------------------------------------------------------------------------------
# The whole tool on a tiny model: 2 self-attention sites (sparse) and 2 cross-attention sites
# (dense, not measured); grid (8, 8, 8) = 8 tiles of (4, 4, 4).
# ---------------------------------------------------------------------------------------------
def tiny_model_and_inputs(joint=None):
    torch.manual_seed(0)
    model = TinyVideoDiT(joint=joint).eval()
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(1, 4, 8, 16, 16, generator=g), torch.randn(1, 5, 16, generator=g)


def euler_sampler(shape, text, steps=4):
    """A sampler as users write one: fixed noise, the model in a loop, a context per step."""
    def sample_fn(model, step_context):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(11))
        for i in range(steps):
            with step_context(i):
                x = x - 0.25 * model(x, text).transpose(1, 2).reshape(shape)
        return x.sigmoid()  # in [0, 1]: peak 1
    return sample_fn


def test_fidelity_eager_backend_on_tiny_model():
    model, x, text = tiny_model_and_inputs()
    sparsity_list = [0.0, 0.5, 0.75, 0.875]
    result = si.fidelity(model, x, text, sparsities=sparsity_list, tiles=[(4, 4, 4), (2, 4, 8)],
                         warmup_steps=[0, 1, 4], sample_fn=euler_sampler((1, 4, 8, 16, 16), text), backend="eager")
    assert [s["module"] for s in result.sites] == ["blocks.0", "blocks.1"]
    assert len(result.rows) == 2 * 4 and len(result.site_rows) == 2 * 4 * 2
    for tile in [(4, 4, 4), (2, 4, 8)]:
        rows = [result.row(s, tile) for s in sparsity_list]
        dense = rows[0]
        assert abs(dense["recall"] - 1) < 1e-6 and abs(dense["recall_best_k"] - 1) < 1e-6 and dense["kept"] == 1.0
        assert dense["rel_l2"] == 0.0  # sparsity 0 runs plain SDPA: the same computation
        assert dense["site_rel_l2"] < 1e-5  # the op at sparsity 0 vs SDPA (fp32)
        assert all(p == math.inf for p in dense["psnr"].values())
        # 8 tiles: k = 4, 2, 1 of 8, and every tile is full, so the kept share is exact.
        assert [r["kept"] for r in rows[1:]] == [0.5, 0.25, 0.125]
        recalls = [r["recall"] for r in rows]
        assert all(a >= b for a, b in zip(recalls, recalls[1:])) and all(0 < r <= 1 + 1e-6 for r in recalls)
        for r in rows[1:]:
            assert r["recall_min"] <= r["recall"] <= r["recall_best_k"] + 1e-6
            assert r["rel_l2"] > 1e-4 and math.isfinite(r["psnr"][0])
            assert r["psnr"][4] == math.inf  # all 4 sampling steps dense: the dense sample
            assert r["psnr"][1] != r["psnr"][0]  # the warm-up context reaches the sampler
    text_out = str(result)
    assert "| (4, 4, 4) | 0.875 | 0.125 |" in text_out and "blocks.1" in text_out
    assert "PSNR dB (dense first 1)" in text_out
    assert json.loads(json.dumps(result.to_dict()))["rows"][0]["tile"] == [4, 4, 4]


def test_compiled_backend_agrees_with_eager():
    model, x, text = tiny_model_and_inputs()
    kw = dict(sparsities=[0.0, 0.75], warmup_steps=[0], sample_fn=euler_sampler((1, 4, 8, 16, 16), text, steps=2))
    eager = si.fidelity(model, x, text, backend="eager", **kw)
    compiled = si.fidelity(model, x, text, backend="sparse_inductor", **kw)
    assert compiled.row(0.0)["rel_l2"] == 0.0 and compiled.row(0.0)["psnr"][0] == math.inf
    # Same semantics; Inductor only reorders fp32 arithmetic around the op.
    assert compiled.row(0.75)["rel_l2"] == pytest.approx(eager.row(0.75)["rel_l2"], rel=1e-3)
    assert compiled.row(0.75)["psnr"][0] == pytest.approx(eager.row(0.75)["psnr"][0], abs=0.05)
    assert compiled.row(0.75)["recall"] == eager.row(0.75)["recall"]  # same dense pass


def test_joint_attention_sites_count_text_as_kept():
    model, x, text = tiny_model_and_inputs(joint="before")
    result = si.fidelity(model, x, text, sparsities=[0.0, 0.75], backend="eager")
    assert [s["text_span"] for s in result.sites] == [(5, 0), (5, 0)]
    assert abs(result.row(0.0)["recall"] - 1) < 1e-6 and result.row(0.0)["rel_l2"] == 0.0
    L, N = 5 + 512, 512
    kept = (N * (N // 4) + N * 5 + 5 * L) / (L * L)  # video rows: 2 of 8 tiles + text; text rows: all
    assert result.row(0.75)["kept"] == pytest.approx(kept, rel=1e-12)


def test_explicit_grid_for_prepacked_tokens():
    """Tokens that arrive already flattened: no grid in the graph until grid= is given."""
    class Packed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(16, 48)

        def forward(self, tokens):
            q, k, v = self.qkv(tokens).view(1, -1, 3, 1, 16).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v)

    tokens = torch.randn(1, 4 * 8 * 8, 16)
    with pytest.raises(ValueError, match="no attention site would be sparse"):
        si.fidelity(Packed(), tokens, sparsities=[0.5], backend="eager")
    result = si.fidelity(Packed(), tokens, sparsities=[0.5], backend="eager", grid=(4, 8, 8))
    assert result.sites[0]["grid"] == (4, 8, 8) and result.row(0.5)["kept"] == 0.5


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsities=0.5), "sparsities must be a non-empty list"),
    (dict(sparsities=[]), "sparsities must be a non-empty list"),
    (dict(sparsities=[1.0]), r"sparsities\[\] must be a number in \[0, 1\)"),
    (dict(tiles=(4, 4, 4)), "tiles must be a non-empty list of tile shapes"),
    (dict(tiles=[(4, 4)]), "tile must be a tuple of three positive ints"),
    (dict(warmup_steps=2), "warmup_steps must be a non-empty list of ints >= 0"),
    (dict(warmup_steps=[-1]), "warmup_steps must be a non-empty list of ints >= 0"),
    (dict(backend="inductor"), r"backend must be one of \('sparse_inductor', 'eager'\)"),
    (dict(sample_fn=3), "sample_fn must be None or a callable"),
    (dict(peak=0), "peak must be a positive number"),
    (dict(min_tokens=-1), "min_tokens must be a non-negative int"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    model, x, text = tiny_model_and_inputs()
    with pytest.raises(ValueError, match=match):
        si.fidelity(model, x, text, **kwargs)


def test_attention_recall_validates_inputs():
    q = torch.randn(1, 1, 64, 8)
    with pytest.raises(ValueError, match=r"q has N=64 tokens but grid \(4, 4, 5\)"):
        attention_recall(q, q, (4, 4, 5), sparsity=0.5)
    with pytest.raises(ValueError, match="sparsity must be a number"):
        attention_recall(q, q, (4, 4, 4), sparsity=2)


# ---------------------------------------------------------------------------------------------
# CLI: python -m sparse_inductor fidelity SETUP, on a checkpoint of the training example
# ---------------------------------------------------------------------------------------------
def test_cli_on_a_tiny_trained_checkpoint(tmp_path, capsys):
    """`python -m sparse_inductor fidelity` in a fresh process, as users run it."""
    import train_tiny_video_dit

    train_tiny_video_dit.main(["--tiny", "--variants", "dense", "--steps", "6", "--out", str(tmp_path)])
    json_path = tmp_path / "f.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, "-m", "sparse_inductor", "fidelity", "examples/train_tiny_video_dit.py:fidelity_setup",
         "--checkpoint", str(tmp_path / "dense.pt"), "--backend", "eager", "--sparsities", "0", "0.75",
         "--tiles", "4,4,4", "1x8x8", "--warmup", "0", "2", "--json", str(json_path)],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 sparse attention site(s)" in result.stdout and "| (1, 8, 8) | 0.75 | 0.250 |" in result.stdout
    data = json.loads(json_path.read_text())
    rows = {(tuple(r["tile"]), r["sparsity"]): r for r in data["rows"]}
    assert abs(rows[((4, 4, 4), 0.0)]["recall"] - 1) < 1e-6 and rows[((4, 4, 4), 0.0)]["psnr"]["0"] == math.inf
    assert 0 < rows[((4, 4, 4), 0.75)]["recall"] < 1


def test_cli_errors(capsys):
    assert cli_main([]) == 2 and "usage" in capsys.readouterr().err
    with pytest.raises(ValueError, match="SETUP must look like"):
        cli_main(["fidelity", "no_colon"])
    with pytest.raises(ValueError, match="has no function 'nope'"):
        cli_main(["fidelity", os.path.join(ROOT, "examples", "video_dit.py") + ":nope"])
    with pytest.raises(ValueError, match="needs checkpoint=PATH"):
        cli_main(["fidelity", os.path.join(ROOT, "examples", "train_tiny_video_dit.py") + ":fidelity_setup"])
    with pytest.raises(SystemExit):
        cli_main(["fidelity", "x:y", "--tiles", "4,4"])


def test_eager_backend_is_the_model_with_the_op_at_the_config_in_force():
    """The eager runner follows the sparsity(...) context at call time, tile included, exactly as
    a model whose self-attention calls video_sparse_attention (the compiled tests' oracle)."""
    from sparse_inductor.fidelity import _EagerSparseModel

    model, x, text = tiny_model_and_inputs()
    sites = {0: dict(module="blocks.0", grid=(8, 8, 8), text_span=None),
             2: dict(module="blocks.1", grid=(8, 8, 8), text_span=None)}  # calls 1, 3: cross-attention
    runner = _EagerSparseModel(model, sites, num_calls=4)
    for level, tile in ((0.5, (2, 4, 8)), (0.75, (4, 4, 4)), (0.0, (4, 4, 4))):
        for block in model.blocks:
            block.self_attention_fn = lambda q, k, v: si.video_sparse_attention(
                q, k, v, (8, 8, 8), sparsity=level, tile=tile) if level else F.scaled_dot_product_attention(q, k, v)
        want = model(x, text)
        for block in model.blocks:
            block.self_attention_fn = F.scaled_dot_product_attention
        with si.sparsity(level, tile=tile):
            assert torch.equal(runner(x, text), want), (level, tile)
    with pytest.raises(RuntimeError, match="made 4 scaled_dot_product_attention call"):
        _EagerSparseModel(model, sites, num_calls=3)(x, text)


@pytest.mark.parametrize("case", [pytest.param("data-dependent text", marks=needs_unbacked_text), "outer-product mask"])
def test_eager_backend_on_joint_layouts(case):
    """Mochi's data-dependent prompt length and HunyuanVideo 1.5's ``m_i & m_j`` mask behind a graph
    break: fidelity's eager runner is the model with the eager op over each call's video span (its
    own text length; padded keys hidden, a padded query's row 0); sparsity 0 is exact, recall 1."""
    from joint_models import JointTokens, ValidPromptTokens, eager_sparse_prompt_attention, joint_inputs

    grid = (4, 4, 6) if case == "outer-product mask" else (3, 4, 5)
    if case == "outer-product mask":
        model, inputs = JointTokens(graph_break=True, mask="outer").eval(), joint_inputs(grid, 5)
        with torch.no_grad():
            sparse = model.eager_sparse(*inputs, grid, sparsity=0.5)
    else:
        g = torch.Generator().manual_seed(0)
        inputs = (torch.randn(2, 4, 3, 8, 10, generator=g), torch.randn(2, 9, 8, generator=g),
                  torch.tensor([[1] * 9, [1] * 5 + [0] * 4], dtype=torch.bool))
        model = ValidPromptTokens("after").eval()
        with torch.no_grad():
            sparse = eager_sparse_prompt_attention(model, *inputs, grid)
    with torch.no_grad():
        dense = model(*inputs)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        result = si.fidelity(model, *inputs, sparsities=[0.0, 0.5], backend="eager")
    assert result.row(0.0)["rel_l2"] == 0.0 and abs(result.row(0.0)["recall"] - 1) < 1e-6
    dense, sparse = torch.cat([t.flatten() for t in dense]), torch.cat([t.flatten() for t in sparse])
    want = ((sparse - dense).norm() / dense.norm()).item()
    assert result.row(0.5)["rel_l2"] == pytest.approx(want, rel=1e-5)
