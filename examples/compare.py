"""Shared by the model examples: one process, one set of inputs, the model compiled with
backend="sparse_inductor" and with backend="inductor", compared on what users judge."""
from __future__ import annotations

import time

import torch

import sparse_inductor


def timed(fn, device, repeats=3):
    """Median milliseconds of ``fn`` (``triton.testing.do_bench`` on a GPU)."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=1, rep=repeats * 1000 // 2, return_mode="median")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def first_call(fn, device):
    """Seconds for compile + first call, and the peak memory of a second call (bytes, GPU only)."""
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    return seconds, peak


def compare(model, args: tuple, kwargs: dict, device: str, sparsity: float, tile=(4, 4, 4)):
    """Print explain(), compile time, peak memory, output error and step time of the model
    compiled with our backend (``tile``: the tile shape) against ``backend="inductor"``.
    Returns the sparse compiled model."""
    tile = tuple(tile)
    sparse_model = torch.compile(model, backend="sparse_inductor")
    dense_model = torch.compile(model, backend="inductor")
    # min_tokens=0 so that tiny models are rewritten too (real sizes pass the default anyway).
    with torch.no_grad(), sparse_inductor.sparsity(sparsity, min_tokens=0, tile=tile):
        print(sparse_inductor.explain(model, *args, **kwargs))
        sparse_s, sparse_peak = first_call(lambda: sparse_model(*args, **kwargs), device)
        dense_s, dense_peak = first_call(lambda: dense_model(*args, **kwargs), device)
        sparse_out = sparse_model(*args, **kwargs)[0]
        dense_out = dense_model(*args, **kwargs)[0]
        sparse_ms = timed(lambda: sparse_model(*args, **kwargs), device)
        dense_ms = timed(lambda: dense_model(*args, **kwargs), device)
    rel = ((sparse_out.float() - dense_out.float()).norm() / dense_out.float().norm()).item()
    print(f"compile + first call: inductor {dense_s:.1f} s, sparse_inductor {sparse_s:.1f} s "
          f"({sparse_s / dense_s:.2f}x)")
    if device == "cuda":
        print(f"peak memory of a step: inductor {dense_peak / 2**30:.2f} GiB, "
              f"sparse_inductor {sparse_peak / 2**30:.2f} GiB")
    print(f"output relative L2 vs dense at sparsity {sparsity}, tile {tile}: {rel:.3e}")
    print(f"denoising step: inductor {dense_ms:.1f} ms, sparse_inductor {sparse_ms:.1f} ms, "
          f"speedup {dense_ms / sparse_ms:.2f}x")
    return sparse_model
