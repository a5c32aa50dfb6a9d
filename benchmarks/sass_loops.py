"""Static look at the attention kernels without a GPU: compile them for sm_90a (H100) and count the
SASS instructions of each loop, with register use and spills.

A loop's instruction count per thread per step is a proxy for issue pressure, not a timing:
every claim about speed still comes from ``bench_attention.py`` on the GPU. Useful to compare two
versions of a kernel before a GPU run (benchmarks/NOTES.md v9).

    python benchmarks/sass_loops.py                        # this checkout's kernels
    python benchmarks/sass_loops.py other/block_sparse_attention.py --chunk 16

Needs triton's bundled ``ptxas`` (one that accepts its PTX version) and ``nvdisasm``. Arguments
are marked divisible by 16 where a Wan 480p launch has them so (loads vectorise as they would).

Register counts depend on the Triton / ptxas pair, and a few registers can change how many programs
an SM holds (the ``occupancy`` printed: 168 registers is 3 programs of 4 warps, 169-255 is 2). Look
with the device's Triton too (the H200 image has 3.6; its wheel ships the CUDA 12.8 ptxas it uses):

    pip install --no-deps --target /tmp/tri36 triton==3.6.0
    PYTHONPATH=/tmp/tri36 python benchmarks/sass_loops.py --block-m 32
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
SIZES = {"H", "L_Q", "NUM_Q_BLOCKS", "NUM_KV_BLOCKS", "MAX_KV", "MAX_Q", "HEAD_DIM"}
TENSORS16 = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
TENSORS32 = {"LSE", "DELTA"}
DIVISIBLE = {"HEAD_DIM", "NUM_Q_BLOCKS", "NUM_KV_BLOCKS"}
SLOT_STRIDES = {"stride_qsb", "stride_qsh", "stride_kvsb", "stride_qcb", "stride_qch", "stride_kvcb"}


def _module(path: str):
    spec = importlib.util.spec_from_file_location("kernels_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _signature(fn, constexprs: dict):
    """Pointer and scalar types as a bf16 launch at D=128 would have them."""
    sig, divisible = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "sm_scale":
            sig[name] = "fp32"
        elif name in TENSORS16:
            sig[name] = "*bf16"
        elif name in TENSORS32:
            sig[name] = "*fp32"
        elif name.isupper() and name not in SIZES:
            sig[name] = "*i32"
        else:
            sig[name] = "i32"
        # As a Wan 480p launch specialises them (H=12, L=32,760, D=128, 624 tiles, 78 listed):
        # pointers, Q/K/V/O strides, HEAD_DIM and the tile counts are multiples of 16.
        if sig[name].startswith("*") or name in DIVISIBLE or (name.startswith("stride_") and name not in SLOT_STRIDES):
            divisible[(i,)] = [["tt.divisibility", 16]]
    return sig, divisible


def _ptxas() -> str:
    """The ptxas this Triton itself runs for sm_90 (3.6, the H200 image's: the CUDA 12.8 ``ptxas``;
    3.9: ``ptxas-blackwell``), so that a look with the device's Triton sees the device's SASS."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(90).path
    except Exception:  # older or newer layouts
        return os.path.join(BIN, "ptxas-blackwell")


def compile_sass(fn, constexprs: dict, num_warps: int, num_stages: int):
    sig, divisible = _signature(fn, constexprs)
    consts = {(fn.arg_names.index(k),): v for k, v in constexprs.items() if k in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=divisible), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        ptx, obj = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.o")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        ptxas = subprocess.run([_ptxas(), "-v", "--gpu-name=sm_90a", ptx, "-o", obj],
                               capture_output=True, text=True, check=True)
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", obj], capture_output=True, text=True,
                              check=True).stdout
    info = [line.strip() for line in ptxas.stderr.splitlines() if "registers" in line or "spill" in line
            or "Performance" in line]
    return sass, kernel.metadata.shared, info


