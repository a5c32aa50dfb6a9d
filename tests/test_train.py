"""examples/train_tiny_video_dit.py: the data, the model, a tiny CPU training run dense and
through backend="sparse_inductor" (TopK, and BSA's CumulativeMass + query_keep), the gated
variant, the measured attention FLOPs, checkpoints and the report."""
import contextlib
import importlib.util
import json

import pytest
import torch

import sparse_inductor as si
from helpers import HAS_CUDA
import train_tiny_video_dit as tr


def test_videos_are_deterministic_in_range_and_move():
    cfg = tr.Config(**tr.TINY)
    a, b = tr.make_videos(3, cfg, seed=5, device="cpu"), tr.make_videos(3, cfg, seed=5, device="cpu")
    assert a.shape == (3, 3, cfg.frames, cfg.size, cfg.size) and torch.equal(a, b)
    assert not torch.equal(a, tr.make_videos(3, cfg, seed=6, device="cpu"))
    assert a.min() >= -1 and a.max() <= 1
    frame_change = (a[:, :, 1:] - a[:, :, :-1]).abs().mean(dim=(1, 3, 4))  # [clip, frame pair]
    assert (frame_change > 1e-3).all(), "every clip changes between every two frames"


def test_model_grid_is_found_by_the_pass_and_output_shape():
    cfg = tr.Config(**tr.TINY)
    model = tr.build_model(cfg, "dense", 0.875)
    x = torch.randn(2, 3, cfg.frames, cfg.size, cfg.size)
    assert model(x, torch.rand(2)).shape == x.shape
    with si.sparsity(0.875, min_tokens=0):
        rows = si.explain(model, x, torch.rand(2)).rows
    assert [(r["module"], r["grid"], r["decision"]) for r in rows] == \
        [(f"blocks.{i}.attn", cfg.grid, "sparse") for i in range(cfg.layers)]


def test_attention_flops_saved():
    cfg = tr.Config()  # the GPU configuration: grid 16x16x16, 64 tiles, k = 8 at 0.875
    dense, sparse = tr.attention_flops(cfg, "dense", 0.875), tr.attention_flops(cfg, "sparse", 0.875)
    assert dense["saved"] == 0 and sparse["saved"] == pytest.approx(0.875, abs=1e-12)
    assert dense["tflop"] == pytest.approx(4 * 8 * 4 * 4096 ** 2 * 64 * 6 * 3.5 / 1e12)
    gated = tr.attention_flops(cfg, "gated", 0.875)
    assert 0.87 < gated["saved"] < 0.875  # the coarse branch costs a little


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """One tiny run of every variant (12 steps each; sparse and bsa compile on CPU)."""
    out = tmp_path_factory.mktemp("train")
    tr.main(["--tiny", "--steps", "12", "--eval-every", "3", "--out", str(out), "--variants", *tr.VARIANTS])
    return out, {v: json.loads((out / f"train_{v}.json").read_text()) for v in tr.VARIANTS}


def test_every_variant_learns(tiny_runs):
    _, logs = tiny_runs
    for variant, log in logs.items():
        vals = [v for _, v in log["val"]]
        assert log["steps"] == 12 and len(vals) == 4
        assert vals[-1] < vals[0], (variant, vals)
        losses = log["train_loss"]
        assert sum(losses[-4:]) < sum(losses[:4]), (variant, losses)


def test_backend_training_follows_the_eager_sparse_op_not_dense(tiny_runs):
    """Same data, initial weights and steps. The model trained through backend="sparse_inductor"
    must track the one whose layers call the eager sparse op (same arithmetic; only Inductor's
    fp32 reordering differs) far more closely than the dense one: the backend really trained
    sparse attention, forward and backward."""
    _, logs = tiny_runs
    dense, sparse, oracle = (logs[v]["train_loss"] for v in ("dense", "sparse", "sparse_eager"))
    to_oracle = sum(abs(a - b) for a, b in zip(sparse, oracle))
    to_dense = sum(abs(a - b) for a, b in zip(sparse, dense))
    assert to_oracle < 0.1 * to_dense, (to_oracle, to_dense)
    assert logs["sparse"]["sparsity"] == 0.875 and logs["sparse"]["flops"]["saved"] == pytest.approx(0.875)


