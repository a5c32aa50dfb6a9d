"""Sparsity sweep on a trained model: attention-mass recall, output rel-L2 and sample PSNR
against dense, for several tile shapes, with and without a dense warm-up of the first sampling
steps. Tables (markdown), JSON and a PNG go to --out.

    python examples/train_tiny_video_dit.py --variants dense --out runs/a      # the model
    python examples/fidelity_sweep.py --checkpoint runs/a/dense.pt --out runs/a/sweep
    python examples/fidelity_sweep.py --checkpoint runs/a/dense.pt --out runs/a/sweep --compiled-check
    python examples/fidelity_sweep.py --replot runs/a/sweep/fidelity.json --out docs   # PNG only

The sweep replaces the attention sites by the eager op (``backend="eager"``: no compilation,
the same semantics); ``--compiled-check`` repeats sparsity 0.875 with the default tile through
``torch.compile(backend="sparse_inductor")`` and prints both, so the table can be trusted for
the compiled path too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_tiny_video_dit import ROOT, fidelity_setup  # noqa: E402

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import sparse_inductor  # noqa: E402
from sparse_inductor.__main__ import parse_tile  # noqa: E402


def plot(rows, path):
    """Recall, output rel-L2 and sample PSNR against sparsity, one line per tile (and warm-up);
    ``rows`` as in ``FidelityResult.to_dict()["rows"]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    tiles = sorted({tuple(r["tile"]) for r in rows}, key=lambda t: (t != (4, 4, 4), t))
    warmups = sorted({int(w) for r in rows for w in r["psnr"]})
    for tile in tiles:
        mine = sorted((r for r in rows if tuple(r["tile"]) == tile), key=lambda r: r["sparsity"])
        xs = [r["sparsity"] for r in mine]
        axes[0].plot(xs, [r["recall"] for r in mine], marker="o", label=f"tile {tile}")
        axes[1].plot(xs, [r["rel_l2"] for r in mine], marker="o", label=f"tile {tile}")
        for w in warmups:
            ys = [min(r["psnr"][str(w)], 60.0) for r in mine]  # inf (identical) drawn at 60 dB
            axes[2].plot(xs, ys, marker="o", linestyle="-" if w == 0 else "--",
                         label=f"tile {tile}" + (f", first {w} steps dense" if w else ""))
    axes[0].axhline(0.9, color="grey", linewidth=0.8, linestyle=":")
    axes[2].axhline(25, color="grey", linewidth=0.8, linestyle=":")
    for ax, title in zip(axes, ("attention-mass recall", "output rel-L2 vs dense", "sample PSNR vs dense (dB)")):
        ax.set_xlabel("sparsity")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a <variant>.pt of examples/train_tiny_video_dit.py")
    parser.add_argument("--out", required=True)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.875, 0.9375])
    parser.add_argument("--tiles", type=parse_tile, nargs="+", default=[(4, 4, 4), (2, 4, 8), (1, 8, 8)])
    parser.add_argument("--warmup", type=int, nargs="+", default=[0, 4],
                        help="dense first sampling steps (of 20) to compare")
    parser.add_argument("--bf16", action="store_true", help="model and inputs in bfloat16 (default float32)")
    parser.add_argument("--compiled-check", action="store_true",
                        help="repeat sparsity 0.875, tile (4, 4, 4) with backend='sparse_inductor'")
    parser.add_argument("--device", default=None)
    parser.add_argument("--replot", metavar="JSON", help="no sweep: draw the PNG of an earlier fidelity.json")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f)["sweep"]["rows"], os.path.join(args.out, "fidelity_sweep.png"))
        print(f"wrote {args.out}/fidelity_sweep.png")
        return
    if not args.checkpoint:
        parser.error("--checkpoint is required (or --replot)")
    setup = fidelity_setup(args.checkpoint, device=args.device, dtype=torch.bfloat16 if args.bf16 else None)
    device = setup["inputs"][0].device
    print(f"checkpoint {args.checkpoint}, device {device}, inputs {list(setup['inputs'][0].shape)} "
          f"{setup['inputs'][0].dtype}, torch {torch.__version__}")
    common = dict(sample_fn=setup["sample_fn"], peak=setup["peak"])
    start = time.perf_counter()
    result = sparse_inductor.fidelity(setup["model"], *setup["inputs"], sparsities=args.sparsities, tiles=args.tiles,
                                      warmup_steps=args.warmup, backend="eager", **common)
    print(f"sweep (eager op): {time.perf_counter() - start:.1f} s\n")
    print(result)
    summary = {"checkpoint": args.checkpoint, "device": str(device), "torch": torch.__version__,
               "dtype": str(setup["inputs"][0].dtype), "sweep": result.to_dict()}
    markdown = ["## Sweep (eager op)", "", result.table(), "", "Per site:", "", result.site_table()]
    if args.compiled_check:
        start = time.perf_counter()
        compiled = sparse_inductor.fidelity(setup["model"], *setup["inputs"], sparsities=[0.875],
                                            tiles=[(4, 4, 4)], warmup_steps=[0], backend="sparse_inductor", **common)
        seconds = time.perf_counter() - start
        eager_row, compiled_row = result.row(0.875), compiled.row(0.875)
        print(f"\ncompiled check (backend='sparse_inductor', two variants compiled): {seconds:.1f} s")
        print(compiled.table())
        line = (f"sparsity 0.875, tile (4, 4, 4): output rel-L2 eager {eager_row['rel_l2']:.4e} / compiled "
                f"{compiled_row['rel_l2']:.4e}; PSNR eager {eager_row['psnr'].get(0, float('nan')):.2f} / compiled "
                f"{compiled_row['psnr'][0]:.2f} dB; compile + run {seconds:.0f} s")
        print(line)
        summary["compiled_check"] = compiled.to_dict()
        markdown += ["", "## Compiled check (backend='sparse_inductor')", "", compiled.table(), "", line]
    with open(os.path.join(args.out, "fidelity.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.out, "fidelity.md"), "w") as f:
        f.write("\n".join(markdown) + "\n")
    try:
        plot(result.to_dict()["rows"], os.path.join(args.out, "fidelity_sweep.png"))
    except ImportError:
        print("matplotlib not installed: no plot")
    print(f"\nwrote {args.out}/fidelity.json, fidelity.md, fidelity_sweep.png")


if __name__ == "__main__":
    main()
