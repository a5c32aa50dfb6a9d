"""Static look at the compact TMA backward's kernels (kernel_templates/tma_block_sparse_bwd.py) on CPU:
compile them for sm_90a (H100 / H200) and print, per kernel, ``dkdv_variant`` and ``dq_mode``, the registers,
spill bytes, shared memory and occupancy ptxas reports, and per loop step (full box, two half
boxes, four quarter boxes; ``BLOCK`` query rows each) the SASS instructions, HGMMAs, MMA waits,
TMA loads and spill instructions (benchmarks/NOTES.md v20; the fused dQ's atomics: v22).

These are issue-pressure and register proxies, not timings: every claim about speed comes from
``bench_tma_backward.py`` on the GPU.

    python benchmarks/sass_backward.py                       # D 128 and 64, 4 and 8 warps
    python benchmarks/sass_backward.py --dims 128 --warps 4 --variants default two_pass
    python benchmarks/sass_backward.py --dims 128 --warps 4 --dq-modes separate atomic atomic_tma   # v22
    python benchmarks/sass_backward.py --dims 128 --warps 4 --no-dq --query-layout                  # v23: dK/dV with LQ

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
    "half_steps": [{"HALF_STEPS": True}],
}
#: The dK/dV kernel's arguments for the fused dQ (dq_mode "atomic": DQ_ACC a pointer; "atomic_tma":
#: all three descriptors; "separate": all None, as the default launch leaves them).
DQ_ACC_ARGS = ("DQ_ACC", "dq_acc_half_desc", "dq_acc_quarter_desc")
#: FUSE_DQ of each dq_mode (kernel_templates.tma_block_sparse_bwd._FUSE_DQ); the fused dQ joins the
#: launch that computes dK (two_pass: the second).
FUSE_DQ = {"separate": 0, "atomic": 1, "atomic_tma": 2}


def launch_flags(variant, dq_mode):
    """The dK/dV kernel's launches (constexpr flags each) of a ``dkdv_variant`` and ``dq_mode``."""
    fuse = FUSE_DQ[dq_mode]
    return [dict(flags, FUSE_DQ=fuse) if fuse and flags.get("DO_DK", True) else flags for flags in LAUNCHES[variant]]


#: The step loops of each kernel, in program order (dQ masks whole boxes, so it has a loop more).
STEP_LABELS = {"dQ": ("full box", "whole box", "2 half boxes", "4 quarter boxes"),
               "dK/dV": ("full or whole box", "2 half boxes", "4 quarter boxes"),
               # half_steps: one loop of BLOCK / 2-row steps (half a full or whole box, or a half box)
               "dK/dV half_steps": ("half box", "2 quarter boxes")}


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