def test_bsa_measures_the_attention_flops_it_kept(tiny_runs):
    """The bsa variant trains under CumulativeMass + query_keep 0.5 and records, on the validation
    passes of its first, middle and last evaluation, what the selection kept. On the tiny grid (8
    tiles) the clamp [min_tiles 4, ceil(0.5 * 8) = 4] keeps exactly 4 tiles per query tile, and
    half of each 64-token tile's rows are computed: FLOPs kept 0.5 * 0.5 = 0.25, whatever the
    weights. The TopK variant's measurement equals its nominal 1/8 (k = 1 of 8 tiles). (The
    measured passes run the training graph under the training context, gradients enabled.)"""
    _, logs = tiny_runs
    bsa = logs["bsa"]
    assert bsa["policy"] == "CumulativeMass(p=0.9, min_tiles=4, max_fraction=0.5)" and bsa["query_keep"] == 0.5
    measured = bsa["measured_flops"]
    assert [point["step"] for point in measured["points"]] == [3, 6, 12]
    for point in measured["points"]:
        assert 0 < point["kept"] < 1 and point["kept"] == pytest.approx(0.25)
        assert point["tiles_min"] == point["tiles_max"] == 4 and point["num_tiles"] == 8
        assert point["query_keep"] == pytest.approx(0.5) and point["calls"] == 2 * 2  # 2 layers x 2 batches
    assert measured["kept"] == pytest.approx(0.25) and measured["saved"] == pytest.approx(0.75)
    assert bsa["flops"]["saved"] == pytest.approx(0.75)  # the table's FLOPs are the measured ones
    topk = logs["sparse"]["measured_flops"]
    assert topk["kept"] == pytest.approx(0.125) and topk["points"][0]["tiles_max"] == 1


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="75 s on CPU (the suite's time budget): runs with CUDA")
def test_bsa_mass_cut_adapts_per_query_tile_when_unclamped(tmp_path):
    """With the clamp opened (min 1 tile, max every tile) the cut at p = 0.5 keeps a number of tiles
    that differs between query tiles, all of it recorded: fewer than all tiles on average, the
    fewest below the most (the test above only sees the clamp)."""
    tr.main(["--tiny", "--steps", "4", "--eval-every", "2", "--out", str(tmp_path), "--variants", "bsa",
             "--bsa-p", "0.5", "--bsa-min-tiles", "1", "--bsa-max-fraction", "1", "--query-keep", "1"])
    log = json.loads((tmp_path / "train_bsa.json").read_text())
    for point in log["measured_flops"]["points"]:
        assert point["tiles_min"] < point["tiles_max"] and point["tiles_mean"] < point["num_tiles"], point
        assert point["query_keep"] == 1.0 and point["kept"] == pytest.approx(point["tiles_mean"] / point["num_tiles"])


def test_bsa_query_keep_ramp_steps_down_from_dense():
    """``--query-keep-ramp N``: BSA's schedule (sparsity raised from dense in small steps). The
    query keep of step s walks 1 -> --query-keep in ``--ramp-levels`` equal steps over the first N
    training steps, then stays at the target; without a ramp it is the target throughout."""
    assert [tr.ramped_query_keep(s, 0.5, ramp_steps=90, levels=2) for s in (0, 29, 30, 59, 60, 89, 90, 500)] == \
        [1.0, 1.0, 0.75, 0.75, 0.5, 0.5, 0.5, 0.5]
    assert tr.ramped_query_keep(0, 0.5, ramp_steps=0, levels=2) == 0.5
    assert [tr.ramped_query_keep(s, 0.25, ramp_steps=40, levels=3) for s in (0, 10, 20, 30, 40)] == \
        [1.0, 0.75, 0.5, 0.25, 0.25]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="163 s on CPU (three compiled query keeps): runs with CUDA")
def test_bsa_ramp_trains_each_stage_under_its_query_keep(tmp_path):
    """End to end: 6 steps, a ramp over all of them in 2 decrements (stages of 2 steps): the
    measured validation passes after steps 2, 4 and 6 ran at query keep 1, 0.75 and 0.5."""
    tr.main(["--tiny", "--steps", "6", "--eval-every", "2", "--out", str(tmp_path), "--variants", "bsa",
             "--query-keep", "0.5", "--query-keep-ramp", "6", "--ramp-levels", "2"])
    log = json.loads((tmp_path / "train_bsa.json").read_text())
    points = log["measured_flops"]["points"]
    assert [p["step"] for p in points] == [2, 4, 6], points
    assert [p["query_keep"] for p in points] == pytest.approx([1.0, 0.75, 0.5]), points
    assert log["query_keep_ramp"] == {"steps": 6, "levels": 2}


def test_bsa_flags_reject_bad_values(tmp_path, capsys):
    for flag, value in (("--bsa-p", "0"), ("--bsa-p", "1.5"), ("--query-keep", "0"), ("--query-keep", "2"),
                        ("--bsa-min-tiles", "0"), ("--bsa-max-fraction", "0"), ("--query-keep-ramp", "-1"),
                        ("--ramp-levels", "0")):
        with pytest.raises(SystemExit):
            tr.main(["--tiny", "--variants", "bsa", flag, value, "--out", str(tmp_path)])
        assert f"{flag}: " in capsys.readouterr().err


