"""examples/testbed_dit.py (issue 17's testbed: data, captions, model, deterministic resumable
training, weights shards, the fidelity setup) and examples/attention_census.py (planted cases
and the CLI). CPU, tiny configuration."""
import contextlib
import json
import math
import os
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attention_census as ac
import sparse_inductor as si
import testbed_dit as tb

TINY = tb.Config(**tb.TINY)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny model's tensors are too small for intra-op threads to pay off, and two threads on
    two cores slow down ~10x when another process keeps one core busy: one thread here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Data and captions
# ---------------------------------------------------------------------------------------------
@given(seed=st.integers(0, 10**6), frames=st.sampled_from([4, 8]), size=st.sampled_from([16, 32]))
def test_videos_are_deterministic_in_range_and_move(seed, frames, size):
    cfg = tb.Config(**{**tb.TINY, "frames": frames, "size": size})
    a, cap_a = tb.make_clips(2, cfg, seed)
    b, cap_b = tb.make_clips(2, cfg, seed)
    assert a.shape == (2, 3, frames, size, size) and torch.equal(a, b) and torch.equal(cap_a, cap_b)
    assert not torch.equal(a, tb.make_clips(2, cfg, seed + 1)[0])
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.1
    frame_change = (a[:, :, 1:] - a[:, :, :-1]).abs().mean(dim=(1, 3, 4))  # [clip, frame pair]
    assert (frame_change > 1e-3).all(), "every clip changes between every two frames"


def test_training_batches_depend_only_on_seed_and_step():
    x0, cap, t, noise = tb.training_batch(TINY, 3, 7)
    x0b, capb, tb_, noiseb = tb.training_batch(TINY, 3, 7)
    assert all(torch.equal(u, v) for u, v in ((x0, x0b), (cap, capb), (t, tb_), (noise, noiseb)))
    other = tb.training_batch(TINY, 3, 8)
    assert not torch.equal(x0, other[0]) and not torch.equal(noise, other[3]) and not torch.equal(t, other[2])
    assert not torch.equal(x0, tb.training_batch(TINY, 4, 7)[0])
    val = tb.validation_set(TINY, 3)
    assert val[0].shape[0] % TINY.batch == 0 and not torch.equal(val[0][:TINY.batch], x0)
    assert 0 < t.min() and t.max() < 1


def test_random_streams_are_distinct_32_bit_seeds():
    """The CPU generator keeps only 32 bits of a seed: every stream of a run (training data and
    noise per step, validation, initial weights, sampling noise) needs distinct low 32 bits."""
    for seed in (0, 1, 4321):
        seeds = [tb.stream_seed(seed, kind, i) for kind in range(5) for i in range(3000)]
        assert len(set(seeds)) == len(seeds) and all(0 <= s < 2 ** 32 for s in seeds)


def _two_object_scene(cfg, front_colour, back_colour):
    """Object 0 (back) and 1 (front): solid discs crossing the centre at mid-clip, static camera;
    object 2 far outside the frame."""
    p = tb.sample_params(1, cfg, seed=0)
    p["pan_class"][:] = 0
    p["pan"][:] = 0
    p["zoom_class"][:] = 0
    p["zoom_rate"][:] = 0
    p["kind"][:] = 0
    p["contrast"][:] = 0  # solid colour
    p["colour_jitter"][:] = 0
    p["colour"][0, :2] = torch.tensor([back_colour, front_colour])
    p["cross_point"][0, :2] = 0.5
    p["cross_point"][0, 2] = 9.0
    p["cross_time"][:] = 0.5
    p["size0"][:] = 0.15
    p["growth"][:] = 0
    p["velocity"][0, 0] = torch.tensor([0.8, 0.0])
    p["velocity"][0, 1] = torch.tensor([0.0, 0.8])
    return p


