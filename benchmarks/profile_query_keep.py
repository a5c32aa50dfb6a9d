"""Profile one fwd+bwd of `sparse_attention` at Wan-1.3B 480p (B=1, H=12, D=128, bf16, TopK(0.875)) for
query_keep 1 and 0.5: CUDA time per kernel (torch.profiler), to split the op into kernels and torch glue.

    PYTHONPATH=$PWD python benchmarks/profile_query_keep.py   # GPU, ~15 s
"""
import math
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sparse_inductor as si
from sparse_inductor.attention import sparse_attention
from sparse_inductor.layout import tile_layout

grid, H, D = (21, 30, 52), 12, 128
N = math.prod(grid)
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v, grad = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
layout = tile_layout(grid, (4, 4, 4), "cuda")
leaf = [t.detach().requires_grad_() for t in (q, k, v)]
for qk in (1.0, 0.5):
    def step(qk=qk):
        out = sparse_attention(*leaf, grid, tile=(4, 4, 4), policy=si.TopK(0.875), query_keep=qk, layout=layout)
        torch.autograd.grad(out, leaf, grad)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"==== query_keep {qk}: CUDA time per kernel, mean over 5 fwd+bwd")
    rows = sorted(((e.key, e.device_time_total / 5 / 1e3, e.count // 5) for e in prof.key_averages()), key=lambda r: -r[1])
    tot = sum(r[1] for r in rows)
    for name, ms, n in rows[:18]:
        print(f"{ms:8.3f} ms  x{n:<3d} {name[:110]}")
    print(f"{tot:8.3f} ms  total")
