"""Attention census of the testbed DiT (issue 17, item 2): where each self-attention head puts
its softmax mass, per layer and head, at several noise levels.

    python examples/attention_census.py --checkpoint runs/testbed --out benchmarks/testbed   # GPU
    python examples/attention_census.py --tiny --out /tmp/census                             # CPU, untrained

The validation clips of the run (their captions as the conditioning) are noised at each t
(default 0.2, 0.5, 0.8) and run through the model once per t; every self-attention call
(``F.scaled_dot_product_attention`` with as many keys as queries, = video tokens) is
intercepted by a ``TorchFunctionMode`` (as ``sparse_inductor.fidelity`` does; the caption
cross-attention passes through). From the exact dense softmax of the call's q, k (float32,
formed in chunks of query rows so 16K tokens fit in memory, tokens taken in tile-major order so
that per-tile sums are reshapes, not matmuls) it accumulates the tile-pair mass
``mass[b, h, i, j]`` = softmax mass of query tile i's rows on KV tile j's keys, tiles of
(4, 4, 4) tokens, and reports, as means over query rows (and clips):

- ``local``: share in the 3x3x3 tile window around the query's tile (|dt|, |dh|, |dw| <= 1 in
  tile coordinates; at most 27 of the 256 tiles of the 16x32x32 grid);
- ``temporal``: share in the same spatial tile (same (h, w) tile coordinates) of the other
  tile rows in time (dt != 0; a tile spans 4 frames, so "other frames" means frames of other
  4-frame groups);
- ``same_frame`` (token level): share on keys of the query's own frame;
- ``top2``: share in the top 2 % of KV tiles of each query tile (k = ceil(0.02 M), the tiles
  with the most mass for that query tile);
- ``best_1_8``, ``best_1_4``: the same for k = M/8 and M/4 tiles: best-k recall, the most any
  top-k tile selection at sparsity 0.875 / 0.75 can keep (``sparse_inductor.fidelity``'s
  best-k recall);
- ``stripe``: share on the 2 % of KV tiles that receive the most mass summed over all query
  tiles (the same tiles for every query tile: a "vertical stripe" / global-token measure).

Output (``--out``): ``census.json`` (per noise level, layer and head), ``census.md`` (per layer:
mean over heads with the min-max over heads; a whole-model line per noise level) and
``census.png`` (heat maps, layers x heads, one per measure and noise level).

Cost (estimate, H200): per layer and noise level, with 4 clips x 4 heads at once, the scores
are 16 x 16,384^2 = 4.3 G float32 elements, formed in 32 chunks of 512 query rows: QK^T
(2 x 4.3 G x 64 = 0.55 TFLOP in fp32, ~10 ms at ~55 TFLOP/s), softmax and the two reductions
(~4 passes over 17 GB, ~20 ms at ~4 TB/s): ~30 ms. 12 layers x 3 noise levels: ~1 s, plus 3
forward passes of the model and the start-up: well under a minute.

How this compares with published analyses of real video DiTs (in words; no numbers of theirs
are restated here):

- Sliding Tile Attention (arXiv 2502.04507) finds that in HunyuanVideo most attention mass
  lies in local 3D windows around each query, and replaces full attention by sliding tile
  windows. ``local`` is the tile-granular version of that window.
- Sparse-vDiT (arXiv 2506.03065) finds recurring attention-map patterns in CogVideoX1.5,
  HunyuanVideo and Wan2.1: diagonal, multi-diagonal and vertical-stripe heads, tied to layer
  depth and head position more than to the input (and some heads that can be skipped). In
  raster token order a diagonal is attention to nearby tokens (``local``), a multi-diagonal is
  attention to the same position in other frames, offsets of multiples of H x W (``temporal``),
  and a vertical stripe is a few keys that every query attends to (``stripe``). The per-head
  heat maps show whether such head types appear here and whether they depend on t.
- Sparse VideoGen (arXiv 2502.01776) splits heads into spatial heads (mass within the same
  frame and its neighbours) and temporal heads (mass at the same spatial position across
  frames) and chooses per head and step online: ``same_frame`` against ``temporal``.
- VSA (arXiv 2505.13389) selects the top-k of 4x4x4 tiles per query tile from pooled scores;
  ``best_1_8`` / ``best_1_4`` are the ceilings of such a selection at its usual sparsity 0.875
  and at 0.75, and ``top2`` says how concentrated the mass is beyond that.

How the testbed differs from those models (say it with every number from it): ~14 M
parameters, 12 layers of 4 heads, against 1-13 B parameters and 30-60 layers of 12-40 heads;
procedural clips of a few textured shapes over a textured background under a pan/zoom camera,
not natural video; pixel space with (1, 4, 4) patches (a token is 4x4 pixels of one frame),
not a VAE latent (a real token covers ~16x16 pixels of ~4 frames with 2x2 patches and 8x, 4x
compression); a 10-token class caption instead of a T5/LLM prompt embedding; 16,384 tokens
(Wan 480p: 32,760); and minutes of training on one GPU instead of very long runs on large
clusters, so attention may be less specialised than in a converged large model. The census
describes this instrument; it is not evidence about real models.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import testbed_dit as tb  # noqa: E402

#: Score elements per chunk of query rows (float32: 512 MiB).
CHUNK_ELEMENTS = 1 << 27
MEASURES = ("local", "temporal", "same_frame", "top2", "best_1_8", "best_1_4", "stripe")
LABELS = {"local": "local 3x3x3 tiles", "temporal": "same spatial tile, other frames",
          "same_frame": "same frame (tokens)", "top2": "top 2 % tiles", "best_1_8": "best-k recall 1/8",
          "best_1_4": "best-k recall 1/4", "stripe": "global top 2 % tiles (stripe)"}
FRACTIONS = {"top2": 0.02, "best_1_8": 1 / 8, "best_1_4": 1 / 4, "stripe": 0.02}


def _tile_grid(grid, tile):
    grid, tile = tuple(int(g) for g in grid), tuple(int(t) for t in tile)
    if len(grid) != 3 or len(tile) != 3 or any(g % t for g, t in zip(grid, tile)):
        raise ValueError(f"the census needs a grid that divides by the tile, got grid {grid} and tile {tile}")
    return tuple(g // t for g, t in zip(grid, tile))


def tile_major_order(grid, tile, device="cpu") -> torch.Tensor:
    """``perm[p]``: the raster index of the token at tile-major position ``p`` (tiles in (t, h, w)
    order, tokens inside a tile in raster order)."""
    (T, H, W), (pt, ph, pw) = grid, tile
    Mt, Mh, Mw = _tile_grid(grid, tile)
    idx = torch.arange(T * H * W, device=device).view(Mt, pt, Mh, ph, Mw, pw)
    return idx.permute(0, 2, 4, 1, 3, 5).reshape(-1)


def k_for(fraction: float, tiles: int) -> int:
    """Tiles kept for a fraction: ``max(1, ceil(fraction * tiles))`` (the selection's rule)."""
    return min(tiles, max(1, math.ceil(round(fraction * tiles, 9))))


@torch.no_grad()
def tile_mass(q, k, grid, tile=(4, 4, 4), scale=None, chunk_elements: int = CHUNK_ELEMENTS) -> dict:
    """Exact dense softmax mass per tile pair.

    Args:
        q, k: ``[B, H, N, D]`` in raster token order over ``grid`` (which must divide by ``tile``).
    Returns:
        ``{"mass": [B, H, M, M] float64`` (sum over query tile i's rows of the softmax mass on KV
        tile j's keys; each row holds mass 1), ``"same_frame": [B, H] float64`` (sum over rows of
        the mass on keys of the row's own frame)``}``.
    """
    B, H, N, D = q.shape
    if k.shape != q.shape:
        raise ValueError(f"q and k must have one shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if N != math.prod(grid):
        raise ValueError(f"N = {N} tokens but grid {tuple(grid)} holds {math.prod(grid)}")
    Mt, Mh, Mw = _tile_grid(grid, tile)
    M, n_tile = Mt * Mh * Mw, math.prod(tile)
    T, HW, pt = grid[0], grid[1] * grid[2], tile[0]
    scale = D ** -0.5 if scale is None else scale
    perm = tile_major_order(grid, tile, q.device)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf = q[:, :, perm].to(work), k[:, :, perm].to(work)
    row_frame = perm // HW  # frame of each tile-major position
    mass = torch.zeros(B, H, M, M, dtype=torch.float64, device=q.device)
    same_frame = torch.zeros(B, H, dtype=torch.float64, device=q.device)
    rows = max(n_tile, (chunk_elements // max(1, B * H * N)) // n_tile * n_tile)
    kt = kf.transpose(-1, -2)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        p = torch.softmax((qf[:, :, r0:r1] @ kt) * scale, dim=-1)  # [B, H, r, N], keys tile-major
        r = r1 - r0
        per_tile = p.view(B, H, r, M, n_tile).sum(-1)  # [B, H, r, M]
        mass[:, :, r0 // n_tile:r1 // n_tile] = per_tile.view(B, H, r // n_tile, n_tile, M).sum(3).to(torch.float64)
        per_frame = p.view(B, H, r, Mt, Mh * Mw, pt, n_tile // pt).sum((4, 6)).reshape(B, H, r, T)
        own = per_frame.gather(-1, row_frame[r0:r1].view(1, 1, r, 1).expand(B, H, r, 1))
        same_frame += own.sum((-1, -2)).to(torch.float64)
    return {"mass": mass, "same_frame": same_frame}


def measures(mass, same_frame, grid, tile=(4, 4, 4)) -> dict:
    """Mean-over-query-rows shares ``{measure: [B, H] float64}`` from :func:`tile_mass`."""
    M = mass.shape[-1]
    Mt, Mh, Mw = _tile_grid(grid, tile)
    if M != Mt * Mh * Mw:
        raise ValueError(f"mass has {M} tiles but the tile grid {(Mt, Mh, Mw)} holds {Mt * Mh * Mw}")
    N = math.prod(grid)
    m = torch.arange(M, device=mass.device)
    coords = torch.stack([m // (Mh * Mw), (m // Mw) % Mh, m % Mw], dim=-1)  # [M, 3]
    delta = (coords[:, None] - coords[None]).abs()  # [M, M, 3]
    local = (delta <= 1).all(-1)
    temporal = (delta[..., 1] == 0) & (delta[..., 2] == 0) & (delta[..., 0] != 0)
    out = {"local": (mass * local).sum((-1, -2)) / N, "temporal": (mass * temporal).sum((-1, -2)) / N,
           "same_frame": same_frame / N}
    for name in ("top2", "best_1_8", "best_1_4"):
        out[name] = mass.topk(k_for(FRACTIONS[name], M), dim=-1).values.sum((-1, -2)) / N
    columns = mass.sum(-2)  # [B, H, M]: mass each KV tile receives from all queries
    top_columns = columns.topk(k_for(FRACTIONS["stripe"], M), dim=-1).values
    out["stripe"] = top_columns.sum(-1) / N
    return {name: out[name] for name in MEASURES}


class _SelfAttentionCensus(TorchFunctionMode):
    """Measures every SDPA call with ``N`` queries and ``N`` keys; runs every call unchanged."""

    def __init__(self, grid, tile, chunk_elements):
        super().__init__()
        self.grid, self.tile, self.chunk = grid, tile, chunk_elements
        self.n = math.prod(grid)
        self.layers = []  # per self-attention call: {measure: [B, H]}
        self.other_calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k = (args[0] if args else kwargs["query"]), (args[1] if len(args) > 1 else kwargs["key"])
            if q.shape[-2] == self.n and k.shape[-2] == self.n:
                scale = kwargs.get("scale", args[6] if len(args) > 6 else None)
                if kwargs.get("attn_mask") is not None or (len(args) > 3 and args[3] is not None):
                    raise ValueError("the census expects self-attention without a mask")
                stats = tile_mass(q, k, self.grid, self.tile, scale, self.chunk)
                self.layers.append(measures(stats["mass"], stats["same_frame"], self.grid, self.tile))
            else:
                self.other_calls += 1
        return func(*args, **kwargs)


def census(model, cfg, seed: int = 0, ts=(0.2, 0.5, 0.8), clips: int = 4, tile=(4, 4, 4), device="cpu",
           autocast_bf16: bool = False, chunk_elements: int = CHUNK_ELEMENTS) -> dict:
    """The census as a JSON-able dict (see the module docstring)."""
    tile = tuple(tile)
    Mt, Mh, Mw = _tile_grid(cfg.grid, tile)
    M = Mt * Mh * Mw
    x0, caption, _, noise = tb.validation_set(cfg, seed, device)
    n = min(clips, x0.shape[0])
    x0, caption, noise = x0[:n], caption[:n], noise[:n]
    model = getattr(model, "_orig_mod", model).eval()
    dtype = next(model.parameters()).dtype
    results, summary = {}, {}
    t_start = time.perf_counter()
    for t in ts:
        tt = torch.full((n,), float(t), device=device)
        x_t = ((1 - t) * x0 + t * noise).to(dtype)
        mode = _SelfAttentionCensus(cfg.grid, tile, chunk_elements)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast_bf16 else tb._Null()
        with torch.no_grad(), ctx, mode:
            model(x_t, tt.to(dtype), caption)
        if len(mode.layers) != cfg.layers:
            raise RuntimeError(f"expected {cfg.layers} self-attention calls, intercepted {len(mode.layers)}")
        layers = []
        for i, m in enumerate(mode.layers):
            layers.append({"layer": i, "heads": {name: m[name].mean(0).tolist() for name in MEASURES}})
        results[str(t)] = {"layers": layers, "cross_attention_calls": mode.other_calls}
        summary[str(t)] = {name: sum(sum(l["heads"][name]) for l in layers) / sum(len(l["heads"][name]) for l in layers)
                           for name in MEASURES}
    return {"grid": list(cfg.grid), "tile": list(tile), "tile_grid": [Mt, Mh, Mw], "tiles": M,
            "k": {name: k_for(f, M) for name, f in FRACTIONS.items()}, "clips": n, "noise_levels": list(ts),
            "layers": cfg.layers, "heads": cfg.heads, "results": results, "summary": summary,
            "seconds": time.perf_counter() - t_start}


def markdown(data: dict) -> str:
    k = data["k"]
    lines = [f"# Attention census ({data.get('source', '')})", "",
             f"Grid {tuple(data['grid'])}, tiles {tuple(data['tile'])} -> {tuple(data['tile_grid'])} = "
             f"{data['tiles']} tiles; {data['clips']} validation clips; {data['layers']} layers x "
             f"{data['heads']} heads; device {data.get('device', '')}, torch {data.get('torch', '')}, "
             f"{data.get('date', '')}; {data['seconds']:.1f} s.", "",
             f"Shares of the dense softmax mass, mean over query rows. top 2 % = {k['top2']} tiles per query "
             f"tile, best-k recall 1/8 = {k['best_1_8']}, 1/4 = {k['best_1_4']}; stripe = the {k['stripe']} KV "
             "tiles with the most mass from all query tiles. Cells: mean over heads (min-max over heads).",
             "Definitions and the comparison with published analyses: `examples/attention_census.py`.", ""]
    head = ["layer"] + [LABELS[m] for m in MEASURES]
    for t in data["noise_levels"]:
        res = data["results"][str(t)]
        lines += [f"## t = {t}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for layer in res["layers"]:
            cells = [str(layer["layer"])]
            for m in MEASURES:
                v = layer["heads"][m]
                cells.append(f"{sum(v) / len(v):.3f} ({min(v):.2f}-{max(v):.2f})")
            lines.append("| " + " | ".join(cells) + " |")
        s = data["summary"][str(t)]
        lines.append("| **all** | " + " | ".join(f"**{s[m]:.3f}**" for m in MEASURES) + " |")
        lines.append("")
    lines += ["## Whole model", ""]
    for t in data["noise_levels"]:
        s = data["summary"][str(t)]
        lines.append(f"- t = {t}: " + ", ".join(f"{LABELS[m]} {s[m]:.3f}" for m in MEASURES))
    return "\n".join(lines) + "\n"


def heatmap(data: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no heat map")
        return False
    ts = data["noise_levels"]
    L, H = data["layers"], data["heads"]
    short = {"local": "local 3x3x3", "temporal": "same tile,\nother frames", "same_frame": "same frame",
             "top2": "top 2 %", "best_1_8": "best-k 1/8", "best_1_4": "best-k 1/4", "stripe": "stripe (global 2 %)"}
    fig, axes = plt.subplots(len(ts), len(MEASURES), squeeze=False, constrained_layout=True,
                             figsize=(1.45 * len(MEASURES) + 1.2, (0.2 * L + 0.7) * len(ts) + 0.4))
    for r, t in enumerate(ts):
        layers = data["results"][str(t)]["layers"]
        for c, m in enumerate(MEASURES):
            grid = torch.tensor([layer["heads"][m] for layer in layers])  # [layers, heads]
            ax = axes[r, c]
            im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
            ax.set_xticks(range(H))
            ax.set_yticks(range(0, L, max(1, L // 6)))
            ax.tick_params(labelsize=6, length=2)
            if r == 0:
                ax.set_title(short[m], fontsize=7)
            if r == len(ts) - 1:
                ax.set_xlabel("head", fontsize=7)
            if c == 0:
                ax.set_ylabel(f"t = {t}\nlayer", fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.6, label="share of softmax mass")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def write_outputs(data: dict, out: str) -> list:
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, "census.json"), os.path.join(out, "census.md")]
    with open(paths[0], "w") as f:
        json.dump(data, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(markdown(data))
    if heatmap(data, os.path.join(out, "census.png")):
        paths.append(os.path.join(out, "census.png"))
    return paths


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="run directory, weights.pt or state.pt of examples/testbed_dit.py")
    parser.add_argument("--tiny", action="store_true", help="an untrained tiny model (tests; CPU)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--t", type=float, nargs="+", default=[0.2, 0.5, 0.8], help="noise levels")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--tile", default="4,4,4")
    parser.add_argument("--device")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast as in training (default: on CUDA)")
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (not args.tiny):
        parser.error("give exactly one of --checkpoint and --tiny")
    tile = tuple(int(x) for x in args.tile.replace("x", ",").split(","))
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny and device == "cpu":
        torch.set_num_threads(1)  # tiny tensors: threads do not pay off (see testbed_dit.main)
    if args.tiny:
        cfg, seed, source = tb.Config(**tb.TINY), 0, "untrained tiny model"
        model = tb.build_model(cfg, seed).to(device)
    else:
        model, cfg, meta = tb.load_model(args.checkpoint, device)
        seed, source = meta.get("seed", 0), f"{args.checkpoint}, step {meta.get('step')}"
    bf16 = device.startswith("cuda") if args.bf16 is None else args.bf16
    t0 = time.perf_counter()
    data = census(model, cfg, seed, args.t, args.clips, tile, device, bf16)
    data.update(source=source, device=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                torch=torch.__version__, date=time.strftime("%Y-%m-%d"), bf16=bf16,
                wall_seconds=time.perf_counter() - t0)
    paths = write_outputs(data, args.out)
    print(markdown(data).split("## Whole model")[-1].strip())
    print(f"census of {cfg.layers} layers x {cfg.heads} heads x {len(args.t)} noise levels in {data['seconds']:.1f} s; "
          f"wrote {', '.join(paths)}")
    return data


if __name__ == "__main__":
    main()
