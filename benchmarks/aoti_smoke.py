"""Does AOTInductor packaging work at all on this machine? A two-layer MLP (no sparse_inductor code),
exported, packaged with ``aoti_compile_and_package`` and loaded in a fresh process, on CPU and on
CUDA when present. Each line says whether the fresh process loaded and ran the package.

    python benchmarks/aoti_smoke.py            # package -> fresh process: loads and runs?
    python benchmarks/aoti_smoke.py --steps    # and, where that fails, which step crashes

``--steps`` loads the package again piece by piece, each piece in its own child process so that a
crash names it: ``dlopen`` of the package's shared library, the model-container runner built on it,
then ``aoti_load_package``.

On the H200 machine (torch 2.11.0+cu130, 2026-12-01) even the CPU package crashed in the loading
process (exit -11) and the call ran out of its 200 s before the CUDA case: the segfault that
``benchmarks/aoti_export.py`` hit is AOTInductor's on that machine, not our ops' (benchmarks/NOTES.md).
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import zipfile

import torch


def load_and_run(path: str, device: str) -> None:
    """In the fresh process: load the package and run it once."""
    package = torch._inductor.aoti_load_package(path)
    out = package(torch.randn(8, 64, device=device))
    print(f"loaded and ran: output {tuple(out.shape)}", flush=True)


def in_child(code: str) -> str:
    """Run ``code`` in a fresh interpreter (with faulthandler): "ok" or how it died."""
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", "import torch\n" + code],
                          capture_output=True, text=True)
    if done.returncode == 0:
        return "ok"
    return f"FAILED (exit {done.returncode}): {done.stderr.strip()[-600:]}"


def load_steps(path: str, device: str) -> list[tuple[str, str]]:
    """Each loading step of the package at ``path`` in its own process."""
    folder = path + ".extracted"
    zipfile.ZipFile(path).extractall(folder)
    libraries = sorted(glob.glob(os.path.join(folder, "**", "*.so"), recursive=True))
    if not libraries:
        raise SystemExit(f"the package {path} holds no shared library (.so): nothing to load step by step")
    library = libraries[0]
    # The container runners are private torch APIs; a diagnostic script may use them (the package may not).
    runner = (f"torch._C._aoti.AOTIModelContainerRunnerCuda({library!r}, 1, 'cuda', {os.path.dirname(library)!r})"
              if device == "cuda" else f"torch._C._aoti.AOTIModelContainerRunnerCpu({library!r}, 1)")
    return [("dlopen", in_child(f"import ctypes; ctypes.CDLL({library!r})")),
            ("container runner", in_child(runner)),
            ("aoti_load_package", in_child(f"torch._inductor.aoti_load_package({path!r})"))]


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] != "--steps":
        load_and_run(sys.argv[1], sys.argv[2])
        return
    with_steps = "--steps" in sys.argv[1:]
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    for device in devices:
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(device)
        program = torch.export.export(model, (torch.randn(8, 64, device=device),))
        with tempfile.TemporaryDirectory() as folder:
            path = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(folder, "mlp.pt2"))
            child = subprocess.run([sys.executable, "-X", "faulthandler", os.path.abspath(__file__), path, device],
                                   capture_output=True, text=True)
            verdict = child.stdout.strip().splitlines()[-1] if child.returncode == 0 and child.stdout.strip() else \
                f"FAILED (exit {child.returncode}): {child.stderr.strip()[-800:]}"
            print(f"{device}: torch {torch.__version__}: fresh process {verdict}", flush=True)
            if with_steps:
                for step, result in load_steps(path, device):
                    print(f"  {device} step {step}: {result}", flush=True)


if __name__ == "__main__":
    main()
