"""``sparse_inductor.export``: ``torch.export`` of a model with its sparse attention sites in place.

``torch.export.export`` never calls a ``torch.compile`` backend, so a plain export of a model holds
dense SDPA. This function finds the sites exactly as the backend does (Dynamo graphs, the same
analysis and decisions as :func:`sparse_inductor.explain`), then exports the model (non-strict) with
every SDPA call intercepted: a call whose site was decided sparse becomes the same sparse attention
the backend's rewrite puts in its graph (our custom ops, with their fake implementations), every
other call stays SDPA. The result is an ordinary ``ExportedProgram``: ``ep.module()`` runs it (on
CPU through the ops' torch path), and ``torch._inductor.aoti_compile_and_package(ep)`` compiles it
with our Triton templates on the GPU.

How calls are matched to sites: by order. The model runs once under Dynamo with a recording
backend; every compiled graph that runs appends its sites' decisions in graph order. Exporting
runs the same Python on the same inputs, so the n-th SDPA call is the n-th recorded site; each
call's q/k/v shapes are checked against its site's, and an SDPA call that ran outside any compiled
graph (a frame Dynamo skipped) makes the counts differ: both raise instead of guessing.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .config import current_config, sparsity

log = logging.getLogger("sparse_inductor")

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


def _record_decisions(model, args, kwargs) -> list:
    """The decisions of every SDPA site, in the order the model executes them (one entry per
    execution, so a graph that runs twice in a call contributes twice)."""
    from .explain import trace_decisions

    executed: list = []
    with torch.no_grad():
        # Static shapes (the grid is fixed in the program); a grid read from coordinates at each
        # call cannot be: those sites stay dense, with that reason.
        trace_decisions(model, args, kwargs, current_config(), on_run=executed.extend, coordinates=False,
                        dynamic=False)
    return executed


def _static_shape(shape) -> tuple | None:
    try:
        return tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        return None


class _SparseSites(TorchFunctionMode):
    """Replaces the n-th SDPA call by the n-th recorded site's sparse attention (or leaves it SDPA)."""

    def __init__(self, decisions, tile):
        super().__init__()
        self.decisions = decisions
        self.tile = tile
        self.calls = 0
        self.rewritten = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:  # (the torch._C._nn builtin itself)
            return func(*args, **kwargs)
        index, self.calls = self.calls, self.calls + 1
        if index >= len(self.decisions):
            return func(*args, **kwargs)  # counted; export() raises once tracing ends
        decision = self.decisions[index]
        call = dict(zip(_SDPA_ARGS, args), **kwargs)
        got = tuple(_static_shape(call[n].shape) for n in ("query", "key", "value"))
        site = decision.site
        want = tuple(_static_shape(s) for s in (site.q_shape, site.k_shape, site.v_shape))
        if got != want:
            raise RuntimeError(
                f"sparse_inductor.export: attention call {index} has q/k/v shapes {got} but the site recorded at "
                f"that position ({site.module_path or '<top>'}) has {want}; the model's attention calls differ "
                "between the Dynamo run and the export trace (data-dependent control flow?)")
        if not decision.sparse:
            return func(*args, **kwargs)
        from passes.masks import mask_options
        from passes.sites import _site_function

        grid = tuple(int(g) for g in decision.grid)
        target = _site_function(decision, grid, self.tile, static=False)
        self.rewritten += 1
        # A recognised block-causal mask becomes causal_block_size; any other mask is a key-padding
        # mask: the pass accepted it as m, m broadcast over the queries, or m_i & m_j, whose
        # padded query rows are 0 (as SDPA answers a row without keys).
        options = mask_options(site, call.get("attn_mask"))
        rows = None
        if options.get("key_padding_mask") is not None:
            from .fidelity import key_padding

            options["key_padding_mask"], rows = key_padding(options["key_padding_mask"])
        out = target(call["query"], call["key"], call["value"], grid, text_before=site.text_before,
                     text_after=site.text_after, scale=call.get("scale"), **options)
        return out if rows is None else torch.where(rows, out, 0.0)


def export(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, *, dynamic_shapes=None,
           **sparsity_settings) -> torch.export.ExportedProgram:
    """Export ``model(*args, **kwargs)`` with its sparse attention sites rewritten.

    Args:
        model: the module (an ``OptimizedModule`` from ``torch.compile`` is unwrapped).
        args, kwargs: example inputs, as for ``torch.export.export``.
        dynamic_shapes: passed to ``torch.export.export``. The sizes a site's grid comes from
            (frames, height, width, and so the token count) must stay static: the grid is fixed
            in the exported program. A dynamic batch is fine.
        **sparsity_settings: the keywords of :func:`sparse_inductor.sparsity` (``sparsity``,
            ``policy``, ``query_keep``, ``plan``, ``layers``, ``tile``, ``min_tokens``, ...) for
            this export; without them, the ``sparsity(...)`` context in force applies.

    Returns an ``ExportedProgram`` whose sparse sites are calls of the ``sparse_inductor::*``
    custom ops (selection and block-sparse attention) and whose other attention is SDPA, exactly
    the decisions :func:`sparse_inductor.explain` prints for the same settings and inputs. A site
    that stays dense is logged with its reason, as under the backend.

    Raises ``RuntimeError`` when calls cannot be matched to sites (an attention call outside the
    Dynamo graphs, e.g. in a frame Dynamo skips, or a different call sequence while exporting).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple of example inputs, got {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict of example inputs or None, got {type(kwargs).__name__}")
    model = getattr(model, "_orig_mod", model)
    kwargs = kwargs or {}
    settings = sparsity(**sparsity_settings) if sparsity_settings else contextlib.nullcontext()
    with settings:
        tile = current_config().tile
        decisions = _record_decisions(model, args, kwargs)
        mode = _SparseSites(decisions, tile)
        with mode:
            program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    if mode.calls != len(decisions):
        raise RuntimeError(
            f"sparse_inductor.export: the export trace made {mode.calls} attention call(s) but the Dynamo run "
            f"compiled {len(decisions)}; attention that runs outside Dynamo's graphs (a skipped frame or an "
            "eager region) cannot be matched to its site")
    log.info("sparse_inductor.export: %d of %d attention call(s) exported sparse", mode.rewritten, mode.calls)
    return program
