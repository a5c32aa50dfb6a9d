"""Sequence parallelism in a Dynamo graph: the grid walk through Ulysses all-to-alls.

Under Ulysses sequence parallelism (DeepSpeed-Ulysses, xDiT / USP, FastVideo, diffusers'
``ContextParallelConfig(ulysses_degree=P)``) rank ``r`` of a group of ``P`` holds chunk ``r`` of
the token sequence. Before attention an all-to-all sends head group ``j`` of its tokens to rank
``j``, so that every rank attends over the whole sequence with ``H / P`` heads. In the graph
(functional collectives, as Dynamo records them):

    local [B, n, H, D] -> reshape [B, n, P, H/P, D] -> permute -> [P, n, B, H/P, D]   (axis 0: to rank j)
      -> all_to_all_single (equal splits along axis 0) -> wait_tensor                 (axis 0: from rank j)
      -> flatten (P, n) into N = P * n tokens -> ... -> scaled_dot_product_attention

The walk reaches the all-to-all with a token state whose outermost axis is axis 0 (the ranks):
the gathered sequence is the ranks' chunks in rank order. It goes on over the input's other
(local) token axes with a :class:`ShardWalker`, which crosses to the full sequence where the
local tokens are chunk ``r`` of ``P`` of it (``chunk`` / ``tensor_split`` / ``split`` along the
outermost token axis, ``r`` being this process's rank in the all-to-all's group); from there the
ordinary walk finds the grid of the full sequence. A site found this way is an ordinary site
with ``H / P`` heads; its grid result carries :class:`Ulysses` for ``explain()``.

Tokens exchanged any other way on the way to an attention (an all-gather of keys and values, a
ring's point-to-point exchange, an all-to-all with uneven splits) are reported with a reason and
the attention stays dense.
"""
from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass

from sparse_inductor import _compat

from .grid import GridMissing, GridWalker, _arg, _name
from .shapes import same_size, static_int, tensor_shape

#: Reasons that start with this mark attention whose keys are sharded across ranks.
RING = "ring attention"
#: Reasons that start with this mark a gathered sequence proven not to be the raster order of the
#: full one (no ``grid=`` can make such a site sparse).
OUT_OF_ORDER = "the gathered sequence is not the full one in order"

_RESHAPES = ("view", "reshape", "_unsafe_view")
_SPLITS = ("chunk", "tensor_split", "split")


@dataclass(frozen=True)
class Ulysses:
    """A token axis gathered by a Ulysses all-to-all over ``degree`` ranks (``group`` is the
    process group's name, ``rank`` this process's rank in it)."""

    degree: int
    group: str
    rank: int

    def __str__(self):
        return f"sequence-parallel (Ulysses, degree {self.degree})"


def present(gm) -> bool:
    """Whether ``gm`` calls any functional collective."""
    return any(n.op == "call_function" and _compat.functional_collective_name(n.target) for n in gm.graph.nodes)


def ring_reason(walker: GridWalker, key) -> str:
    """Why the attention with keys ``key`` is ring-style sequence-parallel attention (keys that
    reach it through a collective other than a Ulysses all-to-all: an all-gather of keys and
    values, a ring's point-to-point exchange), or ``""``."""
    result = walker.query_grid(key)
    if not isinstance(result, GridMissing) or result.parallel is not None:
        return ""
    if result.reason.startswith(RING):
        return result.reason
    exchange = _exchange_above(key)
    if exchange is None:
        return ""
    name = _compat.functional_collective_name(exchange.target)
    return (f"{RING} (the keys come through {name} at {exchange.name}: sequence parallelism over the key axis; only "
            "a Ulysses all-to-all is supported)")


def out_of_order(result) -> bool:
    """Whether a grid walk's ``result`` proves that a gathered sequence is out of order."""
    return isinstance(result, GridMissing) and result.reason.startswith(OUT_OF_ORDER)


def _exchange_above(node, limit: int = 400):
    """The nearest collective above ``node`` that is not an all-to-all between every two ranks
    (an all-gather, a reduction, a point-to-point exchange)."""
    seen, frontier = {node}, [node]
    while frontier and len(seen) < limit:
        nxt = []
        for n in frontier:
            name = _compat.functional_collective_name(n.target) if n.op == "call_function" else None
            if name not in (None, "wait_tensor") and not (name == "all_to_all_single" and _to_every_rank(n)):
                return n
            for m in n.all_input_nodes:
                if m not in seen:
                    seen.add(m)
                    nxt.append(m)
        frontier = nxt
    return None


def _to_every_rank(a2a) -> bool:
    """Whether an all-to-all exchanges data between every two ranks (no zero split)."""
    splits = [static_int(s) for s in (*(_arg(a2a, 1, "output_split_sizes") or ()),
                                      *(_arg(a2a, 2, "input_split_sizes") or ()))]
    return 0 not in splits