def compile_kernel(fn, D, block, warps, stages, flags, tools, query_layout=False):
    """(sass, shared bytes, ptxas -v lines) of ``fn`` compiled for sm_90a, bf16; ``query_layout``:
    the dK/dV kernel with the query side's own row count ``LQ`` (query_keep's kept layout, v23)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type
    from triton.tools.tensor_descriptor import TensorDescriptor

    triton, ptxas, nvdisasm = tools
    consts = {"HEAD_DIM": D, "BLOCK": block, "UPCAST": False, "IEEE": False, **flags}
    sig, attrs = {}, {}
    fuse = flags.get("FUSE_DQ", 0)  # dq_mode: the fp32 dQ accumulator as a pointer (1) or descriptors (2)
    for i, name in enumerate(fn.arg_names):
        if name in consts or i in fn.constexprs:
            sig[name] = "constexpr"
        elif name in DQ_ACC_ARGS:
            if fuse == 0 or (fuse == 1 and name != "DQ_ACC"):
                sig[name] = "constexpr"  # None: the kernel's default
            elif fuse == 1:
                sig[name] = "*fp32"
            else:
                rows = block // 2 if "half" in name else block // 4 if "quarter" in name else block
                rows = rows if rows >= 16 else block
                x = torch.zeros(12, 32768, D, dtype=torch.float32)
                sig[name] = mangle_type(TensorDescriptor.from_tensor(x, [1, rows, D]))
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
        elif name == "LQ":
            sig[name] = "i32" if query_layout else "constexpr"  # None: the kernel's default
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
                spill_ops=ops["LDL"] + ops["STL"], atomics=ops["REDG"] + ops["ATOMG"] + ops["UTMAREDG"])


def measure(fn, D, warps, stages, flags, tools, block=64, query_layout=False):
    import sass_loops

    sass, shared, log = compile_kernel(fn, D, block, warps, stages, flags, tools, query_layout)
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    stores = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    loads = int(re.search(r"(\d+) bytes spill loads", log).group(1))
    info = [line.strip() for line in log.splitlines() if "registers" in line]
    occupancy = sass_loops.occupancy(info, shared, warps)
    return dict(registers=regs, spill_stores=stores, spill_loads=loads, shared=shared,
                serialized="C7515" in log,  # ptxas: wgmma serialized (accumulators touched mid-pipeline)
                programs=re.search(r"occupancy (\d+)", occupancy).group(1),
                steps=[describe(b) for b in step_loops(sass)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", nargs="*", type=int, default=[128, 64])
    parser.add_argument("--warps", nargs="*", type=int, default=[4, 8])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=list(LAUNCHES), choices=list(LAUNCHES))
    parser.add_argument("--dq-modes", nargs="*", default=["separate"], choices=list(FUSE_DQ),
                        help="dq_mode of each dK/dV variant: separate (the dQ kernel is printed once), atomic / "
                             "atomic_tma (dQ fused into the dK/dV kernel)")
    parser.add_argument("--no-dq", action="store_true", help="skip the dQ kernel (unchanged by the variants)")
    parser.add_argument("--query-layout", action="store_true",
                        help="the dK/dV kernel as query_keep < 1 launches it (LQ, the kept layout's rows; v23)")
    parser.add_argument("--any-triton", action="store_true", help="measure with whatever triton is importable")
    args = parser.parse_args()
    tools = _toolchain(args.any_triton)
    from kernel_templates import tma_block_sparse_bwd as bwd

    print(f"triton {tools[0].__version__} ({os.path.dirname(tools[0].__file__)}), ptxas {tools[1]}; sm_90a, bf16, "
          f"BLOCK 64, {args.stages} stages. Per step: instructions / HGMMA / MMA waits / TMA loads / spill ops "
          "[/ dQ atomic instructions: REDG, ATOMG or UTMAREDG]")
    for D in args.dims:
        for warps in args.warps:
            rows = []
            if not args.no_dq and "separate" in args.dq_modes:
                rows.append(("dQ", [measure(bwd._tma_packed_bwd_dq, D, warps, args.stages, {}, tools)]))
            for dq_mode in args.dq_modes:
                for variant in args.variants:
                    name = f"dK/dV {variant}" + ("" if dq_mode == "separate" else f" +dQ {dq_mode}")
                    try:
                        rows.append((name, [measure(bwd._tma_packed_bwd_dkdv, D, warps, args.stages, flags, tools,
                                                    query_layout=args.query_layout)
                                            for flags in launch_flags(variant, dq_mode)]))
                    except Exception as e:  # report, never hide: a variant that does not compile for sm_90a
                        print(f"  {name}: does not compile: {type(e).__name__}: "
                              f"{(str(e).strip().splitlines() or [''])[-1][:300]}", flush=True)
            print(f"\nD = {D}, {warps} warps")
            for name, launches in rows:
                for i, m in enumerate(launches):
                    label = name if len(launches) == 1 else f"{name} pass {i + 1}/{len(launches)}"
                    labels = STEP_LABELS.get(" ".join(name.split(" ")[:2]), STEP_LABELS[name.split(" ")[0]])
                    steps = "; ".join(f"{labels[j] if j < len(labels) else j}: {s['instructions']}/{s['hgmma']}/"
                                      f"{s['waits']}/{s['tma']}/{s['spill_ops']}"
                                      + (f"/{s['atomics']}" if s["atomics"] else "") for j, s in enumerate(m["steps"]))
                    print(f"  {label:28s} {m['registers']:3d} regs, spill {m['spill_stores']}+{m['spill_loads']} B, "
                          f"shared {m['shared']} B, {m['programs']} programs/SM"
                          + (", wgmma SERIALIZED (ptxas C7515)" if m["serialized"] else "") + f" | {steps}")
                if len(launches) > 1:
                    total = [sum(m["steps"][j][key] for m in launches) for j in range(len(launches[0]["steps"]))
                             for key in ("instructions", "hgmma")]
                    pairs = "; ".join(f"{STEP_LABELS['dK/dV'][j // 2]}: {total[j]}/{total[j + 1]}"
                                      for j in range(0, len(total), 2))
                    print(f"  {name + ' both passes':28s} per step instructions/HGMMA summed | {pairs}")


if __name__ == "__main__":
    main()
