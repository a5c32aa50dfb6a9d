"""How long ``sparse_inductor.calibrate`` takes on a Wan-1.3B-sized model (GPU).

A stand-in with Wan 2.1 1.3B's attention shapes and random weights (timing only): a (1, 2, 2)
Conv3d patch embedding of a [B, 16, 21, 60, 104] latent (grid 21x30x52 = 32,760 tokens), 30
blocks of LayerNorm -> qkv -> RMS-normed q/k -> SDPA over 12 heads x 128 -> out projection ->
MLP, bf16. Calibrated on 2 inputs (a batch of 2) at a budget of 1/8; prints the wall time of
each phase and the plan's census.

    PYTHONPATH=$PWD python benchmarks/calibrate_timing.py
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sparse_inductor as si  # noqa: E402
import sparse_inductor.calibrate as calibration  # noqa: E402


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm_q, self.norm_k = nn.RMSNorm(dim // heads), nn.RMSNorm(dim // heads)
        self.out = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, N, 3, self.heads, -1).unbind(2)
        q, k = self.norm_q(q), self.norm_k(k)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.out(o.transpose(1, 2).reshape(B, N, C))
        return x + self.mlp(x)


class WanSized(nn.Module):
    def __init__(self, layers=30, dim=1536, heads=12):
        super().__init__()
        self.embed = nn.Conv3d(16, dim, (1, 2, 2), (1, 2, 2))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))

    def forward(self, latents):
        x = self.embed(latents).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return x


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--budget", type=float, default=0.125)
    parser.add_argument("--out", default=None, help="write the plan here")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = WanSized(args.layers).to(device, torch.bfloat16).eval()
    x = torch.randn(args.batch, 16, 21, 60, 104, device=device, dtype=torch.bfloat16)
    calibration.CHUNK_ELEMENTS = 1 << 30 if device == "cuda" else 1 << 26  # 4 GiB fp32 scores per chunk
    t0 = time.perf_counter()
    result = si.calibrate(model, x, budget=args.budget, min_tokens=0)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    print(result)
    print(f"census: {result.census_text()}")
    print(f"calibrate: {args.layers} layers x 12 heads, grid (21, 30, 52), {args.batch} inputs, budget {args.budget}: "
          f"{seconds:.1f} s on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}")
    if args.out:
        result.plan.save(args.out)


if __name__ == "__main__":
    main()
