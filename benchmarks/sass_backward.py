"""Static look at the compact TMA backward's kernels (kernel_templates/tma_block_sparse_bwd.py) on CPU:
compile them for sm_90a (H100 / H200) and print, per kernel and ``dkdv_variant``, the registers,
spill bytes, shared memory and occupancy ptxas reports, and per loop step (full box, two half
boxes, four quarter boxes; ``BLOCK`` query rows each) the SASS instructions, HGMMAs, MMA waits,
TMA loads and spill instructions (benchmarks/NOTES.md v20).

These are issue-pressure and register proxies, not timings: every claim about speed comes from
``bench_tma_backward.py`` on the GPU.

    python benchmarks/sass_backward.py                       # D 128 and 64, 4 and 8 warps
    python benchmarks/sass_backward.py --dims 128 --warps 4 --variants default two_pass

Needs Triton 3.6 (the H200 image's: its wheel ships the CUDA 12.8 ``ptxas`` it runs, so the counts
are the device's) with its bundled ``ptxas`` and ``nvdisasm``; without a GPU:

    pip install --no-deps --target /tmp/tri36 triton==3.6.0
    PYTHONPATH=/tmp/tri36 python benchmarks/sass_backward.py

Another Triton is refused (its register counts differ) unless ``--any-triton`` is given. Arguments
are typed as a bf16 launch at Wan 480p has them (pointers divisible by 16, descriptors over
``[12, 32768, D]``).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: How each dkdv_variant compiles: a list of launches (one kernel's constexpr flags each).
LAUNCHES = {
    "default": [{}],
    "half_boxes": [{"HALF_BOXES": True}],
    "two_pass": [{"DO_DK": False, "DO_DV": True}, {"DO_DK": True, "DO_DV": False}],
    "stats_in_acc": [{"STATS_IN_ACC": True}],
}
#: The step loops of each kernel, in program order (dQ masks whole boxes, so it has a loop more).
STEP_LABELS = {"dQ": ("full box", "whole box", "2 half boxes", "4 quarter boxes"),
               "dK/dV": ("full or whole box", "2 half boxes", "4 quarter boxes")}


def _toolchain(any_triton: bool):
    """(triton, ptxas path, nvdisasm path), or exits with a message saying what is missing."""
    try:
        import triton
    except ImportError:
        sys.exit("triton is not importable: pip install --no-deps --target /tmp/tri36 triton==3.6.0, then "
                 "PYTHONPATH=/tmp/tri36 python benchmarks/sass_backward.py")
    if not triton.__version__.startswith("3.6") and not any_triton:
        sys.exit(f"found triton {triton.__version__} ({triton.__file__}); these counts are meant with Triton 3.6 "
                 "(the H200 image's). pip install --no-deps --target /tmp/tri36 triton==3.6.0, then "
                 "PYTHONPATH=/tmp/tri36 python benchmarks/sass_backward.py (or pass --any-triton)")
    import sass_loops

    ptxas = sass_loops._ptxas()
    nvdisasm = os.path.join(sass_loops.BIN, "nvdisasm")
    for tool in (ptxas, nvdisasm):
        if not os.path.exists(tool):
            sys.exit(f"{tool} not found: this triton ({triton.__file__}) has no bundled CUDA tools")
    return triton, ptxas, nvdisasm


def compile_kernel(fn, D, block, warps, stages, flags, tools):
    """(sass, shared bytes, ptxas -v lines) of ``fn`` compiled for sm_90a, bf16."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type
    from triton.tools.tensor_descriptor import TensorDescriptor

    triton, ptxas, nvdisasm = tools
    consts = {"HEAD_DIM": D, "BLOCK": block, "UPCAST": False, "IEEE": False, **flags}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts or i in fn.constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_desc"):
            rows = block // 2 if "half" in name else block // 4 if "quarter" in name else block
            rows = rows if rows >= 16 else block
            x = torch.zeros(12, 32768, D, dtype=torch.bfloat16)
            sig[name] = mangle_type(TensorDescriptor.from_tensor(x, [1, rows, D]))
        elif name in ("DQ", "DK", "DV"):
            sig[name] = "*bf16"
        elif name in ("LSE", "DELTA"):
            sig[name] = "*fp32"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        elif name in ("L", "M", "MAX_LIST"):
            sig[name] = "i32"
        else:
            sig[name] = "*i32"
        if sig[name].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    # Constexprs left out take their defaults in the kernel's signature.
    cx = {(i,): consts.get(name, fn.params[i].default) for i, name in enumerate(fn.arg_names)
          if sig[name] == "constexpr"}
    kernel = triton.compile(ASTSource(fn, sig, constexprs=cx, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as tmp:
        ptx, obj = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.o")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        r = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", ptx, "-o", obj], capture_output=True, text=True,
                           check=True)
        sass = subprocess.run([nvdisasm, "-c", obj], capture_output=True, text=True, check=True).stdout
    return sass, kernel.metadata.shared, r.stderr


