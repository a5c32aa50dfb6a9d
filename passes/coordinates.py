"""Grids read from the values of a coordinates input (the tokens' ``(t, h, w)`` positions).

Where a pipeline packs the tokens itself and precomputes their positions (LTX-Video's condition
pipeline: ``video_coords [B, 3, N]``; LTX-2: ``[B, 3, N, 2]`` patch bounds), the grid never shows
in the graph's shapes: the walk only finds that the query's RoPE is built from a graph input with
a coordinate axis of size 3. The grid is in that input's values, so it is read from them each
time the graph runs (:class:`CoordinateReader`) and never assumed from an earlier call. Where the
sequence also packs other rows (MiniMax-H3's text, audio and keyframe conditions before the video,
with one ``position_ids [L, 3]`` for all of them), the values also tell which rows are the video
(:func:`video_span_from_coordinates`); the others are kept whole, like text.
"""
from __future__ import annotations

import math
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


def _coordinate_rows(coords: torch.Tensor, token_axis: int, coord_axis: int) -> torch.Tensor | str:
    """``coords`` as float64 CPU rows ``[R, N, 3]`` (one ``[N, 3]`` table per batch item / bound), or
    why its values are no coordinates."""
    if coords.dtype == torch.bool or coords.is_complex():
        return f"coordinates of dtype {coords.dtype}"
    n_tokens = coords.shape[token_axis]
    if n_tokens == 0:
        return "no tokens"
    rows = coords.detach().movedim((coord_axis, token_axis), (-1, -2)).reshape(-1, n_tokens, 3)
    rows = rows.to("cpu", torch.float64)
    if not torch.isfinite(rows).all():
        return "non-finite coordinates"
    return rows


def _raster_grid(rows: torch.Tensor) -> tuple | str:
    """The grid ``(T, H, W)`` whose raster order the rows ``[N, 3]`` follow, or why they do not
    (see :func:`video_span_from_coordinates`)."""
    n_tokens = rows.shape[0]
    ranks, sizes = [], []
    for values in rows.T:
        unique, inverse = torch.unique(values, sorted=True, return_inverse=True)
        ranks.append(inverse)
        sizes.append(len(unique))
    T, H, W = sizes
    if T * H * W != n_tokens:
        return (f"the coordinates take {T} x {H} x {W} distinct values for {n_tokens} tokens (not one grid: "
                "several videos or repeated positions in one sequence)")
    if not torch.equal((ranks[0] * H + ranks[1]) * W + ranks[2], torch.arange(n_tokens)):
        return f"the tokens are not in raster order over the ({T}, {H}, {W}) grid of their coordinates"
    return (T, H, W)


def _trailing_true(flags: torch.Tensor) -> int:
    """How many of the last entries of the bool vector ``flags`` are all True."""
    return int(flags.flip(0).to(torch.int64).cumprod(0).sum())


def _trailing_blocks(rows: torch.Tensor, size: int, axis: int) -> int:
    """How many blocks of ``size`` rows at the end of ``rows`` ``[N, 3]`` repeat the last block with
    coordinate ``axis`` constant in each block and increasing from block to block: the coordinates
    after ``axis`` equal the last block's row by row, those before it equal the last block's."""
    m = rows.shape[0] // size
    blocks = rows[rows.shape[0] - m * size:].reshape(m, size, 3)
    last = blocks[-1]
    ok = (blocks[:, :, :axis] == last[:, :axis]).all(dim=(1, 2)) \
        & (blocks[:, :, axis] == blocks[:, :1, axis]).all(dim=1) \
        & (blocks[:, :, axis + 1:] == last[:, axis + 1:]).all(dim=(1, 2))
    ok[:-1] &= blocks[:-1, 0, axis] < blocks[1:, 0, axis]
    return _trailing_true(ok)


def _raster_tail(rows: torch.Tensor) -> tuple:
    """``(T, H, W)`` of the longest run of rows at the end of ``rows`` ``[N, 3]`` that is in raster
    order over the grid of its own distinct values (at least ``(1, 1, 1)``: the last row): its last
    row of pixels is the run of rows of one ``(t, h)`` with ``w`` increasing, its last frame the
    rows of pixels before it of that ``t`` with the same ``w`` values and ``h`` increasing, and its
    frames the blocks of that many rows before it with the last frame's ``(h, w)`` and ``t``
    increasing."""
    t, h, w = rows.unbind(1)
    W = 1 + _trailing_true((t[1:] == t[:-1]) & (h[1:] == h[:-1]) & (w[1:] > w[:-1]))
    H = _trailing_blocks(rows, W, 1)
    return _trailing_blocks(rows, H * W, 0), H, W


def _is_line(grid) -> bool:
    return sum(s > 1 for s in grid) < 2