def step(walker: GridWalker, node, axes):
    """One step of ``walker`` back from a collective ``node`` (or a reshape that undoes the
    flatten around one); ``None`` when ``node`` is neither."""
    name = _compat.functional_collective_name(node.target) if node.op == "call_function" else None
    if name == "wait_tensor":
        return walker.walk(node.args[0], axes)
    if name == "all_to_all_single":
        return _through_all_to_all(walker, node, node.args[0], axes)
    if name is not None:
        return GridMissing(f"{RING} (tokens exchanged between ranks by {name} at {node.name}; only a Ulysses "
                           "all-to-all is supported)")
    flat = _flat_all_to_all(node)
    if flat is not None:
        return _through_all_to_all(walker, *flat, axes)
    return None


def _is_collective(node, name) -> bool:
    return getattr(node, "op", None) == "call_function" and _compat.functional_collective_name(node.target) == name


def _strip_waits(node):
    while _is_collective(node, "wait_tensor"):
        node = node.args[0]
    return node


def _flat_all_to_all(node):
    """``(all_to_all, y)`` when ``node`` is ``reshape(all_to_all(flatten(y)), y.shape)`` (waits
    anywhere in between): diffusers flattens the tensor around its all-to-all."""
    if _name(node) not in _RESHAPES or not node.args:
        return None
    a2a = _strip_waits(node.args[0])
    if not _is_collective(a2a, "all_to_all_single"):
        return None
    flat = a2a.args[0]
    if _name(flat) not in ("flatten", *_RESHAPES) or not flat.args:
        return None
    y = flat.args[0]
    y_shape, flat_shape, out_shape = tensor_shape(y), tensor_shape(flat), tensor_shape(node)
    if y_shape is None or flat_shape is None or out_shape is None or len(flat_shape) != 1:
        return None
    if len(out_shape) != len(y_shape) or not all(same_size(a, b) for a, b in zip(out_shape, y_shape)):
        return None
    return a2a, y


def _through_all_to_all(walker, a2a, x, axes):
    """Cross the all-to-all ``a2a`` that exchanges axis 0 of ``x`` (the token state ``axes`` is on
    its output, whose shape is ``x``'s)."""
    out_splits, in_splits = _arg(a2a, 1, "output_split_sizes"), _arg(a2a, 2, "input_split_sizes")
    group = _arg(a2a, 3, "group_name")
    where = f"all-to-all {a2a.name}"
    if out_splits is None or in_splits is None:
        return GridMissing(f"{where} has no split sizes")
    found = _compat.process_group_rank_and_size(group)
    if found is None:
        return GridMissing(f"{where}: cannot resolve its process group {group!r}")
    rank, degree = found
    splits = [static_int(s) for s in (*out_splits, *in_splits)]
    if None in splits:
        return GridMissing(f"{where} has symbolic split sizes")
    if 0 in splits:
        return GridMissing(f"{RING} ({where} sends to a subset of the ranks: a point-to-point exchange)")
    if len(set(splits)) != 1:
        return GridMissing(f"{where} splits unevenly (input {list(in_splits)}, output {list(out_splits)}; e.g. a "
                           f"head count that does not divide by the degree {degree}): only even splits are supported")
    shape = tensor_shape(x)
    if shape is None or static_int(shape[0]) != degree:
        return GridMissing(f"{where} exchanges an axis of size {shape[0] if shape else '?'}: only one slab per rank "
                           f"([{degree}, ...]) is supported")
    if degree == 1:  # one rank: the exchange is the identity; its size-1 axis may hold no tokens
        local = tuple(a for a in axes if a != 0)
    elif 0 not in axes:
        return GridMissing(f"{where} scatters the token axis (it gathers another axis)")
    elif axes[0] != 0 or len(axes) < 2:
        return GridMissing(f"{where}: the ranks' axis is not the outermost part of the token axis")
    else:
        local = tuple(axes[1:])
    ulysses = Ulysses(degree, group, rank)
    result = _shard_walker(walker, ulysses).walk(x, local)
    inputs = getattr(result, "inputs", ())
    if isinstance(result, GridMissing) and result.at_input and inputs:
        # The graph input holds this rank's shard: what earlier graphs remember for the whole
        # sequence (``degree`` times its tokens) places it.
        if len(inputs) != 1 or static_int(inputs[0][1]) != 0:
            return GridMissing(f"{OUT_OF_ORDER}: the shard of rank {rank} joins several graph inputs", parallel=ulysses)
        placeholder, _, tokens = inputs[0]
        result = dataclasses.replace(result, inputs=((placeholder, 0, tokens * degree),))
    return dataclasses.replace(result, parallel=ulysses)


def _shard_walker(walker, ulysses):
    cache = walker.__dict__.setdefault("_shard_walkers", {})
    if ulysses not in cache:
        cache[ulysses] = ShardWalker(walker, ulysses)
    return cache[ulysses]


