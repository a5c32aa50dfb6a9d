"""The oracle (DESIGN.md §3): plain, unoptimised PyTorch in float64, written independently of
the layout, selection and kernel code so that tests compare two derivations.

Everything here works in raster token order; tiles are identified per token with integer
division, never through the tile-major permutation.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def tile_ids(grid, tile) -> Tensor:
    """For each raster token, the index of its tile (tiles in (t, h, w) order)."""
    T, H, W = grid
    tt, th, tw = tile
    nh, nw = -(-H // th), -(-W // tw)
    t = torch.arange(T).view(T, 1, 1) // tt
    h = torch.arange(H).view(1, H, 1) // th
    w = torch.arange(W).view(1, 1, W) // tw
    return ((t * nh + h) * nw + w).reshape(-1)


def reference_selection(q: Tensor, k: Tensor, grid, sparsity: float, tile=(4, 4, 4), scale=None,
                        causal_block_size: int | None = None) -> Tensor:
    """Bool ``[B, H, M, M]``: query tile i keeps KV tile j.

    Mean-pools q and k per tile over its tokens, scores ``q̄ k̄ᵀ * scale`` and keeps the
    ``max(1, ceil((1 - sparsity) * M))`` best KV tiles per query tile, ties to the lower index.

    Under a block-causal mask (``causal_block_size``, see :func:`causal_token_mask`) row i
    chooses among its ``A_i`` allowed tiles only (:func:`causal_allowed_tiles`), keeping
    ``k_i = max(1, ceil((1 - sparsity) * A_i))`` of them, and then also keeps its own tile i.
    """
    M = int(tile_ids(grid, tile).max()) + 1
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = _pooled(q, grid, tile) @ _pooled(k, grid, tile).transpose(-1, -2) * scale
    allowed = _allowed_or_all(grid, tile, causal_block_size)
    selected = torch.zeros(scores.shape, dtype=torch.bool, device=q.device)
    B, H = scores.shape[:2]
    for i in range(M):
        candidates = [j for j in range(M) if allowed[i, j]]
        keep = max(1, math.ceil(round((1.0 - sparsity) * len(candidates), 9)))
        for b in range(B):
            for h in range(H):
                # Highest score first, lower index first among equals.
                order = sorted(candidates, key=lambda j: (-scores[b, h, i, j].item(), j))
                selected[b, h, i, order[:keep]] = True
    return _with_own_tiles(selected, grid, causal_block_size)


def token_mask(selected: Tensor, grid, tile) -> Tensor:
    """Expand a tile mask ``[B, H, M, M]`` to a token mask ``[B, H, N, N]`` in raster order."""
    ids = tile_ids(grid, tile).to(selected.device)
    return selected[:, :, ids][:, :, :, ids]


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale=None):
    """Dense softmax attention in float64 under a bool token mask. Returns ``(out, lse)``."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q.to(torch.float64) @ k.to(torch.float64).transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.softmax(s, dim=-1) @ v.to(torch.float64), lse


def reference_video_sparse_attention(q, k, v, grid, sparsity=0.875, tile=(4, 4, 4), scale=None):
    """The full oracle: selection then fine attention, float64, raster order."""
    selected = reference_selection(q, k, grid, sparsity, tile, scale)
    return reference_attention(q, k, v, token_mask(selected, grid, tile), scale)[0]


# ---------------------------------------------------------------------------------------------
# Policies (DESIGN.md §3.7), written from their definitions with per-row Python loops.
# ---------------------------------------------------------------------------------------------
def _pooled(x: Tensor, grid, tile) -> Tensor:
    """Per tile, the float64 mean of ``x`` over its tokens: ``[B, H, M, D]``."""
    ids = tile_ids(grid, tile).to(x.device)
    onehot = torch.nn.functional.one_hot(ids, int(ids.max()) + 1).to(torch.float64)
    return torch.einsum("bhnd,nm->bhmd", x.to(torch.float64), onehot) / onehot.sum(0)[:, None]


