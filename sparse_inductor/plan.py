"""``Plan``: per-head selection policies by module path, as :func:`sparse_inductor.calibrate`
finds them (Sparse-vDiT's offline search, arXiv 2506.03065), saved as versioned JSON.

A plan is applied with ``sparsity(plan=plan)``: a site the plan names gets its per-head
policies, a site it does not name keeps the context's policy, and ``layers=`` overrides both.
A plan that does not fit the model (a site it names that the model does not have, or another
head count) is an error that names the site.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from .policies import CumulativeMass, Full, PerHead, Policy, Skip, Stripe, Temporal, TopK, Window
from .policies.union import Union

#: Version of the JSON layout written by :meth:`Plan.save`.
SCHEMA_VERSION = 1


def policy_to_json(policy: Policy) -> dict:
    """A JSON-ready description of a policy (``{"kind": ..., parameters}``)."""
    if isinstance(policy, TopK):
        return {"kind": "topk", "sparsity": policy.sparsity}
    if isinstance(policy, CumulativeMass):
        return {"kind": "cumulative_mass", "p": policy.p, "min_tiles": policy.min_tiles,
                "max_fraction": policy.max_fraction}
    if isinstance(policy, Window):
        return {"kind": "window", "rt": policy.rt, "rh": policy.rh, "rw": policy.rw}
    if isinstance(policy, Temporal):
        return {"kind": "temporal", "rh": policy.rh, "rw": policy.rw}
    if isinstance(policy, Stripe):
        return {"kind": "stripe", "tiles": [list(t) for t in policy.tiles], "first_frames": policy.first_frames}
    if isinstance(policy, Full):
        return {"kind": "full"}
    if isinstance(policy, Skip):
        return {"kind": "skip"}
    if isinstance(policy, Union):
        return {"kind": "union", "members": [policy_to_json(m) for m in policy.members]}
    if isinstance(policy, PerHead):
        return {"kind": "per_head", "policies": [policy_to_json(p) for p in policy.policies]}
    raise ValueError(f"no JSON form for policy {policy!r}")


def policy_from_json(data: dict) -> Policy:
    """The inverse of :func:`policy_to_json`."""
    kind = data.get("kind") if isinstance(data, dict) else None
    params = {k: v for k, v in data.items() if k != "kind"} if isinstance(data, dict) else {}
    if kind == "topk":
        return TopK(**params)
    if kind == "cumulative_mass":
        return CumulativeMass(**params)
    if kind == "window":
        return Window(**params)
    if kind == "temporal":
        return Temporal(**params)
    if kind == "stripe":
        return Stripe(tiles=tuple(tuple(t) for t in params.get("tiles", ())),
                      first_frames=params.get("first_frames", 0))
    if kind == "full":
        return Full()
    if kind == "skip":
        return Skip()
    if kind == "union":
        return Union.of(*(policy_from_json(m) for m in params["members"]))
    if kind == "per_head":
        return PerHead(tuple(policy_from_json(p) for p in params["policies"]))
    raise ValueError(f"unknown policy kind {kind!r} in plan (known: topk, cumulative_mass, window, temporal, stripe, "
                     "full, skip, union, per_head)")


def mode_of(policy: Policy) -> str:
    """Sparse-vDiT's mode name of a head's policy: full, skip, window (diagonal), temporal
    (multi-diagonal), stripe (vertical stripe), a union of them, or a dynamic policy."""
    if isinstance(policy, Union):
        return "+".join(sorted(mode_of(m) for m in policy.members))
    return {Full: "full", Skip: "skip", Window: "window", Temporal: "temporal", Stripe: "stripe", TopK: "topk",
            CumulativeMass: "cumulative_mass"}.get(type(policy), type(policy).__name__)


@dataclass(frozen=True)
class Plan:
    """Per-head policies of named attention sites (frozen and hashable: one compiled variant
    per plan).

    Attributes:
        sites: ``((module path, PerHead), ...)``.
        grid: ``(T, H, W)`` the plan was calibrated on (for the record; static patterns are in
            tiles and relative positions, so they apply at other grids too).
        tile: the tile shape it was calibrated with.
        info: ``((key, value), ...)``: the budget, the objective's totals, the project version.
    """

    sites: tuple = ()
    grid: tuple | None = None
    tile: tuple = (4, 4, 4)
    info: tuple = field(default=(), compare=False)  # not part of the variant key

    def __post_init__(self):
        sites = tuple((str(path), p if isinstance(p, PerHead) else PerHead((p,)) if isinstance(p, Policy) else p)
                      for path, p in (self.sites.items() if isinstance(self.sites, dict) else self.sites))
        for path, p in sites:
            if not isinstance(p, PerHead):
                raise ValueError(f"plan site {path!r}: expected PerHead([...]) (one policy per head), got {p!r}")
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "info", tuple(dict(self.info).items()) if not isinstance(self.info, tuple)
                           else self.info)

    def policy_for(self, module_path: str):
        for path, policy in self.sites:
            if path == module_path:
                return policy
        return None

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.sites]

    def census(self) -> dict:
        """``{module path: {mode: heads}}``."""
        out = {}
        for path, per_head in self.sites:
            counts: dict = {}
            for p in per_head.policies:
                counts[mode_of(p)] = counts.get(mode_of(p), 0) + 1
            out[path] = counts
        return out

    def mean_kept(self, tile_grid) -> float:
        """Mean share of the video KV tiles a head keeps on ``tile_grid`` (static heads only;
        a dynamic head counts at its list width)."""
        M = math.prod(tile_grid)
        shares = []
        for _, per_head in self.sites:
            for p in per_head.policies:
                shares.append(1.0 if isinstance(p, Full) else p.width(tile_grid) / M)
        return sum(shares) / max(1, len(shares))

    def check_sites(self, site_heads: dict) -> None:
        """Raise if the plan names a site the model does not have (``site_heads``: module path ->
        heads of every attention site seen) or a site with another head count."""
        for path, per_head in self.sites:
            if path not in site_heads:
                known = ", ".join(sorted(site_heads)) or "none"
                raise ValueError(f"plan names attention site {path!r}, which this model does not have "
                                 f"(its sites: {known})")
            heads = site_heads[path]
            if heads is not None and heads != len(per_head.policies):
                raise ValueError(f"plan site {path!r} has {len(per_head.policies)} heads but the model's site has "
                                 f"{heads}")

    def to_json(self) -> dict:
        from . import __version__

        return {"schema_version": SCHEMA_VERSION, "project_version": __version__,
                "grid": list(self.grid) if self.grid else None, "tile": list(self.tile),
                "info": dict(self.info),
                "sites": {path: [policy_to_json(p) for p in per_head.policies] for path, per_head in self.sites}}

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"plan schema version {version!r} is not supported (this sparse_inductor reads "
                             f"version {SCHEMA_VERSION})")
        sites = tuple((path, PerHead(tuple(policy_from_json(p) for p in heads)))
                      for path, heads in data["sites"].items())
        return cls(sites=sites, grid=tuple(data["grid"]) if data.get("grid") else None, tile=tuple(data["tile"]),
                   info=tuple((k, v if not isinstance(v, list) else tuple(v)) for k, v in data.get("info", {}).items()))

    def save(self, path: str) -> None:
        """Write the plan as JSON (schema version, project version, grid, tile, per site and head
        the pattern and its parameters)."""
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)

    @classmethod
    def load(cls, path: str) -> "Plan":
        with open(path) as f:
            return cls.from_json(json.load(f))

    def __repr__(self):
        heads = sum(len(p.policies) for _, p in self.sites)
        return f"Plan({len(self.sites)} sites, {heads} heads, tile={self.tile}, grid={self.grid})"
