"""Shared strategies and tolerances for the tests."""
import math

import torch
from hypothesis import strategies as st

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a dependency on Linux x86-64
    HAS_TRITON = False

HAS_CUDA = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"

# Relative L2 error ‖x − ref‖ / ‖ref‖ against a float64 reference on the same (rounded) inputs.
# fp32: exact-precision dots (tf32 off); fp16/bf16: P is rounded to the input dtype before P·V
# (flash-style) and the interpreter truncates fp32 -> bf16, hence the looser bf16 bound.
REL_TOL = {
    torch.float64: {"out": 1e-12, "lse": 1e-12, "grad": 1e-12},
    torch.float32: {"out": 2e-5, "lse": 1e-6, "grad": 5e-5},
    torch.float16: {"out": 3e-3, "lse": 1e-6, "grad": 6e-3},
    torch.bfloat16: {"out": 2e-2, "lse": 1e-6, "grad": 3e-2},
}


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / max(‖ref‖, 0.01·sqrt(numel)): relative, with an RMS floor of 0.01 so that a
    reference that is ~0 (e.g. dQ when every row sees one key) is compared absolutely."""
    x, ref = x.double().cpu(), ref.double().cpu()
    assert torch.isfinite(x).all(), "non-finite values"
    floor = 0.01 * ref.numel() ** 0.5
    return ((x - ref).norm() / ref.norm().clamp_min(floor)).item()


def assert_close_rel(x, ref, tol, what):
    err = rel_l2(x, ref)
    assert err <= tol, f"{what}: relative L2 error {err:.3e} > {tol:.1e}"


# Grids include ones that do not divide by the tile; sizes are kept small for the interpreter.
def grids(max_tokens=400):
    return st.tuples(st.integers(1, 7), st.integers(1, 9), st.integers(1, 9)).filter(
        lambda g: math.prod(g) <= max_tokens
    )


tiles = st.sampled_from([(4, 4, 4), (2, 4, 4), (1, 4, 8), (2, 2, 2), (1, 2, 2), (3, 3, 3), (2, 3, 5)])
sparsities = st.sampled_from([0.0, 0.3, 0.5, 0.75, 0.875, 0.95])
kernel_dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
