"""sparse_inductor: block-sparse attention for video diffusion transformers, as a
``torch.compile`` backend and as an eager op.

Compiled use (no change to the model)::

    model = torch.compile(model, backend="sparse_inductor")
    with sparse_inductor.sparsity(0.875):
        out = model(latents, timestep, text)
    print(sparse_inductor.explain(model, latents, timestep, text))

Eager use::

    out = sparse_inductor.video_sparse_attention(q, k, v, grid=(T, H, W), sparsity=0.875)

Models trained with sparse attention: ``sparse_inductor.nn.VideoSparseAttention`` (VSA's gated
coarse branch). What sparsity costs on a model: ``print(sparse_inductor.fidelity(model, *inputs))``. Serving:
``sparse_inductor.export(model, args, kwargs, sparsity=0.875)`` is ``torch.export`` with the sparse sites.
"""
import logging

# Before the imports: sparse_inductor.ops hashes it into the kernel version at import.
__version__ = "0.1.0"

from . import nn  # sparse_inductor.nn.VideoSparseAttention
from .api import select_blocks, video_sparse_attention
from .calibrate import CalibrationResult, calibrate
from .config import SparsityConfig, current_config, sparsity
from .explain import Explanation, explain
# Like fidelity, the function shadows its module's name.
from .export import export
# The function shadows its module's name as a package attribute (sparse_inductor.fidelity is the
# function); import names from the module with `from sparse_inductor.fidelity import ...`.
from .fidelity import FidelityResult, fidelity
from .layout import TileLayout, from_tiles, tile_layout, to_tiles
from .policies import CumulativeMass, Full, PerHead, Policy, Skip, Stripe, Temporal, TopK, Window
from .plan import Plan
from .selection import BlockSelection
# Like fidelity, the function shadows its module (import names with `from sparse_inductor.stats import ...`).
from .stats import Stats, stats

logging.getLogger("sparse_inductor").addHandler(logging.NullHandler())


def _register_backend_from_source_tree() -> None:
    """``backend="sparse_inductor"`` is found through the package's entry point once it is
    pip-installed. Run from a source tree on ``PYTHONPATH`` there is none: register the name here
    (only then: registering it twice is an error in Dynamo)."""
    from importlib.metadata import entry_points

    if any(ep.name == "sparse_inductor" for ep in entry_points(group="torch_dynamo_backends")):
        return
    import torch._dynamo

    if "sparse_inductor" not in torch._dynamo.list_backends(exclude_tags=()):
        from .backend import sparse_inductor_backend

        torch._dynamo.register_backend(name="sparse_inductor")(sparse_inductor_backend)


_register_backend_from_source_tree()

__all__ = [
    "BlockSelection",
    "CalibrationResult",
    "CumulativeMass",
    "Full",
    "PerHead",
    "Plan",
    "Policy",
    "Skip",
    "Stats",
    "Stripe",
    "Temporal",
    "TopK",
    "Window",
    "Explanation",
    "FidelityResult",
    "SparsityConfig",
    "current_config",
    "calibrate",
    "explain",
    "export",
    "fidelity",
    "nn",
    "sparsity",
    "stats",
    "TileLayout",
    "from_tiles",
    "select_blocks",
    "tile_layout",
    "to_tiles",
    "video_sparse_attention",
]
