"""Which tile-selection rule loses least *output* at equal FLOPs, on the trained testbed's real
attention inputs (a research probe, CPU or GPU; issues 15 and 16).

The frontier (benchmarks/quality/) found TopK ahead of CumulativeMass and of the calibrated plans
although those keep as much or more softmax mass; this probe asks why, per site, without sampling.
For each self-attention site of ``examples/testbed_dit.py`` (q, k, v captured on validation clips)
it computes, per query token and KV tile, the tile's exponential sum and value sum against the
dense row (one pass, as dense attention costs), so that any tile selection's output is exact and
cheap. Selections at the same number of (query tile, KV tile) pairs per head:

- ``topk``: VSA/ours: the k highest coarse logits q̄_i·k̄_j per row;
- ``mass``: BSA's cumulative mass, one p per head set so the head keeps the same number of pairs;
- ``global``: the largest coarse probabilities P_ij of the whole head (rows keep different counts);
- ``value topk`` / ``value global``: the same two orders on P_ij·‖v̄_j − ō_i‖, the first-order
  change of query tile i's output when KV tile j is dropped (ō_i = Σ_j P_ij v̄_j): a tile that
  holds mass but whose values equal the row's average costs little to drop;
- ``oracle``: the k tiles with the most true mass per query tile (the census's best-k);
- ``mass p``: the cumulative-mass cut at a fixed p for every head (as ``CumulativeMass(p)`` runs,
  without its clamps): its tiles per query tile differ by layer and head (printed).

Printed: output rel-L2 against dense per layer and the mean, and the mass kept, for k = 1/8 and
1/4 of the tiles.

    python benchmarks/selection_probe.py --checkpoint runs/testbed [--clips 1 2] [--layers 0 4 8 11]

``--overlap`` prints, per layer, how much the TopK lists of two neighbouring query tiles (w, w+1)
share (|A ∩ B| / k): what packing two query tiles into one block would save (NOTES v15).

``--allocations`` instead runs the whole model with TopK at a per-layer budget (tiles per query
tile for layers 0-7 and 8-11, the diffuse ones), each allocation at the same total FLOPs, and
prints the rel-L2 of the model's output against dense: does it matter *where* the budget goes?
(One denoising step's output rel-L2 ranked the KV policies as the sample PSNR did on the
frontier; a mean of per-site errors did not.)
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]

import testbed_dit as tb  # noqa: E402

RULES = ("topk", "mass", "global", "value topk", "value global", "oracle")
FIXED_P = (0.5, 0.8)  # BSA's cut at one p for every head: the tiles it takes differ per head


def to_tiles(x, grid, tile):
    """``[B, H, N, D]`` in raster order -> ``[B, H, M, S, D]`` tile-major (tiles divide the grid)."""
    B, H, _, D = x.shape
    (T, Hh, W), (a, b, c) = grid, tile
    x = x.reshape(B, H, T // a, a, Hh // b, b, W // c, c, D).permute(0, 1, 2, 4, 6, 3, 5, 7, 8)
    return x.reshape(B, H, (T // a) * (Hh // b) * (W // c), a * b * c, D)


def tile_sums(q, k, v, chunk=16):
    """Per query token (tile-major ``[H, M, S, D]`` inputs, one sample) and KV tile: ``Z`` the sum
    of exp(scores - row max) over the tile and ``U`` the matching sum of values. Yields
    ``(first query tile, Z [H, c*S, M], U [H, c*S, M, D])`` per chunk of ``c`` query tiles; any
    selection's output is then ``Σ_sel U / Σ_sel Z``."""
    H, M, S, D = q.shape
    scale = D ** -0.5
    kf, vf = k.reshape(H, M * S, D), v.reshape(H, M * S, D)
    for start in range(0, M, chunk):
        qc = q[:, start:start + chunk].reshape(H, -1, D)
        s = (qc @ kf.transpose(1, 2)) * scale  # [H, c*S, M*S]
        p = torch.exp(s - s.amax(-1, keepdim=True))
        Z = p.view(H, -1, M, S).sum(-1)  # [H, c*S, M]
        U = torch.einsum("hqms,hmsd->hqmd", p.view(H, -1, M, S), vf.view(H, M, S, D))
        yield start, Z, U


