"""sparse_inductor: block-sparse attention for video diffusion transformers, as a
``torch.compile`` backend and as an eager op.

Compiled use (no change to the model)::

    model = torch.compile(model, backend="sparse_inductor")
    with sparse_inductor.sparsity(0.875):
        out = model(latents, timestep, text)
    print(sparse_inductor.explain(model, latents, timestep, text))

Eager use::

    out = sparse_inductor.video_sparse_attention(q, k, v, grid=(T, H, W), sparsity=0.875)
"""
import logging

from .api import select_blocks, video_sparse_attention
from .config import SparsityConfig, current_config, sparsity
from .explain import Explanation, explain
from .layout import TileLayout, from_tiles, tile_layout, to_tiles
from .selection import BlockSelection

__version__ = "0.1.0"

logging.getLogger("sparse_inductor").addHandler(logging.NullHandler())

__all__ = [
    "BlockSelection",
    "Explanation",
    "SparsityConfig",
    "current_config",
    "explain",
    "sparsity",
    "TileLayout",
    "from_tiles",
    "select_blocks",
    "tile_layout",
    "to_tiles",
    "video_sparse_attention",
]
