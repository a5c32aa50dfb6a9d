"""The compiled path's forward+backward under each ``dq_mode`` of the TMA backward (v22) against dense
SDPA, one process, same inputs (GPU). The op reads ``$SPARSE_INDUCTOR_BACKWARD_DQ`` at run time, so
one compiled function is timed under every mode.

    PYTHONPATH=$PWD python benchmarks/bench_dq_modes_compiled.py                 # Wan-1.3B 480p
    PYTHONPATH=$PWD python benchmarks/bench_dq_modes_compiled.py --grid 20 32 52
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernel_templates.tma_block_sparse_bwd import DQ_MODE_ENV, DQ_MODES  # noqa: E402
from sparse_inductor.attention import sparse_attention  # noqa: E402
from sparse_inductor.layout import tile_layout  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, nargs=3, default=(21, 30, 52))
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--sparsity", type=float, default=0.875)
    parser.add_argument("--modes", nargs="*", default=list(DQ_MODES), choices=DQ_MODES)
    args = parser.parse_args()
    grid, H, D = tuple(args.grid), args.heads, 128
    N = math.prod(grid)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    leaf = [t.detach().requires_grad_() for t in (q, k, v)]
    layout = tile_layout(grid, (4, 4, 4), "cuda")
    sparse = torch.compile(lambda q, k, v: sparse_attention(q, k, v, grid, sparsity=args.sparsity, tile=(4, 4, 4),
                                                            layout=layout), fullgraph=True)

    def step(fn):
        return lambda: torch.autograd.grad(fn(*leaf), leaf, grad)

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    dense = bench(step(F.scaled_dot_product_attention))
    print(f"device {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}")
    print(f"grid {grid}, H={H}, D={D}, bf16, TopK({args.sparsity}): dense SDPA fwd+bwd {dense:.3f} ms")
    grads = {}
    for mode in args.modes:
        os.environ[DQ_MODE_ENV] = mode
        try:
            grads[mode] = step(sparse)()
            ms = bench(step(sparse))
        except Exception as e:  # report, never hide
            print(f"  {mode:<10} failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        err = ""
        if mode != args.modes[0] and args.modes[0] in grads:
            rel = [((a.float() - b.float()).norm() / b.float().norm()).item()
                   for a, b in zip(grads[mode], grads[args.modes[0]])]
            err = f"; rel L2 vs {args.modes[0]}: dq {rel[0]:.1e} dk {rel[1]:.1e} dv {rel[2]:.1e}"
        print(f"  {mode:<10} compiled fwd+bwd {ms:.3f} ms, {dense / ms:.2f}x dense{err}")
    os.environ.pop(DQ_MODE_ENV, None)


if __name__ == "__main__":
    main()