def _mass_probabilities(q, k, grid, tile, scale, causal_block_size=None) -> Tensor:
    """``P_i = softmax_j(q̄_i·k̄_j·scale + ln n_j)`` in float64, ``[B, H, M, M]``, over row i's
    allowed tiles only under a block-causal mask (the others get exactly 0)."""
    ids = tile_ids(grid, tile)
    n = torch.bincount(ids, minlength=int(ids.max()) + 1).to(torch.float64).to(q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = _pooled(q, grid, tile) @ _pooled(k, grid, tile).transpose(-1, -2) * scale + n.log()
    allowed = _allowed_or_all(grid, tile, causal_block_size).to(q.device)
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)


def reference_mass_selection(q: Tensor, k: Tensor, grid, p: float, min_tiles: int, max_fraction: float,
                             tile=(4, 4, 4), scale=None, causal_block_size: int | None = None) -> Tensor:
    """Bool ``[B, H, M, M]`` of ``CumulativeMass(p, min_tiles, max_fraction)``: logits
    ``q̄_i·k̄_j·scale + ln(n_j)``, ``P_i = softmax_j``, sorted descending (ties to the lower
    index), the shortest prefix with cumulative P >= p (every tile when p = 1), its length
    clamped to ``[min(min_tiles, M), max(ceil(max_fraction·M), that)]``.

    Under a block-causal mask row i sees only its ``A_i`` allowed tiles: the softmax, the
    prefix and the clamp run over them (``M`` replaced by ``A_i``), and row i also keeps its
    own tile i."""
    prob = _mass_probabilities(q, k, grid, tile, scale, causal_block_size)
    M = prob.shape[-1]
    allowed = _allowed_or_all(grid, tile, causal_block_size)
    selected = torch.zeros(prob.shape, dtype=torch.bool, device=q.device)
    B, H = prob.shape[:2]
    for i in range(M):
        candidates = [j for j in range(M) if allowed[i, j]]
        A = len(candidates)
        lo = min(min_tiles, A)
        hi = max(math.ceil(round(max_fraction * A, 9)), lo)
        for b in range(B):
            for h in range(H):
                order = sorted(candidates, key=lambda j: (-prob[b, h, i, j].item(), j))
                length, total = A, 0.0
                if p < 1.0:
                    for length, j in enumerate(order, start=1):
                        total += prob[b, h, i, j].item()
                        if total >= p:
                            break
                selected[b, h, i, order[:min(max(length, lo), hi)]] = True
    return _with_own_tiles(selected, grid, causal_block_size)


def cut_margin(q: Tensor, k: Tensor, grid, p: float, tile=(4, 4, 4), scale=None,
               causal_block_size: int | None = None) -> Tensor:
    """``[B, H, M]``: how far each row's cumulative mass at its cut lies from ``p`` (the smaller
    of the two distances around the cut). Rows within rounding of ``p`` may be cut one tile
    differently by a float32 implementation; tests exempt them."""
    prob = _mass_probabilities(q, k, grid, tile, scale, causal_block_size)
    cum = torch.cumsum(torch.sort(prob, dim=-1, descending=True).values, dim=-1)
    return (cum - p).abs().min(-1).values


