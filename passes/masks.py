"""Recognise a block-causal attention mask over frames (diffusion forcing) in a Dynamo graph.

A square ``attn_mask`` (``[..., N, N]`` over the video tokens) is accepted only if its value is
known when the graph is compiled and equals, element for element, the block-causal mask over the
site's grid for some number ``c`` of frames per causal block (:mod:`sparse_inductor.causal`):
query frame ``f`` attends key frame ``f'`` iff ``f' // c <= f // c``. The value is known when the
mask is computed inside the graph from constants only (SkyReels-V2 builds it from ``arange`` of the
frame count: no graph input, no random op); the pass then evaluates that subgraph once and
compares. Where the graph shows that the token mask only repeats a ``[T, T]`` frame mask over the
height and width (SkyReels' ``view(T, 1, 1, T, 1, 1).repeat(1, H, W, 1, H, W).reshape(N, N)``),
only the frame mask is evaluated and checked, so large videos need no ``N x N`` tensor at compile
time. Any other mask (a graph input, whose value may change between calls; a symbolic size;
any other pattern) is reported with its reason and the site stays dense. The pass only finds the
structure; the selection under it is chosen at run time (DESIGN.md §9).
"""
from __future__ import annotations

import math

import torch
import torch.fx

from .shapes import static_int, tensor_shape

#: Masks with more elements than this are not evaluated at compile time (the site stays dense).
MAX_MASK_ELEMENTS = 1 << 32

# Targets whose value is not a function of their inputs (a random mask must never be accepted).
_RANDOM_WORDS = ("rand", "normal", "bernoulli", "dropout", "multinomial", "poisson", "exponential", "uniform",
                 "cauchy", "geometric", "seed")


