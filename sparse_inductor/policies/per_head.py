"""``PerHead([...])``: one policy per attention head (Sparse-vDiT's per-head modes, fused into
one launch per layer by the lists rather than by reordering heads)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy, SelectionContext


@dataclass(frozen=True)
class PerHead(Policy):
    """Head ``h`` of a site is chosen by ``policies[h]``; the heads of one site still run as
    one kernel launch (every head has its own list rows). Skipped heads cost nothing, full
    heads run as full rows.

    Args:
        policies: one policy per head (the site's head count must match).
    """

    policies: tuple = ()

    def __post_init__(self):
        if isinstance(self.policies, Policy) or not isinstance(self.policies, (tuple, list)) or not self.policies:
            raise ValueError(f"PerHead takes a non-empty list of policies, one per head, got {self.policies!r}")
        for i, p in enumerate(self.policies):
            if not isinstance(p, Policy) or isinstance(p, PerHead):
                raise ValueError(f"PerHead policies[{i}] must be a policy (TopK, CumulativeMass, Window, Temporal, "
                                 f"Stripe, Full, Skip or a union of them), got {p!r}")
        object.__setattr__(self, "policies", tuple(self.policies))

    @property
    def static(self):  # noqa: D401
        return all(p.static for p in self.policies)

    def check_heads(self, heads: int) -> str:
        if len(self.policies) != heads:
            return f"PerHead has {len(self.policies)} policies but the site has {heads} heads"
        return ""

    def width(self, tile_grid) -> int:
        widths = [p.width(tile_grid) for p in set(self.policies)]
        if all(isinstance(w, int) for w in widths):
            return max(widths)
        return torch.sym_max(*widths) if len(widths) > 1 else widths[0]

    def skip_heads(self, heads: int) -> tuple[bool, ...]:
        return tuple(p.skip_heads(1)[0] for p in self.policies)

    def is_dense(self, num_tiles=None) -> bool:
        return all(p.is_dense(num_tiles) for p in self.policies)

    def groups(self) -> dict:
        """``{policy: [heads]}`` in order of first appearance."""
        out: dict = {}
        for h, p in enumerate(self.policies):
            out.setdefault(p, []).append(h)
        return out

    def video_lists(self, ctx: SelectionContext):
        if ctx.heads != len(self.policies):
            raise ValueError(self.check_heads(ctx.heads))
        W = self.width(ctx.tile_grid)
        W = max(1, W) if isinstance(W, int) else W  # (a zero-width list cannot be indexed)
        B = 1 if self.static else ctx.batch
        M = ctx.num_tiles
        per_head = {}
        for policy, heads in self.groups().items():
            num, idx = policy.lists(ctx.heads_subset(heads))
            pad = W - idx.shape[-1]
            if pad:
                idx = torch.cat([idx, idx.new_zeros(*idx.shape[:-1], pad)], dim=-1)
            num, idx = num.expand(B, len(heads), M), idx.expand(B, len(heads), M, W)
            for j, h in enumerate(heads):
                per_head[h] = (num[:, j:j + 1], idx[:, j:j + 1])
        # Heads back in order by slices (no index tensor: no host-to-device copy).
        order = range(len(self.policies))
        return (torch.cat([per_head[h][0] for h in order], 1).contiguous(),
                torch.cat([per_head[h][1] for h in order], 1).contiguous())

    def describe(self) -> str:
        census: dict = {}
        for p in self.policies:
            census[p.describe()] = census.get(p.describe(), 0) + 1
        return "PerHead(" + ", ".join(f"{n}x {d}" for d, n in census.items()) + ")"
