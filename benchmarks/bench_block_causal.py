"""Block-causal (diffusion-forcing) attention on the GPU: what the per-token mask costs and what the
sparse path gains over dense masked attention. One process, the same inputs for every row,
``triton.testing.do_bench`` medians (ms), forward and forward+backward, bf16, B = 1, D = 128.

Rows:

* ``sdpa_masked``: ``F.scaled_dot_product_attention`` with the bool block-causal ``attn_mask``
  ``[1, 1, N, N]`` (what SkyReels-V2's diffusion-forcing transformer runs).
* ``flex_block_causal``: compiled FlexAttention with the block-causal ``mask_mod`` (it skips the
  KV blocks wholly in the future): the dense competitor that knows the structure.
* ``sparse_compiled``: ``sparse_attention(..., causal_block_size=c)`` under ``torch.compile`` at
  the given sparsity (selection + templates), the backend's path for a recognised mask.
* ``kernel_masked`` / ``kernel_unmasked``: the block-sparse op alone on the same (block-causal)
  lists, with and without the per-token mask: the mask's own cost in the kernels.

    PYTHONPATH=$PWD python benchmarks/bench_block_causal.py [--case skyreels-1.3b-540p] [--sparsity 0.875]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sparse_inductor as si  # noqa: E402
from sparse_inductor.attention import sparse_attention  # noqa: E402
from sparse_inductor.causal import tiles_split_blocks, tokens_per_block  # noqa: E402
from sparse_inductor.layout import tile_layout  # noqa: E402
from sparse_inductor.ops import KERNEL_VERSION  # noqa: E402

# SkyReels-V2 DF 1.3B at 540p: 97 frames -> 25 latent frames, 544 x 960 -> 34 x 60 patches.
CASES = {
    "skyreels-1.3b-540p": dict(H=12, grid=(25, 34, 60)),
    "wan1.3b-480p": dict(H=12, grid=(21, 30, 52)),
}


def bench(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def fwd_bwd(fn, inputs, grad):
    def run():
        torch.autograd.grad(fn(*inputs), inputs, grad)
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="skyreels-1.3b-540p", choices=sorted(CASES))
    parser.add_argument("--sparsity", type=float, default=0.875)
    parser.add_argument("--causal-block-size", type=int, nargs="+", default=[5, 4],
                        help="frames per causal block (5 straddles the 4-frame tiles, 4 does not)")
    args = parser.parse_args()
    H, grid = CASES[args.case]["H"], CASES[args.case]["grid"]
    B, D, dtype, tile = 1, 128, torch.bfloat16, (4, 4, 4)
    N = math.prod(grid)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    inputs = tuple(x.requires_grad_() for x in (q, k, v))
    layout = tile_layout(grid, tile, "cuda")
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; {args.case} grid {grid} N={N} H={H} D={D} "
          f"bf16, sparsity {args.sparsity}")
    for c in args.causal_block_size:
        torch.compiler.reset()
        frames = torch.arange(N, device="cuda") // (grid[1] * grid[2]) // c
        mask = (frames[None, :] <= frames[:, None])[None, None]

        def sdpa_masked(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = create_block_mask(lambda b, h, qi, ki: frames[ki] <= frames[qi], None, None, N, N,
                                       device="cuda")
        flex = torch.compile(flex_attention, dynamic=False)

        def flex_block_causal(q, k, v):
            return flex(q, k, v, block_mask=block_mask)

        sparse_compiled = torch.compile(
            lambda q, k, v: sparse_attention(q, k, v, grid, tile=tile, sparsity=args.sparsity, layout=layout,
                                             causal_block_size=c), fullgraph=True)
        sel = si.select_blocks(q, k, grid, sparsity=args.sparsity, tile=tile, causal_block_size=c)
        slots, counts = layout.slots.expand(B, -1), layout.counts.expand(B, -1)
        q_slots, q_counts = layout.slots.expand(B, H, -1), layout.counts.expand(B, H, -1)

        def kernel(causal_tokens):
            def run(q, k, v):
                return torch.ops.sparse_inductor.block_sparse_attn_fwd(
                    q, k, v, q_slots, slots, q_counts, counts, sel.kv_num_blocks, sel.kv_indices, D ** -0.5,
                    KERNEL_VERSION, causal_tokens)[0]
            return run

        impls = [("sdpa_masked", sdpa_masked), ("flex_block_causal", flex_block_causal),
                 ("sparse_compiled", sparse_compiled), ("kernel_masked", kernel(tokens_per_block(grid, c))),
                 ("kernel_unmasked", kernel(0))]
        times = {}
        for name, fn in impls:
            try:
                times[name] = (bench(lambda: fn(*inputs)), bench(fwd_bwd(fn, inputs, grad)))
            except Exception as error:  # e.g. out of memory for the dense mask
                print(f"{name} (c={c}) failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
        kept = sel.kept_fraction()
        print(f"c={c}: kept {kept:.3f} of the (unmasked) pairs; straddling tiles: "
              f"{'yes' if tiles_split_blocks(grid, tile, c) else 'no'}")
        base = times.get("sdpa_masked")
        for name, (f, fb) in times.items():
            ratio = "" if base is None else f"  {base[0] / f:5.2f}x / {base[1] / fb:5.2f}x vs sdpa_masked"
            print(f"  {name:18s} fwd {f:8.3f} ms  fwd+bwd {fb:8.3f} ms{ratio}")
        if "kernel_masked" in times and "kernel_unmasked" in times:
            m, u = times["kernel_masked"], times["kernel_unmasked"]
            print(f"  per-token mask cost on the same lists: fwd {m[0] / u[0] - 1:+.1%}, fwd+bwd {m[1] / u[1] - 1:+.1%}")


if __name__ == "__main__":
    main()
