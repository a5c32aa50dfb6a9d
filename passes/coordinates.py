"""Grids read from the values of a coordinates input (the tokens' ``(t, h, w)`` positions).

Where a pipeline packs the tokens itself and precomputes their positions (LTX-Video's condition
pipeline: ``video_coords [B, 3, N]``; LTX-2: ``[B, 3, N, 2]`` patch bounds), the grid never shows
in the graph's shapes: the walk only finds that the query's RoPE is built from a graph input with
a coordinate axis of size 3. The grid is in that input's values, so it is read from them each
time the graph runs (:class:`CoordinateReader`) and never assumed from an earlier call.
"""
from __future__ import annotations

import weakref

import torch

from .shapes import same_size, static_int


def coordinate_layout(shape, tokens) -> tuple[int, int] | None:
    """``(token axis, coordinate axis)`` of a graph input of ``shape`` that may hold the ``(t, h, w)``
    coordinates of ``tokens`` tokens (``[B, 3, N]``, ``[B, 3, N, 2]``, ``[N, 3]``...), or None: exactly
    one axis of that many tokens, and exactly one other static axis of size 3 that is not the
    leading (batch) axis of a tensor of 3 or more dims."""
    if shape is None:
        return None
    token_axes = [a for a, size in enumerate(shape) if same_size(size, tokens)]
    if len(token_axes) != 1:
        return None
    coord_axes = [a for a, size in enumerate(shape) if a != token_axes[0] and static_int(size) == 3
                  and not (a == 0 and len(shape) >= 3)]
    return (token_axes[0], coord_axes[0]) if len(coord_axes) == 1 else None


def may_be_coordinates(shape) -> bool:
    """Whether a graph input of ``shape`` has a coordinate axis (see :func:`coordinate_layout`)."""
    return shape is not None and any(static_int(size) == 3 for a, size in enumerate(shape)
                                     if not (a == 0 and len(shape) >= 3))


def grid_from_coordinates(coords: torch.Tensor, token_axis: int, coord_axis: int) -> tuple | str:
    """The grid ``(T, H, W)`` whose raster order the tokens follow, or why they do not.

    ``coords[..., d, ..., n, ...]`` (``d`` on ``coord_axis``, ``n`` on ``token_axis``) is coordinate
    ``d`` (frame, row, column) of token ``n``; every other index (batch, a ``[start, end)`` pair)
    must describe the same grid. With ``u_d`` the sorted distinct values of coordinate ``d`` and
    ``r_d(n)`` the rank of token ``n``'s value among them, the grid is ``(|u_0|, |u_1|, |u_2|)``
    exactly when ``N = |u_0| |u_1| |u_2|`` and ``n = (r_0(n) |u_1| + r_1(n)) |u_2| + r_2(n)`` for
    every token: token order is raster order (w fastest) over the grid of the values, whatever
    monotone scale the coordinates carry (frame rates, VAE strides, a clamped first frame)."""
    if coords.dtype == torch.bool or coords.is_complex():
        return f"coordinates of dtype {coords.dtype}"
    n_tokens = coords.shape[token_axis]
    if n_tokens == 0:
        return "no tokens"
    rows = coords.detach().movedim((coord_axis, token_axis), (-2, -1)).reshape(-1, 3, n_tokens)
    rows = rows.to("cpu", torch.float64)
    if not torch.isfinite(rows).all():
        return "non-finite coordinates"
    grid, order = None, torch.arange(n_tokens)
    for row in rows:
        ranks, sizes = [], []
        for values in row:
            unique, inverse = torch.unique(values, sorted=True, return_inverse=True)
            ranks.append(inverse)
            sizes.append(len(unique))
        T, H, W = sizes
        if T * H * W != n_tokens:
            return (f"the coordinates take {T} x {H} x {W} distinct values for {n_tokens} tokens (not one grid: "
                    "several videos or repeated positions in one sequence)")
        if not torch.equal((ranks[0] * H + ranks[1]) * W + ranks[2], order):
            return f"the tokens are not in raster order over the ({T}, {H}, {W}) grid of their coordinates"
        if grid is not None and grid != (T, H, W):
            return f"the batch's coordinates describe different grids ({grid} and {(T, H, W)})"
        grid = (T, H, W)
    return grid


class CoordinateReader:
    """Reads the grid from one coordinates input at each call, remembering the answer for the
    tensor it was read from while that tensor is alive and unmodified (a pipeline passes the same
    coordinates at every denoising step: read once, without a device sync per step)."""

    def __init__(self, token_axis: int, coord_axis: int):
        self.token_axis, self.coord_axis = token_axis, coord_axis
        self._last = None  # (weak reference to the tensor, its version, the grid or reason)

    def __call__(self, coords) -> tuple | str:
        if not isinstance(coords, torch.Tensor):
            return "the coordinates input is not a tensor"
        if self._last is not None:
            ref, version, answer = self._last
            if ref() is coords and coords._version == version:
                return answer
        try:
            answer = grid_from_coordinates(coords, self.token_axis, self.coord_axis)
        except RuntimeError as error:  # no values to read (a fake tensor while tracing)
            return f"its values cannot be read here ({type(error).__name__})"
        try:
            self._last = (weakref.ref(coords), coords._version, answer)
        except TypeError:  # not weak-referenceable (a fake tensor in some tracing modes)
            self._last = None
        return answer


def read_grids(sites, inputs, readers: dict) -> dict:
    """``{site index: grid, or why none}`` for the sites whose grid is in a coordinates input,
    read from ``inputs`` (the graph's inputs, in placeholder order) with the ``readers`` kept by
    the caller (one per input, so each tensor is read once)."""
    grids = {}
    for site in sites:
        if site.coordinates is None:
            continue
        index, token_axis, coord_axis = site.coordinates
        reader = readers.setdefault(site.coordinates, CoordinateReader(token_axis, coord_axis))
        grids[site.index] = reader(inputs[index]) if index < len(inputs) else "the input is missing"
    return grids
