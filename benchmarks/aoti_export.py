"""Serving the sparse model: ``sparse_inductor.export`` -> AOTInductor package -> a fresh process.

In one process: the diffusers Wan transformer (random weights) compiled with
``backend="sparse_inductor"`` and, from the same model, ``sparse_inductor.export(...)`` compiled by
``torch._inductor.aoti_compile_and_package``. A second, fresh process loads the package, runs the
same inputs and times it. Printed: compile times, which ops the package's program holds, the
rel-L2 of the package's output against the compiled model's (and against dense, to show it is
sparse), and the step times with their ratio.

    python benchmarks/aoti_export.py                 # GPU: Wan-1.3B architecture, 480p, 81 frames
    python benchmarks/aoti_export.py --layers 6      # the same with 6 of its 30 layers (shorter compile)
    python benchmarks/aoti_export.py --tiny          # CPU: a tiny Wan (the package runs the ops' torch path)

Diagnosis (a package that crashed on load on the H200, 2026-12-01): ``--dense`` packages the plain
``torch.export`` of the same model (is it AOTInductor itself?), ``--in-process`` loads the package in
the process that compiled it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]

import sparse_inductor  # noqa: E402
from compare import timed  # noqa: E402
from wan_t2v import LATENT_480P, LATENT_TINY, TINY, WAN_1_3B  # noqa: E402


def inputs(tiny: bool, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = LATENT_TINY if tiny else LATENT_480P
    latents = torch.randn(shape, generator=g).to(device, dtype)
    text = torch.randn(1, 7 if tiny else 512, TINY["text_dim"] if tiny else WAN_1_3B["text_dim"], generator=g)
    return (latents,), dict(timestep=torch.full((1,), 500.0, device=device), encoder_hidden_states=text.to(device, dtype),
                            return_dict=False)


def build(tiny: bool, layers: int | None, device, dtype):
    from diffusers import WanTransformer3DModel

    config = dict(TINY if tiny else WAN_1_3B)
    if layers:
        config["num_layers"] = layers
    torch.manual_seed(0)
    return WanTransformer3DModel(**config).to(device, dtype).eval(), config


def run_package(path: str, tiny: bool, device: str, dtype: torch.dtype, out_file: str) -> dict:
    """In this (fresh) process: load the package, run it, time it, save its output."""
    start = time.perf_counter()
    package = torch._inductor.aoti_load_package(path)
    args, kwargs = inputs(tiny, device, dtype)
    with torch.no_grad():
        out = package(*args, **kwargs)[0]
        if device == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - start
        ms = timed(lambda: package(*args, **kwargs), device)
    torch.save(out.float().cpu(), out_file)
    return dict(load_and_first_s=first, step_ms=ms)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--layers", type=int, help="layers of the Wan architecture (default: all)")
    parser.add_argument("--sparsity", type=float, default=0.875)
    parser.add_argument("--out", help="write results.json here")
    parser.add_argument("--dense", action="store_true", help="package the dense model (diagnosis)")
    parser.add_argument("--in-process", action="store_true", help="load the package in this process (diagnosis)")
    parser.add_argument("--load", nargs=2, metavar=("PACKAGE", "OUTPUT"), help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.load:
        print(json.dumps(run_package(args.load[0], args.tiny, device, dtype, args.load[1])))
        return

    model, config = build(args.tiny, args.layers, device, dtype)
    margs, mkwargs = inputs(args.tiny, device, dtype)
    settings = dict(sparsity=args.sparsity, min_tokens=0)
    print(f"Wan transformer, {config['num_layers']} layers, latent {tuple(margs[0].shape)}, {device}, {dtype}; "
          f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name()}" if device == "cuda" else ""))
    with torch.no_grad():
        dense = model(*margs, **mkwargs)[0]
        compiled = torch.compile(model, backend="sparse_inductor")
        with sparse_inductor.sparsity(**settings):
            start = time.perf_counter()
            want = compiled(*margs, **mkwargs)[0]
            compile_s = time.perf_counter() - start
            compiled_ms = timed(lambda: compiled(*margs, **mkwargs), device)
    torch.compiler.reset()

    start = time.perf_counter()
    if args.dense:
        program = torch.export.export(model, margs, mkwargs, strict=False)
        want = dense
    else:
        program = sparse_inductor.export(model, margs, mkwargs, **settings)
    export_s = time.perf_counter() - start
    targets = sorted({str(n.target) for n in program.graph.nodes if n.op == "call_function"
                      and ("sparse_inductor" in str(n.target) or "attention" in str(n.target))})
    print(f"exported in {export_s:.1f} s; attention ops in the program: {', '.join(targets)}")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "wan_sparse.pt2")
        start = time.perf_counter()
        torch._inductor.aoti_compile_and_package(program, package_path=path)
        aoti_s = time.perf_counter() - start
        out_file = os.path.join(folder, "out.pt")
        if args.in_process:
            print("loading the package in this process", flush=True)
            loaded = run_package(path, args.tiny, device, dtype, out_file)
        else:
            child = [sys.executable, os.path.abspath(__file__), "--load", path, out_file] + (["--tiny"] if args.tiny else [])
            env = dict(os.environ, PYTHONFAULTHANDLER="1")  # a crash in the package prints the Python stack
            done = subprocess.run(child, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(f"the fresh process that loads the package failed (exit {done.returncode}):\n"
                                 f"{done.stdout[-4000:]}\n{done.stderr[-8000:]}")
            loaded = json.loads(done.stdout.strip().splitlines()[-1])
        got = torch.load(out_file)
    want, dense = want.float().cpu(), dense.float().cpu()
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    result = dict(
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
        layers=config["num_layers"], latent=list(margs[0].shape), sparsity=0.0 if args.dense else args.sparsity,
        packaged="dense model" if args.dense else "sparse_inductor.export", loaded_in="this process" if args.in_process else "a fresh process",
        compile_s=compile_s, export_s=export_s, aoti_compile_s=aoti_s, package_load_and_first_s=loaded["load_and_first_s"],
        compiled_step_ms=compiled_ms, package_step_ms=loaded["step_ms"], package_vs_compiled=loaded["step_ms"] / compiled_ms,
        rel_l2_package_vs_compiled=rel(got, want), rel_l2_package_vs_dense=rel(got, dense),
        rel_l2_compiled_vs_dense=rel(want, dense), attention_ops=targets,
    )
    print(f"backend compile + first call {compile_s:.1f} s; AOTInductor compile {aoti_s:.1f} s; "
          f"fresh process load + first call {loaded['load_and_first_s']:.1f} s")
    print(f"rel-L2 package vs compiled {result['rel_l2_package_vs_compiled']:.2e}; package vs dense "
          f"{result['rel_l2_package_vs_dense']:.2e} (compiled vs dense {result['rel_l2_compiled_vs_dense']:.2e})")
    print(f"step: compiled {compiled_ms:.2f} ms, AOTInductor package {loaded['step_ms']:.2f} ms "
          f"(package / compiled = {result['package_vs_compiled']:.3f})")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "aoti_export.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
