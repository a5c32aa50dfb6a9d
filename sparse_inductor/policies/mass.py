"""``CumulativeMass(p, min_tiles, max_fraction)``: BSA's adaptive KV budget (arXiv 2509.01085;
DESIGN.md §3.7).

Per query tile i, the coarse logits ``s_ij = q̄_i·k̄_j·scale + ln(n_j)`` (``n_j`` the valid
tokens of KV tile j, so a partial tile's pooled key counts for the tokens it holds) give
``P_i = softmax_j(s_ij)`` over the video KV tiles. Sorted descending (ties to the lower index),
the shortest prefix whose cumulative P reaches ``p`` is kept, its length clamped to
``[min_tiles, ceil(max_fraction · M)]`` (``min_tiles`` wins if the two cross; both are capped at
M). ``p = 1`` keeps every tile (up to the clamp). Rows therefore keep different numbers of
tiles: few where the coarse attention is peaked, many where it is flat.

On CUDA one Triton kernel per row finds the cut without sorting (two bit searches, like the
top-k kernel); on CPU a sort and a cumulative sum. Both run without host syncs and return lists
``ceil(max_fraction · M)`` wide, so shapes stay static.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

from .base import Policy, SelectionContext, check_count, check_fraction


def mass_bounds(num_tiles, min_tiles: int, max_fraction: float):
    """``(lo, hi)``: the clamp of the kept length on ``num_tiles`` tiles (plain ints or SymInts, or
    an integer tensor of per-row counts, giving int32 tensors):
    ``lo = min(min_tiles, M)``, ``hi = max(ceil(max_fraction · M), lo)``, the ceiling exact (the
    fraction read as the decimal it prints as)."""
    f = Fraction(repr(float(max_fraction)))
    if isinstance(num_tiles, Tensor):
        num_tiles = num_tiles.long()  # (a long decimal's numerator overflows int32)
    hi = (num_tiles * f.numerator + f.denominator - 1) // f.denominator
    if isinstance(num_tiles, Tensor):  # per-row counts (allowed tiles under a block-causal mask)
        lo = num_tiles.clamp(max=min_tiles)
        return lo.to(torch.int32), torch.maximum(hi, lo).to(torch.int32)
    if isinstance(num_tiles, int):
        lo = min(min_tiles, num_tiles)
        return lo, max(hi, lo)
    lo = torch.sym_min(min_tiles, num_tiles)
    return lo, torch.sym_max(hi, lo)


def mass_cut_torch(logits: Tensor, counts: Tensor, p: float, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """The CPU implementation (and the tests' second derivation) of the cut: ``logits``
    ``[..., M]`` already scaled; returns ``(num [...], idx [..., hi])``, kept tiles first in
    increasing order, the rest 0."""
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    prob = torch.softmax(logits.to(work) + counts.to(work).log(), dim=-1)
    order = torch.sort(prob, dim=-1, descending=True, stable=True)
    before = torch.cumsum(order.values, dim=-1) - order.values  # mass of the tiles ahead of each
    M = logits.shape[-1]
    length = torch.full(logits.shape[:-1], M, dtype=torch.int64, device=logits.device) if p >= 1.0 \
        else (before < p).sum(-1)
    length = length.clamp(min=lo, max=hi)
    kept = torch.arange(hi, device=logits.device) < length.unsqueeze(-1)
    idx = torch.where(kept, order.indices[..., :hi], M)
    idx = torch.sort(idx, dim=-1).values
    return length.to(torch.int32), torch.where(idx < M, idx, 0).to(torch.int32).contiguous()


def mass_cut_allowed_torch(logits: Tensor, counts: Tensor, allowed: Tensor, p: float, lo: Tensor, hi: Tensor,
                           width: int) -> tuple[Tensor, Tensor]:
    """:func:`mass_cut_torch` of each row ``i`` of ``logits [..., Mq, M]`` over the columns
    ``allowed[i]`` holds (bool ``[Mq, M]``) only, as if the row had just those tiles, with per-row
    clamps ``lo``, ``hi`` (int ``[Mq]``); ``(num [..., Mq], idx [..., Mq, width])``."""
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    prob = torch.softmax((logits.to(work) + counts.to(work).log()).masked_fill(~allowed, float("-inf")), dim=-1)
    # Disallowed columns rank after every allowed one (an undefined row's NaN included).
    order = torch.sort(torch.where(allowed, prob, -1.0), dim=-1, descending=True, stable=True)
    values = order.values.clamp(min=0)
    before = torch.cumsum(values, dim=-1) - values  # mass of the tiles ahead of each
    M = logits.shape[-1]
    n_allowed = allowed.sum(-1)
    in_row = torch.arange(M, device=logits.device) < n_allowed.unsqueeze(-1)
    length = n_allowed.expand(logits.shape[:-1]) if p >= 1.0 else ((before < p) & in_row).sum(-1)
    length = torch.minimum(torch.maximum(length, lo), hi)
    kept = torch.arange(M, device=logits.device) < length.unsqueeze(-1)
    idx = torch.sort(torch.where(kept, order.indices, M), dim=-1).values[..., :width]
    return length.to(torch.int32), torch.where(idx < M, idx, 0).to(torch.int32).contiguous()


@dataclass(frozen=True)
class CumulativeMass(Policy):
    """Keep, per query tile, the fewest KV tiles holding a share ``p`` of its coarse attention
    mass (BSA's KV sparsity), clamped to ``[min_tiles, ceil(max_fraction · M)]`` tiles.

    Args:
        p: share of the coarse softmax mass to keep, in ``(0, 1]``.
        min_tiles: at least this many tiles per query tile (int >= 1).
        max_fraction: at most ``ceil(max_fraction · M)`` tiles, in ``(0, 1]``; also the list
            width, so it bounds the memory of the lists and the worst-case cost of a row.
    """

    p: float = 0.9
    min_tiles: int = 4
    max_fraction: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "p", check_fraction(self.p, "CumulativeMass p"))
        object.__setattr__(self, "min_tiles", check_count(self.min_tiles, "CumulativeMass min_tiles", 1))
        object.__setattr__(self, "max_fraction", check_fraction(self.max_fraction, "CumulativeMass max_fraction"))

    def bounds(self, num_tiles):
        return mass_bounds(num_tiles, self.min_tiles, self.max_fraction)

    def width(self, tile_grid) -> int:
        return self.bounds(math.prod(tile_grid))[1]

    def is_dense(self, num_tiles=None) -> bool:
        return self.p >= 1.0 and self.max_fraction >= 1.0

    def video_lists(self, ctx: SelectionContext):
        lo, hi = self.bounds(ctx.num_tiles)
        logits = ctx.scores() * ctx.scale  # softmax is not scale-invariant: the scale matters here
        if ctx.allowed is not None:
            # Block-causal mask: the softmax, the cut and the clamp run over each row's allowed
            # tiles (M replaced by A_i); the width is that of a row that sees every tile.
            lo_rows, hi_rows = self.bounds(ctx.num_allowed)
            return torch.ops.sparse_inductor.mass_cut_tiles_allowed(logits, ctx.counts, ctx.allowed, self.p, lo_rows,
                                                                    hi_rows, hi)
        return torch.ops.sparse_inductor.mass_cut_tiles(logits, ctx.counts, self.p, lo, hi)

    def describe(self) -> str:
        return f"CumulativeMass(p={self.p}, min_tiles={self.min_tiles}, max_fraction={self.max_fraction})"
