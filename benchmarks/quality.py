"""The quality frontier of every selection policy on the testbed DiT (issue 17): sample PSNR and
SSIM against dense sampling vs the attention FLOPs actually kept.

    python benchmarks/quality.py --checkpoint runs/testbed --out benchmarks/quality   # GPU
    python benchmarks/quality.py --tiny --out /tmp/q                                  # CPU, seconds

For each policy family (``--families``, default all) it runs :func:`sparse_inductor.fidelity`
on the checkpoint of ``examples/testbed_dit.py`` (4 validation clips noised at t = 0.2 .. 0.8
for the site measures; a 20-step Euler sample of 4 captions from fixed noise, dense vs sparse,
same seed and noise) with the sparse sites' SDPA calls replaced by the eager op
(``backend="eager"``: the same arithmetic as the compiled backend, no compilation per setting):

- ``topk``: ``TopK`` at sparsities 0.5, 0.75, 0.875, 0.9375;
- ``mass``: ``CumulativeMass(p, min_tiles=4, max_fraction=0.5)`` at p = 0.3, 0.5, 0.7, 0.85, 0.95;
- ``query_keep``: ``query_keep=0.5`` on TopK(0.5), TopK(0.75) and CumulativeMass(0.85);
- ``query_ratio``: other splits of the same FLOPs between query and KV sparsity (the frontier of
  2026-12-01 found TopK(0.75) + query_keep 0.5 above TopK(0.875) at 1/8): query_keep 0.25 and
  0.75 on TopK at about 1/8 and 1/4 of the FLOPs;
- ``plan``: plans from :func:`sparse_inductor.calibrate` at mean budgets 1/8, 1/4 and 1/2
  (static patterns and per-head TopK), calibrated on other clips and another sample (another
  seed) than the ones measured, every denoising step included; the plan files are written next
  to the results;
- ``plan_per_head``: the same with ``allocation="per_head"`` (every head keeps at most the
  budget, as TopK spreads it), written as ``plan_per_head_<budget>.json``;
- ``tile_128``: TopK at the same sparsities with tiles of 128 tokens, (4, 4, 8): the quality side of
  issue 22's trade-off (128-row query blocks ran 1.16x faster than 64-row ones in a TMA probe).

Every setting is measured with 0, 2 and 4 of the 20 denoising steps dense. FLOPs kept are from
the lists (computed query-key pairs over dense pairs, query_keep's dropped rows excluded), per
step and over the whole sample (dense warm-up steps count in full). Results go to
``OUT/quality.json`` after each family (a rerun skips the families already there: resumable),
``OUT/frontier.md`` (device, versions, date, one row per setting and warm-up) and
``OUT/frontier.png`` (PSNR vs FLOPs kept over the sample, one curve per family and warm-up).
Deterministic: fixed seeds for data, noise and calibration clips.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "examples")):
    if path not in sys.path:
        sys.path.insert(0, path)
import sparse_inductor as si  # noqa: E402

FAMILIES = ("topk", "mass", "query_keep", "query_ratio", "plan", "plan_per_head", "tile_128")
WARMUPS = (0, 2, 4)
PLAN_BUDGETS = (0.125, 0.25, 0.5)
#: The seed of the calibration clips: not the seed the measured clips come from.
CALIBRATION_SEED = 12345


def family_settings(family: str, plans: dict) -> list:
    """``[(label, sparsity() keywords), ...]`` of one family."""
    if family == "topk":
        return [(f"TopK({s})", {"sparsity": s}) for s in (0.5, 0.75, 0.875, 0.9375)]
    if family == "mass":  # BSA's floor of 4 tiles (with 1 the sparse steps drew clearly worse samples)
        return [(f"CumulativeMass({p})", {"policy": si.CumulativeMass(p, min_tiles=4, max_fraction=0.5)})
                for p in (0.3, 0.5, 0.7, 0.85, 0.95)]
    if family == "query_keep":
        return [("TopK(0.5) qk0.5", {"sparsity": 0.5, "query_keep": 0.5}),
                ("TopK(0.75) qk0.5", {"sparsity": 0.75, "query_keep": 0.5}),
                ("CumulativeMass(0.85) qk0.5", {"policy": si.CumulativeMass(0.85, 4, 0.5), "query_keep": 0.5})]
    if family == "query_ratio":  # (KV sparsity, query_keep): kept FLOPs ~ (1 - s) * r
        return [(f"TopK({s}) qk{r}", {"sparsity": s, "query_keep": r})
                for s, r in ((0.5, 0.25), (0.8333, 0.75), (0.125, 0.25), (0.6667, 0.75))]
    if family == "tile_128":  # 128-token tiles: what issue 22's faster 128-row blocks would cost in quality
        return [(f"TopK({s}) tile 4x4x8", {"sparsity": s, "tile": (4, 4, 8)}) for s in (0.5, 0.75, 0.875, 0.9375)]
    if family == "plan":
        return [(f"plan(budget {b})", {"plan": plans[("global", b)]}) for b in PLAN_BUDGETS]
    if family == "plan_per_head":
        return [(f"plan per head(budget {b})", {"plan": plans[("per_head", b)]}) for b in PLAN_BUDGETS]
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


def calibrate_plans(built, cfg, device, dtype, out, tiny: bool, allocation: str = "global") -> dict:
    """Plans at each budget from the calibration clips, keyed ``(allocation, budget)``; written to
    ``OUT/plan_<budget>.json`` (``plan_per_head_<budget>.json``)."""
    import testbed_dit

    x_t, t, caption = testbed_dit.eval_inputs(cfg, CALIBRATION_SEED, device, dtype)
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(CALIBRATION_SEED)).to(device, dtype)
    steps = 4 if tiny else 20

    def calibration_sample(model, step_context):  # every denoising step of a sample is measured too
        return testbed_dit.sample(model, noise, caption, steps, step_context)

    plans = {}
    for budget in PLAN_BUDGETS:
        result = si.calibrate(built["model"], x_t, t, kwargs={"caption": caption}, budget=budget, min_tokens=0,
                              sample_fn=calibration_sample, dynamic=True, progress=not tiny, allocation=allocation)
        print(result)
        prefix = "plan_" if allocation == "global" else f"plan_{allocation}_"
        result.plan.save(os.path.join(out, f"{prefix}{budget}.json"))
        plans[(allocation, budget)] = result.plan
    return plans


def run(args) -> dict:
    import testbed_dit

    os.makedirs(args.out, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.tiny:
        checkpoint = args.checkpoint or os.path.join(args.out, "tiny_model")
        if not os.path.exists(os.path.join(checkpoint, "weights.pt")):
            testbed_dit.main(["train", "--tiny", "--steps", "4", "--out", checkpoint])
    else:
        checkpoint = args.checkpoint
    built = testbed_dit.setup(checkpoint=checkpoint, device=device, dtype=dtype)
    _, cfg, meta = testbed_dit.load_model(checkpoint, "cpu")
    path = os.path.join(args.out, "quality.json")
    data = json.load(open(path)) if os.path.exists(path) else {}
    data["meta"] = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                        date=datetime.date.today().isoformat(), checkpoint_step=meta.get("step"),
                        grid=list(cfg.grid), layers=cfg.layers, heads=cfg.heads, dtype=str(dtype))
    families = data.setdefault("families", {})
    plans = {}
    for family in args.families:
        if family in families and not args.force:
            print(f"[quality] {family}: already measured (use --force to redo)")
            continue
        allocation = {"plan": "global", "plan_per_head": "per_head"}.get(family)
        if allocation is not None:
            plans.update(calibrate_plans(built, cfg, device, dtype, args.out, args.tiny, allocation))
        t0 = time.perf_counter()
        result = si.fidelity(built["model"], *built["inputs"], kwargs=built.get("kwargs"),
                             settings=family_settings(family, plans), warmup_steps=list(WARMUPS),
                             sample_fn=built["sample_fn"], backend="eager", min_tokens=0, peak=built["peak"])
        print(f"[quality] {family}: {time.perf_counter() - t0:.1f} s\n{result.table()}", flush=True)
        families[family] = result.to_dict()["rows"]
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
    write_frontier(data, args.out)
    return data


def frontier_rows(data) -> list:
    rows = []
    for family, family_rows in data["families"].items():
        for r in family_rows:
            for w in map(str, WARMUPS):
                if w not in r["psnr"]:
                    continue
                rows.append(dict(family=family, setting=r["setting"], warmup=int(w), kept_step=r["kept"],
                                 kept_sample=r["kept_sampling"][w], psnr=r["psnr"][w], ssim=r["ssim"][w],
                                 rel_l2=r["rel_l2"], recall=r["recall"]))
    return rows


def write_frontier(data, out) -> None:
    m = data["meta"]
    lines = ["# Quality frontier on the testbed DiT", "",
             f"Device {m['device']}; torch {m['torch']}; {m['date']}; checkpoint step {m['checkpoint_step']}; "
             f"grid {m['grid']}, {m['layers']} layers x {m['heads']} heads, {m['dtype']}. "
             "PSNR / SSIM of a 20-step sample (4 clips) against the dense sample with the same noise; FLOPs kept "
             "from the lists (per sparse step, and over the whole sample with the dense warm-up steps); output "
             "rel-L2 and recall on the site inputs. Made by `python benchmarks/quality.py`.", "",
             "| family | setting | dense warm-up steps | FLOPs kept (sample) | FLOPs kept (sparse step) | PSNR dB | SSIM "
             "| output rel-L2 | recall |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(frontier_rows(data), key=lambda r: (r["family"], r["warmup"], r["kept_sample"])):
        psnr = "inf" if math.isinf(r["psnr"]) else f"{r['psnr']:.2f}"
        lines.append(f"| {r['family']} | {r['setting']} | {r['warmup']} | {r['kept_sample']:.3f} | "
                     f"{r['kept_step']:.3f} | {psnr} | {r['ssim']:.4f} | {r['rel_l2']:.3e} | {r['recall']:.4f} |")
    with open(os.path.join(out, "frontier.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {0: "-", 2: "--", 4: ":"}  # line style: dense warm-up steps; colour: policy family
    colors = dict(zip(FAMILIES, ("tab:blue", "tab:red", "tab:green", "tab:olive", "tab:purple", "tab:brown",
                                 "tab:cyan")))
    for family in data["families"]:
        for w in WARMUPS:
            pts = sorted((r["kept_sample"], r["psnr"]) for r in frontier_rows(data)
                         if r["family"] == family and r["warmup"] == w and math.isfinite(r["psnr"]))
            if pts:
                ax.plot(*zip(*pts), styles[w], color=colors.get(family), marker="o", markersize=3,
                        label=f"{family}" + (f" (dense first {w} of 20)" if w else ""))
    ax.set_xlabel("attention FLOPs kept over the sample (from the lists)")
    ax.set_ylabel("PSNR vs dense sample (dB)")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"testbed DiT quality frontier ({m['device']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"), dpi=90)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a directory (or weights.pt) written by examples/testbed_dit.py")
    parser.add_argument("--out", required=True)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--tiny", action="store_true", help="an (almost untrained) tiny testbed on CPU")
    parser.add_argument("--force", action="store_true", help="measure families already in quality.json again")
    args = parser.parse_args(argv)
    if not args.tiny and not args.checkpoint:
        parser.error("--checkpoint is required (or --tiny)")
    run(args)


if __name__ == "__main__":
    main()
