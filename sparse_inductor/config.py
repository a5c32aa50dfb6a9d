"""The sparsity configuration and the ``sparsity(...)`` context manager.

Precedence, highest first: the innermost ``sparsity(...)`` context in force at call time, the
``options={...}`` given to ``torch.compile``, the defaults below. A context only sets what it
names; everything else comes from the context around it (and, outermost, from the options). State lives in a ``ContextVar``, so
threads and asyncio tasks each see their own.
"""
from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import numbers
from dataclasses import dataclass, field, replace

from . import _compat
from .layout import check_grid_and_tile

#: Sparsity used when neither a context nor compile options say otherwise (VSA's inference value).
DEFAULT_SPARSITY = 0.875
DEFAULT_TILE = (4, 4, 4)
#: Attention over fewer video tokens than this stays dense (the convention of peer tools: below
#: ~12k tokens attention is cheap and sparsity costs more quality than it saves time).
DEFAULT_MIN_TOKENS = 12288

_UNSET = object()


@dataclass(frozen=True)
class SparsityConfig:
    """A frozen, hashable configuration; one compiled variant exists per distinct value.

    Attributes:
        sparsity: fraction of video KV tiles skipped, in ``[0, 1)``, when no ``policy`` is set:
            the policy is then ``TopK(sparsity)``; 0 is dense SDPA.
        tile: tile shape ``(t, h, w)``.
        min_tokens: attention over fewer video tokens stays dense.
        layers: ``((pattern, policy), ...)``; the first ``fnmatch`` pattern matching a site's
            module path (e.g. ``"blocks.0.*"``) sets its policy (a number given there is
            ``TopK(number)``).
        grid: ``(T, H, W)`` to use where the pass cannot prove the grid from the graph.
        policy: the selection policy of every site ``layers`` and ``plan`` do not name
            (``None``: ``TopK(sparsity)``).
        query_keep: BSA's query sparsity, the share of each tile's query rows computed, ``(0, 1]``.
        plan: a :class:`~sparse_inductor.plan.Plan` (per-head policies by module path, from
            :func:`~sparse_inductor.calibrate`); ``layers`` overrides it.
    """

    sparsity: float = DEFAULT_SPARSITY
    tile: tuple = DEFAULT_TILE
    min_tokens: int = DEFAULT_MIN_TOKENS
    layers: tuple = field(default=())
    grid: tuple | None = None
    policy: object = None
    query_keep: float = 1.0
    plan: object = None

    def default_policy(self):
        """The policy of sites that ``layers`` and ``plan`` do not name."""
        from .policies import TopK

        return self.policy if self.policy is not None else TopK(self.sparsity)

    def policy_for(self, module_path: str):
        """The selection policy of the site made by the module at ``module_path``: the first
        ``layers`` pattern that matches, else the plan's entry, else :meth:`default_policy`. A
        site counts as inside its module, so ``"blocks.0.*"`` matches a site of ``blocks.0``
        itself too."""
        for pattern, value in self.layers:
            if layer_matches(pattern, module_path):
                return value
        if self.plan is not None:
            planned = self.plan.policy_for(module_path)
            if planned is not None:
                return planned
        return self.default_policy()


def layer_matches(pattern: str, module_path: str) -> bool:
    """Whether a ``layers=`` pattern names the site made by the module at ``module_path`` (a site
    counts as inside its module, so ``"blocks.0.*"`` matches ``blocks.0`` itself too)."""
    return fnmatch.fnmatchcase(module_path, pattern) or fnmatch.fnmatchcase(module_path + ".", pattern)


def check_sparsity(value, name: str = "sparsity") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0.0 <= float(value) < 1.0):
        raise ValueError(f"{name} must be a number in [0, 1) (the fraction of KV tiles skipped), got {value!r}")
    return _compat.specialize_float(float(value))


def _check_policy(value, name: str):
    """A policy (or a number, read as ``TopK(number)``), validated."""
    from .policies import Policy, TopK

    if isinstance(value, Policy):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return TopK(check_sparsity(value, name))
    raise ValueError(f"{name} must be a selection policy (TopK, CumulativeMass, Window, Temporal, Stripe, Full, Skip, "
                     f"a union with |, PerHead) or a sparsity in [0, 1), got {value!r}")