def step_loops(sass):
    """Instruction lists of the loop-step bodies, in program order: backward branches whose body
    holds an HGMMA and no EXIT (the others are mbarrier retry paths that jump back from past the
    epilogue)."""
    import sass_loops

    return [body for _, body in sass_loops.loops(sass)
            if any("HGMMA" in i for i in body) and not any(sass_loops.opcode(i) == "EXIT" for i in body)]


def describe(body):
    import sass_loops

    ops = collections.Counter(sass_loops.opcode(i) for i in body)
    waits = sum("WARPGROUP.DEPBAR" in i for i in body)
    return dict(instructions=len(body), hgmma=ops["HGMMA"], waits=waits, tma=ops["UTMALDG"],
                spill_ops=ops["LDL"] + ops["STL"])


def measure(fn, D, warps, stages, flags, tools, block=64):
    import sass_loops

    sass, shared, log = compile_kernel(fn, D, block, warps, stages, flags, tools)
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    stores = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    loads = int(re.search(r"(\d+) bytes spill loads", log).group(1))
    info = [line.strip() for line in log.splitlines() if "registers" in line]
    occupancy = sass_loops.occupancy(info, shared, warps)
    return dict(registers=regs, spill_stores=stores, spill_loads=loads, shared=shared,
                programs=re.search(r"occupancy (\d+)", occupancy).group(1),
                steps=[describe(b) for b in step_loops(sass)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", nargs="*", type=int, default=[128, 64])
    parser.add_argument("--warps", nargs="*", type=int, default=[4, 8])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=list(LAUNCHES), choices=list(LAUNCHES))
    parser.add_argument("--no-dq", action="store_true", help="skip the dQ kernel (unchanged by the variants)")
    parser.add_argument("--any-triton", action="store_true", help="measure with whatever triton is importable")
    args = parser.parse_args()
    tools = _toolchain(args.any_triton)
    from kernel_templates import tma_block_sparse_bwd as bwd

    print(f"triton {tools[0].__version__} ({os.path.dirname(tools[0].__file__)}), ptxas {tools[1]}; sm_90a, bf16, "
          f"BLOCK 64, {args.stages} stages. Per step: instructions / HGMMA / MMA waits / TMA loads / spill ops")
    for D in args.dims:
        for warps in args.warps:
            rows = []
            if not args.no_dq:
                rows.append(("dQ", [measure(bwd._tma_packed_bwd_dq, D, warps, args.stages, {}, tools)]))
            for variant in args.variants:
                rows.append((f"dK/dV {variant}", [measure(bwd._tma_packed_bwd_dkdv, D, warps, args.stages, flags,
                                                          tools) for flags in LAUNCHES[variant]]))
            print(f"\nD = {D}, {warps} warps")
            for name, launches in rows:
                for i, m in enumerate(launches):
                    label = name if len(launches) == 1 else f"{name} pass {i + 1}/{len(launches)}"
                    labels = STEP_LABELS[name.split(" ")[0]]
                    steps = "; ".join(f"{labels[j] if j < len(labels) else j}: {s['instructions']}/{s['hgmma']}/"
                                      f"{s['waits']}/{s['tma']}/{s['spill_ops']}" for j, s in enumerate(m["steps"]))
                    print(f"  {label:28s} {m['registers']:3d} regs, spill {m['spill_stores']}+{m['spill_loads']} B, "
                          f"shared {m['shared']} B, {m['programs']} programs/SM | {steps}")
                if len(launches) > 1:
                    total = [sum(m["steps"][j][key] for m in launches) for j in range(len(launches[0]["steps"]))
                             for key in ("instructions", "hgmma")]
                    pairs = "; ".join(f"{STEP_LABELS['dK/dV'][j // 2]}: {total[j]}/{total[j + 1]}"
                                      for j in range(0, len(total), 2))
                    print(f"  {name + ' both passes':28s} per step instructions/HGMMA summed | {pairs}")


if __name__ == "__main__":
    main()
