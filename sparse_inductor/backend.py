"""The ``torch.compile`` backend ``"sparse_inductor"`` (registered through the
``torch_dynamo_backends`` entry point, so no import is needed).

For each Dynamo graph it analyses the attention sites once, then returns a dispatcher that
compiles, lazily, one Inductor variant per distinct plan (which sites are sparse, at which
sparsity and tile) and runs the variant for the ``sparsity(...)`` config in force at call time.
"""
from __future__ import annotations

import hashlib
import logging
import threading

import torch

from . import _compat
from .config import SparsityConfig, config_from_options, current_config
from .ops import source_hash
from .stats import recording

log = logging.getLogger("sparse_inductor")


# One hash of our sources for both cache keys (this backend's and the ops' kernel_version).
_source_hash = source_hash


def cache_pass(plan_key):
    """A no-op post-grad pass whose ``uuid`` makes Inductor's FX-graph cache key depend on our
    sources and the plan: Inductor does not hash out-of-tree lowerings or templates itself."""
    base = _compat.custom_graph_pass_base()

    class SparseInductorCacheKey(base):
        def __call__(self, graph):
            return None

        def uuid(self):
            return hashlib.sha256((_source_hash() + repr(plan_key)).encode()).hexdigest()

    return SparseInductorCacheKey()


def check_options(options) -> SparsityConfig:
    """The config of ``options=`` (``torch.compile(..., options={...})``), validated. Raised while
    Dynamo compiles, a plain ``ValueError`` would reach the user wrapped in
    ``BackendCompilerFailed``; this one arrives as it is."""
    try:
        return config_from_options(options)
    except ValueError as error:
        raise _compat.user_error(ValueError, str(error)) from None


