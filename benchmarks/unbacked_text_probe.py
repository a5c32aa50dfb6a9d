"""Which compilers handle Mochi-style joint attention with a data-dependent text length?

``tests/joint_models.ValidPromptTokens`` keeps each sample's valid prompt tokens with ``nonzero``
(an unbacked size under ``capture_dynamic_output_shape_ops``). Compiled forward and backward with
plain Inductor, with our backend at sparsity 0 (the site stays dense) and at 0.5 (the sparse rewrite),
on CPU and on CUDA when present; one line each: ``ok`` or the error and the frames it came from.

    PYTHONPATH=$PWD python benchmarks/unbacked_text_probe.py [--force-rewrite]

H200, torch 2.11.0+cu130 (2026-12-01): plain Inductor and sparsity 0 ok on CPU and CUDA; sparsity 0.5
failed on both (CPU: the ``cat`` lowering's guard on the unbacked size; CUDA: "The argument
'3 - 4*((((0))//2))' is not comparable" in ``simplify_loops``). That run predates the gate that now
keeps such sites dense below torch 2.13 (``sparse_inductor._compat.UNBACKED_TEXT_SUPPORTED``, printed
first): below it the 0.5 line compiles a dense site unless ``--force-rewrite`` lifts the gate.
"""
from __future__ import annotations

import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import sparse_inductor as si  # noqa: E402
from sparse_inductor import _compat  # noqa: E402
from joint_models import ValidPromptTokens  # noqa: E402


def attempt(device: str, backend: str, sparsity: float) -> str:
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    model = ValidPromptTokens("after").to(device)
    latents = torch.randn(1, 4, 3, 8, 10, generator=g).to(device).requires_grad_()
    prompt = torch.randn(1, 9, 8, generator=g).to(device).requires_grad_()
    mask = torch.tensor([[1] * 5 + [0] * 4], dtype=torch.bool, device=device)
    try:
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), si.sparsity(sparsity, min_tokens=0):
            (out,) = torch.compile(model, backend=backend)(latents, prompt, mask)
            out.sum().backward()
        return "ok"
    except Exception as error:  # the point is to report any failure
        frames = traceback.extract_tb(error.__traceback__)[-3:]
        first = (str(error).strip().splitlines() or [""])[0][:240]
        return f"{type(error).__name__}: {first} [{', '.join(f'{os.path.basename(f.filename)}:{f.lineno}' for f in frames)}]"


def main() -> None:
    if "--force-rewrite" in sys.argv[1:]:  # probe the sparse rewrite even where the gate keeps it dense
        _compat.UNBACKED_TEXT_SUPPORTED = True
    print(f"torch {torch.__version__}; sparse rewrite of unbacked text enabled: {_compat.UNBACKED_TEXT_SUPPORTED}")
    for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        for backend, sparsity in (("inductor", 0.0), ("sparse_inductor", 0.0), ("sparse_inductor", 0.5)):
            print(f"{device} {backend} sparsity {sparsity}: {attempt(device, backend, sparsity)}", flush=True)


if __name__ == "__main__":
    main()