def order_rows(score, k):
    """Top-k columns per row (bool mask)."""
    idx = score.topk(k, dim=-1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, idx, True)


def order_global(score, k):
    """The ``k * rows`` largest entries of each head's matrix, at least one per row."""
    H, M, _ = score.shape
    flat = score.reshape(H, -1)
    idx = flat.topk(k * M, dim=-1).indices
    sel = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, True).view(H, M, M)
    return sel | order_rows(score, 1)


def cumulative_mass_fixed(P, p):
    """BSA's cut: per row the shortest prefix of the sorted coarse probabilities reaching ``p``."""
    sorted_p, order = P.sort(-1, descending=True)
    n = ((sorted_p.cumsum(-1) - sorted_p) < p).sum(-1).clamp(min=1)
    keep_sorted = torch.arange(P.shape[-1])[None, None, :] < n[..., None]
    return torch.zeros_like(P, dtype=torch.bool).scatter_(-1, order, keep_sorted)


def cumulative_mass_at(P, pairs):
    """BSA's cut per row at one p per head, bisected so the head keeps ``pairs`` pairs."""
    H, M, _ = P.shape
    sorted_p, order = P.sort(-1, descending=True)
    cum = sorted_p.cumsum(-1)
    sels = []
    for h in range(H):
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            n = ((cum[h] - sorted_p[h]) < mid).sum(-1).clamp(min=1)  # shortest prefix reaching mid
            if n.sum() > pairs:
                hi = mid
            else:
                lo = mid
        n = ((cum[h] - sorted_p[h]) < lo).sum(-1).clamp(min=1)
        keep_sorted = torch.arange(M)[None, :] < n[:, None]
        sels.append(torch.zeros(M, M, dtype=torch.bool).scatter_(-1, order[h], keep_sorted))
    return torch.stack(sels)


def selections(q, k, v, true_mass, budget):
    """Every rule's ``[H, M, M]`` selection at ``budget`` tiles per query tile (on average)."""
    H, M, S, D = q.shape
    qm, km, vm = q.mean(2), k.mean(2), v.mean(2)
    logits = qm @ km.transpose(1, 2) * D ** -0.5  # full tiles: the ln(n_j) term is a constant
    P = logits.softmax(-1)
    o_bar = P @ vm  # [H, M, D]
    change = P * (vm[:, None, :, :] - o_bar[:, :, None, :]).norm(dim=-1)
    return {
        "topk": order_rows(logits, budget),
        "mass": cumulative_mass_at(P, budget * M),
        "global": order_global(P, budget),
        "value topk": order_rows(change, budget),
        "value global": order_global(change, budget),
        "oracle": order_rows(true_mass, budget),
        **{f"mass p{p}": cumulative_mass_fixed(P, p) for p in FIXED_P},
    }


def site_errors(q, k, v, budgets):
    """rel-L2 and mass kept of every rule at every budget for one site (one sample)."""
    H, M, S, D = q.shape
    chunks = list(tile_sums(q, k, v))
    true_mass = torch.cat([(Z / Z.sum(-1, keepdim=True)).view(H, -1, S, M).mean(2) for _, Z, _ in chunks], 1)
    out = {}
    for budget in budgets:
        sels = selections(q, k, v, true_mass, budget)
        for rule, sel in sels.items():
            err = ref = kept = 0.0
            for start, Z, U in chunks:
                c = Z.shape[1] // S
                m = sel[:, start:start + c].repeat_interleave(S, dim=1).to(Z.dtype)  # [H, c*S, M]
                dense = U.sum(2) / Z.sum(-1, keepdim=True)
                zs = (Z * m).sum(-1, keepdim=True)
                sparse = torch.einsum("hqm,hqmd->hqd", m, U) / zs
                err += (sparse - dense).square().sum().item()
                ref += dense.square().sum().item()
                kept += (zs / Z.sum(-1, keepdim=True)).sum().item()
            out[(rule, budget)] = dict(rel_l2=math.sqrt(err / ref), mass=kept / (H * M * S),
                                       pairs=sel.sum().item() / (H * M))
    return out


