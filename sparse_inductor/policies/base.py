"""The policy interface (DESIGN.md §3.7): how the KV tiles of each query tile are chosen.

A policy is a small frozen, hashable object. Every policy answers the same question in the same
form: for the *video* query tiles of one attention call, query-major lists
``(num [B', H', Mv], idx [B', H', Mv, W])`` (int32; ``B'``/``H'`` may be 1 to broadcast) of the
video KV tiles kept, entries past ``num`` unspecified. :mod:`sparse_inductor.selection` adds the
text blocks (DESIGN.md §3.5) and hands the lists to the kernels, which never learn which policy
made them; the compiler pass never chooses tiles either (DESIGN.md §9).

Policies see a :class:`SelectionContext`: the tile grid, each tile's valid-token count, the
softmax scale, and (computed on first use, so static patterns cost nothing) the tile means of q
and k.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .. import _compat


def ceil_div(a, b):
    return (a + b - 1) // b


class SelectionContext:
    """What a policy may read to choose tiles for one attention call.

    Attributes:
        tile_grid: ``(nt, nh, nw)`` tiles per axis (ints, or SymInts inside a dynamic graph).
        num_tiles: ``nt * nh * nw`` video tiles (the query tiles, and the KV tiles).
        counts: int32 ``[num_tiles]`` valid tokens per tile.
        scale: softmax scale.
        batch, heads: of the call (``heads`` is the number of heads this context covers).
        device: where the lists must live.
        grid, tile: the token grid and the tile shape.
        allowed: bool ``[num_tiles, num_tiles]`` under a block-causal mask (KV tile j is not
            wholly in the future of query tile i; :mod:`sparse_inductor.causal`), else ``None``.
            Policies with a budget count only allowed tiles (:attr:`num_allowed`) and never
            keep others; the common path (:func:`sparse_inductor.selection.select_tiles`)
            intersects every policy's lists with it.
    """

    def __init__(self, *, grid, tile, counts: Tensor, scale: float, batch, heads, device, means=None,
                 static_lists=None, allowed: Tensor | None = None):
        self.grid, self.tile = tuple(grid), tuple(tile)
        self.tile_grid = tuple(ceil_div(g, t) for g, t in zip(self.grid, self.tile))
        self.num_tiles = math.prod(self.tile_grid)
        self.counts, self.scale = counts, scale
        self.batch, self.heads, self.device = batch, heads, device
        self._means = means  # a callable () -> (q_mean, k_mean) [B, H, Mv, D] fp32, or the pair
        # Precomputed lists of static policies ({policy: (num, idx)}): graph constants.
        self.static_lists = static_lists or {}
        self.allowed = allowed

    @property
    def num_allowed(self) -> Tensor | None:
        """int32 ``[num_tiles]``: allowed KV tiles per query tile (``None`` without a mask)."""
        return None if self.allowed is None else self.allowed.sum(-1, dtype=torch.int32)

    def means(self) -> tuple[Tensor, Tensor]:
        """Tile means of q and k, ``[B, heads, num_tiles, D]`` in fp32 (fp64 for fp64 input)."""
        if callable(self._means):
            self._means = self._means()
        if self._means is None:
            raise ValueError("this policy reads q and k, but the selection was asked for without them "
                             "(a static-only context)")
        return self._means

    def scores(self) -> Tensor:
        """Coarse scores ``q̄ k̄ᵀ`` (unscaled) ``[B, heads, M, M]``."""
        q_mean, k_mean = self.means()
        return q_mean @ k_mean.transpose(-1, -2)

    def heads_subset(self, heads: list[int]) -> "SelectionContext":
        """The same call restricted to the site's heads ``heads`` (for :class:`PerHead`)."""
        if callable(self._means):
            self._means = self._means()
        means = None
        if self._means is not None:  # slices, not an index tensor: no host-to-device copy
            means = tuple(torch.cat([m[:, h:h + 1] for h in heads], dim=1) for m in self._means)
        return SelectionContext(grid=self.grid, tile=self.tile, counts=self.counts, scale=self.scale,
                                batch=self.batch, heads=len(heads), device=self.device, means=means,
                                static_lists=self.static_lists, allowed=self.allowed)

    def coords(self) -> Tensor:
        """int64 ``[num_tiles, 3]``: the ``(t, h, w)`` tile coordinates of each tile, tiles in
        ``(t, h, w)`` order."""
        nt, nh, nw = self.tile_grid
        m = torch.arange(self.num_tiles, device=self.device)
        return torch.stack([m // (nh * nw), (m // nw) % nh, m % nw], dim=-1)


class Policy:
    """Base class of the selection policies; subclasses are frozen dataclasses.

    Subclasses implement :meth:`width` and :meth:`video_lists`; they set ``static = True`` when
    the lists depend on the tile grid only (no coarse stage runs for them).
    """

    static: bool = False

    def width(self, tile_grid) -> int:
        """The list width: an upper bound on the KV tiles any query tile keeps (static shapes)."""
        raise NotImplementedError

    def video_lists(self, ctx: SelectionContext) -> tuple[Tensor, Tensor]:
        """``(num [B', H', Mv], idx [B', H', Mv, width])`` int32 for the video query tiles."""
        raise NotImplementedError

    def lists(self, ctx: SelectionContext) -> tuple[Tensor, Tensor]:
        """:meth:`video_lists`, or a static policy's lists precomputed for this grid."""
        cached = ctx.static_lists.get(self) if self.static else None
        return cached if cached is not None else self.video_lists(ctx)

    def skip_heads(self, heads: int) -> tuple[bool, ...]:
        """Per head: whether the head is skipped (output and gradients exactly 0, text rows too)."""
        return (False,) * heads

    def is_dense(self, num_tiles=None) -> bool:
        """Whether every query tile keeps every tile (then the site runs as plain SDPA)."""
        return False

    def describe(self) -> str:
        """A short text for ``explain()``."""
        return repr(self)

    def check_heads(self, heads: int) -> str:
        """"" if the policy applies to a site with ``heads`` heads, else why not."""
        return ""

    def __or__(self, other):
        from .union import Union

        return Union.of(self, other)


def as_lists(mask: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Bool ``[..., Mq, Mk]`` -> ``(num, idx)`` int32 with each row's kept columns first in
    increasing order, ``idx`` cut to ``width`` columns (``width`` >= every row's count)."""
    num = mask.sum(-1, dtype=torch.int32)
    idx = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    return num, idx.to(torch.int32).contiguous()


def check_fraction(value, name: str, *, low_open: bool = True, allow_one: bool = True) -> float:
    """A float in (0, 1] (or [0, 1) etc.), with an error naming ``name``."""
    # Comparisons, not math.isfinite: they trace when the value is a symbolic float (Dynamo).
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = -math.inf < v < math.inf
    if ok:
        ok = (v > 0 if low_open else v >= 0) and (v <= 1 if allow_one else v < 1)
    if not ok:
        bounds = ("(0, " if low_open else "[0, ") + ("1]" if allow_one else "1)")
        raise ValueError(f"{name} must be a number in {bounds}, got {value!r}")
    return _compat.specialize_float(float(value))


def check_count(value, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def static_parts(policy: Policy) -> list[Policy]:
    """The largest static sub-policies of ``policy`` (whose lists can be precomputed per grid)."""
    if policy.static:
        return [policy]
    members = getattr(policy, "policies", None) or getattr(policy, "members", None) or ()
    out: list = []
    for m in members:
        out += [p for p in static_parts(m) if p not in out]
    return out


def flags_tensor(flags, device) -> Tensor:
    """Bool ``[len(flags)]`` on ``device`` built from a Python sequence without a host-to-device
    copy (so the selection can be captured in a CUDA graph)."""
    out = torch.zeros(len(flags), dtype=torch.bool, device=device)
    for i, flag in enumerate(flags):
        if flag:
            out[i:i + 1].fill_(True)  # (``out[i] = True`` copies a host scalar: not capturable)
    return out