class SparseInductorGraph:
    """The callable returned for one Dynamo graph: dispatches to a variant per plan.

    Thread-safe: a variant is compiled under Dynamo's compile lock (a config seen for the first
    time in two threads at once is compiled once; the saved tracing context is entered by one
    thread at a time), and the per-config lookup of a compiled variant takes no lock.
    """

    def __init__(self, gm: torch.fx.GraphModule, example_inputs, options=None, mode=None):
        from passes.sites import analyze, grids_of

        self.base_config = check_options(options)
        self.gm = gm
        self.example_inputs = example_inputs
        self.mode_patches = _mode_patches(mode)
        # The grids this graph flattens, offered to later graphs of the same call while it runs.
        self.grids = grids_of(gm)
        self.sites = analyze(gm)
        self.site_paths = tuple(s.module_path for s in self.sites)
        # Sites whose grid is read from a coordinates input's values at each call (LTX).
        self.reads_coordinates = any(s.coordinates is not None for s in self.sites)
        self._coordinate_readers: dict = {}
        self.variants: dict = {}  # plan key -> compiled variant
        self._by_config: dict = {}  # config -> compiled variant (skips re-planning on every call)
        self._layers_seen: set = set()  # the layers= overrides this graph ran with
        self.tracing_context = _compat.current_tracing_context()
        self.compiled_keys: list = []  # in compile order, for tests and diagnostics
        # Compile now, inside Dynamo's context (the example inputs' coordinates give their grids).
        self.variant_for(current_config(self.base_config), read_grids=self._read_grids(example_inputs))

    def _read_grids(self, inputs):
        """``{site index: grid or why none}`` from the coordinates inputs of this call, or None."""
        if not self.reads_coordinates:
            return None
        from passes.coordinates import read_grids

        return read_grids(self.sites, inputs, self._coordinate_readers)

    def variant_for(self, cfg, record: bool = False, read_grids: dict | None = None):
        read_key = tuple(sorted(read_grids.items())) if read_grids else ()
        fn = self._by_config.get((cfg, record, read_key))
        if fn is not None:
            return fn
        with _compat.compile_lock():
            fn = self._by_config.get((cfg, record, read_key))  # another thread may have compiled it meanwhile
            if fn is not None:
                return fn
            from passes.sites import log_dense, plan, plan_key

            decisions = plan(self.sites, cfg, read_grids)
            key = plan_key(decisions, cfg.tile)
            if record and key != ("dense",):
                key = key + ("record",)
            fn = self.variants.get(key)
            if fn is None:
                log_dense(decisions)
                fn = self._compile(decisions, cfg.tile, key, record)
                self.variants[key] = fn
                self.compiled_keys.append(key)
            self._by_config[(cfg, record, read_key)] = fn
        return fn

    def _compile(self, decisions, tile, key, record=False):
        from passes.sites import rewrite

        gm = rewrite(self.gm, decisions, tile, record=record)  # a copy, also when nothing is rewritten
        patches = dict(self.mode_patches)
        patches[_compat.CACHE_PASS_CONFIG_KEY] = cache_pass(key)
        if self.tracing_context is not None and _compat.current_tracing_context() is None:
            # A later variant: compile under the graph's own tracing context so symbolic
            # shapes stay symbolic.
            with _compat.tracing(self.tracing_context):
                return _compat.compile_fx(gm, self.example_inputs, config_patches=patches)
        return _compat.compile_fx(gm, self.example_inputs, config_patches=patches)

    def __call__(self, *args):
        cfg = current_config(self.base_config)
        if self.grids:
            from passes.sites import enter_grids

            enter_grids(self.grids)
        if cfg.layers and cfg.layers not in _layers_checked:
            self._check_layers(cfg.layers)
        # Inside sparse_inductor.stats(), a variant with the recording op (it syncs once a call).
        return self.variant_for(cfg, recording(), self._read_grids(args))(*args)

    def _check_layers(self, layers):
        """Warn once about a ``layers=`` pattern that matches no attention site. A model's sites may
        be spread over several graphs (graph breaks), all compiled during its first call: the
        check runs when a graph runs a second time with the same ``layers``, by then over the sites
        of every graph that ran with them."""
        with _layers_lock:
            if layers in self._layers_seen:
                warn_unmatched_layers(layers, _layers_sites.get(layers, set()))
                _layers_checked.add(layers)
            else:
                self._layers_seen.add(layers)
                _layers_sites.setdefault(layers, set()).update(self.site_paths)


_layers_lock = threading.Lock()
_layers_sites: dict = {}  # layers= value -> module paths of the sites of the graphs that ran with it
_layers_checked: set = set()
_layers_warned: set = set()


def warn_unmatched_layers(layers, site_paths, once: bool = True) -> None:
    """Log a warning for each ``layers=`` pattern matching none of ``site_paths`` (with ``once``,
    only the first time for a pattern)."""
    from .config import layer_matches

    paths = sorted(p or "<top>" for p in set(site_paths))
    for pattern, _ in layers:
        if once and pattern in _layers_warned:
            continue
        if not any(layer_matches(pattern, p) for p in set(site_paths)):
            _layers_warned.add(pattern)
            log.warning("sparse_inductor: layers pattern %r matches no attention site; the module paths of the "
                        "sites are: %s", pattern, ", ".join(paths) if paths else "(none)")


def _mode_patches(mode) -> dict:
    if mode in (None, "default"):
        return {}
    return _compat.mode_options(mode)


def sparse_inductor_backend(gm, example_inputs, *, mode=None, options=None):
    """``torch.compile(model, backend="sparse_inductor", options={...})``.

    ``options`` takes the keys of :func:`sparse_inductor.sparsity` (``sparsity``, ``tile``,
    ``min_tokens``, ``layers``, ``grid``, ``policy``, ``query_keep``, ``plan``) as the defaults of
    this compiled model; a ``sparsity(...)`` context in force at call time overrides them. A bad
    key or value raises ``ValueError`` (at the first call: Dynamo calls the backend then).
    """
    return SparseInductorGraph(gm, example_inputs, options=options, mode=mode)