def tile_coords(grid, tile) -> Tensor:
    """int64 ``[M, 3]``: tile coordinates ``(t, h, w)`` of each tile, tiles in (t, h, w) order
    (computed from the tokens each tile holds)."""
    T, H, W = grid
    ids = tile_ids(grid, tile)
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    coords = torch.stack([t.reshape(-1) // tile[0], h.reshape(-1) // tile[1], w.reshape(-1) // tile[2]], -1)
    M = int(ids.max()) + 1
    out = torch.zeros(M, 3, dtype=torch.int64)
    out[ids] = coords
    return out


def reference_pattern(kind: str, grid, tile, **params) -> Tensor:
    """Bool ``[M, M]`` of a static pattern from its definition: ``"window"`` (rt, rh, rw),
    ``"temporal"`` (rh, rw), ``"stripe"`` (kept: a set of KV tile indices)."""
    c = tile_coords(grid, tile)
    M = c.shape[0]
    out = torch.zeros(M, M, dtype=torch.bool)
    for i in range(M):
        for j in range(M):
            dt, dh, dw = (abs(int(c[i, a]) - int(c[j, a])) for a in range(3))
            if kind == "window":
                out[i, j] = dt <= params["rt"] and dh <= params["rh"] and dw <= params["rw"]
            elif kind == "temporal":
                out[i, j] = dh <= params["rh"] and dw <= params["rw"]
            elif kind == "stripe":
                out[i, j] = j in params["kept"]
            else:
                raise ValueError(kind)
    return out


def reference_query_keep(q: Tensor, grid, tile, query_keep: float) -> tuple[Tensor, Tensor]:
    """``(kept [B, H, N] bool, source [B, H, N] int64)`` of BSA's query sparsity: in each tile of
    ``n`` tokens (tile raster order) the centre ``c = n // 2`` and the ``ceil(r·n) − 1`` tokens
    with the lowest cosine similarity of their q to ``q_c`` (ties to the lower index) are kept;
    every token's output comes from ``source`` (itself if kept, else its tile's centre)."""
    ids = tile_ids(grid, tile)
    M = int(ids.max()) + 1
    B, H, N, _ = q.shape
    kept = torch.zeros(B, H, N, dtype=torch.bool)
    source = torch.arange(N).expand(B, H, N).clone()
    x = q.detach().to(torch.float64).cpu()
    for m in range(M):
        tokens = [int(t) for t in torch.nonzero(ids == m).flatten()]  # raster order = tile raster order
        n = len(tokens)
        c = tokens[n // 2]
        n_keep = max(1, math.ceil(round(query_keep * n, 9)))
        for b in range(B):
            for h in range(H):
                qc = x[b, h, c]
                sims = []
                for j, t in enumerate(tokens):
                    if t == c:
                        continue
                    denom = max(float(x[b, h, t].norm() * qc.norm()), 1e-30)
                    sims.append((float(x[b, h, t] @ qc) / denom, j, t))
                chosen = {c} | {t for _, _, t in sorted(sims)[: n_keep - 1]}
                for t in tokens:
                    kept[b, h, t] = t in chosen
                    source[b, h, t] = t if t in chosen else c
    return kept.to(q.device), source.to(q.device)


def reference_attention_query_keep(q, k, v, mask, source, scale=None) -> Tensor:
    """Dense masked attention in float64 where every row's output is that of row ``source``
    (differentiable: its gradient is the exact gradient of the definition)."""
    out, _ = reference_attention(q, k, v, mask, scale)
    return torch.gather(out, 2, source.unsqueeze(-1).expand(*source.shape, out.shape[-1]))


# ---------------------------------------------------------------------------------------------
# Block-causal masks (diffusion forcing), written from the token-level rule.
# ---------------------------------------------------------------------------------------------
def causal_token_mask(grid, causal_block_size: int) -> Tensor:
    """Bool ``[N, N]`` in raster order: the block-causal mask over frames.

    Video token n of frame ``f = n // (H·W)`` belongs to causal block ``f // c`` (``c =
    causal_block_size`` frames per block, SkyReels-V2's ``num_frame_per_block``); query n may
    attend key m iff ``block(m) <= block(n)``. ``c = 1`` is frame-causal; ``c >= T`` masks
    nothing and counts as no mask (rule 3 below does not apply).

    How the sparse selection composes with it (DESIGN.md §3 terms; README "Block-causal masks"):

    1. A KV tile j is *allowed* for query tile i unless it lies wholly in the future of it (no
       query token of i may attend any key token of j): :func:`causal_allowed_tiles`. Row i has
       ``A_i >= 1`` allowed tiles (its own tile is always one).
    2. Every policy chooses among row i's allowed tiles only, as if the grid held just those
       ``A_i`` tiles: TopK keeps ``k_i = max(1, ceil((1 - sparsity) · A_i))`` of them by score
       (a row with fewer allowed tiles keeps proportionally fewer; the last rows, which may see
       every tile, keep the unmasked ``k``); CumulativeMass's softmax, prefix and clamp
       ``[min(min_tiles, A_i), max(ceil(max_fraction · A_i), ·)]`` run over them; static
       patterns, ``Full``, unions, ``PerHead`` and plans keep their tiles that are allowed
       (``Full`` keeps every allowed tile). ``Skip`` keeps nothing.
    3. Then every row of a head that is not skipped also keeps its own tile i (if the policy did
       not): it holds each query token's own position, so no query row is left without a key
       (a tile that straddles the boundary may hold keys for only some of the rows of i).
    4. Fine stage: exact softmax over the kept tiles' tokens that the token mask allows; a tile
       that straddles the boundary contributes only its allowed keys.
    5. ``query_keep < 1`` composes only when no tile holds tokens of two causal blocks
       (:func:`causal_tiles_split_blocks`): a dropped token receives its tile centre's output,
       which must see the same keys.

    So sparsity 0 (and any policy keeping every allowed tile) is SDPA under this mask.
    """
    T, H, W = grid
    block = torch.arange(T * H * W) // (H * W) // causal_block_size
    return block[None, :] <= block[:, None]


def causal_allowed_tiles(grid, tile, causal_block_size: int) -> Tensor:
    """Bool ``[M, M]``: KV tile j is allowed for query tile i (some query token of i may attend
    some key token of j under :func:`causal_token_mask`), counted from the token mask."""
    ids = tile_ids(grid, tile)
    onehot = torch.nn.functional.one_hot(ids, int(ids.max()) + 1).to(torch.float64)
    pairs = onehot.T @ causal_token_mask(grid, causal_block_size).to(torch.float64) @ onehot
    return pairs > 0


def causal_tiles_split_blocks(grid, tile, causal_block_size: int) -> bool:
    """Whether some tile holds tokens of two causal blocks (then query_keep does not compose)."""
    T, H, W = grid
    ids = tile_ids(grid, tile)
    block = torch.arange(T * H * W) // (H * W) // causal_block_size
    for m in range(int(ids.max()) + 1):
        if len(set(block[ids == m].tolist())) > 1:
            return True
    return False


def reference_causal_restrict(selected: Tensor, grid, tile, causal_block_size: int,
                              skipped_heads=None) -> Tensor:
    """A static pattern's (or any policy's) tile mask ``[..., M, M]`` under a block-causal mask:
    its allowed tiles, plus each row's own tile, except on ``skipped_heads`` (a bool per head of
    a ``[B, H, M, M]`` mask: those rows keep nothing)."""
    out = _with_own_tiles(selected & causal_allowed_tiles(grid, tile, causal_block_size).to(selected.device), grid,
                          causal_block_size)
    if skipped_heads is not None:
        out[:, torch.tensor(skipped_heads, dtype=torch.bool)] = False
    return out


def reference_causal_attention_mask(selected: Tensor, grid, tile, causal_block_size: int | None) -> Tensor:
    """The fine stage's token mask ``[B, H, N, N]``: the kept tiles' tokens, under the
    block-causal token mask when ``causal_block_size`` is given."""
    mask = token_mask(selected, grid, tile)
    if causal_block_size is None:
        return mask
    return mask & causal_token_mask(grid, causal_block_size).to(mask.device)


def _allowed_or_all(grid, tile, causal_block_size) -> Tensor:
    if causal_block_size is None:
        M = int(tile_ids(grid, tile).max()) + 1
        return torch.ones(M, M, dtype=torch.bool)
    return causal_allowed_tiles(grid, tile, causal_block_size)


def _with_own_tiles(selected: Tensor, grid, causal_block_size) -> Tensor:
    """Under a block-causal mask every row also keeps its own tile (rule 3 above); a mask with
    one causal block of every frame (``c >= T``) masks nothing and is no mask."""
    if causal_block_size is None or causal_block_size >= grid[0]:
        return selected
    M = selected.shape[-1]
    return selected | torch.eye(M, dtype=torch.bool, device=selected.device)
