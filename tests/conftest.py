"""Test setup: without CUDA the Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before ``kernel_templates`` is imported (``triton.jit`` reads it
when the kernels are defined).
"""
import os
import sys

import torch

# The example model (examples/video_dit.py) doubles as the compiler tests' model.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The CPU tests' tensors are too small for intra-op threads to pay off, and two threads on
    # two cores slow down many-fold whenever another process keeps a core busy (Inductor's
    # compile workers, the ranks of a distributed test, a second test run); examples/testbed_dit.py's
    # --tiny does the same. The environment variable carries it to the processes tests start.
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from hypothesis import HealthCheck, settings  # noqa: E402


def _backend_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == "sparse_inductor" for ep in entry_points(group="torch_dynamo_backends"))


BACKEND_INSTALLED = _backend_installed()
# Running from a source tree on PYTHONPATH (e.g. the GPU machine) without `pip install`, importing
# the package registers the backend by hand; test_entry_point_needs_no_import is skipped then.
import sparse_inductor  # noqa: E402,F401

# CI (2 CPU cores) runs few examples per property; the GPU machine runs more.
settings.register_profile(
    "cpu", max_examples=12, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "gpu", max_examples=40, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gpu" if HAS_CUDA else "cpu"))