def _video_span(rows: torch.Tensor) -> tuple | str:
    """``(grid, before, after)`` of one table ``[N, 3]`` (see :func:`video_span_from_coordinates`)."""
    whole = _raster_grid(rows)
    if isinstance(whole, tuple):
        return whole, 0, 0
    n = rows.shape[0]
    runs = []
    for grid, at_end in ((_raster_tail(rows), True), (_raster_tail(-rows.flip(0)), False)):
        if not _is_line(grid):  # (the raster order of negated, reversed rows is the start's, reversed)
            size = math.prod(grid)
            runs.append((grid, n - size, 0) if at_end else (grid, 0, n - size))
    if not runs:
        return (f"{whole}, and no run of rows at its start or end is in raster order over a grid of two or more "
                "axes (a video)")
    if len(runs) == 2 and math.prod(runs[0][0]) == math.prod(runs[1][0]):
        return (f"{whole}: the runs of rows at its start and at its end are grids of the same size "
                f"({math.prod(runs[0][0])} tokens, {runs[1][0]} and {runs[0][0]}): which one is the video is ambiguous")
    grid, before, after = max(runs, key=lambda r: math.prod(r[0]))
    if not isinstance(_raster_grid(rows[before: n - after]), tuple):  # (the walk above proves it; checked)
        return f"{whole}, and the run of rows found at its {'end' if before else 'start'} is no grid"
    return grid, before, after


def video_span_from_coordinates(coords: torch.Tensor, token_axis: int, coord_axis: int) -> tuple | str:
    """``(grid, before, after)``: where the video's tokens are and their grid, read from the values
    of a coordinates input, or why there is none.

    ``coords[..., d, ..., n, ...]`` (``d`` on ``coord_axis``, ``n`` on ``token_axis``) is coordinate
    ``d`` (frame, row, column) of token ``n``; every other index (batch, a ``[start, end)`` pair)
    must describe the same grid. With ``u_d`` the sorted distinct values of coordinate ``d`` and
    ``r_d(n)`` the rank of token ``n``'s value among them, the grid is ``(|u_0|, |u_1|, |u_2|)``
    exactly when ``N = |u_0| |u_1| |u_2|`` and ``n = (r_0(n) |u_1| + r_1(n)) |u_2| + r_2(n)`` for
    every token: token order is raster order (w fastest) over the grid of the values, whatever
    monotone scale the coordinates carry (frame rates, VAE strides, a clamped first frame).

    All tokens in raster order over one grid: ``(grid, 0, 0)``.
    Otherwise the sequence packs other rows with the video (MiniMax-H3: ``[text | keyframe
    conditions | audio | video]``; LTX: conditioning latents before the video): the video is the
    longest run of rows at the end, or at the start, of the sequence that is in raster order over a
    grid of its own values with two or more axes of more than one value (a run along one axis is a
    line of text or audio positions, never a video; a tie of the two ends is ambiguous), and the
    ``before`` / ``after`` rows around it are kept whole, like text (DESIGN.md §3.5). Frames are
    whole: the run starts at a frame boundary. Every batch item / bound must place it alike."""
    rows = _coordinate_rows(coords, token_axis, coord_axis)
    if isinstance(rows, str):
        return rows
    span = None
    for table in rows:
        found = _video_span(table)
        if isinstance(found, str):
            return found
        if span is not None and span != found:
            return (f"the batch's coordinates place the video differently (grid {span[0]} after {span[1]} rows, "
                    f"grid {found[0]} after {found[1]} rows)")
        span = found
    return span


class CoordinateReader:
    """Reads the grid and the video's rows (:func:`video_span_from_coordinates`) from one
    coordinates input at each call, remembering the answer for the tensor it was read from while
    that tensor is alive and unmodified (a pipeline passes the same coordinates at every denoising
    step: read once, without a device sync per step)."""

    def __init__(self, token_axis: int, coord_axis: int):
        self.token_axis, self.coord_axis = token_axis, coord_axis
        self._last = None  # (weak reference to the tensor, its version, (grid, before, after) or reason)

    def __call__(self, coords) -> tuple | str:
        if not isinstance(coords, torch.Tensor):
            return "the coordinates input is not a tensor"
        if self._last is not None:
            ref, version, answer = self._last
            if ref() is coords and coords._version == version:
                return answer
        try:
            answer = video_span_from_coordinates(coords, self.token_axis, self.coord_axis)
        except RuntimeError as error:  # no values to read (a fake tensor while tracing)
            return f"its values cannot be read here ({type(error).__name__})"
        try:
            self._last = (weakref.ref(coords), coords._version, answer)
        except TypeError:  # not weak-referenceable (a fake tensor in some tracing modes)
            self._last = None
        return answer


def read_grids(sites, inputs, readers: dict) -> dict:
    """``{site index: (grid, rows before, rows after the video), or why none}`` for the sites whose
    grid is in a coordinates input, read from ``inputs`` (the graph's inputs, in placeholder order)
    with the ``readers`` kept by the caller (one per input, so each tensor is read once)."""
    grids = {}
    for site in sites:
        if site.coordinates is None:
            continue
        index, token_axis, coord_axis = site.coordinates
        reader = readers.setdefault(site.coordinates, CoordinateReader(token_axis, coord_axis))
        grids[site.index] = reader(inputs[index]) if index < len(inputs) else "the input is missing"
    return grids
