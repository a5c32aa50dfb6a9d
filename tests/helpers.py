"""Shared strategies and tolerances for the tests."""
import math

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st

from sparse_inductor import _compat

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a dependency on Linux x86-64
    HAS_TRITON = False

HAS_CUDA = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


def interpreted_examples(n):
    """``settings`` for a property whose every example runs the Triton kernels: ``n`` examples on
    CPU, where the interpreter takes seconds per example (the suite's time budget), the profile's
    count on CUDA. Only the number of draws changes, never the strategies (the spec)."""
    return settings(max_examples=settings.default.max_examples if HAS_CUDA else n)


#: Cases that repeat what a cheaper case of the same test already shows on CPU, at a cost CI's two
#: cores cannot carry in the suite's 30-minute budget: marked ``slow`` and run where CUDA is
#: (``pytest -m slow`` on the GPU machine), skipped without it; never deleted.
SLOW_ON_CPU = (pytest.mark.slow,
               pytest.mark.skipif(not HAS_CUDA, reason="slow on CPU (the suite's time budget): runs with CUDA"))


def slow_on_cpu(*values):
    """``pytest.param(*values)`` marked :data:`SLOW_ON_CPU`."""
    return pytest.param(*values, marks=SLOW_ON_CPU)


#: Sparse sites with a data-dependent text length (Mochi) exist only where Inductor compiles them
#: (``_compat.UNBACKED_TEXT_SUPPORTED``); below that version they stay dense, which other tests check.
needs_unbacked_text = pytest.mark.skipif(
    not _compat.UNBACKED_TEXT_SUPPORTED,
    reason=f"sparse sites with a data-dependent text length need torch >= 2.13 (this is {torch.__version__})")
UNBACKED_TEXT_MODELS = ("mochi",)


def unbacked_text_params(values):
    """``values`` for ``parametrize`` with the models of :data:`UNBACKED_TEXT_MODELS` (a name, or a
    tuple starting with one) marked :data:`needs_unbacked_text`."""
    name = lambda v: v[0] if isinstance(v, tuple) else v  # noqa: E731
    return [pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=needs_unbacked_text)
            if name(v) in UNBACKED_TEXT_MODELS else v for v in values]

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


# Joint text + video attention (DESIGN.md §3.5) with a key-padding mask over the text keys.
text_paddings = st.sampled_from(["none", "some", "all text"])


def text_key_keep(B, before, N, after, padding, generator):
    """Bool ``[B, L]`` (True = attend) over ``[text_before | video | text_after]``: every key kept
    (``"none"``), about 60 % of each batch's text keys (``"some"``), or no text key (``"all text"``)."""
    L = before + N + after
    keep = torch.ones(B, L, dtype=torch.bool)
    text = torch.cat([torch.arange(before), torch.arange(before + N, L)])
    if padding == "some":
        keep[:, text] = torch.rand(B, len(text), generator=generator) < 0.6
    elif padding == "all text":
        keep[:, text] = False
    return keep


def joint_token_mask(video_selected, grid, tile, before, after, keep):
    """The §3.5 token mask ``[B, H, L, L]``: text queries see every key, video queries their
    selected video tiles (``video_selected``, a tile mask) plus all text; ``keep`` hides keys."""
    from sparse_inductor.reference import token_mask

    B, H = video_selected.shape[:2]
    N = math.prod(grid)
    L = before + N + after
    mask = torch.ones(B, H, L, L, dtype=torch.bool)
    mask[:, :, before: before + N, before: before + N] = token_mask(video_selected.cpu(), grid, tile)
    return mask & keep.view(B, 1, 1, L)
