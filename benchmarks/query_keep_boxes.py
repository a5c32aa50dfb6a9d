"""Static cost of query_keep < 1 on the compact TMA kernels (benchmarks/NOTES.md v23), on CPU.

Makes the selection ``bench_attention.py`` / ``bench_query_keep_compiled.py`` make at Wan 480p (random
q, k; TopK(0.875); B = 1, H = 12, D = 128), and for each ``query_keep`` the boxes each kernel walks:

- forward and dQ: one program per (query tile, head), each a ``BLOCK``-row query box at its kept offset
  over the tile's KV box list (:func:`kv_boxes_by_class` of the query-major lists on the full compact
  layout), so their work does not depend on ``query_keep`` (a program's box holds its ``c_i`` kept rows
  and the next tile's);
- dK/dV: one program per (KV tile, head) over the query boxes of the kv-major lists on the *kept*
  layout (tile ``i`` holds ``c_i = num_kept(r, n_i)`` rows, neighbouring listed tiles merged into runs
  cut into ``BLOCK``-row boxes), so its work falls with ``r``.

Each kernel's list total is Σ steps x SASS instructions per step (sm_90a, Triton 3.6, D 128, bf16,
4 warps: ``sass_backward.py``, ``packed_cost_model.py --sass``) and its MMA work Σ steps x 64 query rows;
the time is ``T1 * (a * I / I1 + (1 - a) * U / U1)`` from the measured ``query_keep = 1`` kernel ``T1``
(H200, seventh session's profile), with ``a`` the instruction share fitted in v22 (0.59-0.66).

    python benchmarks/query_keep_boxes.py [--keeps 1 0.75 0.5 0.25] [--heads 12]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: SASS instructions per loop step (full box, whole box, two half boxes, four quarter boxes):
#: forward with Q in registers (NOTES v21), dQ and dK/dV (``sass_backward.py``; dK/dV's full and
#: whole boxes share one loop; with ``--query-layout`` the same counts, 1050 for the quarter step).
STEP_INSTRUCTIONS = {"forward": (350, 560, 687, 917), "dQ": (287, 565, 780, 993), "dK/dV": (580, 580, 781, 1049)}
#: Measured at query_keep = 1 (H200, seventh session, CUDA time per kernel of the compiled 480p fwd+bwd).
MEASURED_MS = {"forward": 2.122, "dQ": 2.371, "dK/dV": 3.995}


def steps(per_class: torch.Tensor):
    """Loop steps of each class per list row: full, whole, ceil(half / 2), ceil(quarter / 4)."""
    return torch.stack([per_class[:, 0], per_class[:, 1], (per_class[:, 2] + 1) // 2, (per_class[:, 3] + 3) // 4], -1)


def totals(ends: torch.Tensor, kernel: str):
    """(box counts per class, steps, instructions, MMA query rows) summed over the lists."""
    ends = ends.reshape(-1, 4).long()
    per_class = torch.diff(ends, dim=-1, prepend=torch.zeros_like(ends[:, :1]))
    s = steps(per_class)
    instructions = (s * torch.tensor(STEP_INSTRUCTIONS[kernel])).sum().item()
    return per_class.sum(0).tolist(), s.sum().item(), instructions, s.sum().item() * 64


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    parser.add_argument("--grid", type=int, nargs=3, default=[21, 30, 52])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.59, 0.63, 0.66])
    args = parser.parse_args()
    import sparse_inductor as si
    from sparse_inductor.compact_layout import compact_layout, kv_boxes_by_class
    from sparse_inductor.layout import tile_layout
    from sparse_inductor.ops import transpose_block_lists
    from sparse_inductor.query_keep import kept_layout

    grid, H = tuple(args.grid), args.heads
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, H, math.prod(grid), 128, generator=g) for _ in range(2))
    selection = si.select_blocks(q, k, grid, policy=si.TopK(0.875))
    layout = tile_layout(grid, (4, 4, 4))
    compact = compact_layout(layout)
    num, idx = selection.kv_num_blocks, selection.kv_indices
    q_num, q_idx = transpose_block_lists(num, idx, compact.num_tiles)
    print(f"grid {grid}, H = {H}, TopK(0.875), random q/k (seed 0); {compact.num_tiles} tiles, {compact.num_tokens} "
          f"tokens; boxes full/whole/half/quarter summed over the lists; time = T1 (a I/I1 + (1 - a) U/U1), "
          f"a in {args.alpha}")
    _, _, fwd_ends = kv_boxes_by_class(num, idx, compact)
    base = {}
    for kernel in ("forward", "dQ"):
        boxes, n_steps, instr, units = totals(fwd_ends, kernel)
        base[kernel] = (instr, units)
        print(f"  {kernel:8s} every query_keep: boxes {boxes}, steps {n_steps}, instructions {instr / 1e6:.1f} M "
              f"-> {MEASURED_MS[kernel]:.3f} ms (measured at query_keep 1; the same work at every query_keep)")
    for r in args.keeps:
        kl = kept_layout(q[:, :1], layout, r)  # the counts and offsets are the same for every head
        _, _, ends = kv_boxes_by_class(q_num, q_idx, kl.compact, lists_sorted=True)
        boxes, n_steps, instr, units = totals(ends, "dK/dV")
        if "dK/dV" not in base:
            if r != 1.0:
                sys.exit("the first --keeps value must be 1 (the measured anchor)")
            base["dK/dV"] = (instr, units)
        i1, u1 = base["dK/dV"]
        ms = [MEASURED_MS["dK/dV"] * (a * instr / i1 + (1 - a) * units / u1) for a in args.alpha]
        kernels = MEASURED_MS["forward"] + MEASURED_MS["dQ"] + ms[len(ms) // 2]
        print(f"  dK/dV    query_keep {r:<5} Lq {kl.compact.num_tokens}: boxes {boxes}, steps {n_steps}, "
              f"instructions {instr / 1e6:.1f} M ({instr / i1:.3f}x), MMA rows {units / u1:.3f}x -> "
              f"{ms[len(ms) // 2]:.2f} ms ({min(ms):.2f}-{max(ms):.2f}); three kernels {kernels:.2f} ms")


if __name__ == "__main__":
    main()
