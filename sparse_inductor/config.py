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
        sparsity: fraction of video KV tiles skipped, in ``[0, 1)``; 0 is dense SDPA.
        tile: tile shape ``(t, h, w)``.
        min_tokens: attention over fewer video tokens stays dense.
        layers: ``((pattern, sparsity), ...)``; the first ``fnmatch`` pattern matching a site's
            module path (e.g. ``"blocks.0.*"``) overrides ``sparsity`` there.
        grid: ``(T, H, W)`` to use where the pass cannot prove the grid from the graph.
    """

    sparsity: float = DEFAULT_SPARSITY
    tile: tuple = DEFAULT_TILE
    min_tokens: int = DEFAULT_MIN_TOKENS
    layers: tuple = field(default=())
    grid: tuple | None = None

    def sparsity_for(self, module_path: str) -> float:
        """The sparsity of the site made by the module at ``module_path``. A site counts as
        inside its module, so ``"blocks.0.*"`` matches a site of ``blocks.0`` itself too."""
        for pattern, value in self.layers:
            if fnmatch.fnmatchcase(module_path, pattern) or fnmatch.fnmatchcase(module_path + ".", pattern):
                return value
        return self.sparsity


def check_sparsity(value, name: str = "sparsity") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0.0 <= float(value) < 1.0):
        raise ValueError(f"{name} must be a number in [0, 1) (the fraction of KV tiles skipped), got {value!r}")
    return float(value)


def make_config(base: SparsityConfig, sparsity=_UNSET, *, tile=_UNSET, min_tokens=_UNSET, layers=_UNSET,
                grid=_UNSET) -> SparsityConfig:
    """``base`` with the given fields replaced, each validated."""
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
            raise ValueError("layers must be a dict {module path pattern (str): sparsity}, "
                             f"e.g. {{'blocks.0.*': 0.0}}, got {layers!r}")
        changes["layers"] = tuple((p, check_sparsity(v, f"layers[{p!r}]")) for p, v in layers.items())
    if grid is not _UNSET:
        changes["grid"] = None if grid is None else check_grid_and_tile(grid, (1, 1, 1))[0]
    return replace(base, **changes)


_OPTION_KEYS = ("sparsity", "tile", "min_tokens", "layers", "grid")


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
def sparsity(sparsity=_UNSET, *, tile=_UNSET, min_tokens=_UNSET, layers=_UNSET, grid=_UNSET):
    """Set the attention sparsity of models compiled with ``backend="sparse_inductor"``.

    Compiled models follow the value in force when they are called; one variant is compiled
    per distinct configuration, and ``sparsity(0.0)`` runs plain SDPA.

    Args:
        sparsity: fraction of video KV tiles each query tile skips, in ``[0, 1)``.
        tile: tile shape ``(t, h, w)`` (default ``(4, 4, 4)``).
        min_tokens: attention sites with fewer video tokens stay dense (default 12288).
        layers: ``{module path pattern: sparsity}`` overrides, matched with ``fnmatch`` against
            module paths such as ``"blocks.3.attn1"``; the first match wins.
        grid: ``(T, H, W)`` to use where the grid cannot be inferred from the graph.

    Settings not given come from the enclosing context, else from the compile options. Example::

        with sparse_inductor.sparsity(0.875, layers={"blocks.0.*": 0.0}):
            out = model(x)
    """
    given = {name: value for name, value in (("sparsity", sparsity), ("tile", tile), ("min_tokens", min_tokens),
                                              ("layers", layers), ("grid", grid)) if value is not _UNSET}
    checked = make_config(SparsityConfig(), **given)  # validates; raises on bad input
    merged = dict(_overrides.get())
    merged.update({name: getattr(checked, name) for name in given})
    token = _overrides.set(tuple(merged.items()))
    try:
        yield
    finally:
        _overrides.reset(token)
