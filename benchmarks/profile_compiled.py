"""Profile the compiled path (what the backend runs) at Wan-1.3B 480p: CUDA time per kernel of one
forward and of one forward+backward of ``sparse_attention`` under ``torch.compile`` (B=1, H=12,
D=128, bf16, TopK(0.875)), to split the compiled forward into selection, layout gathers and the
attention kernel (issue 22: selection <= 4 % of the compiled forward).

    PYTHONPATH=$PWD python benchmarks/profile_compiled.py            # GPU, ~60 s with compiles
    PYTHONPATH=$PWD python benchmarks/profile_compiled.py --grid 21 45 80 --heads 40
    PYTHONPATH=$PWD python benchmarks/profile_compiled.py --query-keep 0.5      # v23: the kept-layout path
    PYTHONPATH=$PWD python benchmarks/profile_compiled.py --tile 4 4 8          # v25 / v26: 128-token tiles
    PYTHONPATH=$PWD python benchmarks/profile_compiled.py --unfused             # v28's A/B: the pool as its own pass
"""
import argparse
import math
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparse_inductor.attention import sparse_attention  # noqa: E402
from sparse_inductor.layout import tile_layout  # noqa: E402


def table(prof, reps, title, top=20):
    rows = sorted(((e.key, e.device_time_total / reps / 1e3, e.count // reps) for e in prof.key_averages()
                   if e.device_time_total > 0), key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    print(f"==== {title}: CUDA time per kernel, mean over {reps} calls (total {total:.3f} ms)")
    for name, ms, n in rows[:top]:
        print(f"{ms:8.3f} ms {100 * ms / total:5.1f} %  x{n:<3d} {name[:100]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, nargs=3, default=(21, 30, 52))
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--sparsity", type=float, default=0.875)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--query-keep", type=float, default=1.0)
    parser.add_argument("--tile", type=int, nargs=3, default=(4, 4, 4))
    parser.add_argument("--unfused", action="store_true",
                        help="separate Q/K permutation and pool passes (v28's A/B; the pool keeps v28's warps)")
    args = parser.parse_args()
    if args.unfused:
        from sparse_inductor import attention

        attention.POOL_IN_PERMUTATION = False
    grid, H, D = tuple(args.grid), args.heads, 128
    N = math.prod(grid)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    tile = tuple(args.tile)
    layout = tile_layout(grid, tile, "cuda")
    fn = torch.compile(lambda q, k, v: sparse_attention(q, k, v, grid, sparsity=args.sparsity, tile=tile,
                                                        query_keep=args.query_keep, layout=layout), fullgraph=True)
    leaf = [t.detach().requires_grad_() for t in (q, k, v)]

    def forward():
        with torch.no_grad():
            fn(q, k, v)

    def train_step():
        torch.autograd.grad(fn(*leaf), leaf, grad)

    for title, step in (("compiled forward", forward), ("compiled forward+backward", train_step)):
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.reps):
                step()
            torch.cuda.synchronize()
        table(prof, args.reps, f"{title}, grid {grid}, tile {tile}, H={H}, query_keep {args.query_keep}")


if __name__ == "__main__":
    main()
