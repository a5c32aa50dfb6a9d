"""Selection policies at the Wan-1.3B 480p attention shape (GPU): time per policy, one process.

Rows (B=1, H=12, grid 21x30x52, D=128, bf16, the same inputs for every row):

* ``dense_sdpa``: ``F.scaled_dot_product_attention`` (default backend).
* per setting, ``op``: ``sparse_attention`` in eager mode, everything one call does (selection,
  query selection, kernels, centre broadcast); the forward is timed as a CUDA-graph replay (GPU
  time, no launch gaps), forward+backward with ``do_bench``; ``kernel``: the attention kernel
  alone on the setting's lists; ``select``: the selection alone (CUDA graph).
* settings: ``TopK(0.875)``; ``CumulativeMass`` at the ``p`` that keeps the same attention FLOPs
  as ``TopK(0.875)`` on these inputs (found by bisection); each with ``query_keep=0.5``; a static pattern near 1/8 (lists as
  constants, no selection: ``Window(1, 2, 2)`` keeps 75 of 624 tiles away from the borders);
  the same pattern with 25 % of the heads skipped.

Each row prints the mean tiles kept per query tile and the FLOPs kept (from the lists).
Writes ``policies.json`` and a markdown table into ``--out-dir`` (default: benchmarks/).

    PYTHONPATH=$PWD python benchmarks/bench_policies.py
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sparse_inductor as si  # noqa: E402
from sparse_inductor.attention import sparse_attention  # noqa: E402
from sparse_inductor.layout import tile_layout  # noqa: E402
from sparse_inductor.policies.base import SelectionContext, static_parts  # noqa: E402
from sparse_inductor.query_keep import select_queries  # noqa: E402
from sparse_inductor.selection import select_tiles  # noqa: E402


def bench(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_graph(fn):
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def mass_p_for(q, k, grid, target: float) -> float:
    """The ``p`` of ``CumulativeMass(p, 1, 0.5)`` whose attention FLOPs kept (from the lists) are
    ``target``: equal work, not an equal number of tiles (the ``ln n_j`` term of the logits
    favours full tiles over partial border tiles, so at equal tile counts it keeps more FLOPs)."""
    lo, hi = 1e-4, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        if si.select_blocks(q, k, grid, policy=si.CumulativeMass(mid, 1, 0.5)).kept_fraction() > target:
            hi = mid
        else:
            lo = mid
    return round((lo + hi) / 2, 5)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, nargs=3, default=[21, 30, 52])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_policies.py needs a CUDA GPU")
    import triton

    grid, H, B, D, dtype = tuple(args.grid), args.heads, 1, 128, torch.bfloat16
    N = math.prod(grid)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    layout = tile_layout(grid, (4, 4, 4), "cuda")
    M = layout.num_video_tiles
    scale = D ** -0.5
    p = mass_p_for(q, k, grid, si.select_blocks(q, k, grid, sparsity=0.875).kept_fraction())
    window = si.Window(1, 2, 2)
    skip_quarter = si.PerHead([si.Skip() if h % 4 == 3 else window for h in range(H)])
    settings = [("TopK(0.875)", si.TopK(0.875), 1.0), (f"CumulativeMass({p})", si.CumulativeMass(p, 1, 0.5), 1.0),
                ("TopK(0.875) qk0.5", si.TopK(0.875), 0.5), (f"CumulativeMass({p}) qk0.5", si.CumulativeMass(p, 1, 0.5), 0.5),
                ("Window(1,2,2) static", window, 1.0), ("Window(1,2,2) 25% heads skipped", skip_quarter, 1.0),
                ("Window(1,2,2) static qk0.5", window, 0.5)]
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.date.today().isoformat(), grid=list(grid), heads=H, D=D, dtype="bfloat16")
    rows = []

    def record(setting, impl, pass_, ms, **extra):
        rows.append(dict(setting=setting, impl=impl, **{"pass": pass_}, ms=ms, **extra))
        print(f"{setting:36s} {impl:8s} {pass_:8s} {ms if ms is None else round(ms, 3)} ms "
              + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()), flush=True)

    def timed(setting, impl, pass_, fn, graph=False, **extra):
        try:
            ms = bench_graph(fn) if graph else bench(fn)
        except Exception as e:  # report, never hide
            print(f"[{setting}] {impl} {pass_} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            traceback.print_exc(limit=3)
            ms = None
        record(setting, impl, pass_, ms, **extra)
        return ms

    leaf = [x.detach().requires_grad_() for x in (q, k, v)]
    with torch.no_grad():
        timed("dense", "sdpa", "fwd", lambda: F.scaled_dot_product_attention(q, k, v))

    def sdpa_fb():
        out = F.scaled_dot_product_attention(*leaf)
        torch.autograd.grad(out, leaf, grad)

    timed("dense", "sdpa", "fwd+bwd", sdpa_fb)
    B_, H_ = q.shape[:2]
    slots, counts = layout.slots.expand(B_, -1), layout.counts.expand(B_, -1)
    for name, policy, query_keep in settings:
        static_lists = None
        if policy.static:
            ctx = SelectionContext(grid=grid, tile=(4, 4, 4), counts=layout.counts[:M], scale=1.0, batch=1, heads=H,
                                   device="cuda")
            static_lists = {part: part.video_lists(ctx) for part in static_parts(policy)}
        sel = si.select_blocks(q, k, grid, policy=policy, query_keep=query_keep)
        info = dict(tiles_mean=float(sel.kv_num_blocks.float().mean()), kept=sel.kept_fraction(),
                    tiles_max=int(sel.kv_num_blocks.max()), num_tiles=M)

        def op(q, k, v, policy=policy, query_keep=query_keep, static_lists=static_lists):
            return sparse_attention(q, k, v, grid, tile=(4, 4, 4), policy=policy, query_keep=query_keep,
                                    layout=layout, static_lists=static_lists)

        with torch.no_grad():
            timed(name, "op", "fwd", lambda: op(q, k, v), graph=True, **info)

        def op_fb():
            out = op(*leaf)
            torch.autograd.grad(out, leaf, grad)

        timed(name, "op", "fwd+bwd", op_fb, **info)
        with torch.no_grad():
            num, idx = select_tiles(q, k, layout, policy, scale, static_lists=static_lists)
            if query_keep < 1.0:
                keep = select_queries(q, layout, query_keep)
                q_slots, q_counts = keep.q_slots, keep.q_counts
                num, idx = keep.query_lists(num, idx)
            else:
                q_slots, q_counts = layout.slots.expand(B_, H_, -1), layout.counts.expand(B_, H_, -1)
            timed(name, "kernel", "fwd", lambda: torch.ops.sparse_inductor.block_sparse_attn_fwd(
                q, k, v, q_slots, slots, q_counts, counts, num, idx, scale), graph=True, **info)
            if not policy.static:
                timed(name, "select", "fwd", lambda: select_tiles(q, k, layout, policy, scale), graph=True)
            if query_keep < 1.0:
                timed(name, "select_q", "fwd", lambda: select_queries(q, layout, query_keep), graph=True)

    dense = {r["pass"]: r["ms"] for r in rows if r["setting"] == "dense"}
    base = {(r["impl"], r["pass"]): r["ms"] for r in rows if r["setting"] == "TopK(0.875)"}
    lines = [f"Device: {meta['device']}; torch {meta['torch']}; triton {meta['triton']}; {meta['date']}. "
             f"B=1, H={H}, grid {grid}, D=128, bf16. Forward rows are CUDA-graph GPU time; fwd+bwd `do_bench`.",
             "", "| setting | impl | pass | ms | vs dense | vs TopK(0.875) | tiles kept mean (max) of M | FLOPs kept |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["ms"]
        vs_dense = f"{dense[r['pass']] / ms:.2f}x" if ms and dense.get(r["pass"]) and r["impl"] in ("op", "kernel") \
            else ""
        ref = base.get((r["impl"], r["pass"]))
        vs_topk = f"{ref / ms:.2f}x" if ms and ref and r["setting"] != "dense" else ""
        tiles = f"{r['tiles_mean']:.1f} ({r['tiles_max']}) of {r['num_tiles']}" if "tiles_mean" in r else ""
        kept = f"{r['kept']:.4f}" if "kept" in r else ""
        lines.append(f"| {r['setting']} | {r['impl']} | {r['pass']} | {'failed' if ms is None else f'{ms:.3f}'} | "
                     f"{vs_dense} | {vs_topk} | {tiles} | {kept} |")
    table = "\n".join(lines)
    print("\n" + table)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "policies.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out_dir, "policies.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
