"""Find the SDPA calls of a Dynamo graph, decide which can become sparse, and rewrite them.

Analysis (:func:`analyze`) is independent of the sparsity config: it records each site's
shapes, grid, text span and whether its structure allows a rewrite. :func:`plan` turns that
into per-site decisions for one config, and :func:`rewrite` applies a plan to a copy of the
graph.
"""
from __future__ import annotations

import contextvars
import copy
import logging
import math
import operator
import os
import re
import sys
import weakref
from dataclasses import dataclass, field, replace

import torch
import torch.fx
import torch.nn.functional as F

from sparse_inductor import _compat
from sparse_inductor.api import MAX_HEAD_DIM, supported_dtypes

from . import collectives, masks
from .coordinates import coordinate_layout
from .grid import GridFound, GridMissing, GridWalker
from .shapes import example_value, expr, same_size, size_hint, static_int, tensor_shape

log = logging.getLogger("sparse_inductor")

SDPA_ARG_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclass
class Site:
    """One SDPA call site as the analysis saw it."""

    index: int
    node_name: str
    module_path: str
    q_shape: tuple
    k_shape: tuple
    v_shape: tuple
    args: dict = field(repr=False)
    grid: tuple | None = None
    grid_source: str = ""  # "graph", "earlier graph", or "" (none)
    found: GridFound | None = field(default=None, repr=False)
    text_before: int = 0  # an int, or a SymInt for a data-dependent text length (Mochi)
    text_after: int = 0
    eligible: bool = False
    reason: str = ""
    # (graph input index, token axis, coordinate axis) of the coordinates input whose values give the
    # grid at each call (passes/coordinates.py); ``grid`` stays None.
    coordinates: tuple | None = None
    parallel: object = None  # collectives.Ulysses when q, k, v were gathered from ranks by an all-to-all
    causal_block_size: int | None = None  # frames per causal block of a recognised block-causal mask

    @property
    def video_tokens(self) -> int | None:
        return None if self.grid is None else math.prod(size_hint(s) for s in self.grid)

    @property
    def static_text(self) -> bool:
        """Both text lengths are ints (a data-dependent one is only known at run time)."""
        return static_int(self.text_before) is not None and static_int(self.text_after) is not None

    @property
    def has_text(self) -> bool:
        return not (static_int(self.text_before) == 0 and static_int(self.text_after) == 0)

    @property
    def text_span(self):
        """``(text_before, text_after)`` for reports, ``None`` without text; a data-dependent length
        reads as its symbol (e.g. ``"u0"``)."""
        if not self.has_text:
            return None
        return tuple(static_int(n) if static_int(n) is not None else str(expr(n))
                     for n in (self.text_before, self.text_after))


@dataclass(frozen=True)
class Decision:
    site: Site
    sparse: bool
    reason: str
    policy: object = None  # the selection policy of a sparse site
    query_keep: float = 1.0
    grid: tuple | None = None
    grid_source: str = ""

    @property
    def sparsity(self) -> float | None:
        """The TopK sparsity of a sparse site (``None`` for other policies, 0 for dense)."""
        if not self.sparse:
            return 0.0
        return getattr(self.policy, "sparsity", None) if type(self.policy).__name__ == "TopK" else None


# -------------------------------------------------------------------------------------------
# Module paths
# -------------------------------------------------------------------------------------------
def module_path(node: torch.fx.Node) -> str:
    """The dotted path of the innermost module that made ``node`` (e.g. ``blocks.0.attn1``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return normalize_module_path(path)


def normalize_module_path(path: str) -> str:
    # Dynamo writes paths like "L['self'].blocks[0].attn" or "L['self']._modules['blocks']['0']".
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"^L__self___?", "", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"(^|\.)(__dict__|_modules)(?=\.|$)", "", path)
    return path.strip(".")


# -------------------------------------------------------------------------------------------
# Finding and normalising SDPA calls
# -------------------------------------------------------------------------------------------
def is_sdpa(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is F.scaled_dot_product_attention


def sdpa_arguments(node: torch.fx.Node) -> dict:
    """The SDPA call's arguments by name, however the model wrote them."""
    args = dict(zip(SDPA_ARG_NAMES, node.args))
    args.update(node.kwargs)
    return {
        "query": args.get("query"), "key": args.get("key"), "value": args.get("value"),
        "attn_mask": args.get("attn_mask"), "dropout_p": args.get("dropout_p", 0.0),
        "is_causal": args.get("is_causal", False), "scale": args.get("scale"),
        "enable_gqa": args.get("enable_gqa", False),
    }


