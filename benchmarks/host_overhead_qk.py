"""Host time vs GPU time of the compiled query_keep path (eighth session probe).

`bench_query_keep_compiled.py` timed the compiled query_keep 0.5 forward on the TMA kernels at 4.83 ms
while `profile_compiled.py` summed 2.57 ms of CUDA kernel time: this prints, for each query_keep, the
`do_bench` time (host launches included), the CUDA-graph time (`do_bench_cudagraph`: GPU only) and the
host time per call of enqueueing without a sync (median of 50), so a host-bound path shows as
host >= do_bench > cudagraph; ``--cprofile`` prints where the host time goes. The keeps share one process
and one lambda on purpose: in the eighth session every keep after the first was Dynamo's recompile with
``query_keep`` as a dynamic float (267 kernels per call, NOTES); since the ninth it is a graph constant
per value (``_compat.specialize_float``), so later keeps must time like fresh processes.

    PYTHONPATH=$PWD SPARSE_INDUCTOR_FORWARD_KERNEL=tma python benchmarks/host_overhead_qk.py [--keeps 1 0.5] [--tile 4 4 8]
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sparse_inductor as si
from sparse_inductor.attention import sparse_attention
from sparse_inductor.layout import tile_layout


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--grid", type=int, nargs=3, default=[21, 30, 52])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--tile", type=int, nargs=3, default=[4, 4, 4])
    parser.add_argument("--cprofile", action="store_true", help="also print where the host time of 20 calls goes")
    args = parser.parse_args()
    import triton.testing

    grid, H, D = tuple(args.grid), args.heads, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, H, math.prod(grid), D, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    tile = tuple(args.tile)
    layout = tile_layout(grid, tile, "cuda")
    print(f"device {torch.cuda.get_device_name()}; torch {torch.__version__}; grid {grid}, tile {tile}, H={H}, bf16, "
          f"TopK(0.875), "
          f"forward kernel {os.environ.get('SPARSE_INDUCTOR_FORWARD_KERNEL', 'auto')}", flush=True)
    for keep in args.keeps:
        fn = torch.compile(lambda q, k, v, keep=keep: sparse_attention(
            q, k, v, grid, tile=tile, policy=si.TopK(0.875), query_keep=keep, layout=layout), fullgraph=True)

        def fwd():
            with torch.no_grad():
                fn(q, k, v)

        fwd()
        torch.cuda.synchronize()
        wall = triton.testing.do_bench(fwd, warmup=25, rep=100, return_mode="median")
        try:
            graph = triton.testing.do_bench_cudagraph(fwd, rep=100, return_mode="median")
        except Exception as e:  # noqa: BLE001 -- report, never hide
            graph = float("nan")
            print(f"query_keep {keep}: CUDA graph capture failed ({type(e).__name__}: {str(e)[:160]})", flush=True)
        host = []
        for _ in range(50):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fwd()
            host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        if args.cprofile:
            import cProfile
            import pstats

            profile = cProfile.Profile()
            profile.enable()
            for _ in range(20):
                fwd()
            profile.disable()
            torch.cuda.synchronize()
            print(f"query_keep {keep}: host time of 20 calls by function (tottime)", flush=True)
            pstats.Stats(profile).sort_stats("tottime").print_stats(25)
            print(f"query_keep {keep}: the same by cumulative time", flush=True)
            pstats.Stats(profile).sort_stats("cumulative").print_stats(40)
        print(f"query_keep {keep:<4} compiled fwd: do_bench {wall:.3f} ms, cudagraph {graph:.3f} ms, host enqueue "
              f"{statistics.median(host):.3f} ms per call", flush=True)


if __name__ == "__main__":
    main()
