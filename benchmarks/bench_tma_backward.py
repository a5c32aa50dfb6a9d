"""The compact TMA backward (kernel_templates/tma_block_sparse_bwd.py) against our gather backward
kernel on the same inputs and selection, kernel only (GPU; issue 22, v19).

Both take precomputed lists (the gather kernel its kv-major transpose, the TMA kernels their box
lists) and precomputed ``delta``-ready inputs; rows:

* ``gather_bwd``: ``sparse_inductor::block_sparse_attn_bwd`` (eager launch of our gather kernel) on
  sequence-order tensors, delta computed outside the timed region;
* ``tma_bwd[w, s]``: the TMA dQ + dK/dV kernels on compact copies (delta inside: one torch pass),
  for a few launch configurations (warps, stages); ``tma_bwd[w, s, variant]`` for each other
  ``dkdv_variant`` of the dK/dV kernel (``--variants``, default all; NOTES.md v20);
  ``tma_bwd[w, s, variant, dq_mode]`` for each fused ``dq_mode`` (``--dq-modes``; NOTES.md v22: dQ
  added by fp32 atomics inside the dK/dV kernel, its zeroed buffer and the scale-and-cast pass
  inside the timing), with the variants that mode takes (``ATOMIC_VARIANTS``);
* ``tma_fwd``: the TMA forward on the same inputs, for the fwd+bwd sum.

``--tile 4 4 8`` (128-slot tiles, NOTES.md v26): the TMA rows run each tile as two 64-slot halves
(``split_tiles``, the default: the half lists, their boxes and the transpose inside the timed
region), and with ``--whole-tiles`` also as 128-row programs (``split_tiles=False``).

Prints each time, the ratio to ``gather_bwd``, the relative L2 of dQ, dK, dV against it and, for
every row but the first of a config, against that config's first row (``separate`` and the first
variant: the fused modes' rounding differs by the order of the fp32 adds).

    PYTHONPATH=$PWD python benchmarks/bench_tma_backward.py --cases wan1.3b-480p
    PYTHONPATH=$PWD python benchmarks/bench_tma_backward.py --configs 4,2 --variants default two_pass
    PYTHONPATH=$PWD python benchmarks/bench_tma_backward.py --configs 4,2 8,2 --variants default two_pass half_steps \
        --dq-modes separate atomic atomic_tma                                                      # v22
    PYTHONPATH=$PWD python benchmarks/bench_tma_backward.py --tile 4 4 8 --configs 4,2 8,2 --variants default \
        --whole-tiles                                                                              # v26
"""
from __future__ import annotations

import argparse
import math

import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernel_templates.tma_block_sparse_bwd import ATOMIC_VARIANTS, DKDV_VARIANTS, DQ_MODES  # noqa: E402

CASES = {"wan1.3b-480p": (12, (21, 30, 52)), "dividing-20x32x52": (12, (20, 32, 52)),
         "wan14b-720p": (40, (21, 45, 80))}


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def runs(configs, variants, dq_modes):
    """The ``(warps, stages, dkdv_variant, dq_mode)`` rows to time, in order: per config, every
    variant with the separate dQ kernel, then every fused mode with the variants it takes."""
    return [(w, s, v, m) for (w, s) in configs for m in dq_modes for v in variants
            if m == "separate" or v in ATOMIC_VARIANTS]


def rel_l2(got, want):
    return [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, want)]


