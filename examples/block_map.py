"""Write a PNG of the block map that one head keeps: query tiles (rows) x KV tiles (columns).

    python examples/block_map.py --out block_map.png
    python examples/block_map.py --grid 8 16 16 --tile 4 4 4 --sparsity 0.875 --head 0 --out map.png

Q and K are made from the tokens' (t, h, w) positions (random Fourier features plus noise), so
attention prefers nearby tokens, as it does in trained video DiTs; the map shows which tiles the
coarse stage keeps. Swap in your own ``q, k`` (``[B, H, T*H*W, D]``, raster order) to look at
a real model's selection.
"""
from __future__ import annotations

import argparse
import math

import torch

import sparse_inductor


def positional_qk(grid, heads=2, dim=64, noise=0.3, seed=0):
    """``q, k`` of shape ``[1, heads, T*H*W, dim]`` whose dot products fall off with distance."""
    g = torch.Generator().manual_seed(seed)
    T, H, W = grid
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    coords = torch.stack([t, h, w], -1).reshape(-1, 3).float()
    freqs = torch.randn(heads, 3, dim // 2, generator=g) * 0.35
    phase = torch.einsum("nc,hcf->hnf", coords, freqs)
    features = torch.cat([phase.cos(), phase.sin()], -1)  # [heads, N, dim]
    q = features + noise * torch.randn(features.shape, generator=g)
    k = features + noise * torch.randn(features.shape, generator=g)
    return q.unsqueeze(0), k.unsqueeze(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, nargs=3, default=[8, 16, 16])
    parser.add_argument("--tile", type=int, nargs=3, default=[4, 4, 4])
    parser.add_argument("--sparsity", type=float, default=0.875)
    parser.add_argument("--head", type=int, default=0)
    parser.add_argument("--out", default="block_map.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid, tile = tuple(args.grid), tuple(args.tile)
    q, k = positional_qk(grid)
    selection = sparse_inductor.select_blocks(q, k, grid, sparsity=args.sparsity, tile=tile)
    kept = selection.dense_mask()[0, args.head].float()  # [query tiles, KV tiles]
    M = kept.shape[0]
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(kept.numpy(), cmap="Greys", interpolation="nearest")
    ax.set_xlabel("KV tile (t, h, w order)")
    ax.set_ylabel("query tile")
    ax.set_title(f"grid {grid}, tile {tile}, sparsity {args.sparsity}: "
                 f"{int(kept.sum(1)[0])} of {M} tiles kept per row (head {args.head})", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}: {M} x {M} tiles, {kept.mean().item():.3f} kept "
          f"(k = {math.ceil((1 - args.sparsity) * M)})")


if __name__ == "__main__":
    main()
