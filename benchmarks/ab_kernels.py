"""A/B of the attention kernels in one process (GPU): the v11 kernels (commit 7fc74e7, kept in
``benchmarks/variants/``) against the current ones, on the same 480p inputs and lists, timed with
``do_bench`` and as CUDA-graph replays, interleaved (A B A B) so drift shows as A/A spread.

    PYTHONPATH=$PWD python benchmarks/ab_kernels.py
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sparse_inductor as si  # noqa: E402
from sparse_inductor import triton_launch  # noqa: E402
from sparse_inductor.layout import tile_layout  # noqa: E402
from sparse_inductor.ops import transpose_block_lists  # noqa: E402


def load_v11():
    path = os.path.join(ROOT, "benchmarks", "variants", "v11_block_sparse_attention.py")
    spec = importlib.util.spec_from_file_location("v11_block_sparse_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def s3(t):
    return t.stride(0), t.stride(1), t.stride(2)


def main():
    import triton.testing

    v11 = load_v11()
    grid, B, H, D = (21, 30, 52), 1, 12, 128
    N = math.prod(grid)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    layout = tile_layout(grid, (4, 4, 4), "cuda")
    sel = si.select_blocks(q, k, grid, sparsity=0.875)
    num, idx = sel.kv_num_blocks, sel.kv_indices
    M = layout.num_tiles
    scale = D ** -0.5
    slots, counts = layout.slots.expand(B, -1), layout.counts.expand(B, -1)
    q_slots, q_counts = layout.slots.expand(B, H, -1), layout.counts.expand(B, H, -1)
    out, lse = torch.empty_like(q), torch.empty(B, H, N, device="cuda")
    q_num, q_idx = transpose_block_lists(num, idx, M)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    cfg = triton_launch.default_config(64, D)

    def old_fwd():
        v11.block_sparse_attn_fwd_kernel[(M, B * H)](
            q, k, v, out, lse, slots, slots, counts, counts, num, idx, scale, H, N, M, M, idx.shape[-1], D,
            slots.stride(0), slots.stride(0), counts.stride(0), counts.stride(0), *s3(q), *s3(k), *s3(v), *s3(out),
            BLOCK=64, BLOCK_D=128, UPCAST=False, IEEE=False, CHUNK=triton_launch.PACK_CHUNK, **cfg)

    def new_fwd():
        triton_launch.block_sparse_fwd(q, k, v, out, lse, q_slots, slots, q_counts, counts, num, idx, scale)

    new_fwd()
    delta = (out.float() * do.float()).sum(-1)

    def old_bwd():
        v11.block_sparse_attn_bwd_kernel[(M + M, B * H)](
            q, k, v, do, lse, delta, dq, dk, dv, slots, slots, counts, counts, num, idx, q_num, q_idx,
            scale, H, N, M, M, idx.shape[-1], q_idx.shape[-1], D,
            slots.stride(0), slots.stride(0), counts.stride(0), counts.stride(0), *s3(q), *s3(k), *s3(v), *s3(do),
            *s3(dq), *s3(dk), *s3(dv), BLOCK=64, BLOCK_D=128, UPCAST=False, IEEE=False,
            CHUNK=triton_launch.PACK_CHUNK, **cfg)

    def new_bwd():
        triton_launch.block_sparse_bwd(do, q, k, v, lse, delta, dq, dk, dv, q_slots, slots, q_counts, counts,
                                       num, idx, q_num, q_idx, scale)

    # Same results first (the A/B compares equal work).
    old_fwd()
    ref = out.clone()
    new_fwd()
    print("fwd max |new - v11|:", (out.float() - ref.float()).abs().max().item())
    rows = []
    for rep in range(2):
        for name, fn in (("v11 fwd", old_fwd), ("v12 fwd", new_fwd), ("v11 bwd", old_bwd), ("v12 bwd", new_bwd)):
            a = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            b = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
            rows.append((rep, name, a, b))
            print(f"rep {rep} {name}: do_bench {a:.3f} ms, cudagraph {b:.3f} ms", flush=True)
    print("| kernel | do_bench ms (rep 0 / 1) | CUDA graph ms (rep 0 / 1) |\n|---|---|---|")
    for name in ("v11 fwd", "v12 fwd", "v11 bwd", "v12 bwd"):
        r = [x for x in rows if x[1] == name]
        print(f"| {name} | {r[0][2]:.3f} / {r[1][2]:.3f} | {r[0][3]:.3f} / {r[1][3]:.3f} |")


if __name__ == "__main__":
    main()