def test_objects_occlude_in_depth_order():
    cfg = tb.Config(**{**tb.TINY, "frames": 9, "size": 32})
    red, blue = tb.COLOURS.index("red"), tb.COLOURS.index("blue")
    p = _two_object_scene(cfg, front_colour=blue, back_colour=red)
    video = tb.render(p, cfg)
    centre = video[0, :, 4, 16, 16]  # mid-clip: both discs cover the centre
    assert torch.allclose(centre, tb.PALETTE[blue], atol=0.02), centre
    # Swap the depth order: the other object is in front now.
    swapped = {k: (v[:, [1, 0, 2]] if k in tb.OBJECT_KEYS else v) for k, v in p.items()}
    scene_keys = {"pan_class", "zoom_class", "pan", "zoom_rate", "bg_base", "bg_slope", "bg_blobs", "bg_stripe"}
    assert set(tb.OBJECT_KEYS) == set(p) - scene_keys
    swapped_video = tb.render(swapped, cfg)
    centre = swapped_video[0, :, 4, 16, 16]
    assert torch.allclose(centre, tb.PALETTE[red], atol=0.02), centre
    # Where only one object is (object 0 at its start position, left of centre), nothing changes.
    assert torch.allclose(video[0, :, 2, 16, 8], swapped_video[0, :, 2, 16, 8], atol=0.01)  # (soft edges)
    # The centre pixel shows the background before the objects arrive.
    assert (video[0, :, 0, 16, 16] - tb.PALETTE[blue]).abs().max() > 0.1


def test_objects_overlap_in_most_random_clips():
    _, masks = tb.render(tb.sample_params(16, TINY, seed=1), TINY, return_masks=True)
    assert masks.shape == (16, TINY.objects, TINY.frames, TINY.size, TINY.size)
    overlapping = ((masks > 0.5).sum(1) >= 2).flatten(1).any(1)
    assert overlapping.float().mean() >= 0.5, overlapping


@given(seed=st.integers(0, 10**6))
def test_captions_are_derived_from_the_parameters(seed):
    n = 8
    p = tb.sample_params(n, tb.Config(), seed)
    cap = tb.caption_tokens(p)
    K = tb.Config().objects
    assert cap.shape == (n, 3 * K + 1) and cap.dtype == torch.long
    assert cap.min() >= 0 and cap.max() < tb.VOCAB
    per_object = cap[:, :3 * K].view(n, K, 3)
    assert torch.equal(per_object[..., 0] - tb.KIND_OFFSET, p["kind"])
    assert torch.equal(per_object[..., 1] - tb.COLOUR_OFFSET, p["colour"])
    assert torch.equal(per_object[..., 2] - tb.DIRECTION_OFFSET, p["direction"])
    # The direction token says where the object moves: within 22.5 degrees of its class angle.
    angle = torch.atan2(p["velocity"][..., 1], p["velocity"][..., 0])
    diff = torch.remainder(angle - p["direction"] * math.pi / 4 + math.pi, 2 * math.pi) - math.pi
    assert diff.abs().max() <= math.pi / 8 + 1e-6
    camera = cap[:, -1] - tb.CAMERA_OFFSET
    pan, zoom = camera // tb.ZOOM_CLASSES, camera % tb.ZOOM_CLASSES
    assert torch.equal(pan, p["pan_class"]) and torch.equal(zoom, p["zoom_class"])
    assert torch.equal(p["pan"].norm(dim=-1) > 0, pan > 0)
    assert torch.equal(torch.sign(p["zoom_rate"]), torch.where(zoom == 1, 1.0, torch.where(zoom == 2, -1.0, 0.0)))
    moving = pan > 0
    pan_angle = torch.atan2(p["pan"][:, 1], p["pan"][:, 0])
    diff = torch.remainder(pan_angle - (pan - 1) * math.pi / 4 + math.pi, 2 * math.pi) - math.pi
    assert (diff.abs()[moving] <= math.pi / 8 + 1e-6).all()


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def test_model_output_shape_and_caption_matters():
    model = tb.build_model(TINY)
    torch.nn.init.normal_(model.out.weight, std=0.1)  # the output layer starts at 0
    for block in model.blocks:
        torch.nn.init.normal_(block.cross.proj.weight, std=0.1)
    x, cap = tb.make_clips(2, TINY, 0)
    t = torch.rand(2)
    y = model(x, t, cap)
    assert y.shape == x.shape
    assert not torch.allclose(model(x, t, cap.flip(0)), y), "the caption reaches the output"


