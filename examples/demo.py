"""Compile a 3D video transformer with backend="sparse_inductor": print explain(), the error
against dense attention and the time of both.

    python examples/demo.py            # a GPU uses Wan-1.3B attention sizes; a CPU a tiny model

Weights are random, so attention is close to uniform (the hardest case for any selection):
the error printed says how far this selection is from dense on such a model, not the quality
on a trained one.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sparse_inductor  # noqa: E402
from video_dit import TinyVideoDiT  # noqa: E402


def timed(fn, device, repeats):
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=max(50, repeats * 10), return_mode="median")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny CPU configuration, also on a GPU")
    parser.add_argument("--sparsity", type=float, default=0.875)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    torch.manual_seed(0)
    if device == "cuda":
        # Wan-1.3B attention: 12 heads x 128, 480p 81 frames -> latent 21x60x104 -> grid 21x30x52
        dtype, latent, layers, dim, heads = torch.bfloat16, (1, 16, 21, 60, 104), 4, 1536, 12
    else:
        dtype, latent, layers, dim, heads = torch.float32, (1, 4, 8, 32, 32), 2, 64, 2
    model = TinyVideoDiT(in_channels=latent[1], dim=dim, heads=heads, layers=layers, text_dim=64)
    model = model.to(device, dtype).eval()
    latents = torch.randn(latent, device=device, dtype=dtype)
    text = torch.randn(1, 32, 64, device=device, dtype=dtype)
    print(f"device {device}, {dtype}, latents {list(latent)}, {layers} blocks, {heads} heads x {dim // heads}")

    sparse_model = torch.compile(model, backend="sparse_inductor")
    dense_model = torch.compile(model, backend="inductor")
    with torch.no_grad(), sparse_inductor.sparsity(args.sparsity, min_tokens=0):
        print(sparse_inductor.explain(model, latents, text))
        start = time.perf_counter()
        sparse_out = sparse_model(latents, text)
        print(f"compile + first call, sparse_inductor: {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        dense_out = dense_model(latents, text)
        print(f"compile + first call, inductor (dense): {time.perf_counter() - start:.1f} s")
        rel = ((sparse_out.float() - dense_out.float()).norm() / dense_out.float().norm()).item()
        print(f"output error vs dense at sparsity {args.sparsity}: relative L2 {rel:.3e} (random weights)")
        repeats = 20 if device == "cuda" else 3
        sparse_ms = timed(lambda: sparse_model(latents, text), device, repeats)
        dense_ms = timed(lambda: dense_model(latents, text), device, repeats)
    print(f"forward: dense {dense_ms:.2f} ms, sparse {sparse_ms:.2f} ms, speedup {dense_ms / sparse_ms:.2f}x")


if __name__ == "__main__":
    main()