def make_config(base: SparsityConfig, sparsity=_UNSET, *, tile=_UNSET, min_tokens=_UNSET, layers=_UNSET,
                grid=_UNSET, policy=_UNSET, query_keep=_UNSET, plan=_UNSET, **unknown) -> SparsityConfig:
    """``base`` with the given fields replaced, each validated (an unknown keyword is a
    ``ValueError`` naming it and the accepted ones)."""
    if unknown:
        raise ValueError(f"unknown sparsity() setting(s) {sorted(unknown)}; accepted keys are {list(_OPTION_KEYS)}")
    changes = {}
    if sparsity is not _UNSET:
        changes["sparsity"] = check_sparsity(sparsity)
    if tile is not _UNSET:
        changes["tile"] = check_grid_and_tile((1, 1, 1), tile)[1]
    if min_tokens is not _UNSET:
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
            raise ValueError(f"min_tokens must be a non-negative int, got {min_tokens!r}")
        changes["min_tokens"] = min_tokens
    if layers is not _UNSET:
        if layers is None:
            layers = {}
        if not isinstance(layers, dict) or not all(isinstance(p, str) for p in layers):
            raise ValueError("layers must be a dict {module path pattern (str): sparsity or policy}, "
                             f"e.g. {{'blocks.0.*': 0.0}}, got {layers!r}")
        changes["layers"] = tuple((p, _check_policy(v, f"layers[{p!r}]")) for p, v in layers.items())
    if grid is not _UNSET:
        changes["grid"] = None if grid is None else check_grid_and_tile(grid, (1, 1, 1))[0]
    if policy is not _UNSET:
        changes["policy"] = None if policy is None else _check_policy(policy, "policy")
    if query_keep is not _UNSET:
        from .query_keep import check_query_keep

        changes["query_keep"] = check_query_keep(query_keep)
    if plan is not _UNSET:
        from .plan import Plan

        if plan is not None and not isinstance(plan, Plan):
            raise ValueError(f"plan must be a sparse_inductor.Plan (from calibrate() or Plan.load(path)), got {plan!r}")
        changes["plan"] = plan
    return replace(base, **changes)


_OPTION_KEYS = ("sparsity", "tile", "min_tokens", "layers", "grid", "policy", "query_keep", "plan")
#: Naming ``sparsity=`` in a context means "TopK at this sparsity": it resets these unless the
#: same call names them (so ``sparsity(0.0)`` is dense SDPA inside any outer policy context).
_RESET_BY_SPARSITY = {"policy": None, "query_keep": 1.0, "plan": None}


def config_from_options(options: dict | None) -> SparsityConfig:
    """The config given by ``torch.compile(..., options={...})`` (same keys as the context)."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(_OPTION_KEYS))
    if unknown:
        raise ValueError(f"unknown sparse_inductor option(s) {unknown}; accepted keys are {list(_OPTION_KEYS)}")
    return make_config(SparsityConfig(), **options)


# The settings named by the enclosing contexts (outer ones merged under inner ones), already
# validated; applied over the compile options at call time.
_overrides: contextvars.ContextVar[tuple] = contextvars.ContextVar("sparse_inductor_overrides", default=())


def current_config(base: SparsityConfig | None = None) -> SparsityConfig:
    """The config in force now: ``base`` (compile options, else defaults) with the settings of
    the enclosing ``sparsity(...)`` contexts applied over it."""
    base = base if base is not None else SparsityConfig()
    overrides = _overrides.get()
    return replace(base, **dict(overrides)) if overrides else base


@contextlib.contextmanager
def sparsity(sparsity=_UNSET, *, policy=_UNSET, query_keep=_UNSET, tile=_UNSET, min_tokens=_UNSET, layers=_UNSET,
             grid=_UNSET, plan=_UNSET):
    """Set the attention sparsity of models compiled with ``backend="sparse_inductor"``.

    Compiled models follow the value in force when they are called; one variant is compiled
    per distinct configuration, and ``sparsity(0.0)`` runs plain SDPA.

    Args:
        sparsity: fraction of video KV tiles each query tile skips, in ``[0, 1)`` (VSA's fixed
            budget, ``TopK(sparsity)``). Naming it also resets ``policy``, ``query_keep`` and
            ``plan`` inherited from outer contexts (unless named here too), so ``sparsity(0.0)``
            is dense everywhere ``layers`` does not say otherwise.
        policy: a selection policy for every site (:mod:`sparse_inductor.policies`), e.g.
            ``CumulativeMass(0.9)``; wins over ``sparsity``.
        query_keep: BSA's query sparsity, in ``(0, 1]`` (default 1: every query row).
        tile: tile shape ``(t, h, w)`` (default ``(4, 4, 4)``).
        min_tokens: attention sites with fewer video tokens stay dense (default 12288).
        layers: ``{module path pattern: sparsity or policy}`` overrides, matched with ``fnmatch``
            against module paths such as ``"blocks.3.attn1"``; the first match wins.
        grid: ``(T, H, W)`` to use where the grid cannot be inferred from the graph.
        plan: a :class:`~sparse_inductor.plan.Plan` from :func:`~sparse_inductor.calibrate`
            (per-head patterns by module path); ``layers`` overrides it, sites it does not name
            keep ``policy``.

    Settings not given come from the enclosing context, else from the compile options. Example::

        with sparse_inductor.sparsity(policy=sparse_inductor.CumulativeMass(0.9), query_keep=0.5,
                                      layers={"blocks.0.*": 0.0}):
            out = model(x)
    """
    given = {name: value for name, value in (("sparsity", sparsity), ("tile", tile), ("min_tokens", min_tokens),
                                              ("layers", layers), ("grid", grid), ("policy", policy),
                                              ("query_keep", query_keep), ("plan", plan)) if value is not _UNSET}
    checked = make_config(SparsityConfig(), **given)  # validates; raises on bad input
    merged = dict(_overrides.get())
    if "sparsity" in given:
        merged.update({name: value for name, value in _RESET_BY_SPARSITY.items() if name not in given})
    merged.update({name: getattr(checked, name) for name in given})
    token = _overrides.set(tuple(merged.items()))
    try:
        yield
    finally:
        _overrides.reset(token)
