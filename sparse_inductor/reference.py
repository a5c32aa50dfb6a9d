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


def reference_selection(q: Tensor, k: Tensor, grid, sparsity: float, tile=(4, 4, 4), scale=None) -> Tensor:
    """Bool ``[B, H, M, M]``: query tile i keeps KV tile j.

    Mean-pools q and k per tile over its tokens, scores ``q̄ k̄ᵀ * scale`` and keeps the
    ``max(1, ceil((1 - sparsity) * M))`` best KV tiles per query tile, ties to the lower index.
    """
    M = int(tile_ids(grid, tile).max()) + 1
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = _pooled(q, grid, tile) @ _pooled(k, grid, tile).transpose(-1, -2) * scale
    keep = max(1, math.ceil(round((1.0 - sparsity) * M, 9)))
    selected = torch.zeros(scores.shape, dtype=torch.bool, device=q.device)
    B, H = scores.shape[:2]
    for b in range(B):
        for h in range(H):
            for i in range(M):
                # Highest score first, lower index first among equals.
                order = sorted(range(M), key=lambda j: (-scores[b, h, i, j].item(), j))
                selected[b, h, i, order[:keep]] = True
    return selected


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


def _mass_probabilities(q, k, grid, tile, scale) -> Tensor:
    """``P_i = softmax_j(q̄_i·k̄_j·scale + ln n_j)`` in float64, ``[B, H, M, M]``."""
    ids = tile_ids(grid, tile)
    n = torch.bincount(ids, minlength=int(ids.max()) + 1).to(torch.float64).to(q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.softmax(_pooled(q, grid, tile) @ _pooled(k, grid, tile).transpose(-1, -2) * scale + n.log(), dim=-1)


def reference_mass_selection(q: Tensor, k: Tensor, grid, p: float, min_tiles: int, max_fraction: float,
                             tile=(4, 4, 4), scale=None) -> Tensor:
    """Bool ``[B, H, M, M]`` of ``CumulativeMass(p, min_tiles, max_fraction)``: logits
    ``q̄_i·k̄_j·scale + ln(n_j)``, ``P_i = softmax_j``, sorted descending (ties to the lower
    index), the shortest prefix with cumulative P >= p (every tile when p = 1), its length
    clamped to ``[min(min_tiles, M), max(ceil(max_fraction·M), that)]``."""
    prob = _mass_probabilities(q, k, grid, tile, scale)
    M = prob.shape[-1]
    lo = min(min_tiles, M)
    hi = max(math.ceil(round(max_fraction * M, 9)), lo)
    selected = torch.zeros(prob.shape, dtype=torch.bool, device=q.device)
    B, H = prob.shape[:2]
    for b in range(B):
        for h in range(H):
            for i in range(M):
                order = sorted(range(M), key=lambda j: (-prob[b, h, i, j].item(), j))
                length, total = M, 0.0
                if p < 1.0:
                    for length, j in enumerate(order, start=1):
                        total += prob[b, h, i, j].item()
                        if total >= p:
                            break
                selected[b, h, i, order[:min(max(length, lo), hi)]] = True
    return selected


def cut_margin(q: Tensor, k: Tensor, grid, p: float, tile=(4, 4, 4), scale=None) -> Tensor:
    """``[B, H, M]``: how far each row's cumulative mass at its cut lies from ``p`` (the smaller
    of the two distances around the cut). Rows within rounding of ``p`` may be cut one tile
    differently by a float32 implementation; tests exempt them."""
    prob = _mass_probabilities(q, k, grid, tile, scale)
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