def loops(sass: str):
    """(label, instructions) of every backward branch's body, in program order."""
    instructions, label_at, pending = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        ins = re.match(r"\s*/\*[0-9a-f]{4,6}\*/\s*(.*?)\s*;?\s*$", line)
        if ins:
            for name in pending:
                label_at[name] = len(instructions)
            pending = []
            instructions.append(ins.group(1))
    found = []
    for i, ins in enumerate(instructions):
        branch = re.search(r"BRA\s+`?\(?\.?(L_x_\d+)", ins)
        if branch and label_at.get(branch.group(1), i) < i:
            found.append((branch.group(1), instructions[label_at[branch.group(1)]: i + 1]))
    return found


def occupancy(info, shared: int, num_warps: int) -> str:
    """Programs per SM on an H100 / H200 (64 K registers, 228 KB shared memory, 1 KB reserved per
    program, 64 warps), from the register count ptxas reports and the shared memory."""
    found = re.search(r"Used (\d+) registers", " ".join(info))
    if not found:
        return "occupancy unknown"
    regs = -(-int(found.group(1)) // 8) * 8  # allocated per warp in units of 256 (8 per thread)
    by_regs = 65536 // (regs * 32 * num_warps)
    by_shared = (228 * 1024) // (shared + 1024)
    return f"occupancy {min(by_regs, by_shared, 64 // num_warps)} programs/SM (registers {by_regs}, shared {by_shared})"


def epilogue(sass: str, found) -> int:
    """Instructions after the last loop's closing branch (the epilogue, run once per program)."""
    instructions = [m.group(1) for m in (re.match(r"\s*/\*[0-9a-f]{4,6}\*/\s*(.*?)\s*;?\s*$", line)
                                         for line in sass.splitlines()) if m]
    if not found:
        return len(instructions)
    closing = max(i for i, ins in enumerate(instructions) if any(ins == body[-1] for _, body in found))
    return len(instructions) - closing - 1


def opcode(ins: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", ins).split(" ")[0].split(".")[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?",
                        default=os.path.join(ROOT, "kernel_templates", "block_sparse_attention.py"))
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--ops", action="store_true", help="print each loop's opcode histogram")
    parser.add_argument("--block-m", type=int, default=64, help="query rows per program (v12; 32 under query_keep 0.5)")
    parser.add_argument("--causal-tokens", type=int, default=0,
                        help="tokens per causal block of a block-causal mask (0: none; Wan 480p, 1 frame: 1560)")
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    module = _module(args.source)
    constexprs = {"BLOCK": 64, "BLOCK_D": 128, "UPCAST": False, "IEEE": False, "CHUNK": args.chunk}
    if "BLOCK_M" in module.block_sparse_attn_fwd_kernel.arg_names:  # v12: query blocks of their own size
        constexprs["BLOCK_M"] = args.block_m
    if "CAUSAL_TOKENS" in module.block_sparse_attn_fwd_kernel.arg_names:  # block-causal masks
        constexprs["CAUSAL_TOKENS"] = args.causal_tokens
    for fn in (module.block_sparse_attn_fwd_kernel, module.block_sparse_attn_bwd_kernel):
        sass, shared, info = compile_sass(fn, constexprs, args.warps, args.stages)
        found = loops(sass)
        print(f"{fn.__name__}: shared memory {shared} B; " + "; ".join(info) + "; "
              + occupancy(info, shared, args.warps) + f"; {epilogue(sass, found)} instructions after the last loop")
        for label, body in found:
            counts = collections.Counter(opcode(i) for i in body)
            spills = counts["LDL"] + counts["STL"]
            print(f"  loop {label}: {len(body)} instructions, {counts['HGMMA']} HGMMA, "
                  f"{counts['LDG'] + counts['LDGSTS']} global loads, {counts['BAR']} barriers, {spills} spill ops")
            if args.ops:
                print("    " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))


if __name__ == "__main__":
    main()