def test_explain_finds_self_attention_sparse_with_the_grid_and_cross_attention_dense():
    cfg = tb.Config(**{**tb.TINY, "frames": 4, "size": 48, "layers": 3})  # grid (4, 12, 12)
    rows = tb.explain_sites(tb.build_model(cfg), cfg).rows
    kinds = (("attn", "sparse"), ("cross", "dense"))
    assert [(r["module"], r["decision"]) for r in rows] == [
        (f"blocks.{i}.{kind}", decision) for i in range(3) for kind, decision in kinds]
    sparse = [r for r in rows if r["decision"] == "sparse"]
    assert all(r["grid"] == (4, 12, 12) and r["q"][-1] == cfg.dim // cfg.heads for r in sparse)
    assert all(r["k"][2] == cfg.caption_length for r in rows if r["decision"] == "dense")


def test_gpu_config_matches_the_issue():
    cfg = tb.Config()
    assert cfg.layers >= 12 and cfg.dim // cfg.heads == 64 and cfg.tokens >= 16 * 32 * 32
    assert cfg.grid == (16, 32, 32) and cfg.objects >= 3


# ---------------------------------------------------------------------------------------------
# Training, resuming, checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed")
    log = tb.main(["train", "--tiny", "--steps", "30", "--schedule-steps", "40", "--eval-every", "10",
                   "--out", str(out)])
    return out, log


def test_tiny_training_learns_and_writes_its_artefacts(tiny_run):
    out, log = tiny_run
    vals = [v for _, v in log["val"]]
    assert [s for s, _ in log["val"]] == [10, 20, 30] and vals[-1] < 0.95 * vals[0], vals
    assert [s for s, _ in log["train_loss"]] == list(range(1, 31))
    for name in ("state.pt", "weights.pt", "log.json", "summary.md"):
        assert (out / name).exists(), name
    assert json.loads((out / "log.json").read_text())["runs"][0]["end_step"] == 30
    summary = (out / "summary.md").read_text()
    assert "| 0 | cpu |" in summary and "0 -> 30" in summary and "**Status:**" in summary
    if (out / "loss_curve.png").exists() or __import__("importlib").util.find_spec("matplotlib"):
        assert (out / "loss_curve.png").read_bytes()[:8] == PNG


def test_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    tb.main(["train", "--tiny", "--steps", "6", "--out", str(straight), "--no-plot"])
    tb.main(["train", "--tiny", "--steps", "3", "--schedule-steps", "6", "--out", str(split), "--no-plot"])
    mid = torch.load(split / "state.pt", weights_only=False)
    assert mid["step"] == 3
    tb.main(["train", "--tiny", "--steps", "6", "--out", str(split), "--no-plot"])  # resumes from state.pt
    a, b = (torch.load(d / "state.pt", weights_only=False) for d in (straight, split))
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not all(torch.equal(a["model"][k], mid["model"][k]) for k in a["model"])
    la, lb = (json.loads((d / "log.json").read_text()) for d in (straight, split))
    assert la["train_loss"] == lb["train_loss"] and len(lb["runs"]) == 2 and lb["runs"][1]["resumed_from"] == "state"
    assert dict(la["val"])[6] == dict(lb["val"])[6]


def test_resume_from_weights_only_needs_the_flag(tmp_path, tiny_run):
    out, _ = tiny_run
    carried = tmp_path / "carried"
    carried.mkdir()
    for name in os.listdir(out):
        if name.startswith("weights") or name == "log.json":
            shutil.copy(out / name, carried / name)
    with pytest.raises(SystemExit, match="--resume"):
        tb.main(["train", "--tiny", "--steps", "32", "--out", str(carried), "--no-plot"])
    log = tb.main(["train", "--tiny", "--steps", "32", "--out", str(carried), "--resume", "--no-plot"])
    assert log["runs"][-1]["resumed_from"] == "weights" and [s for s, _ in log["train_loss"]][-3:] == [30, 31, 32]


def test_training_past_the_schedule_end_runs_at_its_final_learning_rate(tmp_path):
    """The plateau check of a finished schedule: ``--past-schedule`` trains on at the last learning
    rate (10 %) instead of refusing; without it, --steps is capped by the schedule."""
    log = tb.main(["train", "--tiny", "--steps", "4", "--schedule-steps", "4", "--out", str(tmp_path), "--no-plot"])
    assert log["runs"][-1]["end_step"] == 4
    log = tb.main(["train", "--tiny", "--steps", "7", "--out", str(tmp_path), "--no-plot"])
    assert log["runs"][-1]["end_step"] == 4, "without --past-schedule the schedule's end is the target"
    log = tb.main(["train", "--tiny", "--steps", "7", "--past-schedule", "--out", str(tmp_path), "--no-plot"])
    assert log["runs"][-1]["end_step"] == 7 and log["schedule_steps"] == 4
    assert [s for s, _ in log["train_loss"]][-3:] == [5, 6, 7]
    cfg = tb.Config(**tb.TINY)
    assert tb.lr_at(6, cfg, 4) == pytest.approx(0.1 * cfg.lr)
    assert "3 steps past its end" in tb.summary_verdict(log, tb.plateau(log["val"]))
    with pytest.raises(SystemExit, match="--past-schedule needs --steps"):
        tb.main(["train", "--tiny", "--past-schedule", "--out", str(tmp_path), "--no-plot"])


def test_cooldown_decays_the_learning_rate_to_zero_past_the_schedule(tmp_path):
    """``--cooldown-from S`` (with --past-schedule): from global step S the rate falls linearly from the
    schedule's final 10 % to 0 at --steps; before S it is untouched; bad spans are refused by name."""
    cfg = tb.Config(**tb.TINY)
    assert tb.lr_at(5, cfg, 4, (6, 10)) == pytest.approx(0.1 * cfg.lr)
    assert tb.lr_at(6, cfg, 4, (6, 10)) == pytest.approx(0.1 * cfg.lr)
    assert tb.lr_at(8, cfg, 4, (6, 10)) == pytest.approx(0.05 * cfg.lr)
    assert tb.lr_at(10, cfg, 4, (6, 10)) == 0.0
    tb.main(["train", "--tiny", "--steps", "4", "--schedule-steps", "4", "--out", str(tmp_path), "--no-plot"])
    log = tb.main(["train", "--tiny", "--steps", "8", "--past-schedule", "--cooldown-from", "5", "--out",
                   str(tmp_path), "--no-plot"])
    assert log["runs"][-1]["cooldown"] == [5, 8] and log["runs"][-1]["end_step"] == 8
    verdict = tb.summary_verdict(log, tb.plateau(log["val"]))
    assert "went on 1 steps past its end at the final learning rate, then decayed it linearly to 0 from step 5 to 8" \
        in verdict
    with pytest.raises(SystemExit, match="--cooldown-from needs --past-schedule"):
        tb.main(["train", "--tiny", "--steps", "9", "--cooldown-from", "5", "--out", str(tmp_path), "--no-plot"])
    with pytest.raises(SystemExit, match=r"--cooldown-from must lie in \[4, 9\)"):
        tb.main(["train", "--tiny", "--steps", "9", "--past-schedule", "--cooldown-from", "9", "--out",
                 str(tmp_path), "--no-plot"])


def test_time_limit_stops_the_run_and_saves(tmp_path):
    log = tb.main(["train", "--tiny", "--steps", "2000", "--schedule-steps", "100000", "--minutes", "0.06",
                   "--out", str(tmp_path), "--no-plot"])
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    assert 0 < state["step"] < 2000 and log["runs"][-1]["stop_reason"].startswith("time limit")
    assert log["runs"][-1]["seconds"] < 0.06 * 60 + 2.5


def test_set_overrides_config_fields_of_a_new_run_only(tmp_path):
    log = tb.main(["train", "--tiny", "--steps", "1", "--set", "layers=1", "--set", "size=16", "--set", "lr=0.01",
                   "--out", str(tmp_path), "--no-plot"])
    assert (log["config"]["layers"], log["config"]["size"], log["config"]["lr"]) == (1, 16, 0.01)
    with pytest.raises(SystemExit, match="new run only"):
        tb.main(["train", "--tiny", "--steps", "2", "--set", "layers=2", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="KEY one of"):
        tb.main(["train", "--tiny", "--set", "depth=2", "--out", str(tmp_path / "other")])


def test_plateau_rule():
    improving = [[i, 1.0 / i] for i in range(1, 8)]
    assert not tb.plateau(improving)["stopped"]
    flat = [[1, 1.0], [2, 0.5], [3, 0.499], [4, 0.4995], [5, 0.4989]]
    out = tb.plateau(flat)
    assert out["stopped"] and out["best_step"] == 5 and out["gain"] == pytest.approx(1 - 0.4989 / 0.5)
    assert tb.plateau(flat[:3])["gain"] is None and not tb.plateau(flat[:3])["stopped"]


def test_lr_schedule_warms_up_then_decays_to_ten_percent():
    cfg = tb.Config()
    lrs = [tb.lr_at(s, cfg, 3000) for s in range(3000)]
    assert lrs[0] == pytest.approx(cfg.lr / 100) and lrs[99] == pytest.approx(cfg.lr)
    assert all(a >= b for a, b in zip(lrs[99:], lrs[100:])) and tb.lr_at(3000, cfg, 3000) == pytest.approx(0.1 * cfg.lr)


def test_weights_round_trip_in_shards(tmp_path):
    model = tb.build_model(TINY, seed=3)
    paths = tb.save_weights(model, tmp_path, {"config": tb.asdict(TINY), "step": 5, "seed": 3, "schedule_steps": 20},
                            limit=64 * 1024)
    assert len(paths) >= 2 and os.path.basename(paths[0]) == "weights.pt"
    tensors, meta = tb.load_weights(tmp_path)
    assert meta["step"] == 5 and meta["seed"] == 3
    want = model.state_dict()
    assert tensors.keys() == want.keys()
    assert all(tensors[k].dtype == torch.bfloat16 and torch.equal(tensors[k], want[k].to(torch.bfloat16)) for k in want)
    loaded, cfg, _ = tb.load_model(tmp_path)
    assert cfg == TINY and not loaded.training
    x, cap = tb.make_clips(1, TINY, 0)
    rounded = tb.build_model(TINY)
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in want.items()})
    with torch.no_grad():
        t = torch.tensor([0.3])
        assert torch.equal(loaded(x, t, cap), rounded(x, t, cap))
    # Fewer shards next time: stale ones are removed.
    tb.save_weights(model, tmp_path, meta)
    assert sorted(os.listdir(tmp_path)) == ["weights.pt"]


