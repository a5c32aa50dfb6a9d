"""Cost model of the compact tile-major TMA forward (kernel_templates/tma_block_sparse.py), on CPU.

For a benchmark case it makes the selection ``bench_attention.py`` makes (random inputs, TopK), turns
every query tile's list into box lists (:func:`kv_boxes_by_class`) and counts the loop steps of each
kind per list. Each kind of step costs a multiple of one step of ``tma_list_kernel`` (one 64-row box
per listed tile, masked), whose time is measured: 2.096 ms for 520 x 65 x 12 steps on the dividing
grid (H200, benchmarks/NOTES.md). The weights are judged from the sm_90a SASS of the loops
(``--sass``: instructions per step and serial MMA waits), not measured: see NOTES.md v16.

    python benchmarks/packed_cost_model.py                    # 480p and the dividing grid
    python benchmarks/packed_cost_model.py --sass             # + the loops' SASS counts
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

#: tma_list_kernel's step (one 64 x 64 query-tile x KV-tile step, aggregate over the GPU), H200:
#: 2.096 ms / (520 query tiles x 65 listed x 12 heads) on the dividing grid 20 x 32 x 52.
TMA_LIST_STEP_NS = 2.096e6 / (520 * 65 * 12)

#: Cost of one loop step of each class relative to TMA_LIST_STEP_NS: (low, central, high). Full:
#: 364 vs 454 instructions (no mask, scale fused), same MMAs. Whole box: 423 instructions (masked).
#: Two half boxes: 526 instructions, N = 32 QK MMAs, 2 more serial MMA waits than a full step. Four
#: quarter boxes: 758 instructions, N = 16 QK MMAs re-reading Q from shared memory, 6 more waits.
STEP_WEIGHTS = {"full": (0.85, 0.90, 1.00), "whole": (0.95, 0.97, 1.00), "half pair": (1.15, 1.25, 1.45),
                "quarter quad": (1.50, 1.75, 2.10)}
#: A class loop after the first refills the software pipeline: about half a step.
CLASS_SWITCH = 0.5
CASES = {"wan1.3b-480p": dict(H=12, grid=(21, 30, 52)), "dividing-20x32x52": dict(H=12, grid=(20, 32, 52))}


def box_counts(grid, heads, sparsity=0.875, merge_adjacent=True, seed=0):
    """Per list (query tile, head) the number of boxes of each class, ``[lists, 4]`` int64, and the
    kept-pair FLOPs of the selection (valid tokens only, as bench_attention.py counts them) per head."""
    import sparse_inductor as si
    from sparse_inductor.compact_layout import compact_layout, kv_boxes_by_class
    from sparse_inductor.layout import tile_layout

    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, heads, math.prod(grid), 128, generator=g) for _ in range(2))
    selection = si.select_blocks(q, k, grid, sparsity=sparsity)
    compact = compact_layout(tile_layout(grid, (4, 4, 4)))
    _, _, ends = kv_boxes_by_class(selection.kv_num_blocks, selection.kv_indices, compact, merge_adjacent)
    ends = ends.reshape(-1, 4).long()
    per_class = torch.diff(ends, dim=-1, prepend=torch.zeros_like(ends[:, :1]))
    flops_per_head = 4.0 * 128 * selection.kept_pairs().sum().item() / heads
    return per_class, flops_per_head


def steps_per_list(per_class, which):
    """Loop steps per list in tma_list steps, under the low / central / high weights (``which``)."""
    w = {name: weights[which] for name, weights in STEP_WEIGHTS.items()}
    steps = (per_class[:, 0] * w["full"] + per_class[:, 1] * w["whole"] + (per_class[:, 2] + 1) // 2 * w["half pair"]
             + (per_class[:, 3] + 3) // 4 * w["quarter quad"])
    switches = ((per_class > 0).sum(-1) - 1).clamp(min=0) * CLASS_SWITCH
    return (steps + switches).double()


def report(name, H, grid, model_heads):
    tokens = math.prod(grid)
    print(f"{name}: grid {grid}, H = {H} (lists of {model_heads} heads counted, scaled to {H})")
    for merge in (True, False):
        per_class, flops_per_head = box_counts(grid, model_heads, merge_adjacent=merge)
        mean = per_class.double().mean(0).tolist()
        lists = per_class.shape[0] * H / model_heads
        line = []
        for i, which in enumerate(("low", "central", "high")):
            ms = steps_per_list(per_class, i).mean().item() * lists * TMA_LIST_STEP_NS * 1e-6
            line.append(f"{which} {ms:.2f} ms ({flops_per_head * H / ms * 1e-9:.0f} TFLOP/s, "
                        f"{ms * 1e6 / tokens:.1f} ns/token)")
        print(f"  {'merged' if merge else 'one box per tile'}: boxes per list full {mean[0]:.1f}, whole {mean[1]:.1f}, "
              f"half {mean[2]:.1f}, quarter {mean[3]:.1f}; kept FLOPs {flops_per_head * H / 1e12:.3f} T")
        print("    predicted " + "; ".join(line))


def sass_counts():
    """Instructions, MMAs and waits per step of each loop of the packed kernel (both Q modes) and of
    tma_list_kernel, compiled for sm_90a (needs triton's bundled ptxas and nvdisasm)."""
    import collections
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type
    from triton.tools.tensor_descriptor import TensorDescriptor

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import sass_loops
    from kernel_templates import tma_attention, tma_block_sparse

    def descriptor(rows):
        return mangle_type(TensorDescriptor.from_tensor(torch.zeros(12, 32768, 128, dtype=torch.bfloat16),
                                                        [1, rows, 128]))

    boxes = {"q_desc": 64, "k_desc": 64, "v_desc": 64, "k_half_desc": 32, "v_half_desc": 32, "k_quarter_desc": 16,
             "v_quarter_desc": 16}
    pointers = {"O": "*bf16", "LSE": "*fp32", "POSITIONS": "*i64", "Q": "*bf16", "K": "*bf16", "V": "*bf16"}

    def compile_loops(fn, constexprs):
        sig, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in constexprs:
                sig[name] = "constexpr"
            elif name.endswith("_desc"):
                sig[name] = descriptor(boxes.get(name, 64))
            elif name in pointers:
                sig[name] = pointers[name]
            elif name in ("qk_scale",):
                sig[name] = "fp32"
            elif name.isupper() and name not in ("L", "M", "MAX_LIST", "BH", "H") or name.startswith("kv_"):
                sig[name] = "*i32"
            else:
                sig[name] = "i32"
            if sig[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        consts = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
        kernel = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": 4, "num_stages": 2})
        with tempfile.TemporaryDirectory() as tmp:
            ptx, obj = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.o")
            with open(ptx, "w") as f:
                f.write(kernel.asm["ptx"])
            ptxas = subprocess.run([os.path.join(sass_loops.BIN, "ptxas-blackwell"), "-v", "--gpu-name=sm_90a", ptx,
                                    "-o", obj], capture_output=True, text=True, check=True)
            sass = subprocess.run([os.path.join(sass_loops.BIN, "nvdisasm"), "-c", obj], capture_output=True,
                                  text=True, check=True).stdout
        registers = [line.split(":")[-1].strip() for line in ptxas.stderr.splitlines() if "registers" in line]
        # The per-step loops: the ones that hold MMAs (the others are mbarrier spin waits).
        steps = [body for _, body in sass_loops.loops(sass) if any("HGMMA" in i for i in body) and len(body) < 1500]
        return registers, steps

    def describe(body):
        ops = collections.Counter(sass_loops.opcode(i) for i in body)
        waits = sum("WARPGROUP.DEPBAR" in i for i in body)
        return f"{len(body)} instructions, {ops['HGMMA']} HGMMA, {waits} MMA waits, {ops['UTMALDG']} TMA loads"

    registers, steps = compile_loops(tma_attention._tma_block_list_fwd, {"HEAD_DIM": 128, "BLOCK": 64})
    print(f"tma_list_kernel ({'; '.join(registers)}): step {describe(steps[0])}")
    for q_in_registers in (False, True):
        registers, steps = compile_loops(tma_block_sparse._tma_packed_fwd, {
            "HEAD_DIM": 128, "BLOCK": 64, "SEQUENCE_ORDER": False, "Q_IN_REGISTERS": q_in_registers, "UPCAST": False,
            "IEEE": False})
        print(f"tma_packed q_in_registers={q_in_registers} ({'; '.join(registers)}):")
        for label, body in zip(("full", "whole box", "two half boxes", "four quarter boxes"), steps):
            print(f"  {label}: {describe(body)}")
    registers, steps = compile_loops(tma_block_sparse._tma_packed_fwd_device, {
        "HEAD_DIM": 128, "BLOCK": 64, "HALF": 32, "QUARTER": 16, "SEQUENCE_ORDER": False, "Q_IN_REGISTERS": False,
        "UPCAST": False, "IEEE": False})
    print(f"tma_packed with device-side descriptors ({'; '.join(registers)}):")
    for label, body in zip(("full", "whole box", "two half boxes", "four quarter boxes"), steps):
        print(f"  {label}: {describe(body)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--heads", type=int, default=4, help="heads whose lists are counted (statistics per head)")
    parser.add_argument("--sass", action="store_true")
    args = parser.parse_args()
    for name in args.cases:
        report(name, **CASES[name], model_heads=args.heads)
    if args.sass:
        sass_counts()


if __name__ == "__main__":
    main()
