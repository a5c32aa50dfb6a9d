"""v28's passes alone (GPU, CUDA-graph time): the fused Q/K permutation + pool (``compact_pool_kernel``) at
2 / 4 / 8 warps, against what it replaces: Inductor's permutation of Q and K (``index_select``, compiled) plus
the pool kernel (``pool_tiles_kernel`` at ``triton_launch.pool_warps``), at Wan-1.3B 480p (B=1, H=12, D=128, bf16), (4, 4, 4) and
(4, 4, 8) tiles. Prints ms, GB/s of the bytes each must move, and checks the fused outputs.

    PYTHONPATH=$PWD python benchmarks/bench_compact_pool.py
"""
import math
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernel_templates.selection_kernels import compact_pool_kernel, pool_tiles_kernel  # noqa: E402
from sparse_inductor.compact_layout import compact_layout  # noqa: E402
from sparse_inductor.layout import tile_layout  # noqa: E402
from sparse_inductor.triton_launch import head_block, pool_warps  # noqa: E402


def gpu_ms(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")


def main(grid=(21, 30, 52), H=12, D=128):
    N = math.prod(grid)
    g = torch.Generator(device="cuda").manual_seed(0)
    # [B, N, H, D] viewed as [B, H, N, D], as a DiT hands q and k to SDPA
    q, k = (torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
            for _ in range(2))
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for tile in ((4, 4, 4), (4, 4, 8)):
        layout = tile_layout(grid, tile, "cuda")
        compact = compact_layout(layout)
        M, S = layout.num_tiles, layout.block_size
        qc, kc = (torch.empty(1, H, N, D, device="cuda", dtype=q.dtype) for _ in range(2))
        qm, km, pm, pk = (torch.empty(1, H, M, D, device="cuda") for _ in range(4))
        moved = 4 * q.numel() * q.element_size()  # read and write Q and K
        permute = torch.compile(lambda q, k: (q.index_select(2, compact.positions), k.index_select(2, compact.positions)))

        def pool():
            pool_tiles_kernel[(M, H)](q, k, layout.slots, layout.counts, pm, pk, H, M, D, *q.stride()[:3],
                                      *k.stride()[:3], BLOCK=S, BLOCK_D=head_block(D), num_warps=pool_warps(S))

        permute(q, k)
        t_perm, t_pool = gpu_ms(lambda: permute(q, k)), gpu_ms(pool)
        print(f"tile {tile}: inductor Q/K permutation {t_perm:.4f} ms ({moved / t_perm / 1e6:.0f} GB/s), "
              f"pool kernel {t_pool:.4f} ms, together {t_perm + t_pool:.4f} ms")
        want_q, want_k = permute(q, k)
        for warps in (2, 4, 8):
            def fused(warps=warps):
                compact_pool_kernel[(M, H)](q, k, layout.slots, layout.counts, compact.tile_offsets, qc, kc, qm, km,
                                            H, M, N, D, *q.stride()[:3], *k.stride()[:3], BLOCK=S,
                                            BLOCK_D=head_block(D), num_warps=warps)

            t = gpu_ms(fused)
            fused()
            pool()
            same = (torch.equal(qc, want_q) and torch.equal(kc, want_k), torch.equal(qm, pm) and torch.equal(km, pk))
            print(f"tile {tile}: compact_pool {warps} warps {t:.4f} ms ({moved / t / 1e6:.0f} GB/s), "
                  f"saves {t_perm + t_pool - t:+.4f} ms; copies equal {same[0]}, means equal to the pool's {same[1]}")


if __name__ == "__main__":
    main()
