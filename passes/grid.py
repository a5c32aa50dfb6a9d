"""Infer the 3D video grid ``(T, H, W)`` of an attention's query tokens from the graph.

The rule (DESIGN.md §8): from the query's token axis walk backwards through permutes,
reshapes, elementwise ops, linears, norms, RoPE, unbind/stack..., tracking the token range
through ``cat`` and slices (which gives the video span of a joint text+video sequence); stop
where the token axis splits into 3 axes: their sizes, in order, are (T, H, W).

The walk tracks a *token state*: the tuple of axes of the current node's tensor whose
flattened product is the query's token axis. A reshape that merged axes widens it; when it
holds three axes of size the grid is found.
"""
from __future__ import annotations

import math
import operator
import sys
from dataclasses import dataclass, replace

import torch
import torch.fx
import torch.nn.functional as F

from .coordinates import may_be_coordinates
from .shapes import reshape_groups, same_size, static_int, tensor_shape

MAX_VISITS = 4000


@dataclass(frozen=True)
class GridFound:
    """The grid and where its video tokens sit on the starting node's token axis.

    ``sizes`` are ints or SymInts; ``source`` is ``(node, axes)`` whose sizes they are, so a
    rewrite can read them at run time; ``start`` is the offset of the video span.
    """

    sizes: tuple
    source: tuple
    start: object = 0
    parallel: object = None  # passes.collectives.Ulysses when the tokens were gathered from ranks


@dataclass(frozen=True)
class GridMissing:
    reason: str
    at_input: bool = False  # the walk ended at a graph input (a graph break may hide the grid)
    node: object = None  # that input (the placeholder), for comparing where q and k come from
    # ``(placeholder, start, tokens)`` per graph input the token axis reached (several through a
    # ``cat``: video tokens and text tokens that both arrive as inputs), with its token range on the
    # starting node's token axis: a grid remembered for that many tokens places the video span.
    inputs: tuple = ()
    parallel: object = None  # as GridFound's


# Ops that keep every axis where it is (elementwise, casts, norms over the last dim...).
_SAME_SHAPE_METHODS = {
    "contiguous", "float", "half", "bfloat16", "double", "to", "type_as", "clone", "detach",
    "mul", "add", "sub", "div", "neg", "sigmoid", "tanh", "exp", "pow", "sqrt", "rsqrt", "mul_", "add_",
    "masked_fill", "where", "view_as", "reshape_as", "type", "__mul__", "__add__", "__sub__", "__truediv__",
    "__neg__", "__radd__", "__rmul__", "__rsub__", "__rtruediv__",
}
# Ops that act on the last axis only (and may change its size or split it, like view_as_complex).
_LAST_DIM_OPS = {
    "linear", "matmul", "layer_norm", "rms_norm", "group_norm", "dropout", "silu", "gelu",
    "view_as_complex", "view_as_real", "normalize",
}
_NOT_TOKEN_PRESERVING = {
    "softmax", "log_softmax", "cumsum", "cumprod", "roll", "flip", "sort", "argsort", "topk",
    "sum", "mean", "amax", "max", "min", "fft", "gather", "scatter", "index_select", "repeat_interleave",
}
# Reductions that keep the token order when they reduce other axes only (e.g. RoPE written as
# ``(rope * x).sum(-1)``, Kandinsky).
_REDUCTIONS = {"sum", "mean", "amax", "amin", "prod"}


def _is_sdpa(node) -> bool:
    return node.op == "call_function" and node.target is F.scaled_dot_product_attention


def _name(node) -> str:
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def _dim(d, ndim):
    return d % ndim if isinstance(d, int) else None