def test_gpu_config_weights_fit_in_16_mib_shards(tmp_path):
    cfg = tb.Config()
    model = tb.build_model(cfg)  # 14 M parameters: built and saved in well under a second
    assert sum(p.numel() for p in model.parameters()) == tb.parameter_count(cfg)
    paths = tb.save_weights(model, tmp_path, {"config": tb.asdict(cfg), "step": 0, "seed": 0, "schedule_steps": 1})
    sizes = [os.path.getsize(p) for p in paths]
    assert len(paths) == 2 and max(sizes) < tb.SHARD_LIMIT, sizes
    assert sum(sizes) > 2 * tb.parameter_count(cfg)  # every tensor is there, in bfloat16
    tensors, _ = tb.load_weights(paths[0])
    assert tensors.keys() == model.state_dict().keys()


def test_setup_feeds_sparse_inductor_fidelity(tiny_run):
    out, _ = tiny_run
    built = tb.setup(checkpoint=str(out), device="cpu")
    assert set(built) == {"model", "inputs", "kwargs", "sample_fn", "peak"}
    x_t, t = built["inputs"]
    assert x_t.shape == (4, 3, TINY.frames, TINY.size, TINY.size) and t.tolist() == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert built["kwargs"]["caption"].shape == (4, TINY.caption_length)
    entered = []

    @contextlib.contextmanager
    def step_context(i):
        entered.append(i)
        yield

    s = built["sample_fn"](built["model"], step_context)
    assert entered == [0, 1, 2, 3] and s.shape == x_t.shape and 0 <= s.min() and s.max() <= 1
    result = si.fidelity(built["model"], *built["inputs"], kwargs=built["kwargs"], sample_fn=built["sample_fn"],
                         sparsities=[0.0, 0.5], backend="eager")
    assert [r["module"] for r in result.site_rows[:TINY.layers]] == [f"blocks.{i}.attn" for i in range(TINY.layers)]
    assert result.row(0.0)["psnr"][0] == math.inf and result.row(0.5)["recall"] < 1