def run_case(name, sparsity, configs, variants=("default",), dq_modes=("separate",), tile=(4, 4, 4),
             whole_tiles=False):
    import sparse_inductor as si
    from kernel_templates.tma_block_sparse import tma_packed_block_sparse_attention
    from kernel_templates.tma_block_sparse_bwd import tma_packed_block_sparse_attention_backward
    from sparse_inductor.compact_layout import compact_layout, from_compact, kv_boxes_by_class, to_compact
    from sparse_inductor.layout import tile_layout
    from sparse_inductor.ops import transpose_block_lists

    H, grid = CASES[name]
    B, D, dtype = 1, 128, torch.bfloat16
    N = math.prod(grid)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    layout = tile_layout(grid, tile, "cuda")
    compact = compact_layout(layout)
    sel = si.select_blocks(q, k, grid, sparsity=sparsity, tile=tile)
    num, idx = sel.kv_num_blocks, sel.kv_indices
    M = layout.num_tiles
    scale = D ** -0.5
    qn, qi = transpose_block_lists(num, idx, M)
    big = compact.block > 64  # 128-slot tiles: the forward in 64-row steps, the backward on halves
    boxes = kv_boxes_by_class(num, idx, compact, step=64 if big else None)
    q_boxes = None if big else kv_boxes_by_class(qn, qi, compact)
    qc, kc, vc, doc = (to_compact(x, compact).contiguous() for x in (q, k, v, do))

    # Gather backward on sequence-order tensors (its forward gives out and lse).
    slots = layout.slots
    q_slots, kv_slots = slots.expand(B, H, -1), slots.expand(B, -1)
    q_counts, kv_counts = layout.counts.expand(B, H, -1), layout.counts.expand(B, -1)
    out, lse = torch.ops.sparse_inductor.block_sparse_attn_fwd(q, k, v, q_slots, kv_slots, q_counts, kv_counts,
                                                               num, idx, scale)
    delta = (out.float() * do.float()).sum(-1).contiguous()

    def gather_bwd():
        return torch.ops.sparse_inductor.block_sparse_attn_bwd(do, q, k, v, lse, delta, q_slots, kv_slots, q_counts,
                                                               kv_counts, num, idx, qn, qi, scale)

    out_c, lse_c = tma_packed_block_sparse_attention(qc, kc, vc, num, idx, compact, scale, boxes=boxes,
                                                     step=64 if big else None)
    ref = gather_bwd()
    counts = layout.counts.long()
    live = torch.arange(idx.shape[-1], device="cuda") < num.unsqueeze(-1)
    kv_tokens = torch.where(live, counts[idx.long().clamp(min=0)], 0).sum(-1)  # [B, H, M]
    kept = float((kv_tokens * counts.view(1, 1, M)).sum())  # query-key pairs computed
    flops = 4.0 * D * kept * 2.5  # the backward does 2.5x the forward's matmul work
    t_gather = bench(gather_bwd)
    name = name if tile == (4, 4, 4) else f"{name} tile {tile}"
    print(f"[{name}] sparsity {sparsity}: gather_bwd {t_gather:.3f} ms ({flops / t_gather / 1e9:.0f} TFLOP/s)",
          flush=True)
    t_fwd = bench(lambda: tma_packed_block_sparse_attention(qc, kc, vc, num, idx, compact, scale, boxes=boxes,
                                                            step=64 if big else None))
    print(f"[{name}] tma_fwd {t_fwd:.3f} ms", flush=True)
    first = {}  # (warps, stages) -> that config's first row's gradients
    splits = [True, False] if big and whole_tiles else [None]
    for (warps, stages, variant, dq_mode), split in ((r, sp) for r in runs(configs, variants, dq_modes) for sp in splits):
        def tma_bwd():
            return tma_packed_block_sparse_attention_backward(doc, qc, kc, vc, out_c, lse_c, num, idx, compact, scale,
                                                              boxes=None if big else boxes, q_boxes=q_boxes,
                                                              num_warps=warps, num_stages=stages, dkdv_variant=variant,
                                                              dq_mode=dq_mode, split_tiles=split)
        label = f"{warps}w,{stages}s" + ("" if variant == "default" else f",{variant}") + (
            "" if dq_mode == "separate" else f",{dq_mode}") + ("" if split is not False else ",whole")
        try:
            got = [from_compact(x, compact) for x in tma_bwd()]
            errs = rel_l2(got, ref)
            base = first.setdefault((warps, stages), (label, got))
            vs = "" if base[0] == label else ("; vs {} dq {:.1e} dk {:.1e} dv {:.1e}".format(base[0],
                                                                                      *rel_l2(got, base[1])))
            t = bench(tma_bwd)
            print(f"[{name}] tma_bwd[{label}] {t:.3f} ms ({flops / t / 1e9:.0f} TFLOP/s), "
                  f"{t_gather / t:.2f}x gather_bwd; rel L2 vs gather dq {errs[0]:.1e} dk {errs[1]:.1e} "
                  f"dv {errs[2]:.1e}{vs}", flush=True)
        except Exception as e:  # report, never hide
            print(f"[{name}] tma_bwd[{label}] failed: {type(e).__name__}: "
                  f"{(str(e).splitlines() or [''])[0][:200]}", flush=True)
    first.clear()
    del q, k, v, do, qc, kc, vc, doc
    torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=["wan1.3b-480p"], choices=list(CASES))
    parser.add_argument("--sparsity", type=float, default=0.875)
    parser.add_argument("--configs", nargs="*", default=["4,2", "8,2", "4,3", "8,1"],
                        help="warps,stages pairs for the TMA kernels")
    parser.add_argument("--variants", nargs="*", default=list(DKDV_VARIANTS), choices=list(DKDV_VARIANTS),
                        help="dkdv_variant of the TMA dK/dV kernel, each run under every config")
    parser.add_argument("--dq-modes", nargs="*", default=["separate"], choices=list(DQ_MODES),
                        help="dq_mode of the TMA backward: separate (the dQ kernel) and/or the fused atomic modes, "
                             f"which run only the variants they take ({', '.join(ATOMIC_VARIANTS)})")
    parser.add_argument("--tile", nargs=3, type=int, default=[4, 4, 4])
    parser.add_argument("--whole-tiles", action="store_true",
                        help="with 128-slot tiles, also time the kernels' own 128-row programs (split_tiles=False)")
    args = parser.parse_args()
    print(f"device {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}")
    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs]
    for name in args.cases:
        run_case(name, args.sparsity, configs, args.variants, args.dq_modes, tuple(args.tile), args.whole_tiles)


if __name__ == "__main__":
    main()
