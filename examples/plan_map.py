"""Draw one layer of a calibrated plan: each head's kept tiles (query tiles x KV tiles), PNG.

    python examples/plan_map.py benchmarks/quality/plan_0.125.json --site blocks.1.attn --out plan_map.png
    python examples/plan_map.py benchmarks/quality/plan_*.json --census     # heads per mode, per site (markdown)

Static heads (windows, temporal patterns, stripes, unions, Full, Skip) are drawn from their lists on
the plan's grid; a dynamic head (TopK, CumulativeMass) depends on the input, so it is drawn as its
budget (a grey band) with its name. Query tiles and KV tiles are in (t, h, w) order, so a window
shows as a band around the diagonal, a temporal pattern as diagonals one frame apart, a stripe as
columns.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import sparse_inductor  # noqa: E402
from sparse_inductor.layout import tile_layout  # noqa: E402
from sparse_inductor.plan import mode_of  # noqa: E402
from sparse_inductor.policies.base import SelectionContext  # noqa: E402
from sparse_inductor.selection import mask_from_lists  # noqa: E402


def head_masks(plan: sparse_inductor.Plan, site: str, grid=None) -> list:
    """Per head of ``site``: ``(title, bool [M, M] mask or None for a dynamic head, share kept)``."""
    per_head = plan.policy_for(site)
    if per_head is None:
        raise ValueError(f"plan has no site {site!r}; its sites: {', '.join(plan.paths)}")
    grid = tuple(grid or plan.grid or ())
    if len(grid) != 3:
        raise ValueError("the plan records no grid: pass grid=(T, H, W)")
    layout = tile_layout(grid, plan.tile)
    M = layout.num_video_tiles
    ctx = SelectionContext(grid=grid, tile=plan.tile, counts=layout.counts[:M], scale=1.0, batch=1, heads=1,
                           device="cpu")
    out = []
    for h, policy in enumerate(per_head.policies):
        title = f"head {h}: {policy.describe()}"
        if policy.static:
            num, idx = policy.video_lists(ctx)
            mask = mask_from_lists(num.expand(1, 1, M), idx.expand(1, 1, M, idx.shape[-1]), M)[0, 0]
            if sparse_inductor.Skip() == policy:
                mask = torch.zeros(M, M, dtype=torch.bool)
            out.append((title, mask, float(mask.float().mean())))
        else:
            out.append((title, None, policy.width(ctx.tile_grid) / M))
    return out


def draw(plan, site, path, grid=None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = head_masks(plan, site, grid)
    cols = min(4, len(heads))
    rows = math.ceil(len(heads) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, mask, share) in zip(axes.flat, heads):
        ax.axis("on")
        if mask is None:
            ax.imshow([[share]], cmap="Greys", vmin=0, vmax=1, extent=(0, 1, 0, 1))
            ax.text(0.5, 0.5, f"dynamic\n(input-dependent)\n<= {share:.2f} of tiles", ha="center", va="center",
                    fontsize=8)
        else:
            ax.imshow(mask.numpy(), cmap="Blues", interpolation="nearest")
        ax.set_title(f"{title}\n{share:.3f} of tiles", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    modes = ", ".join(sorted({mode_of(p) for p in plan.policy_for(site).policies}))
    fig.suptitle(f"{site}: per-head patterns ({modes}); query tiles (rows) x KV tiles (columns)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _counts(counts: dict) -> str:
    """``{mode: heads}`` as "2 topk, 1 window" (most heads first, then by name)."""
    return ", ".join(f"{n} {mode}" for mode, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def census_table(plans: dict) -> str:
    """Markdown: one row per site, one column per plan (``{label: Plan}``), the heads of each mode
    (Sparse-vDiT's names: window = diagonal, temporal = multi-diagonal, stripe = vertical stripe),
    and a row over all sites."""
    labels = list(plans)
    sites = list(dict.fromkeys(path for plan in plans.values() for path in plan.paths))
    lines = ["| site | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    totals = {label: {} for label in labels}
    for site in sites:
        cells = []
        for label in labels:
            counts = plans[label].census().get(site, {})
            for mode, n in counts.items():
                totals[label][mode] = totals[label].get(mode, 0) + n
            cells.append(_counts(counts))
        lines.append(f"| {site} | " + " | ".join(cells) + " |")
    lines.append("| all | " + " | ".join(_counts(totals[label]) for label in labels) + " |")
    return "\n".join(lines)


def plan_labels(paths: list) -> list:
    """Column labels: each file's name without ``.json``, or the paths as given where two names
    repeat (plans of one name from two runs), so that no plan's column replaces another's."""
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", nargs="+", help="plan JSON(s) written by Plan.save / python -m sparse_inductor "
                                                "calibrate (one to draw; several with --census)")
    parser.add_argument("--census", action="store_true", help="print the heads of each mode per site, per plan")
    parser.add_argument("--site", help="module path (default: the plan's first site)")
    parser.add_argument("--grid", type=int, nargs=3, help="default: the grid the plan was calibrated on")
    parser.add_argument("--out", default="plan_map.png")
    args = parser.parse_args(argv)
    if args.census:
        print(census_table({label: sparse_inductor.Plan.load(p) for label, p in zip(plan_labels(args.plan), args.plan)}))
        return
    if len(args.plan) > 1:
        parser.error("draw one plan at a time (several plans only with --census)")
    plan = sparse_inductor.Plan.load(args.plan[0])
    site = args.site or plan.paths[0]
    print(f"{site}: {plan.policy_for(site).describe() if plan.policy_for(site) else '?'}")
    print("wrote", draw(plan, site, args.out, args.grid))


if __name__ == "__main__":
    main()