def _target_name(node: torch.fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _ancestors(node: torch.fx.Node) -> list[torch.fx.Node] | str:
    """The nodes ``node`` is computed from, in graph order, or why its value is not a constant."""
    seen, stack = {}, [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen[n] = True
        if n.op == "placeholder":
            return f"it depends on the graph input {n.name} (its value may change between calls)"
        if n.op not in ("call_function", "call_method", "get_attr"):
            return f"it is computed by a {n.op} node ({n.name})"
        if n.op != "get_attr" and any(word in _target_name(n).lower() for word in _RANDOM_WORDS):
            return f"it is computed by a random op ({_target_name(n)})"
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def constant_value(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor | str:
    """The value of ``node`` if it is computed from constants only (evaluated once, no
    gradient), else the reason it is not known at compile time."""
    nodes = _ancestors(node)
    if isinstance(nodes, str):
        return nodes
    shape = tensor_shape(node)
    if shape is None or any(static_int(s) is None for s in shape):
        return "its shape is symbolic"
    if math.prod(static_int(s) for s in shape) > MAX_MASK_ELEMENTS:
        return f"it has more than {MAX_MASK_ELEMENTS} elements (too large to check at compile time)"
    graph = torch.fx.Graph()
    env: dict = {}
    for n in nodes:
        env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output(env[node])
    try:
        with torch.no_grad():
            value = torch.fx.GraphModule(gm, graph)()
    except Exception as error:  # a constant subgraph that cannot run here: not provable
        return f"evaluating it at compile time failed ({type(error).__name__}: {error})"
    if not isinstance(value, torch.Tensor):
        return "it is not a tensor"
    return value


_RESHAPES = {"view", "reshape", "unsqueeze", "_unsafe_view"}
_BROADCASTS = {"repeat", "expand", "expand_as", "broadcast_to"}


def _static_shape(node) -> tuple | None:
    shape = tensor_shape(node)
    if shape is None:
        return None
    shape = tuple(static_int(s) for s in shape)
    return None if None in shape else shape


def _without_leading_ones(shape: tuple) -> tuple:
    while shape and shape[0] == 1:
        shape = shape[1:]
    return shape


def frame_mask_node(node: torch.fx.Node, grid) -> torch.fx.Node | None:
    """The ``[T, T]`` node the token mask ``node`` repeats over the height and width of ``grid``
    (``mask[q, k] = frames[frame(q), frame(k)]``), read off the graph: leading unit dims, a
    raster flatten of ``[T, H, W, T, H, W]``, a repeat / expand of ``[T, 1, 1, T, 1, 1]``, a view of
    ``[T, T]``. ``None`` if the graph does not show that structure."""
    T, H, W = grid
    N = T * H * W

    def step(n, names):
        if isinstance(n, torch.fx.Node) and n.op in ("call_method", "call_function") and \
                _target_name(n) in names and n.args and isinstance(n.args[0], torch.fx.Node):
            return n.args[0]
        return None

    def unit_index(n):  # x[None, None] (adds leading unit dims only)
        index = n.args[1] if n.op == "call_function" and _target_name(n) == "getitem" and len(n.args) == 2 else 0
        index = index if isinstance(index, tuple) else (index,)
        return bool(n.args) and isinstance(n.args[0], torch.fx.Node) and all(i is None or i == slice(None) or i is Ellipsis
                                                            for i in index)

    shape = _static_shape(node)
    while shape is not None and _without_leading_ones(shape) == (N, N) and len(shape) > 2:
        node = node.args[0] if unit_index(node) else step(node, _RESHAPES)  # [1, 1, N, N] <- [N, N]
        shape = None if node is None else _static_shape(node)
    if shape != (N, N):
        return None
    node = step(node, _RESHAPES)
    if node is None or _static_shape(node) != (T, H, W, T, H, W):
        return None
    node = step(node, _BROADCASTS)
    if node is None or _static_shape(node) != (T, 1, 1, T, 1, 1):
        return None
    node = step(node, _RESHAPES)
    if node is None or _static_shape(node) != (T, T):
        return None
    return node


def block_causal_frames(value: torch.Tensor, grid, num_tokens) -> int | str:
    """The frames per causal block ``c`` if the mask ``value`` (broadcastable to ``[B, H, N, N]``,
    bool or float 0 / -inf) is exactly the block-causal mask over ``grid`` (``c = T`` when it
    masks nothing), else why not."""
    T, H, W = (static_int(g) for g in grid)
    N = static_int(num_tokens)
    if None in (T, H, W, N) or T * H * W != N:
        return "the grid is symbolic or does not cover the sequence"
    if value.dim() < 2 or tuple(value.shape[-2:]) != (N, N):
        return f"its shape {list(value.shape)} is not [..., {N}, {N}]"
    if value.dtype == torch.bool:
        allowed = value
    elif value.is_floating_point():
        allowed = value == 0
        if not bool((allowed | (value == float("-inf"))).all()):
            return "it is a float mask with values other than 0 and -inf (an additive bias)"
    else:
        return f"its dtype {value.dtype} is neither bool nor float"
    allowed = allowed.reshape(-1, N, N)
    first = allowed[0]
    for other in allowed[1:]:  # broadcast dims (batch, heads) must repeat one mask
        if not torch.equal(other, first):
            return "it differs between batch elements or heads"
    # Candidate c: how many frames the first query may see; then the whole mask must match.
    frames_seen = first[0, :: H * W]
    c = int(frames_seen.sum())
    if c == 0 or not bool(frames_seen[:c].all()):
        return "it is not block-causal over frames (the first query does not see a prefix of frames)"
    block = torch.arange(N, device=first.device) // (H * W) // c
    rows = max(1, (1 << 24) // N)  # compare in row chunks: bounded memory for large masks
    for r0 in range(0, N, rows):
        expected = block[None, :] <= block[r0: r0 + rows, None]
        if not torch.equal(first[r0: r0 + rows], expected):
            return "it is not block-causal over frames of the grid (query frame f attends key frames f' with " \
                   "f' // c <= f // c)"
    return min(c, T)


# -------------------------------------------------------------------------------------------
# The site-level steps (called from passes/sites.py)
# -------------------------------------------------------------------------------------------
def is_square(mask, q_shape) -> bool:
    """Whether ``mask`` is a tensor node shaped ``[..., L, L]`` (at most 4 dims, leading dims 1,
    the batch or the heads): a candidate block-causal mask, checked once the grid is known."""
    if not isinstance(mask, torch.fx.Node) or q_shape is None:
        return False
    shape = tensor_shape(mask)
    if shape is None or not 2 <= len(shape) <= 4:
        return False
    L = static_int(q_shape[2])
    if L is None or static_int(shape[-1]) != L or static_int(shape[-2]) != L:
        return False
    leading = [static_int(s) for s in shape[:-2]]
    allowed = (1, static_int(q_shape[0]), static_int(q_shape[1]))
    return all(s is not None and s in allowed for s in leading)


def recognise_block_causal(gm: torch.fx.GraphModule, site) -> str:
    """Set ``site.causal_block_size`` if the site's square mask is block-causal over the frames of
    its grid; else return why the site stays dense (shown by ``explain()`` and logged)."""
    mask = site.args["attn_mask"]
    what = f"attn_mask {list(tensor_shape(mask))}"
    if static_int(site.text_before) != 0 or static_int(site.text_after) != 0:
        return f"{what} on joint text + video attention (a block-causal mask is supported on video-only attention)"
    grid = tuple(static_int(g) for g in site.grid)
    frames_node = frame_mask_node(mask, grid) if None not in grid else None
    if frames_node is not None:  # the token mask repeats a frame mask: check that one
        node, check_grid, tokens = frames_node, (grid[0], 1, 1), grid[0]
    else:
        node, check_grid, tokens = mask, site.grid, site.q_shape[2]
    value = constant_value(gm, node)
    if isinstance(value, str):
        return f"{what} is not known at compile time: {value}; only a block-causal mask computed in the graph " \
               "from constants (as SkyReels-V2 diffusion forcing builds it) is recognised"
    frames = block_causal_frames(value, check_grid, tokens)
    if isinstance(frames, str):
        return f"{what}: {frames}"
    site.causal_block_size = frames
    return ""


def block_causal_reason(site, cfg, grid) -> str:
    """Why a site with a recognised block-causal mask stays dense under ``cfg`` ("" if it may be
    sparse)."""
    from sparse_inductor.causal import effective_block_size, tiles_split_blocks

    c = effective_block_size(tuple(static_int(g) for g in grid), site.causal_block_size)
    if c is not None and cfg.query_keep < 1.0 and tiles_split_blocks(grid, cfg.tile, c):
        return (f"query_keep={cfg.query_keep} with a block-causal mask of {c} frame(s) per block: tile {cfg.tile} "
                "holds frames of two causal blocks (a dropped token would receive the output of a token that sees "
                "other keys)")
    return ""


def mask_options(site, attn_mask) -> dict:
    """The mask arguments of the rewritten call: a block-causal mask becomes ``causal_block_size``
    (the mask tensor is no longer read, so its construction is dead code), any other mask is a
    key-padding mask."""
    if site.causal_block_size is not None:
        return dict(causal_block_size=site.causal_block_size)
    return dict(key_padding_mask=attn_mask)