# ---------------------------------------------------------------------------------------------
# Census
# ---------------------------------------------------------------------------------------------
GRID, TILE = (8, 8, 8), (2, 2, 2)  # 64 tiles on a 4x4x4 tile grid


def _tile_index(grid, tile):
    """Tile of each raster token, and its (t, h, w) tile coordinates."""
    T, H, W = grid
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    Mh, Mw = grid[1] // tile[1], grid[2] // tile[2]
    ct, ch, cw = (t // tile[0]).flatten(), (h // tile[1]).flatten(), (w // tile[2]).flatten()
    return (ct * Mh + ch) * Mw + cw, (ct, ch, cw)


def _census(q, k, grid=GRID, tile=TILE):
    stats = ac.tile_mass(q, k, grid, tile)
    return {name: float(v.mean()) for name, v in ac.measures(stats["mass"], stats["same_frame"], grid, tile).items()}


def test_census_planted_local_head():
    index, _ = _tile_index(GRID, TILE)
    q = 30.0 * torch.nn.functional.one_hot(index, 64).float()[None, None]  # keys = queries of the same tile
    m = _census(q, q)
    assert m["local"] == pytest.approx(1, abs=1e-6) and m["top2"] == pytest.approx(1, abs=1e-6)
    assert m["best_1_8"] == pytest.approx(1, abs=1e-6) and m["temporal"] == pytest.approx(0, abs=1e-6)
    assert m["same_frame"] == pytest.approx(0.5, abs=1e-6)  # a tile spans 2 frames, uniform inside it
    assert m["stripe"] < 0.05


def test_census_planted_global_tile_head():
    index, _ = _tile_index(GRID, TILE)
    target = 63  # tile (3, 3, 3)
    q = torch.zeros(1, 1, 512, 64)
    q[..., 0] = 30.0
    k = torch.zeros(1, 1, 512, 64)
    k[0, 0, index == target, 0] = 30.0
    m = _census(q, k)
    assert m["top2"] == pytest.approx(1, abs=1e-6) and m["stripe"] == pytest.approx(1, abs=1e-6)
    assert m["local"] == pytest.approx(8 / 64, abs=1e-6)  # the query tiles whose window holds tile 63
    assert m["temporal"] == pytest.approx(3 / 64, abs=1e-6)  # the tiles (t, 3, 3), t != 3


def test_census_planted_temporal_head():
    _, (_, ch, cw) = _tile_index(GRID, TILE)
    spatial = ch * 4 + cw
    q = 30.0 * torch.nn.functional.one_hot(spatial, 64).float()[None, None]
    m = _census(q, q)  # uniform over the 4 tiles at the same (h, w)
    assert m["temporal"] == pytest.approx(0.75, abs=1e-6)
    assert m["local"] == pytest.approx((2 + 3 + 3 + 2) / 16, abs=1e-6)
    assert m["same_frame"] == pytest.approx(1 / 8, abs=1e-6)


def test_census_uniform_attention_gives_the_counting_shares():
    q = torch.zeros(2, 3, 512, 16)
    m = _census(q, torch.randn(2, 3, 512, 16) * 0)
    assert m["local"] == pytest.approx((2.5 / 4) ** 3) and m["temporal"] == pytest.approx(3 / 64)
    assert m["top2"] == pytest.approx(2 / 64) and m["stripe"] == pytest.approx(2 / 64)
    assert m["best_1_8"] == pytest.approx(8 / 64) and m["best_1_4"] == pytest.approx(16 / 64)
    assert m["same_frame"] == pytest.approx(1 / 8)


@given(case=st.sampled_from([((4, 6, 8), (2, 3, 4)), ((6, 4, 4), (3, 2, 2)), ((2, 4, 6), (1, 2, 3))]),
       seed=st.integers(0, 1000))
def test_tile_mass_matches_a_brute_force_softmax(case, seed):
    grid, tile = case
    N = math.prod(grid)
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 2, N, 8, generator=g, dtype=torch.float64), torch.randn(2, 2, N, 8, generator=g,
                                                                                 dtype=torch.float64)
    index, _ = _tile_index(grid, tile)
    p = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, dim=-1)
    one_hot = torch.nn.functional.one_hot(index).double()
    want = one_hot.T @ p @ one_hot  # [M, M] per (b, h)
    frame = torch.arange(N) // (grid[1] * grid[2])
    same = (frame[:, None] == frame[None]).double()
    want_frame = (p * same).sum((-1, -2))
    for chunk in (1, ac.CHUNK_ELEMENTS):  # one query tile per chunk, and all rows at once
        got = ac.tile_mass(q, k, grid, tile, chunk_elements=chunk)
        assert torch.allclose(got["mass"], want, atol=1e-12) and torch.allclose(got["same_frame"], want_frame)


