"""benchmarks/quality.py in its tiny CPU mode: every family measured, FLOPs over a sample with
dense warm-up steps counted, the frontier table and plot written, a rerun resumes."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quality():
    spec = importlib.util.spec_from_file_location("quality", os.path.join(ROOT, "benchmarks", "quality.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    quality = _quality()
    quality.main(["--tiny", "--out", str(out)])
    return quality, out


def test_every_family_and_warmup_is_measured(tiny_run):
    quality, out = tiny_run
    data = json.loads((out / "quality.json").read_text())
    assert set(data["families"]) == set(quality.FAMILIES)
    rows = quality.frontier_rows(data)
    n_settings = sum(len(v) for v in data["families"].values())
    assert len(rows) == n_settings * len(quality.WARMUPS)
    for r in rows:
        # The tiny sampler takes 4 steps: w dense steps count in full.
        want = (min(r["warmup"], 4) + max(4 - r["warmup"], 0) * r["kept_step"]) / 4
        assert r["kept_sample"] == pytest.approx(want)
        assert 0 < r["kept_step"] <= 1 and -1 <= r["ssim"] <= 1
    topk = {r["setting"]: r["kept_step"] for r in rows if r["family"] == "topk" and r["warmup"] == 0}
    assert topk["TopK(0.875)"] == pytest.approx(0.125)  # 8 tiles: k = 1, every tile full
    qk = {r["setting"]: r["kept_step"] for r in rows if r["family"] == "query_keep" and r["warmup"] == 0}
    assert qk["TopK(0.5) qk0.5"] == pytest.approx(0.25)  # half the tiles, half the query rows
    big = {r["setting"]: r["kept_step"] for r in rows if r["family"] == "tile_128" and r["warmup"] == 0}
    assert big["TopK(0.75) tile 4x4x8"] == pytest.approx(0.25)  # 4 tiles of 128 tokens: k = 1
    for budget in quality.PLAN_BUDGETS:
        assert (out / f"plan_{budget}.json").exists() and (out / f"plan_per_head_{budget}.json").exists()
    plan_rows = [r for r in rows if r["family"] in ("plan", "plan_per_head") and r["warmup"] == 0]
    assert len(plan_rows) == 2 * len(quality.PLAN_BUDGETS)
    assert all(r["kept_step"] <= float(r["setting"].split()[-1][:-1]) + 1e-9 for r in plan_rows)


def test_frontier_files_and_resume(tiny_run, capsys):
    quality, out = tiny_run
    text = (out / "frontier.md").read_text()
    assert "| topk | TopK(0.875) | 0 |" in text and "FLOPs kept (sample)" in text
    assert (out / "frontier.png").stat().st_size > 1000
    before = (out / "quality.json").read_text()
    quality.main(["--tiny", "--out", str(out), "--families", "topk"])
    assert "topk: already measured" in capsys.readouterr().out
    assert json.loads((out / "quality.json").read_text())["families"] == json.loads(before)["families"]
