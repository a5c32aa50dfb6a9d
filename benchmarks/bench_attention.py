"""Sparse attention vs dense SDPA vs FlexAttention on the same block selection (GPU).

All competitors run in this one process on the same inputs; times are medians of
``triton.testing.do_bench``. Rows:

* ``dense_sdpa``: ``F.scaled_dot_product_attention`` (default backend) on raster inputs.
* ``sparse_op``: ``video_sparse_attention`` — everything the rewrite adds for one call:
  permutation in and out, coarse selection, block-sparse kernel.
* ``sparse_kernel``: the block-sparse kernel alone on tile-major inputs with a fixed selection.
* ``flex_kernel``: compiled FlexAttention on the same tile-major inputs and the identical
  selection (a ``BlockMask`` built from our lists; a ``mask_mod`` masks padding slots).

Writes RESULTS.md and results.json into ``--out-dir`` (default: this folder).

    PYTHONPATH=$PWD python benchmarks/bench_attention.py
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sparse_inductor as si  # noqa: E402
from sparse_inductor.layout import tile_layout, to_tiles  # noqa: E402

CASES = {
    "wan1.3b-480p": dict(H=12, grid=(21, 30, 52)),
    "wan14b-720p": dict(H=40, grid=(21, 45, 80)),
}


def bench(fn, warmup=25, rep=100):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def kept_pair_tokens(selection) -> float:
    """Sum over kept (query tile, KV tile) pairs of valid-query x valid-key token counts."""
    counts = selection.counts.double()
    mask = selection.dense_mask().double()  # [B, H, M, M]
    return float(torch.einsum("bhij,i,j->", mask, counts, counts))


def flex_setup(layout, selection, N):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    valid_slot = layout.gather_index < N

    def mask_mod(b, h, q_idx, kv_idx):
        return valid_slot[kv_idx]

    # Flex wants kv_indices as wide as the number of KV blocks; ours are k wide. Pad with 0s
    # (entries past kv_num_blocks are ignored).
    B, H, M, K = selection.kv_indices.shape
    kv_indices = torch.nn.functional.pad(selection.kv_indices, (0, M - K))
    block_mask = BlockMask.from_kv_blocks(
        selection.kv_num_blocks, kv_indices, BLOCK_SIZE=layout.block_size,
        mask_mod=mask_mod, seq_lengths=(layout.num_slots, layout.num_slots),
    )
    flex = torch.compile(flex_attention, dynamic=False)
    # Flex's default 128-row tiles cannot run 64-token blocks; ask for 64x64 tiles.
    options = {"BLOCK_M": layout.block_size, "BLOCK_N": layout.block_size}
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask, kernel_options=options)


def fwd_bwd(fn, inputs, grad):
    def run():
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, grad)

    return run


def run_case(name, H, grid, sparsity, records, meta, with_flex=True):
    B, D, dtype = 1, 128, torch.bfloat16
    N = math.prod(grid)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    layout = tile_layout(grid, (4, 4, 4), "cuda")
    tq, tk, tv, tgrad = (to_tiles(x, layout) for x in (q, k, v, grad))
    selection = si.select_blocks(q, k, grid, sparsity=sparsity)
    scale = 1.0 / math.sqrt(D)
    dense_flops = 4.0 * B * H * N * N * D
    sparse_flops = 4.0 * D * kept_pair_tokens(selection)

    def dense(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    def sparse_op(q, k, v):
        return si.video_sparse_attention(q, k, v, grid, sparsity=sparsity)

    def sparse_kernel(q, k, v):
        return torch.ops.sparse_inductor.block_sparse_attn_fwd(
            q, k, v, layout.counts, layout.counts, selection.kv_num_blocks, selection.kv_indices, scale)[0]

    impls = [("dense_sdpa", dense, (q, k, v), grad, dense_flops),
             ("sparse_op", sparse_op, (q, k, v), grad, sparse_flops),
             ("sparse_kernel", sparse_kernel, (tq, tk, tv), tgrad, sparse_flops)]
    if with_flex:
        try:
            impls.append(("flex_kernel", flex_setup(layout, selection, N), (tq, tk, tv), tgrad, sparse_flops))
        except Exception as e:  # report, never hide
            print(f"[{name}] FlexAttention setup failed: {type(e).__name__}: {e}")

    dense_ms = {}
    for impl, fn, inputs, impl_grad, flops in impls:
        for pass_ in ("fwd", "fwd+bwd"):
            try:
                if pass_ == "fwd":
                    with torch.no_grad():
                        ms = bench(lambda: fn(*inputs))
                else:
                    leaf = tuple(x.detach().requires_grad_() for x in inputs)
                    ms = bench(fwd_bwd(fn, leaf, impl_grad))
            except Exception as e:
                print(f"[{name}] {impl} {pass_} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                traceback.print_exc(limit=2)
                ms = None
            if impl == "dense_sdpa":
                dense_ms[pass_] = ms
            flop_factor = 1.0 if pass_ == "fwd" else 3.5  # bwd does 2.5x the fwd matmul work
            records.append(dict(
                case=name, impl=impl, **{"pass": pass_}, sparsity=sparsity if impl != "dense_sdpa" else 0.0,
                ms=ms, speedup_vs_dense=(dense_ms[pass_] / ms) if ms and dense_ms.get(pass_) else None,
                tflops=(flops * flop_factor / (ms * 1e-3) / 1e12) if ms else None, **meta,
            ))
            print(f"[{name}] {impl:14s} {pass_:8s} {ms if ms is None else round(ms, 3)} ms", flush=True)
    del q, k, v, grad, tq, tk, tv, tgrad
    torch.cuda.empty_cache()


def write_results(records, meta, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(records, f, indent=1)
    lines = [
        "# Benchmark results",
        "",
        f"Device: {meta['device']}; torch {meta['torch']}; triton {meta['triton']}; date {meta['date']}.",
        "B=1, D=128, bf16, tile (4, 4, 4). Medians of `triton.testing.do_bench`; one process, same inputs.",
        "TFLOP/s counts only the FLOPs of kept blocks (valid tokens); fwd+bwd counts 3.5x the forward.",
        "Reproduce: `PYTHONPATH=$PWD python benchmarks/bench_attention.py` on the GPU machine.",
        "",
        "| case | impl | pass | sparsity | ms | speedup vs dense | TFLOP/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        ms = "failed" if r["ms"] is None else f"{r['ms']:.3f}"
        sp = "" if r["speedup_vs_dense"] is None else f"{r['speedup_vs_dense']:.2f}x"
        tf = "" if r["tflops"] is None else f"{r['tflops']:.0f}"
        lines.append(f"| {r['case']} | {r['impl']} | {r['pass']} | {r['sparsity']} | {ms} | {sp} | {tf} |")
    with open(os.path.join(out_dir, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--sparsity", type=float, nargs="*", default=[0.875])
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU")
    import triton

    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.date.today().isoformat())
    records = []
    for name in args.cases:
        for sparsity in args.sparsity:
            run_case(name, **CASES[name], sparsity=sparsity, records=records, meta=meta, with_flex=not args.no_flex)
    write_results(records, meta, args.out_dir)
    print("\nratios (dense ms / impl ms):")
    for r in records:
        if r["impl"] != "dense_sdpa":
            sp = "failed" if r["speedup_vs_dense"] is None else f"{r['speedup_vs_dense']:.2f}x"
            print(f"  {r['case']:14s} {r['impl']:14s} {r['pass']:8s} sparsity {r['sparsity']}: {sp}")


if __name__ == "__main__":
    main()