def test_census_rejects_grids_that_do_not_divide():
    with pytest.raises(ValueError, match="divides by the tile"):
        ac.tile_mass(torch.zeros(1, 1, 60, 4), torch.zeros(1, 1, 60, 4), (3, 4, 5), (2, 2, 2))


def test_census_cli_on_the_untrained_tiny_model(tmp_path, capsys):
    data = ac.main(["--tiny", "--out", str(tmp_path), "--tile", "2,2,2", "--t", "0.2", "0.8", "--clips", "2"])
    assert data["noise_levels"] == [0.2, 0.8] and data["tiles"] == 64 and data["k"]["best_1_8"] == 8
    for t in ("0.2", "0.8"):
        res = data["results"][t]
        assert len(res["layers"]) == TINY.layers and res["cross_attention_calls"] == TINY.layers
        for layer in res["layers"]:
            assert set(layer["heads"]) == set(ac.MEASURES)
            assert all(len(v) == TINY.heads and all(0 <= x <= 1 + 1e-9 for x in v) for v in layer["heads"].values())
            h = layer["heads"]
            assert all(a <= b + 1e-9 for a, b in zip(h["top2"], h["best_1_8"]))
            assert all(a <= b + 1e-9 for a, b in zip(h["best_1_8"], h["best_1_4"]))
    assert json.loads((tmp_path / "census.json").read_text())["summary"].keys() == {"0.2", "0.8"}
    md = (tmp_path / "census.md").read_text()
    assert "## t = 0.2" in md and "| **all** |" in md and md.count("\n| 1 |") == 2 and "## Whole model" in md
    if __import__("importlib").util.find_spec("matplotlib"):
        assert (tmp_path / "census.png").read_bytes()[:8] == PNG
    assert "census of 2 layers x 2 heads x 2 noise levels" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="71 s on CPU (the suite's time budget): runs with CUDA")
def test_sparse_training_option(tmp_path):
    """--attention trains through the backend under a policy (BSA's CumulativeMass + query_keep)."""
    assert tb.parse_attention("dense") == {}
    settings = tb.parse_attention("mass:0.9,qk:0.5")
    assert settings == {"policy": si.CumulativeMass(0.9, 4, 0.5), "query_keep": 0.5}
    with pytest.raises(SystemExit, match="unknown part"):
        tb.parse_attention("window:1")
    with pytest.raises(ValueError, match="query_keep"):
        tb.parse_attention("topk:0.5,qk:2")
    out = tmp_path / "sparse"
    tb.main(["train", "--tiny", "--steps", "2", "--out", str(out), "--attention", "topk:0.5,qk:0.5",
                      "--no-plot"])
    log = json.loads((out / "log.json").read_text())
    assert log["attention"] == "topk:0.5,qk:0.5" and len(log["train_loss"]) == 2
    with pytest.raises(SystemExit, match="differs from the run"):
        tb.main(["train", "--tiny", "--steps", "3", "--out", str(out), "--no-plot"])