def sparse_output(q, k, v, grid, tile, budget):
    """TopK(budget tiles per query tile) attention of one sample ``[1, H, N, D]`` (raster order),
    exact, through the per-tile sums."""
    tiles = [to_tiles(x.float(), grid, tile)[0] for x in (q, k, v)]
    H, M, S, D = tiles[0].shape
    qm, km = tiles[0].mean(2), tiles[1].mean(2)
    sel = order_rows(qm @ km.transpose(1, 2), budget)
    out = torch.empty(H, M, S, D)
    for start, Z, U in tile_sums(*tiles):
        c = Z.shape[1] // S
        m = sel[:, start:start + c].repeat_interleave(S, dim=1).to(Z.dtype)
        out[:, start:start + c] = (torch.einsum("hqm,hqmd->hqd", m, U) / (Z * m).sum(-1, keepdim=True)).view(H, c, S, D)
    (T, Hh, W), (a, b, c) = grid, tile
    out = out.view(H, T // a, Hh // b, W // c, a, b, c, D).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return out.reshape(1, H, T * Hh * W, D).to(q.dtype)


def list_overlap(q, k, grid, tile, budget):
    """Mean |A ∩ B| / budget of the TopK lists of query tiles (t, h, w) and (t, h, w + 1)."""
    tiles = [to_tiles(x.float(), grid, tile)[0] for x in (q, k)]
    qm, km = tiles[0].mean(2), tiles[1].mean(2)
    sel = order_rows(qm @ km.transpose(1, 2), budget)  # [H, M, M]
    nw = grid[2] // tile[2]
    left = torch.arange(sel.shape[1])
    left = left[(left % nw) < nw - 1]
    return ((sel[:, left] & sel[:, left + 1]).sum(-1).float() / budget).mean().item()


def allocations(args, model, x_t, t, caption, grid, tile):
    M = math.prod(g // s for g, s in zip(grid, tile))
    plans = {  # name: (tiles for layers 0-7, tiles for layers 8-11); 8 x a + 4 x b = 12 x M / 8
        "uniform 1/8": (M // 8, M // 8),
        "early-heavy 1/8": (M // 8 + M // 32, M // 8 - M // 16),
        "late-heavy 1/8": (M // 8 - M // 32, M // 8 + M // 16),
        "uniform 1/4": (M // 4, M // 4),
        "early-heavy 1/4": (M // 4 + M // 16, M // 8),
        "late-heavy 1/4": (M // 4 - M // 16, M // 4 + M // 8),
    }
    real = torch.nn.functional.scaled_dot_product_attention
    clip = args.clips[0]
    inputs = (x_t[clip:clip + 1], t[clip:clip + 1])
    with torch.no_grad():
        dense = model(*inputs, caption=caption[clip:clip + 1]).float()
    print(f"clip {clip} (t {t[clip].item():.1f}); model-output rel-L2 vs dense, TopK per layer\n")
    print("| allocation | tiles layers 0-7 | tiles layers 8-11 | FLOPs kept | model-output rel-L2 |")
    print("|---|---|---|---|---|")
    for name, (early, late) in plans.items():
        layer = [0]

        def attention(q, k, v, *a, **kw):
            if q.shape[2] == math.prod(grid) and k.shape[2] == q.shape[2]:
                budget = early if layer[0] < 8 else late
                layer[0] += 1
                return sparse_output(q, k, v, grid, tile, budget)
            return real(q, k, v, *a, **kw)

        tb.F.scaled_dot_product_attention = attention
        try:
            with torch.no_grad():
                out = model(*inputs, caption=caption[clip:clip + 1]).float()
        finally:
            tb.F.scaled_dot_product_attention = real
        rel = ((out - dense).norm() / dense.norm()).item()
        print(f"| {name} | {early} | {late} | {(8 * early + 4 * late) / (12 * M):.3f} | {rel:.4f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--clips", type=int, nargs="+", default=[1, 2], help="of the 4 eval clips (t 0.2/0.4/0.6/0.8)")
    parser.add_argument("--layers", type=int, nargs="+", help="default: all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--allocations", action="store_true", help="per-layer budgets, whole model (see above)")
    parser.add_argument("--overlap", action="store_true", help="neighbouring query tiles' list overlap (see above)")
    args = parser.parse_args()
    torch.manual_seed(0)
    setup = tb.setup(args.checkpoint, device=args.device)
    model, (x_t, t), caption = setup["model"], setup["inputs"], setup["kwargs"]["caption"]
    cfg = tb.config_from_dict(tb.load_weights(os.path.join(args.checkpoint, tb.WEIGHTS))[1]["config"])
    grid, tile = tuple(cfg.grid), (4, 4, 4)
    captured = []
    real = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, *a, **kw):
        if q.shape[2] == math.prod(grid) and k.shape[2] == q.shape[2]:
            captured.append((q.detach(), k.detach(), v.detach()))
        return real(q, k, v, *a, **kw)

    if args.allocations:
        return allocations(args, model, x_t, t, caption, grid, tile)
    budgets = [math.prod(g // s for g, s in zip(grid, tile)) // d for d in (8, 4)]
    results = {}
    start = time.perf_counter()
    for clip in args.clips:
        captured.clear()
        tb.F.scaled_dot_product_attention = recording
        try:
            with torch.no_grad():
                model(x_t[clip:clip + 1], t[clip:clip + 1], caption=caption[clip:clip + 1])
        finally:
            tb.F.scaled_dot_product_attention = real
        for layer, (q, k, v) in enumerate(captured):
            if args.layers and layer not in args.layers:
                continue
            if args.overlap:
                print(f"clip {clip} layer {layer}: neighbour overlap " + ", ".join(
                    f"k={b}: {list_overlap(q, k, grid, tile, b):.3f}" for b in budgets), flush=True)
                continue
            tiles = [to_tiles(x.float(), grid, tile)[0] for x in (q, k, v)]
            for key, value in site_errors(*tiles, budgets).items():
                results.setdefault((layer,) + key, []).append(value)
            print(f"clip {clip} (t {t[clip].item():.1f}) layer {layer}: {time.perf_counter() - start:.0f} s", flush=True)
    if args.overlap:
        return
    layers = sorted({key[0] for key in results})
    for budget in budgets:
        print(f"\n## {budget} of {math.prod(g // s for g, s in zip(grid, tile))} tiles per query tile "
              f"(mean over clips {args.clips}); cells: output rel-L2 (mass kept)\n")
        rules = RULES + tuple(f"mass p{p}" for p in FIXED_P)
        print("| layer | " + " | ".join(rules) + " |")
        print("|---|" + "---|" * len(rules))
        for layer in layers + ["mean"]:
            cells = []
            for rule in rules:
                rows = [v for lay in (layers if layer == "mean" else [layer]) for v in results[(lay, rule, budget)]]
                cell = (f"{sum(r['rel_l2'] for r in rows) / len(rows):.4f} "
                        f"({sum(r['mass'] for r in rows) / len(rows):.3f}")
                if rule.startswith("mass p"):  # its own tile count, not the budget's
                    cell += f", {sum(r['pairs'] for r in rows) / len(rows):.0f} tiles"
                cells.append(cell + ")")
            print(f"| {layer} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