# -------------------------------------------------------------------------------------------
# Grids remembered across the graphs of one call (a graph break between patchify and the blocks)
# -------------------------------------------------------------------------------------------
# A graph that flattens a 5-d [B, C, T, H, W] / [B, T, H, W, C] tensor into tokens records, each
# time it runs, ``(frame key, grids)`` here: the frame is the innermost frame of model code at that
# moment (outside torch's machinery and this package), i.e. the code that ran the graph. A later
# graph whose tokens arrive as an input may use these grids only while that frame is still on the
# stack: Dynamo compiles the graph after a break from within the frame that ran the graph before
# it, so the grids serve the rest of the same call and never an unrelated model compiled later.
# Per thread / task (a ContextVar).
_scope: contextvars.ContextVar = contextvars.ContextVar("sparse_inductor_remembered_grids", default=None)

# Frames in these directories are not model code: torch (but torch.nn, whose containers' forwards
# are a model's own, e.g. nn.Sequential), the passes, the sparse_inductor package.
_INTERNAL_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                       for m in (torch, sys.modules[__name__], sys.modules["sparse_inductor"]))
_MODEL_DIRS = (os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "nn") + os.sep,)


def _caller_frame():
    """The innermost frame of model code (outside torch's machinery and this package), or None."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_INTERNAL_DIRS) or name.startswith(_MODEL_DIRS):
            return frame
        frame = frame.f_back
    return None


def _frame_key(frame) -> tuple:
    """What identifies a running frame without keeping it (and its locals) alive: its id and code,
    and a weak reference to its ``self`` (a frame's id and code are reused by the next call of the
    same function, e.g. ``Module._call_impl`` of another model)."""
    owner = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
    try:
        owner = weakref.ref(owner) if owner is not None else None
    except TypeError:  # not weak-referenceable: id and code only
        owner = None
    return id(frame), frame.f_code, owner


def _on_stack(key) -> bool:
    frame_id, code, owner = key
    frame = sys._getframe(1)
    while frame is not None:
        if id(frame) == frame_id and frame.f_code is code:
            return owner is None or frame.f_locals.get("self") is owner()
        frame = frame.f_back
    return False


def forget_grids() -> None:
    """Drop the grids remembered from earlier graphs (explain() starts from a clean slate)."""
    _scope.set(None)


def grids_of(gm: torch.fx.GraphModule) -> dict:
    """The static token layouts a graph hands on: ``{token count: (grid, video start)}``, ``None``
    for a count two different layouts have (ambiguous). They are the grids it flattens into tokens
    (video start 0) and the layouts of its ``[B, N, C]`` outputs whose token axis the grid walk
    resolves (e.g. Framepack's history tokens concatenated before the video's, start > 0)."""
    grids: dict = {}
    walker = GridWalker(gm)
    for node in gm.graph.nodes:
        if node.op != "output":
            continue
        for out in _flat_nodes(node.args):
            shape = tensor_shape(out)
            if shape is None or len(shape) != 3:
                continue
            found = walker.grid_of(out, 1)
            n = static_int(shape[1])
            if isinstance(found, GridFound) and n is not None and _all_static(found.sizes) \
                    and static_int(found.start) is not None:
                _merge(grids, n, (tuple(static_int(x) for x in found.sizes), static_int(found.start)))
    for node in gm.graph.nodes:
        if node.op not in ("call_method", "call_function"):
            continue
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if name not in ("flatten", "view", "reshape"):
            continue
        src_shape, out_shape = tensor_shape(node.args[0]) if node.args else None, tensor_shape(node)
        if src_shape is None or out_shape is None or len(src_shape) != 5 or len(out_shape) != 3:
            continue
        # [B, C, T, H, W] -> [B, C, T*H*W]  (conv3d patch embedding, channels first)
        # [B, T, H, W, C] -> [B, T*H*W, C]  (channels last)
        for sizes, tokens in ((src_shape[2:], out_shape[2]), (src_shape[1:4], out_shape[1])):
            sizes = [static_int(x) for x in sizes]
            if None not in sizes and static_int(tokens) == math.prod(sizes):
                _merge(grids, math.prod(sizes), (tuple(sizes), 0))
    return grids


def _flat_nodes(args) -> list:
    """The nodes in a (nested) tuple / list / dict of graph outputs."""
    if isinstance(args, torch.fx.Node):
        return [args]
    if isinstance(args, (tuple, list)):
        return [n for a in args for n in _flat_nodes(a)]
    if isinstance(args, dict):
        return [n for a in args.values() for n in _flat_nodes(a)]
    return []


def _merge(grids: dict, n: int, grid) -> None:
    if n in grids and grids[n] != grid:
        grids[n] = None
    else:
        grids[n] = grid


def enter_grids(grids: dict) -> None:
    """Called when a graph with ``grids`` (:func:`grids_of`) runs: later graphs compiled within the
    same call may use them."""
    frame = _caller_frame()
    if frame is None:
        return
    key = _frame_key(frame)  # no reference to the frame: it would keep its locals alive
    scope = _scope.get()
    merged = dict(scope[1]) if scope is not None and _same_key(scope[0], key) else {}
    for n, g in grids.items():
        _merge(merged, n, g)
    _scope.set((key, merged))


def _same_key(a, b) -> bool:
    return a[0] == b[0] and a[1] is b[1] and (a[2] is None) == (b[2] is None) and (a[2] is None or a[2]() is b[2]())


def remembered_layout(n):
    """The layout remembered for ``n`` tokens in this call: ``(grid, video start)``, ``None`` (none),
    or ``"ambiguous"``."""
    scope = _scope.get()
    if scope is None or n is None or n not in scope[1]:
        return None
    key, grids = scope
    if not _on_stack(key):
        _scope.set(None)  # that call is over
        return None
    return grids[n] if grids[n] is not None else "ambiguous"


# -------------------------------------------------------------------------------------------
# Analysis
# -------------------------------------------------------------------------------------------
def _structural_reason(args: dict, q_shape, k_shape, v_shape, q_val) -> str:
    """Why the attention cannot be rewritten whatever its grid ("" if it can)."""
    if args["is_causal"] is not False:
        return "causal attention"
    dropout = args["dropout_p"]
    if not isinstance(dropout, (int, float)):
        return "dropout_p is not a constant"
    if dropout != 0.0:
        return f"dropout_p={dropout} (dropout in effect)"
    if args["enable_gqa"] is not False:
        return "grouped-query attention (enable_gqa)"
    if q_shape is None or k_shape is None or v_shape is None:
        return "q/k/v shapes unknown"
    if not (len(q_shape) == len(k_shape) == len(v_shape) == 4):
        return f"q/k/v are not 4-d [B, H, N, D] (q has {len(q_shape)} dims)"
    if not same_size(q_shape[2], k_shape[2]):
        return f"cross-attention (query tokens {q_shape[2]} != key tokens {k_shape[2]})"
    if not (same_size(q_shape[0], k_shape[0]) and same_size(q_shape[1], k_shape[1])
            and all(same_size(a, b) for a, b in zip(k_shape, v_shape))):
        return "q, k and v shapes differ (batch/heads/value dim)"
    if not same_size(q_shape[3], k_shape[3]):
        return "q and k head dims differ"
    if not same_size(v_shape[3], q_shape[3]):
        return "value head dim differs from query head dim"
    d = static_int(q_shape[3])
    if d is None or d > MAX_HEAD_DIM:
        return f"head dim {q_shape[3]} is symbolic or above {MAX_HEAD_DIM}"
    if q_val.device.type not in ("cpu", "cuda"):
        return f"device {q_val.device.type} (supported: cpu, cuda)"
    allowed = supported_dtypes(q_val.device.type)
    if q_val.dtype not in allowed:
        return f"dtype {q_val.dtype} (supported on {q_val.device.type}: " + \
            ", ".join(str(d).replace("torch.", "") for d in allowed) + ")"
    scale = args["scale"]
    if scale is not None and not isinstance(scale, (int, float)):
        return "scale is not a constant"
    return ""


def _mask_reason(mask, q_shape) -> str:
    """"" if ``mask`` is a bool key-padding mask ``[B, 1, 1, L]`` (or None), else why not."""
    if mask is None:
        return ""
    if not isinstance(mask, torch.fx.Node):
        return "attn_mask is not a tensor"
    shape, val = tensor_shape(mask), mask.meta.get("example_value")
    if shape is None or val.dtype != torch.bool:
        return f"attn_mask of dtype {getattr(val, 'dtype', None)} (only a bool key-padding mask is supported)"
    if padding_mask(mask, q_shape) is not None:
        return ""
    if len(shape) != 4 or not (same_size(shape[0], q_shape[0]) or same_size(shape[0], 1)) \
            or not same_size(shape[1], 1) or not same_size(shape[2], 1) or not same_size(shape[3], q_shape[2]):
        return (f"attn_mask of shape {list(shape)} is not a key-padding mask [B, 1, 1, N] (nor one broadcast over "
                "the queries, nor the outer product m_i & m_j of one)")
    return ""


# Ops that leave a bool mask's values as they are, and the ops of an elementwise AND.
_SAME_MASK = {"bool", "contiguous", "clone", "to"}
_AND = {"and_", "__and__", "logical_and", "bitwise_and", "__iand__"}


def _op_name(node) -> str:
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", "") if node.op == "call_function" else ""


def _strip_same_mask(node):
    while isinstance(node, torch.fx.Node) and _op_name(node) in _SAME_MASK and node.args \
            and getattr(example_value(node), "dtype", None) == torch.bool \
            and getattr(example_value(node.args[0]), "dtype", None) == torch.bool:
        node = node.args[0]
    return node


def padding_mask(mask, q_shape):
    """``(key mask, padded queries)`` if the bool ``mask`` is a key-padding mask: ``key mask`` the
    node of a ``[B, 1, 1, L]`` (or ``[1, 1, 1, L]``) mask m, and ``padded queries`` whether ``mask``
    is m_i & m_j, its outer product with itself (HunyuanVideo 1.5's ``[B, 1, L, L]``: a padded
    query sees no key, which SDPA answers with a row of zeros). ``None`` for any other mask.

    Recognised by structure: m itself; m broadcast over the queries (``repeat`` / ``expand`` along
    the query axis); and the AND of such a key mask with a query mask of the same m
    (``transpose(2, 3)`` of it, or ``m`` indexed as ``[:, None, :, None]``)."""
    if not isinstance(mask, torch.fx.Node) or q_shape is None:
        return None
    shape = tensor_shape(mask)
    if shape is None or len(shape) != 4 or getattr(example_value(mask), "dtype", None) != torch.bool:
        return None
    L = q_shape[2]
    if not (same_size(shape[0], q_shape[0]) or same_size(shape[0], 1)) or not same_size(shape[3], L):
        return None
    keys = _mask_vector(mask, 3)
    if keys is not None:
        return keys, False
    node = _strip_same_mask(mask)
    if _op_name(node) not in _AND or len(node.args) != 2 or not all(isinstance(a, torch.fx.Node) for a in node.args):
        return None
    a, b = node.args
    for key_side, query_side in ((a, b), (b, a)):
        keys, queries = _mask_vector(key_side, 3), _mask_vector(query_side, 2)
        if keys is not None and queries is not None and _mask_root(keys) is _mask_root(queries) \
                and same_size(tensor_shape(keys)[3], L):
            return keys, True
    return None


def _mask_vector(node, axis):
    """The mask ``node`` as one vector broadcast along the other of the last two axes: the node of
    that vector, shaped ``[B, 1, 1, L]`` (``axis`` 3: it varies over the keys) or ``[B, 1, L, 1]``
    (``axis`` 2: over the queries); ``None`` if it is not one."""
    for _ in range(64):  # a chain of a few ops in practice
        node = _strip_same_mask(node)
        shape = tensor_shape(node)
        if shape is None or len(shape) != 4 or not same_size(shape[1], 1):
            return None
        other = 5 - axis  # the axis it is broadcast along
        if same_size(shape[other], 1):
            return node
        name, src = _op_name(node), node.args[0] if node.args else None
        src_shape = tensor_shape(src)
        if src_shape is None or len(src_shape) != 4:
            return None
        if name == "repeat":  # repeats of the size-1 broadcast axis only
            reps = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            if len(reps) != 4 or not same_size(src_shape[other], 1) \
                    or not all(isinstance(r, int) and r == 1 for i, r in enumerate(reps) if i != other):
                return None
        elif name == "expand":
            if not same_size(src_shape[other], 1) or not same_size(src_shape[axis], shape[axis]):
                return None
        elif name in ("transpose", "swapaxes"):
            dims = {d % 4 for d in node.args[1:3] if isinstance(d, int)}
            if dims != {2, 3}:
                return None
            axis = other
        else:
            return None
        node = src
    return None


def _mask_root(node):
    """The tensor a mask vector is a view of, its elements in the same order (through reshapes,
    unsqueezes, transposes of a size-1 axis, and indexing by ``:`` and ``None`` only): the same
    root means the same padding mask."""
    while isinstance(node, torch.fx.Node) and node.args and isinstance(node.args[0], torch.fx.Node):
        node = _strip_same_mask(node)
        name, src = _op_name(node), node.args[0]
        shape, src_shape = tensor_shape(node), tensor_shape(src)
        if shape is None or src_shape is None or not same_size(math.prod(shape), math.prod(src_shape)):
            break
        if name == "getitem":
            index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            if not all(i is None or i is Ellipsis or i == slice(None) for i in index):
                break  # e.g. a permutation of the tokens
        elif name == "transpose":
            dims = node.args[1:3]
            if not all(isinstance(d, int) for d in dims) or not any(same_size(src_shape[d], 1) for d in dims):
                break
        elif name not in ("view", "reshape", "unsqueeze"):
            break
        node = src
    return node


def analyze(gm: torch.fx.GraphModule) -> list[Site]:
    """Every SDPA call of ``gm`` with its shapes, grid, text span and structural eligibility."""
    walker = GridWalker(gm)
    sequence_parallel = collectives.present(gm)
    sites = []
    for node in gm.graph.nodes:
        if not is_sdpa(node):
            continue
        args = sdpa_arguments(node)
        q, k, v = args["query"], args["key"], args["value"]
        q_shape, k_shape, v_shape = (tensor_shape(x) for x in (q, k, v))
        site = Site(len(sites), node.name, module_path(node), q_shape, k_shape, v_shape, args)
        sites.append(site)
        # Keys sharded across ranks (ring attention) first: they often look like cross-attention.
        reason = collectives.ring_reason(walker, k) if sequence_parallel else ""
        if not reason:
            reason = _structural_reason(args, q_shape, k_shape, v_shape, q.meta.get("example_value"))
        if not reason:
            reason = _mask_reason(args["attn_mask"], q_shape)
        square_mask = bool(reason) and masks.is_square(args["attn_mask"], q_shape)  # maybe block-causal
        if square_mask:
            reason = ""
        if reason:
            site.reason = reason
            continue
        result = walker.query_grid(q)
        L = q_shape[2]
        site.parallel = result.parallel
        if isinstance(result, GridFound):
            key_result = walker.query_grid(k)
            if not (isinstance(key_result, GridFound) and _same_grid(result, key_result)):
                site.reason = "keys do not come from the query's video tokens (not self-attention)"
                continue
            site.grid, site.found, site.grid_source = result.sizes, result, "graph"
            span = _text_span(result, L)
            if isinstance(span, str):
                site.reason = span
                continue
            site.text_before, site.text_after = span
        else:
            if collectives.out_of_order(result):  # proven wrong token order: no grid= can fix it
                site.reason = f"grid not found: {result.reason}"
                continue
            if result.at_input:
                # Provenance: the keys must come from the same graph input as the queries.
                key_result = walker.query_grid(k)
                if not (isinstance(key_result, GridMissing) and key_result.at_input
                        and _same_inputs(key_result, result) and key_result.parallel == result.parallel):
                    site.reason = ("keys do not come from the query's tokens (query and keys derive from different "
                                   "tensors; not self-attention)")
                    continue
            remembered = _remembered_span(result) if result.at_input else None
            if isinstance(remembered, tuple):
                site.grid, site.grid_source = remembered[0], "earlier graph"
                span = _text_span(GridFound(*remembered), L)
                if isinstance(span, str):
                    site.reason = span
                    continue
                site.text_before, site.text_after = span
            else:
                site.coordinates = _coordinates_of(gm, result, L)
                if site.coordinates is not None:
                    site.grid_source, site.eligible = "coordinates", True
                    site.reason = f"grid read from the values of the coordinates input {result.node.name} at each call"
                    continue
                site.reason = f"grid not found: {result.reason}"
                if remembered == "ambiguous":
                    site.reason += (" (earlier graphs of this call remember different grids for the token count of "
                                    "a graph input it comes from, or grids for several of them)")
                site.eligible = True  # a grid= in the config can still make it sparse
                continue
        if square_mask:  # sparse only if it is exactly block-causal over the site's frames
            site.reason = masks.recognise_block_causal(gm, site)
            if site.reason:
                continue
        site.eligible = True
    return sites


def _same_inputs(a: GridMissing, b: GridMissing) -> bool:
    """The same graph inputs at the same token ranges."""
    return len(a.inputs) == len(b.inputs) and all(
        pa is pb and same_size(sa, sb) and same_size(na, nb) for (pa, sa, na), (pb, sb, nb) in zip(a.inputs, b.inputs))


def _remembered_span(result: GridMissing):
    """``(grid, source, video start)`` from the layout an earlier graph of this call remembers for
    the token count of one of the graph inputs the tokens come from (its range placing the video
    span, e.g. video tokens before text tokens, both inputs); ``"ambiguous"``, or ``None``."""
    spans, ambiguous = [], False
    for placeholder, start, n in result.inputs:
        layout = remembered_layout(static_int(n))
        if layout == "ambiguous":
            ambiguous = True
        elif layout is not None:
            spans.append((layout[0], (placeholder, ()), start + layout[1]))
    if len(spans) == 1 and not ambiguous:
        return spans[0]
    return "ambiguous" if spans or ambiguous else None


def _coordinates_of(gm, result: GridMissing, L) -> tuple | None:
    """``(input index, token axis, coordinate axis)`` when the query's token axis reached a graph
    input that may hold the tokens' coordinates, all ``L`` of them (the grid is then in its values,
    checked at each call: passes/coordinates.py), else None."""
    if not result.at_input or result.node is None:
        return None
    layout = coordinate_layout(tensor_shape(result.node), L)
    if layout is None:
        return None
    index = [p for p in gm.graph.nodes if p.op == "placeholder"].index(result.node)
    return (index, *layout)


def _same_grid(a: GridFound, b: GridFound) -> bool:
    """Same grid, same video span, and found on the same tensor (the token tensor before the
    per-branch projections): keys from another video with an equal grid are not self-attention."""
    return (a.source[0] is b.source[0] and tuple(a.source[1]) == tuple(b.source[1])
            and len(a.sizes) == len(b.sizes) and all(same_size(x, y) for x, y in zip(a.sizes, b.sizes))
            and same_size(a.start, b.start) and a.parallel == b.parallel)


def _text_span(found: GridFound, L) -> tuple | str:
    """``(text_before, text_after)`` around the video span, or the reason it cannot be used.

    One of the two may be symbolic: a text length known only at run time (Mochi keeps each
    sample's valid prompt tokens, an unbacked size); the rewrite computes it from the sequence
    length then. Both symbolic would leave the video's offset unknown."""
    n_video = math.prod(found.sizes)
    start = static_int(found.start)
    after = static_int(L - found.start - n_video)
    if after is None and start == 0 and same_size(n_video, L):
        after = 0
    if start is None and after is None:
        return "symbolic text spans before and after the video (one of them must be static)"
    if (start is not None and start < 0) or (after is not None and after < 0):
        return f"video span ({found.start} + {n_video} tokens) does not fit the sequence ({L})"
    before = start if start is not None else found.start
    after = after if after is not None else L - found.start - n_video
    if not _compat.UNBACKED_TEXT_SUPPORTED and any(_compat.has_unbacked_symbols(n) for n in (before, after)):
        return (f"a data-dependent text length ({before if start is None else after}) needs torch >= 2.13: "
                f"Inductor {torch.__version__} cannot compile the sparse rewrite of it")
    return before, after


def _all_static(sizes) -> bool:
    return all(static_int(s) is not None for s in sizes)


# -------------------------------------------------------------------------------------------
# Per-config decisions
# -------------------------------------------------------------------------------------------
def decide(site: Site, cfg, read_grids: dict | None = None) -> Decision:
    """The decision for one site under one :class:`~sparse_inductor.config.SparsityConfig`;
    ``read_grids``: ``{site index: (grid, rows before, rows after the video), or why none}`` read
    from coordinates inputs at this call. The decision's ``site`` is the site as this call sees it:
    for a coordinates site, with the text span of the rows around the video read at this call."""
    if not site.eligible:
        return Decision(site, False, site.reason)
    grid, source = site.grid, site.grid_source
    if site.coordinates is not None:
        read = (read_grids or {}).get(site.index, "no values at this call")
        if not isinstance(read, tuple):
            return Decision(site, False, f"no grid in the coordinates input: {read}")
        grid, before, after = read
        site = replace(site, text_before=before, text_after=after)
    if cfg.grid is not None and grid is not None:
        n_video = static_int(math.prod(grid)) if source == "graph" else math.prod(grid)
        if n_video == math.prod(cfg.grid) and tuple(cfg.grid) != tuple(static_int(g) for g in grid):
            if source not in ("graph", "coordinates"):  # grid= wins over one remembered from an earlier graph
                grid, source = cfg.grid, "config"
            elif _all_static(grid):
                raise _compat.user_error(ValueError, (
                    f"sparse_inductor: grid={tuple(cfg.grid)} contradicts the grid "
                    f"{tuple(static_int(g) for g in grid)} the graph{' (its coordinates)' if source != 'graph' else ''} "
                    f"proves for attention site {site.module_path or '<top>'} ({n_video} video tokens); grid= is for "
                    "sites whose grid the graph cannot prove: drop it or make it agree"))
    if grid is None:
        if cfg.grid is None:
            return Decision(site, False, site.reason + " (pass grid=(T, H, W) to sparsity() to set it)")
        L = static_int(site.q_shape[2])
        if L is None or L != math.prod(cfg.grid):
            return Decision(site, False, f"{site.reason}; configured grid {cfg.grid} does not match {site.q_shape[2]} tokens")
        grid, source = cfg.grid, "config"
    if site.causal_block_size is not None:
        why = masks.block_causal_reason(site, cfg, grid)
        if why:
            return Decision(site, False, why, None, 1.0, grid, source)
    elif site.args["attn_mask"] is not None and not site.has_text:
        return Decision(site, False, "attn_mask on attention without text tokens (it would mask video keys)")
    policy = cfg.policy_for(site.module_path)
    heads = static_int(site.q_shape[1])
    mismatch = policy.check_heads(heads) if heads is not None else ""
    if mismatch and site.parallel is not None:
        mismatch += (f" (under {site.parallel} each rank attends with {heads} of the model's heads; per-head "
                     "policies are not split across ranks)")
    if mismatch:
        raise _compat.user_error(ValueError, f"sparse_inductor: the policy of attention site "
                                             f"{site.module_path or '<top>'} does not fit: {mismatch}")
    n_video = math.prod(size_hint(s) for s in grid)
    if policy.is_dense() and cfg.query_keep == 1.0:
        why = "sparsity 0 (dense SDPA)" if type(policy).__name__ == "TopK" else \
            f"policy {policy.describe()} keeps every tile (dense SDPA)"
        return Decision(site, False, why, None, 1.0, grid, source)
    if n_video < cfg.min_tokens:
        return Decision(site, False, f"{n_video} video tokens < min_tokens={cfg.min_tokens}", None, 1.0, grid, source)
    return Decision(site, True, "", policy, cfg.query_keep, grid, source)


def plan(sites: list[Site], cfg, read_grids: dict | None = None) -> tuple[Decision, ...]:
    if cfg.plan is not None:
        cfg.plan.check_sites({s.module_path: static_int(s.q_shape[1]) if s.q_shape else None for s in sites})
    return tuple(decide(s, cfg, read_grids) for s in sites)


def plan_key(decisions, tile) -> tuple:
    """Hashable key of what a plan compiles to: configs with equal keys share a variant."""
    sparse = tuple((d.site.index, d.policy, d.query_keep,
                    tuple(d.grid) if d.grid_source in ("config", "coordinates") else None,
                    (d.site.text_before, d.site.text_after) if d.grid_source == "coordinates" else None)
                   for d in decisions if d.sparse)
    return (sparse, tuple(tile)) if sparse else ("dense",)


def log_dense(decisions) -> None:
    for d in decisions:
        if not d.sparse:
            level = logging.WARNING if d.site.eligible and d.site.grid is None else logging.INFO
            log.log(level, "sparse_inductor: attention %s (%s) stays dense: %s",
                    d.site.node_name, d.site.module_path or "<top>", d.reason)


# -------------------------------------------------------------------------------------------
# Rewrite
# -------------------------------------------------------------------------------------------
def rewrite(gm: torch.fx.GraphModule, decisions, tile, record: bool = False) -> torch.fx.GraphModule:
    """A copy of ``gm`` with every sparse-decided SDPA replaced by the sparse attention call
    (with ``record``, each call also records its selection for :func:`sparse_inductor.stats`)."""
    new_gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    nodes = {n.name: n for n in new_gm.graph.nodes}
    for d in decisions:
        if not d.sparse:
            continue
        node = nodes[d.site.node_name]
        args = sdpa_arguments(node)
        with new_gm.graph.inserting_before(node):
            grid = _grid_args(new_gm.graph, d, nodes)
            options = dict(scale=args["scale"], **masks.mask_options(d.site, args["attn_mask"]))
            padding = padding_mask(args["attn_mask"], d.site.q_shape)
            if padding is not None:  # the [B, 1, 1, L] mask m of a broadcast one, or of m_i & m_j
                options["key_padding_mask"] = padding[0]
            if record:
                options["record_as"] = d.site.module_path or "<top>"
            spans = _span_args(new_gm.graph, d, args["query"], grid)
            if all(isinstance(g, int) for g in grid) and d.site.static_text:
                # Static sizes: the layout's index tensors and the lists of static patterns become
                # constants of the graph.
                device = args["query"].meta["example_value"].device
                constants = _static_constants(new_gm, d, grid, tile, device)
                target = _site_function(d, grid, tile, static=True, num_constants=len(constants))
                new = new_gm.graph.call_function(target, (args["query"], args["key"], args["value"], *constants),
                                                 options)
            else:
                target = _site_function(d, grid, tile, static=False)
                new = new_gm.graph.call_function(target, (args["query"], args["key"], args["value"], grid),
                                                 dict(**spans, **options))
            new.meta.update(node.meta)
            if padding is not None and padding[1]:
                # m_i & m_j: a padded query's row is 0 (SDPA's answer for a row without keys).
                rows = new_gm.graph.call_method("transpose", (padding[0], 2, 3))
                new = new_gm.graph.call_function(torch.where, (rows, new, 0.0))
                new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        new_gm.graph.erase_node(node)
    new_gm.graph.lint()
    new_gm.recompile()
    return new_gm


def _static_constants(gm, decision, grid, tile, device) -> list:
    """Register the layout's index tensors and the precomputed lists of the decision's static
    policies as buffers of ``gm``; return their ``get_attr`` nodes."""
    from sparse_inductor.layout import tile_layout
    from sparse_inductor.policies.base import SelectionContext, static_parts

    site = decision.site
    layout = tile_layout(grid, tile, device, text_before=site.text_before, text_after=site.text_after)
    tensors = {f: getattr(layout, f) for f in ("counts", "gather_index", "scatter_index")}
    heads = static_int(site.q_shape[1]) or 1  # a static per-head policy is checked against a static count
    ctx = SelectionContext(grid=grid, tile=tile, counts=layout.counts[: layout.num_video_tiles], scale=1.0, batch=1,
                           heads=heads, device=device)
    for i, part in enumerate(static_parts(decision.policy)):
        num, idx = part.video_lists(ctx)
        tensors[f"static{i}_num"], tensors[f"static{i}_idx"] = num, idx
    nodes = []
    for name, tensor in tensors.items():
        attr = f"_sparse_inductor_{site.index}_{name}"
        gm.register_buffer(attr, tensor.clone())
        nodes.append(gm.graph.get_attr(attr))
    return nodes


def _site_function(decision, grid, tile, static: bool, num_constants: int = 0):
    """The function the rewritten site calls, with the site's policy, query_keep, grid and tile
    bound in (FX keeps a function, not a policy object, as a call target)."""
    from sparse_inductor.attention import sparse_attention, sparse_attention_static_layout
    from sparse_inductor.policies.base import static_parts

    policy, query_keep, tile = decision.policy, decision.query_keep, tuple(tile)
    parts = static_parts(policy)
    spans = dict(text_before=decision.site.text_before, text_after=decision.site.text_after)

    if static:
        def sparse_site_attention(q, k, v, counts, gather_index, scatter_index, *lists, scale=None,
                                  key_padding_mask=None, record_as=None, causal_block_size=None):
            static_lists = {p: (lists[2 * i], lists[2 * i + 1]) for i, p in enumerate(parts)}
            return sparse_attention_static_layout(q, k, v, counts, gather_index, scatter_index, grid, tile=tile,
                                                  policy=policy, query_keep=query_keep, scale=scale,
                                                  key_padding_mask=key_padding_mask, static_lists=static_lists,
                                                  record_as=record_as, causal_block_size=causal_block_size, **spans)
    else:
        def sparse_site_attention(q, k, v, grid, *, text_before, text_after, scale=None, key_padding_mask=None,
                                  record_as=None, causal_block_size=None):
            return sparse_attention(q, k, v, grid, tile=tile, policy=policy, query_keep=query_keep, scale=scale,
                                    text_before=text_before, text_after=text_after,
                                    key_padding_mask=key_padding_mask, record_as=record_as,
                                    causal_block_size=causal_block_size)
    return sparse_site_attention


def _span_args(graph, decision, query, grid) -> dict:
    """The text lengths as ints, or, for a data-dependent one, as ``L - other - T*H*W`` computed
    in the graph from the query's token count (its sizes are only known at run time)."""
    site = decision.site
    before, after = (static_int(n) for n in (site.text_before, site.text_after))
    if before is not None and after is not None:
        return dict(text_before=before, text_after=after)
    n_video = math.prod(g for g in grid if isinstance(g, int))
    for g in grid:
        if not isinstance(g, int):
            n_video = graph.call_function(operator.mul, (n_video, g))
    known = before if before is not None else after
    rest = graph.call_function(operator.sub, (graph.call_method("size", (query, 2)), n_video))
    rest = graph.call_function(operator.sub, (rest, known))
    return dict(text_before=rest, text_after=after) if before is None else dict(text_before=before, text_after=rest)


def _grid_args(graph, decision, nodes):
    """The grid as ints, or as ``size()`` calls on the node the walk found it on."""
    sizes = decision.grid
    if decision.grid_source != "graph" or _all_static(sizes):
        return tuple(static_int(s) if static_int(s) is not None else size_hint(s) for s in sizes)
    src_node, axes = decision.site.found.source
    src = nodes[src_node.name]
    return tuple(static_int(s) if static_int(s) is not None else graph.call_method("size", (src, a))
                 for s, a in zip(sizes, axes))
