"""query_keep under torch.compile (the backend's path) at Wan-1.3B 480p: compiled vs eager, fwd and fwd+bwd.

``bench_policies.py`` times the eager op, whose centre broadcast runs as separate torch ops; under the
backend Inductor compiles that glue with the rest of the graph. On Hopper every query_keep runs the
compact TMA kernels (v23: the kept rows in a layout of their own; before, query_keep < 1 ran the gather
templates, autotuned). One process, the same inputs for every row (B=1, H=12, grid 21x30x52, D=128,
bf16, TopK(0.875)); prints each row's time, its ratio to query_keep 1 of the same path, and the seconds
since the start. The compiled rows come first (all keeps), then the eager ones, so a cut keeps them.

    PYTHONPATH=$PWD python benchmarks/bench_query_keep_compiled.py [--keeps 1 0.75 0.5] [--paths compiled]
        [--tile 4 4 8] [--passes fwd]

``--tile 4 4 8``: 128-token tiles; their forward runs the TMA kernel in 64-row KV steps (v25), their
backward the TMA kernels on 64-slot halves (v26). Each compiled forward is checked against the eager
gather path (relative L2 printed).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sparse_inductor as si
from sparse_inductor.attention import sparse_attention
from sparse_inductor.layout import tile_layout


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.75, 0.5])
    parser.add_argument("--grid", type=int, nargs=3, default=[21, 30, 52])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--paths", nargs="+", default=["compiled", "eager"], choices=["compiled", "eager"])
    parser.add_argument("--tile", type=int, nargs=3, default=[4, 4, 4])
    parser.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    args = parser.parse_args()
    start = time.perf_counter()
    import triton.testing

    grid, H, D = tuple(args.grid), args.heads, 128
    N = math.prod(grid)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    tile = tuple(args.tile)
    layout = tile_layout(grid, tile, "cuda")
    leaf = [t.detach().requires_grad_() for t in (q, k, v)]
    print(f"device {torch.cuda.get_device_name()}; torch {torch.__version__}; grid {grid}, H={H}, D={D}, bf16, "
          f"TopK(0.875), tile {tile}", flush=True)
    times = {}
    for path in args.paths:
        for keep in args.keeps:
            # A fresh Dynamo per keep: otherwise the second keep recompiles the lambda with query_keep as a
            # dynamic float, whose graph computes the kept layout's tables per call (267 launches at 480p;
            # NOTES, eighth session) -- a real case (a query_keep ramp), timed by host_overhead_qk.py.
            torch.compiler.reset()
            def eager(q, k, v, keep=keep):
                return sparse_attention(q, k, v, grid, tile=tile, policy=si.TopK(0.875), query_keep=keep,
                                        layout=layout)

            fn = torch.compile(eager, fullgraph=True) if path == "compiled" else eager

            def fwd(fn=fn):
                with torch.no_grad():
                    fn(q, k, v)

            def fwd_bwd(fn=fn):
                torch.autograd.grad(fn(*leaf), leaf, grad)

            if path == "compiled" and "fwd" in args.passes:
                with torch.no_grad():
                    want = sparse_attention(q, k, v, grid, tile=tile, policy=si.TopK(0.875), query_keep=keep,
                                            layout=layout, forward_kernel="gather").float()
                    err = (fn(q, k, v).float() - want).norm() / want.norm()
                print(f"query_keep {keep} compiled fwd vs eager gather path: relative L2 {err.item():.2e}", flush=True)
            for pass_, f in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                if pass_ not in args.passes:
                    continue
                try:
                    f()  # compile (and autotune) outside the timing
                    ms = triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
                except Exception as e:  # noqa: BLE001 -- report, never hide: the other rows still run
                    print(f"query_keep {keep} {path} {pass_}: failed ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:200]})", flush=True)
                    continue
                times[(keep, path, pass_)] = ms
                base = times.get((1.0, path, pass_))
                ratio = f"  {base / ms:.2f}x of query_keep 1" if base and keep != 1.0 else ""
                print(f"query_keep {keep:<5} {path:9s} {pass_:8s} {ms:8.3f} ms{ratio}  "
                      f"[{time.perf_counter() - start:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