def _arg(node, index, name, default=None):
    """Positional-or-keyword argument of a call (for call_method, index 0 is self)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class GridWalker:
    """Walks one graph backwards from attention queries; results are memoised per (node, axes)."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.memo: dict = {}
        self.visits = 0
        # Placeholders of an autograd.Function's forward subgraph -> the nodes passed to it.
        self.subgraph_inputs: dict = {}

    def query_grid(self, q_node: torch.fx.Node) -> GridFound | GridMissing:
        """The grid of the token axis (dim 2) of a ``[B, H, L, D]`` query."""
        shape = tensor_shape(q_node)
        if shape is None or len(shape) != 4:
            return GridMissing("query is not a 4-d tensor")
        return self.grid_of(q_node, 2)

    def grid_of(self, node: torch.fx.Node, axis: int) -> GridFound | GridMissing:
        """The grid of the token axis ``axis`` of ``node`` (e.g. 1 of a ``[B, N, C]`` graph output)."""
        # The walk recurses once per node on the path; deep models need more than Python's 1000.
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 4 * MAX_VISITS + 1000))
        try:
            return self.walk(node, (axis,))
        finally:
            sys.setrecursionlimit(limit)

    def walk(self, node, axes: tuple) -> GridFound | GridMissing:
        key = (node, axes)
        if key in self.memo:
            return self.memo[key]
        self.memo[key] = GridMissing("cycle")  # guards recursion through the same state
        self.visits += 1
        if self.visits > MAX_VISITS:
            result = GridMissing("graph too large to search")
        else:
            result = self._step(node, axes)
        self.memo[key] = result
        return result

    # -- one step back from `node` ---------------------------------------------------------
    def _step(self, node, axes):
        if node.op == "placeholder" and node in self.subgraph_inputs:  # out of an autograd.Function's forward
            return self.walk(self.subgraph_inputs[node], axes)
        shape = tensor_shape(node)
        if shape is None:
            return GridMissing(f"no shape recorded for {node.name}")
        from .collectives import step as collective_step  # (imports this module)

        through_collective = collective_step(self, node, axes)
        if through_collective is not None:
            return through_collective
        if len(axes) == 3:
            return GridFound(tuple(shape[a] for a in axes), (node, axes))
        if len(axes) > 3:
            return GridMissing(f"the token axis splits into {len(axes)} axes at {node.name}")
        if node.op == "placeholder":
            tokens = math.prod(shape[a] for a in axes)
            return GridMissing(f"reached graph input {node.name} without finding the grid", at_input=True, node=node,
                               inputs=((node, 0, tokens),))
        if node.op == "get_attr":
            return GridMissing(f"reached parameter/buffer {node.target}")
        name = _name(node)
        ndim = len(shape)

        if name in ("transpose", "swapaxes"):
            src = node.args[0]
            d0, d1 = (_dim(d, ndim) for d in (_arg(node, 1, "dim0"), _arg(node, 2, "dim1")))
            if d0 is None or d1 is None:
                return GridMissing(f"non-constant transpose at {node.name}")
            swap = {d0: d1, d1: d0}
            return self.walk(src, tuple(swap.get(a, a) for a in axes))
        if name == "permute":
            src = node.args[0]
            dims = node.args[1:] if node.op == "call_method" else (_arg(node, 1, "dims"),)
            if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = dims[0]
            if not all(isinstance(d, int) for d in dims):
                return GridMissing(f"non-constant permute at {node.name}")
            dims = [d % ndim for d in dims]
            return self.walk(src, tuple(dims[a] for a in axes))
        if name == "flatten":
            return self._through_flatten(node, axes, ndim)
        if name == "unflatten":
            return self._through_unflatten(node, axes)
        if name in ("view", "reshape", "_unsafe_view"):
            return self._through_reshape(node, axes)
        if name in ("unsqueeze", "squeeze"):
            return self._through_reshape(node, axes)
        if name == "getitem" and node.target is operator.getitem:
            return self._through_getitem(node, axes)
        if name in ("cat", "concat", "concatenate"):
            return self._through_cat(node, axes)
        if name == "stack":
            tensors = _arg(node, 0, "tensors")
            d = _dim(_arg(node, 1, "dim", 0), ndim)
            if d is None or any(d <= a for a in axes):
                return GridMissing(f"stack over the token axis at {node.name}")
            return self._first_found([self.walk(t, axes) for t in tensors], node)
        if name in _LAST_DIM_OPS or _is_sdpa(node):
            # These mix or reshape only the last axis (features), never the token axis.
            if any(a == ndim - 1 for a in axes):
                return GridMissing(f"{name} mixes the token axis at {node.name}")
            src = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("query"))
            src_shape = tensor_shape(src)
            if src_shape is not None and abs(len(src_shape) - ndim) <= 1:
                return self.walk(src, axes)
            return GridMissing(f"{name} changes the rank at {node.name}")
        if node.op == "call_module":
            src = node.args[0] if node.args else None
            if src is not None and tensor_shape(src) is not None and len(tensor_shape(src)) == ndim:
                return self.walk(src, axes)
            return GridMissing(f"module call {node.target} changes the rank")
        if name in _REDUCTIONS:
            return self._through_reduction(node, axes, ndim)
        if name == "repeat_interleave":
            # A repeat along another axis (GQA-style head repeats, Cosmos) keeps the tokens.
            dim = _dim(_arg(node, 2, "dim"), ndim)
            if dim is not None and dim not in axes and isinstance(node.args[0], torch.fx.Node):
                return self.walk(node.args[0], axes)
            return GridMissing(f"repeat_interleave along the token axis (or flattened) at {node.name}")
        if name in _NOT_TOKEN_PRESERVING:
            return GridMissing(f"{name} at {node.name} does not preserve token order")
        return self._through_elementwise(node, axes, shape)

    def _through_reduction(self, node, axes, ndim):
        """``sum`` / ``mean`` / ... over axes that hold no tokens: the token axes keep their order
        (shifted back past the reduced axes unless ``keepdim``)."""
        src = node.args[0]
        in_ndim = len(tensor_shape(src) or ())
        dims = _arg(node, 1, "dim")
        if dims is None or in_ndim == 0:
            return GridMissing(f"{_name(node)} over every axis at {node.name}")
        dims = dims if isinstance(dims, (tuple, list)) else (dims,)
        if not all(isinstance(d, int) for d in dims):
            return GridMissing(f"non-constant {_name(node)} dims at {node.name}")
        reduced = sorted({d % in_ndim for d in dims})
        keepdim = bool(_arg(node, 2, "keepdim", False))
        if keepdim:
            src_axes = axes
        else:
            kept = [a for a in range(in_ndim) if a not in reduced]  # output axis i is input axis kept[i]
            src_axes = tuple(kept[a] for a in axes)
        if any(a in reduced for a in src_axes):
            return GridMissing(f"{_name(node)} over the token axis at {node.name}")
        return self.walk(src, src_axes)

    def _through_flatten(self, node, axes, ndim):
        """``flatten(start, end)`` names the merged axes exactly (no size matching)."""
        src = node.args[0]
        in_ndim = len(tensor_shape(src) or ())
        start = _arg(node, 1, "start_dim", 0)
        end = _arg(node, 2, "end_dim", -1)
        if not isinstance(start, int) or not isinstance(end, int) or in_ndim == 0:
            return GridMissing(f"non-constant flatten at {node.name}")
        start, end = start % in_ndim, end % in_ndim
        new_axes = []
        for a in axes:
            if a < start:
                new_axes.append(a)
            elif a == start:
                new_axes.extend(range(start, end + 1))
            else:
                new_axes.append(a + end - start)
        return self.walk(src, tuple(new_axes))

    def _through_unflatten(self, node, axes):
        src = node.args[0]
        in_ndim = len(tensor_shape(src) or ())
        dim, sizes = _arg(node, 1, "dim"), _arg(node, 2, "sizes")
        if not isinstance(dim, int) or not isinstance(sizes, (tuple, list)) or in_ndim == 0:
            return GridMissing(f"non-constant unflatten at {node.name}")
        dim %= in_ndim
        n = len(sizes)
        mapped = [a if a < dim else (dim if a < dim + n else a - n + 1) for a in axes]
        split = [a for a in axes if dim <= a < dim + n]
        if not split or split == list(range(dim, dim + n)):
            return self.walk(src, tuple(dict.fromkeys(mapped)))
        return self._through_partial_unflatten(node, src, axes, mapped, dim, n, split)

    def _through_partial_unflatten(self, node, src, axes, mapped, dim, n, split):
        """Only the inner axes of an unflatten carry tokens: ``unflatten(0, (B, F))`` of a
        ``[B*F, ...]`` tensor (Allegro's per-frame patch embedding) makes frames tokens while the
        batch is not. Upstream the merged axis ``B*F`` then reads as the grid's first axis: its
        size is divided by the outer, non-token factor (static sizes only). Where upstream splits
        the merged axis again, its leading piece of exactly that size is the outer factor (by
        position) and is dropped instead."""
        out_shape = tensor_shape(node)
        if split != list(range(dim + n - len(split), dim + n)) or split[0] != axes[0]:
            return GridMissing(f"unflatten {node.name} splits the token axis unevenly")
        outer = [static_int(out_shape[a]) for a in range(dim, split[0])]
        if None in outer:
            return GridMissing(f"unflatten {node.name} merges the tokens with a symbolic axis")
        return self._without_outer_factor(node, src, tuple(dict.fromkeys(mapped)), math.prod(outer))

    def _without_outer_factor(self, node, src, src_axes, factor):
        """Walk ``src`` with ``src_axes``, whose first axis merges a leading non-token factor of
        static size ``factor`` (a batch) with the leading token axis (frames): the grid found has
        that merged axis first, and its size is divided by ``factor`` (see
        ``_through_partial_unflatten``; ``view(B, T, ...)`` of a ``[B*T, ...]`` tensor reaches here
        from ``_through_reshape``)."""
        found = self.walk(src, src_axes)
        if not isinstance(found, GridFound):
            return found
        first = static_int(found.sizes[0])
        if first == factor:
            # The leading axis is the outer factor itself: upstream the merged axis came from
            # ``flatten`` of ``[B, F, ...]`` (a per-frame step between two token tensors, Wan
            # Animate's face adapter). It holds no tokens: walk on with the other axes.
            found_node, found_axes = found.source
            rest = self.walk(found_node, tuple(found_axes[1:]))
            if isinstance(rest, GridFound):
                return replace(rest, start=found.start + rest.start)
        if first is None or first % factor or not all(static_int(x) is not None for x in found.sizes):
            return GridMissing(f"the grid found through {_name(node)} {node.name} does not split by {factor}")
        return replace(found, sizes=(first // factor, *found.sizes[1:]))

    def _through_reshape(self, node, axes):
        src = node.args[0]
        in_shape, out_shape = tensor_shape(src), tensor_shape(node)
        if in_shape is None:
            return GridMissing(f"no shape for the input of {node.name}")
        groups = reshape_groups(in_shape, out_shape)
        if groups is None:
            return GridMissing(f"cannot map the axes of reshape {node.name}")
        new_axes, factor = [], 1
        for a in axes:
            for g_in, g_out in groups:
                if a in g_out:
                    if len(g_out) > 1:
                        # The token axis was split by this reshape (it merges back upstream):
                        # follow only if the group maps one-to-one.
                        if len(g_in) != 1:
                            return GridMissing(f"reshape {node.name} splits and merges the token axis")
                        if g_in[0] not in new_axes:
                            outer = self._outer_factor(node, axes, g_out, out_shape)
                            if isinstance(outer, GridMissing):
                                return outer
                            factor *= outer
                        new_axes.append(g_in[0])
                        break
                    new_axes.extend(self._merged_axes(g_in, in_shape))
                    break
        # A split of one input axis into several output axes that all belong to the token
        # state collapses back to that axis.
        new_axes = tuple(dict.fromkeys(new_axes))
        if factor > 1:
            return self._without_outer_factor(node, src, new_axes, factor)
        return self.walk(src, new_axes)

    @staticmethod
    def _outer_factor(node, axes, g_out, out_shape):
        """A reshape splits one input axis into the output axes ``g_out``. Where the token axes
        among them are the inner ones, behind axes that are not (``view(B, T, C, H*W)`` of
        ``[B*T, C, H, W]``: the batch), the static size of those leading axes; else 1: the input
        axis is followed whole (all of them tokens, size-1 axes aside; or tokens in front, e.g. a
        Ulysses all-to-all's rank-major slabs ``[P*h, ...] -> [P, h, ...]``, left to
        passes/collectives.py)."""
        g_out = [x for x in g_out if x in axes or static_int(out_shape[x]) != 1]
        inner = [x for x in g_out if x in axes]
        lead = g_out[:len(g_out) - len(inner)]
        sizes = [static_int(out_shape[x]) for x in lead]
        if not lead or inner != g_out[len(lead):]:
            return 1
        if None in sizes:
            return GridMissing(f"reshape {node.name} splits a symbolic axis off the token axis")
        factor = math.prod(sizes)
        if factor > 1 and inner[0] != axes[0]:
            return GridMissing(f"reshape {node.name} splits a batch off a token axis that is not the first")
        return factor

    @staticmethod
    def _merged_axes(g_in, in_shape):
        """The input axes a merged token axis came from. Size-1 axes are ambiguous in a
        reshape (``reshape_groups`` puts them with the group after them): three axes are the
        grid, size-1 ones included (T = 1 is an image); fewer are completed with the size-1
        axes right after them when that makes exactly three (``[B, T, 1, 1, C] -> [B, T, C]``);
        otherwise size-1 axes carry no tokens (a squeeze)."""
        if len(g_in) == 3:
            return list(g_in)
        if len(g_in) < 3:
            nxt, extended = g_in[-1] + 1, list(g_in)
            while len(extended) < 3 and nxt < len(in_shape) - 1 and same_size(in_shape[nxt], 1):
                extended.append(nxt)
                nxt += 1
            if len(extended) == 3:
                return extended
        return [i for i in g_in if not same_size(in_shape[i], 1)] or list(g_in[-1:])

    def _through_getitem(self, node, axes):
        src, index = node.args
        src_val = tensor_shape(src)
        if src_val is None:
            # Element of a tuple (unbind / chunk / split / SDPA-with-lse outputs).
            return self._through_tuple_item(src, index, axes)
        if len(axes) != 1:
            return GridMissing(f"indexing a multi-axis token state at {node.name}")
        index = index if isinstance(index, tuple) else (index,)
        in_axis, out_axis, src_axis_of = 0, 0, {}
        start, stop = 0, None
        for item in index:
            if item is Ellipsis:
                n_rest = sum(1 for i in index if i is not Ellipsis and i is not None)
                for _ in range(len(src_val) - n_rest):
                    src_axis_of[out_axis] = in_axis
                    out_axis += 1
                    in_axis += 1
                continue
            if item is None:
                out_axis += 1
                continue
            if isinstance(item, int):
                in_axis += 1
                continue
            if isinstance(item, slice):
                if out_axis == axes[0]:
                    if item.step not in (None, 1):
                        return GridMissing(f"strided slice of the token axis at {node.name}")
                    start, stop = item.start or 0, item.stop
                    size = static_int(src_val[in_axis])
                    if not isinstance(start, int) or not (stop is None or isinstance(stop, int)) or size is None:
                        return GridMissing(f"slice of the token axis [{item.start}:{item.stop}] at {node.name}")
                    # Normalise negative bounds the way Python slicing does.
                    start = max(0, start + size) if start < 0 else min(start, size)
                    if stop is not None:
                        stop = max(0, stop + size) if stop < 0 else min(stop, size)
                src_axis_of[out_axis] = in_axis
                out_axis += 1
                in_axis += 1
                continue
            return GridMissing(f"advanced indexing at {node.name}")
        while in_axis < len(src_val):
            src_axis_of[out_axis] = in_axis
            out_axis += 1
            in_axis += 1
        if axes[0] not in src_axis_of:
            return GridMissing(f"cannot follow the token axis through {node.name}")
        found = self.walk(src, (src_axis_of[axes[0]],))
        if isinstance(found, GridFound):
            video_start = found.start
            video_end = static_int(video_start + math.prod(found.sizes)) if isinstance(video_start, int) else None
            if isinstance(video_start, int) and video_end is not None:
                stop_ = video_end if stop is None else stop
                if video_end <= start or video_start >= stop_:
                    return GridMissing(f"slice {node.name} keeps no video token")
                if video_start < start or video_end > stop_:
                    return GridMissing(f"slice {node.name} cuts the video span")
            return replace(found, start=video_start - start)
        if found.inputs and (start or stop is not None):
            # The graph inputs' token ranges on the slice: those it keeps whole, shifted.
            kept = tuple((p, s - start, n) for p, s, n in found.inputs
                         if static_int(s) is not None and static_int(n) is not None and static_int(s) >= start
                         and (stop is None or static_int(s) + static_int(n) <= stop))
            return replace(found, inputs=kept, at_input=bool(kept))
        return found

    def _through_tuple_item(self, src, index, axes):
        name = _name(src)
        if not isinstance(index, int):
            return GridMissing(f"non-constant tuple index at {src.name}")
        if name == "unbind":
            dim = _arg(src, 1, "dim", 0)
            inner = tensor_shape(src.args[0])
            if inner is None or not isinstance(dim, int):
                return GridMissing(f"cannot follow unbind {src.name}")
            dim %= len(inner)
            return self.walk(src.args[0], tuple(a + (a >= dim) for a in axes))
        if name in ("chunk", "split", "tensor_split", "split_with_sizes"):
            dim = _arg(src, 2, "dim", 0)
            inner = tensor_shape(src.args[0])
            if inner is None or not isinstance(dim, int):
                return GridMissing(f"cannot follow {name} {src.name}")
            if dim % len(inner) in axes:
                return GridMissing(f"{name} along the token axis at {src.name}")
            return self.walk(src.args[0], axes)
        if _is_sdpa(src) or name == "scaled_dot_product_attention":
            return self.walk(src.args[0], axes)
        if name == "autograd_function_apply":
            return self._through_autograd_function(src, index, axes)
        return GridMissing(f"cannot follow item {index} of {src.name} ({name})")

    def _through_autograd_function(self, hop, index, axes):
        """A ``torch.autograd.Function`` as Dynamo traces it (``autograd_function_apply(fwd_body,
        bwd_body, *args)``): output ``index`` is walked inside the forward's subgraph, whose inputs
        lead back to the call's arguments. (An all-to-all written as an autograd.Function, as
        xDiT and FastVideo do, and torch 2.11's own collectives under autograd, arrive this way.)"""
        body = hop.args[0] if hop.args else None
        forward = getattr(self.gm, body.target, None) if isinstance(body, torch.fx.Node) and body.op == "get_attr" \
            else None
        if not isinstance(forward, torch.fx.GraphModule):
            return GridMissing(f"cannot find the forward of {hop.name}")
        returned = next(n for n in forward.graph.nodes if n.op == "output").args[0]
        # The forward returns (outputs, saved tensors), or the outputs alone.
        outputs = returned[0] if isinstance(returned, (tuple, list)) and returned \
            and isinstance(returned[0], (tuple, list)) else returned
        if not isinstance(outputs, (tuple, list)):
            outputs = (outputs,)
        if not (0 <= index < len(outputs)) or not isinstance(outputs[index], torch.fx.Node):
            return GridMissing(f"cannot follow item {index} of {hop.name}")
        placeholders = [n for n in forward.graph.nodes if n.op == "placeholder"]
        self.subgraph_inputs.update(zip(placeholders, hop.args[2:]))
        return self.walk(outputs[index], axes)

    def _through_cat(self, node, axes):
        tensors = _arg(node, 0, "tensors")
        shape = tensor_shape(node)
        dim = _dim(_arg(node, 1, "dim", 0), len(shape))
        if dim is None:
            return GridMissing(f"non-constant cat dim at {node.name}")
        if dim not in axes:
            return self._first_found([self.walk(t, axes) for t in tensors], node)
        if len(axes) != 1:
            return GridMissing(f"cat along a multi-axis token state at {node.name}")
        found, inputs, missing, offset = [], [], [], 0
        for t in tensors:
            r = self.walk(t, axes)
            if isinstance(r, GridFound):
                found.append(replace(r, start=r.start + offset))
            elif r.at_input:
                inputs.extend((p, start + offset, n) for p, start, n in r.inputs)
            else:
                missing.append(r.reason)
            offset = offset + tensor_shape(t)[dim]
        if len(found) == 1:
            return found[0]
        if not found:
            reason = f"no input of cat {node.name} carries a video grid" + (f" ({missing[0]})" if missing else "")
            if inputs:  # e.g. video and text tokens both graph inputs (a graph break before the cat)
                return GridMissing(reason, at_input=True, node=inputs[0][0], inputs=tuple(inputs))
            return GridMissing(reason)
        return self._largest_grid(found, node)

    @staticmethod
    def _largest_grid(found, node):
        """Several video grids in one sequence (Framepack: history latents at coarser grids before
        the current window): the grid with the most tokens is the site's video span; the others'
        tokens are kept dense, like text tokens (DESIGN.md §3.5). A tie is ambiguous."""
        sizes = [static_int(math.prod(f.sizes)) for f in found]
        if None in sizes:
            return GridMissing(f"several inputs of cat {node.name} carry a video grid, some of symbolic size")
        largest = max(sizes)
        if sizes.count(largest) > 1:
            return GridMissing(f"several inputs of cat {node.name} carry video grids of the same size ({largest} "
                               "tokens): which one is the video is ambiguous")
        return found[sizes.index(largest)]

    def _through_elementwise(self, node, axes, shape):
        """Follow the tensor operands of the output's rank whose token axes are whole (an operand
        broadcast along a token axis carries no tokens; along other axes it may, e.g. a RoPE
        table broadcast over the batch and heads)."""
        candidates = [a for a in list(node.args) + list(node.kwargs.values())
                      if isinstance(a, torch.fx.Node) and tensor_shape(a) is not None
                      and len(tensor_shape(a)) == len(shape)
                      and all(same_size(tensor_shape(a)[i], shape[i]) for i in axes)]
        if not candidates:
            return GridMissing(f"cannot follow the token axis through {_name(node)} at {node.name}")
        return self._first_found([self.walk(c, axes) for c in candidates], node)

    @staticmethod
    def _first_found(results, node):
        found = [r for r in results if isinstance(r, GridFound)]
        if found:
            first = found[0]
            for other in found[1:]:
                if len(other.sizes) != len(first.sizes) or not all(
                        same_size(a, b) for a, b in zip(other.sizes, first.sizes)):
                    return GridMissing(f"operands of {node.name} disagree on the grid")
            return first
        # Of the graph inputs reached, one that may hold the tokens' coordinates first (the RoPE's
        # source, LTX: passes/coordinates.py reads the grid from its values; the features' input
        # tells nothing).
        at_input = sorted((r for r in results if isinstance(r, GridMissing) and r.at_input),
                          key=lambda r: not may_be_coordinates(tensor_shape(r.node)))
        return at_input[0] if at_input else (results[0] if results else GridMissing(f"nothing to follow at {node.name}"))