class ShardWalker(GridWalker):
    """Walks the tokens one rank holds (its shard of the sequence) back to the full sequence.

    A shard's own structure says nothing about the gathered sequence: a local grid, a ``cat`` or
    a slice of local tokens would interleave across ranks; only the crossing to the full sequence
    (chunk ``rank`` of ``degree`` along the outermost token axis) ends the walk.
    """

    def __init__(self, outer: GridWalker, ulysses: Ulysses):
        super().__init__(outer.gm)
        self.outer, self.ulysses = outer, ulysses
        self.subgraph_inputs = outer.subgraph_inputs  # walks out of autograd.Function subgraphs, too

    def _step(self, node, axes):
        if _name(node) == "getitem" and node.target is operator.getitem and isinstance(node.args[1], int) \
                and _name(node.args[0]) in _SPLITS and tensor_shape(node.args[0]) is None:
            crossing = self._through_shard(node.args[0], node.args[1], axes)
            if crossing is not None:
                return crossing
        if self.ulysses.degree == 1:  # the one rank's tokens are the whole sequence
            return super()._step(node, axes)
        if len(axes) >= 3:
            return GridMissing(f"{OUT_OF_ORDER}: the tokens of one rank split into {len(axes)} axes at {node.name} "
                               "before a shard of the whole sequence was found (a shard's grid is not the sequence's)")
        if _name(node) == "getitem" and tensor_shape(node.args[0]) is not None and self._cuts_tokens(node, axes):
            return GridMissing(f"{OUT_OF_ORDER}: a slice of one rank's tokens at {node.name} (gathered, the ranks' "
                               "slices interleave)")
        return super()._step(node, axes)

    def _through_cat(self, node, axes):
        dim = _arg(node, 1, "dim", 0)
        ndim = len(tensor_shape(node))
        if isinstance(dim, int) and dim % ndim in axes and self.ulysses.degree > 1:
            return GridMissing(f"{OUT_OF_ORDER}: tokens joined at {node.name} after the sequence was sharded "
                               "(gathered, the ranks' parts interleave)")
        return super()._through_cat(node, axes)

    def _through_shard(self, split, index, axes):
        """The full sequence's walk if ``split[index]`` is this rank's chunk of it along the
        outermost token axis; a reason if it is another chunk; None if the split is elsewhere."""
        full = split.args[0]
        full_shape = tensor_shape(full)
        if full_shape is None:
            return None
        ndim = len(full_shape)
        name = _name(split)
        dim = _arg(split, 2, "dim", 0)
        if not isinstance(dim, int) or dim % ndim not in axes:
            return None
        dim %= ndim
        if dim != axes[0]:
            return GridMissing(f"{OUT_OF_ORDER}: {name} {split.name} shards an inner part of the token axis")
        size = static_int(full_shape[dim])
        count = _arg(split, 1, {"chunk": "chunks", "split": "split_size"}.get(name, "sections"))
        if name == "split" and isinstance(count, int) and size is not None and count and size % count == 0:
            count = size // count
        degree, rank = self.ulysses.degree, self.ulysses.rank
        if not isinstance(count, int) or size is None or count != degree or size % degree:
            return GridMissing(f"{name} {split.name} does not split the sequence ({full_shape[dim]} tokens) into "
                               f"{degree} equal shards")
        if index != rank:
            return GridMissing(f"{OUT_OF_ORDER}: rank {rank} of the all-to-all's group holds shard {index} of "
                               f"{degree} ({split.name}), so the all-to-all would not gather the sequence in order")
        return self.outer.walk(full, tuple(axes))

    @staticmethod
    def _cuts_tokens(node, axes) -> bool:
        """Whether the indexing ``node`` slices the (one-axis) token state (other items of the
        index, and indexing the base walk rejects anyway, are left to it)."""
        src_shape = tensor_shape(node.args[0])
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if len(axes) != 1 or src_shape is None:
            return False
        out_axis = in_axis = 0
        for item in index:
            if item is Ellipsis:
                skip = len(src_shape) - sum(1 for i in index if i is not Ellipsis and i is not None)
                out_axis, in_axis = out_axis + skip, in_axis + skip
            elif item is None:
                out_axis += 1
            elif isinstance(item, int):
                in_axis += 1
            elif isinstance(item, slice):
                if out_axis == axes[0]:
                    size = static_int(src_shape[in_axis])
                    whole_stop = item.stop is None or (size is not None and isinstance(item.stop, int)
                                                       and item.stop >= size)
                    return not (item.start in (None, 0) and whole_stop and item.step in (None, 1))
                out_axis, in_axis = out_axis + 1, in_axis + 1
            else:
                return False
        return False


__all__ = ["OUT_OF_ORDER", "RING", "ShardWalker", "Ulysses", "out_of_order", "present", "ring_reason", "step"]
