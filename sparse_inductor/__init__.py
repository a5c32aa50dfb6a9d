"""sparse_inductor: block-sparse attention for video diffusion transformers, as an eager op and
as a ``torch.compile`` backend.

Eager use::

    out = sparse_inductor.video_sparse_attention(q, k, v, grid=(T, H, W), sparsity=0.875)
"""
from .api import select_blocks, video_sparse_attention
from .layout import TileLayout, from_tiles, tile_layout, to_tiles
from .selection import BlockSelection

__version__ = "0.1.0"

__all__ = [
    "BlockSelection",
    "TileLayout",
    "from_tiles",
    "select_blocks",
    "tile_layout",
    "to_tiles",
    "video_sparse_attention",
]
