"""The ``torch.compile`` backend ``"sparse_inductor"`` (registered through the
``torch_dynamo_backends`` entry point, so no import is needed).

For each Dynamo graph it analyses the attention sites once, then returns a dispatcher that
compiles, lazily, one Inductor variant per distinct plan (which sites are sparse, at which
sparsity and tile) and runs the variant for the ``sparsity(...)`` config in force at call time.
"""
from __future__ import annotations

import hashlib
import logging

import torch

from . import _compat
from .config import config_from_options, current_config
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


class SparseInductorGraph:
    """The callable returned for one Dynamo graph: dispatches to a variant per plan."""

    def __init__(self, gm: torch.fx.GraphModule, example_inputs, options=None, mode=None):
        from passes.sites import analyze, remember_grids

        self.gm = gm
        self.example_inputs = example_inputs
        self.base_config = config_from_options(options)
        self.mode_patches = _mode_patches(mode)
        remember_grids(gm)
        self.sites = analyze(gm)
        self.variants: dict = {}  # plan key -> compiled variant
        self._by_config: dict = {}  # config -> compiled variant (skips re-planning on every call)
        self.tracing_context = _compat.current_tracing_context()
        self.compiled_keys: list = []  # in compile order, for tests and diagnostics
        self.variant_for(current_config(self.base_config))  # compile now, inside Dynamo's context

    def variant_for(self, cfg, record: bool = False):
        fn = self._by_config.get((cfg, record))
        if fn is not None:
            return fn
        from passes.sites import log_dense, plan, plan_key

        decisions = plan(self.sites, cfg)
        key = plan_key(decisions, cfg.tile)
        if record and key != ("dense",):
            key = key + ("record",)
        fn = self.variants.get(key)
        if fn is None:
            log_dense(decisions)
            fn = self._compile(decisions, cfg.tile, key, record)
            self.variants[key] = fn
            self.compiled_keys.append(key)
        self._by_config[(cfg, record)] = fn
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
        # Inside sparse_inductor.stats(), a variant with the recording op (it syncs once a call).
        return self.variant_for(current_config(self.base_config), recording())(*args)


def _mode_patches(mode) -> dict:
    if mode in (None, "default"):
        return {}
    return _compat.mode_options(mode)


def sparse_inductor_backend(gm, example_inputs, *, mode=None, options=None):
    """``torch.compile(model, backend="sparse_inductor", options={...})``.

    ``options`` takes the keys of :func:`sparse_inductor.sparsity` (``sparsity``, ``tile``,
    ``min_tokens``, ``layers``, ``grid``) as the defaults of this compiled model; a
    ``sparsity(...)`` context in force at call time overrides them.
    """
    return SparseInductorGraph(gm, example_inputs, options=options, mode=mode)
