"""``sparse_inductor.explain``: what the backend would do with each attention site."""
from __future__ import annotations

import torch

from .config import current_config


class Explanation:
    """One row per attention site (in graph order), printable as a table.

    ``rows`` is a list of dicts with keys ``graph``, ``module``, ``q``, ``k``, ``v``, ``grid``,
    ``grid_source``, ``text_span``, ``decision`` (``"sparse"`` or ``"dense"``), ``policy`` (its
    description, e.g. ``"TopK(0.875)"`` or a per-head census ``"PerHead(3x Window(1, 1, 1), 1x
    Skip())"``), ``query_keep``, ``sparsity`` (TopK's, ``None`` for other policies, 0 when
    dense), ``reason``, ``mask`` (``"block-causal (c frames per block)"`` for a recognised
    block-causal mask, else ``""``; a column only when some row has it), ``parallel``
    (``"sequence-parallel (Ulysses, degree N)"`` for attention over a sequence gathered from ``N``
    ranks by an all-to-all, else ``""``; a column only when some row has it), ``kernel`` (the
    forward kernel of a sparse site's calls: ``"tma"`` (the compact TMA kernels, Hopper),
    ``"gather"``, or ``"gather (why not tma)"`` when the TMA path was asked for or available
    but does not cover the site; ``""`` for dense sites; a column when some row is not plain
    ``"gather"``).
    """

    COLUMNS = ("graph", "module", "q", "k", "v", "grid", "text_span", "decision", "policy", "query_keep", "reason")

    def __init__(self, rows: list[dict]):
        self.rows = rows

    @property
    def sparse_rows(self):
        return [r for r in self.rows if r["decision"] == "sparse"]

    def __len__(self):
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __str__(self):
        def cell(row, col):
            value = row[col]
            if col == "grid" and value is not None and row["grid_source"] not in ("graph", ""):
                return f"{value} ({row['grid_source']})"
            return "" if value is None else str(value)

        columns = self.COLUMNS
        if any(r.get("mask") for r in self.rows):
            columns = columns[:7] + ("mask",) + columns[7:]
        if any(r.get("parallel") for r in self.rows):
            columns = columns[:-1] + ("parallel",) + columns[-1:]
        if any(r.get("kernel") not in (None, "", "gather") for r in self.rows):  # plain gather: the CPU's only kernel
            columns = columns[:-1] + ("kernel",) + columns[-1:]
        table = [list(columns)] + [[cell(r, c) for c in columns] for r in self.rows]
        widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        n_sparse = len(self.sparse_rows)
        lines.append(f"{len(self.rows)} attention site(s): {n_sparse} sparse, {len(self.rows) - n_sparse} dense")
        return "\n".join(lines)

    __repr__ = __str__


def _shape(shape):
    return None if shape is None else list(shape)


def _forward_kernel(decision, cfg) -> str:
    """The forward kernel a sparse site's calls run (:func:`sparse_inductor.attention.forward_kernel_for`
    on the site's example inputs): ``"tma"``, ``"gather"``, or ``"gather (why not tma)"``."""
    from types import SimpleNamespace

    from .attention import forward_kernel_for
    from .layout import block_size_for

    site = decision.site
    q, k, v = (site.args[name].meta.get("example_value") for name in ("query", "key", "value"))
    if q is None or k is None or v is None:
        return ""
    layout = SimpleNamespace(text_before=site.text_before, text_after=site.text_after,
                             block_size=block_size_for(tuple(cfg.tile)))
    scale = site.args.get("scale")
    kernel, why = forward_kernel_for(q, k, v, layout, decision.policy, scale if isinstance(scale, float) else 1.0,
                                     decision.query_keep, site.args.get("attn_mask"), site.causal_block_size)
    return f"{kernel} ({why})" if why else kernel


def trace_decisions(model, args, kwargs, cfg, *, on_compile=None, on_run=None, coordinates=True, dynamic=None):
    """Run ``model(*args, **kwargs)`` once under Dynamo, planning each graph's attention sites under
    ``cfg`` as the backend does (dense sites logged with their reason), and running the graphs as
    traced. ``on_compile(decisions)`` is called once per graph, ``on_run(decisions)`` each time a
    graph runs. Grids in coordinates inputs are read from the example inputs (``coordinates=False``:
    such sites stay dense, with that reason). Dynamo's caches are reset before and after."""
    from passes.coordinates import read_grids
    from passes.sites import analyze, enter_grids, forget_grids, grids_of, log_dense, plan

    def backend(gm, example_inputs):
        grids = grids_of(gm)
        sites = analyze(gm)
        if coordinates:
            read = read_grids(sites, example_inputs, {})
        else:
            read = {s.index: "an exported program cannot read the grid from the coordinates at each call"
                    for s in sites if s.coordinates is not None}
        decisions = plan(sites, cfg, read)
        log_dense(decisions)
        if on_compile is not None:
            on_compile(decisions)

        def run(*graph_args):  # as the backend's graphs do: offer the grids to the rest of the call
            if grids:
                enter_grids(grids)
            if on_run is not None:
                on_run(decisions)
            return gm.forward(*graph_args)
        return run

    torch.compiler.reset()
    forget_grids()
    try:
        torch.compile(model, backend=backend, dynamic=dynamic)(*args, **kwargs)
    finally:
        torch.compiler.reset()
        forget_grids()


def explain(model, *args, **kwargs) -> Explanation:
    """Trace ``model(*args, **kwargs)`` with Dynamo and report every attention site: module
    path, q/k/v shapes, the grid found (and where from), the text span, and the decision with
    its reason under the ``sparsity(...)`` config in force.

    The model runs once, eagerly. Like ``torch._dynamo.explain`` this resets Dynamo's caches
    before and after, so already-compiled models recompile on their next call.
    """
    from .backend import warn_unmatched_layers

    model = getattr(model, "_orig_mod", model)  # an OptimizedModule from torch.compile
    cfg = current_config()
    rows: list[dict] = []
    graph_index = [0]

    def record(decisions):
        for d in decisions:
            s = d.site
            rows.append(dict(
                graph=graph_index[0], module=s.module_path or "<top>", q=_shape(s.q_shape),
                k=_shape(s.k_shape), v=_shape(s.v_shape),
                grid=None if d.grid is None and s.grid is None else tuple(d.grid or s.grid),
                grid_source=d.grid_source or s.grid_source,
                text_span=s.text_span,
                decision="sparse" if d.sparse else "dense", sparsity=d.sparsity,
                policy=d.policy.describe() if d.sparse else "", query_keep=d.query_keep if d.sparse else None,
                reason=d.reason,
                mask=f"block-causal ({s.causal_block_size} frames per block)" if s.causal_block_size else "",
                parallel=str(s.parallel) if s.parallel is not None else "",
                kernel=_forward_kernel(d, cfg) if d.sparse else "",
            ))
        graph_index[0] += 1

    trace_decisions(model, args, kwargs, cfg, on_compile=record)
    if cfg.layers:
        warn_unmatched_layers(cfg.layers, [r["module"] if r["module"] != "<top>" else "" for r in rows], once=False)
    return Explanation(rows)
