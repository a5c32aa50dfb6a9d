"""``a | b``: a KV tile is kept if any member keeps it (e.g. ``Window(1, 1, 1) | Stripe(...)``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy, SelectionContext, as_lists
from .full import Full
from .skip import Skip


@dataclass(frozen=True)
class Union(Policy):
    """The union of the members' selections (made with ``|``). ``Skip()`` members add nothing;
    a ``Full()`` member makes the union full. Static when every member is."""

    members: tuple = ()

    @classmethod
    def of(cls, *policies) -> Policy:
        members = []
        for p in policies:
            if not isinstance(p, Policy):
                raise TypeError(f"| combines selection policies (TopK, CumulativeMass, Window, ...), got {p!r}")
            for m in (p.members if isinstance(p, Union) else (p,)):
                if not isinstance(m, Skip) and m not in members:
                    members.append(m)
        if any(isinstance(m, Full) for m in members):
            return Full()
        if not members:
            return Skip()
        return members[0] if len(members) == 1 else cls(tuple(members))

    @property
    def static(self):  # noqa: D401 - a property of the members
        return all(m.static for m in self.members)

    def width(self, tile_grid) -> int:
        nt, nh, nw = tile_grid
        total = sum(m.width(tile_grid) for m in self.members)
        M = nt * nh * nw
        return min(total, M) if isinstance(M, int) else torch.sym_min(total, M)

    def is_dense(self, num_tiles=None) -> bool:
        return all(m.is_dense(num_tiles) for m in self.members)

    def video_lists(self, ctx: SelectionContext):
        from ..selection import mask_from_lists

        mask = None
        for m in self.members:
            num, idx = m.lists(ctx)
            keep = mask_from_lists(num, idx, ctx.num_tiles)
            mask = keep if mask is None else mask | keep
        return as_lists(mask, self.width(ctx.tile_grid))

    def describe(self) -> str:
        return " | ".join(m.describe() for m in self.members)