def test_gated_checkpoint_learned_a_gate_and_reloads(tiny_runs):
    out, logs = tiny_runs
    model, cfg = tr.load_checkpoint(out / "gated.pt")
    gates = [block.attn.to_gate.weight for block in model.blocks]
    assert all(g.abs().sum() > 0 for g in gates), "the zero-initialised gates received gradients"
    assert all(block.attn.sparsity == 0.875 for block in model.blocks)
    # The reloaded model reproduces the logged final validation loss.
    loss = tr.evaluate(model, tr.validation_set(cfg, "cpu"), cfg, tr._null)
    assert loss == pytest.approx(logs["gated"]["final_val_loss"], rel=1e-5)


def test_report_table_and_plot(tiny_runs, tmp_path):
    pytest.importorskip("matplotlib")
    out, _ = tiny_runs
    tr.main(["--report", str(out), "--out", str(tmp_path)])
    table = (tmp_path / "train_table.md").read_text()
    assert table.count("\n") == 7 and "| sparse | 0.875 | 12 |" in table and "87.5 %" in table
    assert "measured FLOPs kept" in table.splitlines()[0]
    bsa_row = next(line for line in table.splitlines() if line.startswith("| bsa |"))
    assert "CumulativeMass(p=0.9, min_tiles=4, max_fraction=0.5), query_keep=0.5" in bsa_row
    assert "| 75.0 % | 0.250 (step 3: 0.250, step 6: 0.250, step 12: 0.250) |" in bsa_row  # measured
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sampler_is_euler_and_enters_the_step_context_each_step():
    cfg = tr.Config(**tr.TINY)
    model = tr.build_model(cfg, "dense", 0.0)
    torch.nn.init.normal_(model.out.weight, std=0.1)  # a non-zero velocity (the output starts at 0)
    noise = torch.randn(1, 3, cfg.frames, cfg.size, cfg.size)
    entered = []

    @contextlib.contextmanager
    def step_context(i):
        entered.append(i)
        yield

    out = tr.sample(model, noise, 3, step_context)
    assert entered == [0, 1, 2] and out.shape == noise.shape and 0 <= out.min() and out.max() <= 1
    with torch.no_grad():
        one_step = ((noise - model(noise, torch.ones(1))).clamp(-1, 1) + 1) / 2  # x_0 = x_1 - v(x_1, 1)
    assert torch.allclose(tr.sample(model, noise, 1), one_step, atol=1e-6)


def test_fidelity_sweep_script_on_the_dense_checkpoint(tiny_runs, tmp_path, capsys):
    import fidelity_sweep

    out, _ = tiny_runs
    fidelity_sweep.main(["--checkpoint", str(out / "dense.pt"), "--out", str(tmp_path), "--sparsities", "0", "0.75",
                         "--tiles", "4,4,4", "2,4,8", "--warmup", "0", "1"])
    printed = capsys.readouterr().out
    assert "sweep (eager op)" in printed and "| (2, 4, 8) | 0.75 | 0.250 |" in printed
    data = json.loads((tmp_path / "fidelity.json").read_text())
    rows = {(tuple(r["tile"]), r["sparsity"]): r for r in data["sweep"]["rows"]}
    assert set(rows) == {((4, 4, 4), 0.0), ((4, 4, 4), 0.75), ((2, 4, 8), 0.0), ((2, 4, 8), 0.75)}
    assert rows[((4, 4, 4), 0.0)]["rel_l2"] == 0.0 and rows[((4, 4, 4), 0.0)]["psnr"]["1"] == float("inf")
    assert rows[((4, 4, 4), 0.75)]["recall"] < 1 and "Per site:" in (tmp_path / "fidelity.md").read_text()
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "fidelity_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_clip_size_options_set_the_grid_and_reject_non_dividing_sizes(tmp_path, capsys):
    tr.main(["--tiny", "--frames", "4", "--size", "48", "--steps", "2", "--variants", "dense", "--out", str(tmp_path)])
    log = json.loads((tmp_path / "train_dense.json").read_text())
    assert (log["config"]["frames"], log["config"]["size"]) == (4, 48)  # grid 4x12x12
    assert tr.Config(**{**log["config"], "patch": tuple(log["config"]["patch"])}).grid == (4, 12, 12)
    for flag, value in (("--size", "40"), ("--frames", "6"), ("--size", "0")):
        with pytest.raises(SystemExit):
            tr.main(["--tiny", flag, value, "--out", str(tmp_path)])
        assert f"{flag} must be a positive multiple of" in capsys.readouterr().err
