"""Train a small video DiT on synthetic moving shapes: dense, sparse through the backend (TopK,
or BSA's CumulativeMass + query_keep), and with VSA's gated coarse branch; equal steps,
validation loss curves to PNG.

    python examples/train_tiny_video_dit.py --out runs/a                      # GPU: dense, sparse, gated
    python examples/train_tiny_video_dit.py --variants dense --steps 3000 --out runs/a
    python examples/train_tiny_video_dit.py --variants bsa --steps 3000 --time-limit 8 --out runs/bsa  # GPU
    python examples/train_tiny_video_dit.py --variants bsa --query-keep-ramp 1500 --steps 3000 --out runs/ramp
    python examples/train_tiny_video_dit.py --tiny --variants bsa --out /tmp/bsa_tiny   # CPU, seconds
    python examples/train_tiny_video_dit.py --tiny --steps 20 --out /tmp/t   # CPU, seconds
    python examples/train_tiny_video_dit.py --report runs/a runs/b --out runs/all   # merge runs

Variants (same model, data order, seed and steps):
- ``dense``: every self-attention is ``F.scaled_dot_product_attention``; compiled with
  ``backend="inductor"`` (``--compile``, default on CUDA).
- ``sparse``: the same model compiled with ``backend="sparse_inductor"`` and trained and
  validated under ``sparse_inductor.sparsity(--sparsity, min_tokens=0)``.
- ``gated``: the attention layers are ``sparse_inductor.nn.VideoSparseAttention`` at
  ``--sparsity`` with VSA's gated coarse branch (compiled with ``backend="inductor"``).
- ``sparse_eager`` (not run by default): the layers call the eager sparse op at ``--sparsity``
  without the gate: the same arithmetic as ``sparse`` without the backend (a cross-check).
- ``bsa`` (not run by default): BSA's setting (arXiv 2509.01085): the model compiled with
  ``backend="sparse_inductor"``, trained and validated under
  ``sparse_inductor.sparsity(policy=CumulativeMass(--bsa-p, --bsa-min-tiles, --bsa-max-fraction),
  query_keep=--query-keep, min_tokens=0)``: per query tile the fewest KV tiles holding a share p
  of its coarse attention mass (defaults p 0.9, clamped to [4, ceil(0.5 * 64) = 32] tiles), and
  half the query rows of every tile (the others receive the tile centre's output).

Measured attention FLOPs: ``bsa``'s budget is adaptive, so what it kept is measured, not
nominal. For the variants compiled with the backend (``sparse``, ``bsa``) three validation
passes (those of the first evaluation, the evaluation nearest the middle and the last one) run
inside ``sparse_inductor.stats()``, which reads back every call's lists (KV tiles kept per
query tile, query rows computed): the log's ``measured_flops`` holds per pass the FLOPs kept
(query-key pairs computed over dense pairs: the KV tiles kept / total x the query keep, the
convention of :func:`attention_flops`). Recording syncs with the device once per attention call
and compiles one more variant (the first recorded pass pays it), so training steps never record.
``bsa``'s TFLOP/step and FLOPs saved in the table are those measured; ``sparse``'s measurement
cross-checks its nominal 1/8.

GPU run of the issue-15 target (BSA's setting at equal steps, within 5 % of dense's validation
loss, the dense 3000-step run of benchmarks/RESULTS.md: 0.0723)::

    python examples/train_tiny_video_dit.py --variants bsa --steps 3000 --time-limit 8 --out runs/bsa
    python examples/train_tiny_video_dit.py --variants dense --steps 3000 --out runs/dense  # its log is not in git
    python examples/train_tiny_video_dit.py --report runs/dense runs/bsa --out runs/all

Estimate on an H100/H200: the ``sparse`` variant took 30.4 ms/step and 52 s to compile; ``bsa``
compiles two variants (training, and recording at the first measured pass) and runs the mass
cut and the query ranking on top, so about 30-45 ms/step: 3000 steps in about 2-2.5 min, plus
about 2 min of compiles and validation, 4-5 min in all (the line at step 20 prints the measured
ms/step; ``--time-limit`` counts from the first step, compile included: 8 min leaves room under
a 10-minute limit). Dense: 20.6 ms/step and 42 s compile, about 2.5 min.

The data set is made on the fly: 16-frame 64x64 RGB clips of 3 textured shapes (disc, square,
diamond; striped or checkered) that move, rotate and grow or shrink over a colour gradient
with a panning blob texture (a camera move).
Patches of (1, 4, 4) pixels give a 16x16x16 grid of 4,096 tokens = 64 tiles of (4, 4, 4), so at
sparsity 0.875 each query tile keeps 8 KV tiles. ``--frames`` and ``--size`` change the clip
(e.g. ``--size 128``: a 16x32x32 grid, 256 tiles, 32 kept per query tile — closer to a real
DiT's 624 tiles at 480p, where a kept tile is a smaller part of the video). The objective is rectified flow (flow
matching): ``x_t = (1 - t) x_0 + t ε``, the model predicts ``ε - x_0``; sampling integrates it
with Euler steps from t = 1 to 0. The checkpoints (``--out``/``<variant>.pt``, about 30 MB)
stay out of git: rerun the script to regenerate them.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without `pip install`
    sys.path.insert(0, ROOT)
import sparse_inductor  # noqa: E402
from sparse_inductor.nn import VideoSparseAttention  # noqa: E402
from video_dit import apply_rope, rope_3d  # noqa: E402  (this folder is on sys.path)

VARIANTS = ("dense", "sparse", "bsa", "gated", "sparse_eager")
DEFAULT_VARIANTS = ("dense", "sparse", "gated")


@dataclass
class Config:
    frames: int = 16
    size: int = 64
    channels: int = 3
    patch: tuple = (1, 4, 4)
    dim: int = 256
    heads: int = 4  # head dim 64
    layers: int = 6
    batch: int = 8
    lr: float = 5e-4
    warmup_steps: int = 100
    val_clips: int = 32
    shapes: int = 3
    qk_norm: bool = True

    @property
    def grid(self):
        pt, ph, pw = self.patch
        return (self.frames // pt, self.size // ph, self.size // pw)


#: Variants compiled with ``backend="sparse_inductor"``; their validation passes measure the FLOPs kept.
BACKEND_VARIANTS = ("sparse", "bsa")

#: The CPU configuration of the tests: an 8x8x8 grid (512 tokens, 8 tiles of (4, 4, 4)).
TINY = dict(frames=8, size=32, dim=32, heads=2, layers=2, batch=2, warmup_steps=2, val_clips=4, lr=2e-3)


# ---------------------------------------------------------------------------------------------
# Data: textured shapes that move, rotate and change scale, over a panning background.
# ---------------------------------------------------------------------------------------------
def make_videos(n: int, cfg: Config, seed: int, device) -> torch.Tensor:
    """``n`` clips ``[n, 3, frames, size, size]`` in ``[-1, 1]``, a pure function of ``seed``.

    The random parameters come from a CPU generator (so every device and every variant sees
    the same clips); the rendering is vectorised on ``device``.
    """
    g = torch.Generator().manual_seed(seed)

    def uniform(lo, hi, *shape):
        return (lo + (hi - lo) * torch.rand(n, *shape, generator=g)).to(device)

    T, S = cfg.frames, cfg.size
    t = torch.linspace(0, 1, T, device=device).view(1, T, 1, 1)
    coords = (torch.arange(S, device=device, dtype=torch.float32) + 0.5) / S
    y, x = coords.view(1, 1, S, 1), coords.view(1, 1, 1, S)
    # Background: a colour gradient plus a smooth random texture (blobs of about 1/8 of the
    # frame) that pans at a constant velocity, like a camera move. Without it the background
    # is best estimated from the whole frame; with it, as in real video, what predicts a patch
    # is nearby in space and along the motion in time.
    base, slope_x, slope_y = uniform(-0.6, 0.6, 3), uniform(-0.4, 0.4, 3), uniform(-0.4, 0.4, 3)
    video = (base.view(n, 3, 1, 1, 1) + slope_x.view(n, 3, 1, 1, 1) * (x - 0.5).unsqueeze(1)
             + slope_y.view(n, 3, 1, 1, 1) * (y - 0.5).unsqueeze(1))
    cells = 9
    blobs = torch.randn(n, 3, cells, cells, generator=g).to(device) * uniform(0.1, 0.35, 1).view(n, 1, 1, 1)
    pan = uniform(-0.25, 0.25, 2)  # in units of the sampled texture's half-width, over the clip
    zoom = 0.7  # the frame sees 70 % of the texture, so a pan stays (mostly) inside it
    sample_x = (2 * x - 1) * zoom + pan[:, 0].view(n, 1, 1, 1) * t  # [n, T, 1, S] -> broadcast below
    sample_y = (2 * y - 1) * zoom + pan[:, 1].view(n, 1, 1, 1) * t
    where = torch.stack(torch.broadcast_tensors(sample_x, sample_y), dim=-1).reshape(n, T * S, S, 2)
    texture = F.grid_sample(blobs, where, mode="bicubic", padding_mode="reflection", align_corners=False)
    video = video + texture.view(n, 3, T, S, S)
    for _ in range(cfg.shapes):
        center0, velocity = uniform(0.25, 0.75, 2), uniform(-0.5, 0.5, 2)
        angle0, spin = uniform(0, 2 * math.pi, 1), uniform(-math.pi, math.pi, 1)
        size0, growth = uniform(0.08, 0.2, 1), uniform(-0.7, 0.7, 1)
        kind = torch.randint(0, 3, (n, 1), generator=g).to(device)
        pattern = torch.randint(0, 2, (n, 1), generator=g).to(device)
        freq = torch.randint(2, 5, (n, 1), generator=g).to(device).float()
        color_a, color_b = uniform(-1, 1, 3), uniform(-1, 1, 3)

        def per_clip(v):
            return v.view(n, 1, 1, 1)

        cx = per_clip(center0[:, 0]) + per_clip(velocity[:, 0]) * t
        cy = per_clip(center0[:, 1]) + per_clip(velocity[:, 1]) * t
        angle = per_clip(angle0[:, 0]) + per_clip(spin[:, 0]) * t
        scale = per_clip(size0[:, 0]) * torch.exp(per_clip(growth[:, 0]) * t)
        # Shape-local coordinates: translate, rotate by -angle, divide by the scale.
        dx, dy = x - cx, y - cy
        u = (dx * torch.cos(angle) + dy * torch.sin(angle)) / scale
        v = (-dx * torch.sin(angle) + dy * torch.cos(angle)) / scale
        radius = torch.where(per_clip(kind[:, 0]) == 0, torch.sqrt(u * u + v * v + 1e-12),
                             torch.where(per_clip(kind[:, 0]) == 1, torch.maximum(u.abs(), v.abs()),
                                         u.abs() + v.abs()))
        mask = torch.sigmoid((1 - radius) * scale * S * 2)  # about one pixel of soft edge
        stripes = torch.sin(math.pi * per_clip(freq[:, 0]) * u)
        checker = stripes * torch.sin(math.pi * per_clip(freq[:, 0]) * v)
        texture = torch.sigmoid(6 * torch.where(per_clip(pattern[:, 0]) == 0, stripes, checker))
        color = color_a.view(n, 3, 1, 1, 1) + (color_b - color_a).view(n, 3, 1, 1, 1) * texture.unsqueeze(1)
        video = video * (1 - mask.unsqueeze(1)) + color * mask.unsqueeze(1)
    return video.clamp(-1, 1).contiguous()


# ---------------------------------------------------------------------------------------------
# Model: Conv3d patchify, 3D RoPE, adaLN-Zero DiT blocks (Peebles & Xie, arXiv 2212.09748).
# ---------------------------------------------------------------------------------------------
def timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000 * t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class Block(nn.Module):
    def __init__(self, dim, heads, sparsity, gated, qk_norm):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = VideoSparseAttention(dim, heads, sparsity=sparsity, gated=gated, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.modulation = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.modulation.weight)  # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x, c, grid, rotary):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1, grid, rotary)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class VideoDiT(nn.Module):
    """Velocity model: ``forward(x_t [B, C, T, H, W], t [B]) -> [B, C, T, H, W]``.

    ``sparsity``/``gated`` configure every self-attention (``sparsity=0``: plain SDPA, which
    ``backend="sparse_inductor"`` can make sparse).
    """

    def __init__(self, cfg: Config, sparsity: float = 0.0, gated: bool = False):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embed = nn.Conv3d(cfg.channels, dim, kernel_size=cfg.patch, stride=cfg.patch)
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(Block(dim, cfg.heads, sparsity, gated, cfg.qk_norm) for _ in range(cfg.layers))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.out_modulation = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, cfg.channels * math.prod(cfg.patch))
        for layer in (self.out_modulation, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t):
        B, C, T, H, W = x.shape
        pt, ph, pw = self.cfg.patch
        grid = (T // pt, H // ph, W // pw)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, dim], raster order
        c = F.silu(self.time_mlp(timestep_embedding(t, self.cfg.dim).to(tokens.dtype)))
        # Base 100, not 10,000: an axis has at most 16 positions, lower frequencies would barely turn.
        cos, sin = rope_3d(grid, self.cfg.dim // self.cfg.heads, x.device, base=100)

        def rotary(z):
            return apply_rope(z, cos, sin)

        for block in self.blocks:
            tokens = block(tokens, c, grid, rotary)
        shift, scale = self.out_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        out = self.out(self.norm_out(tokens) * (1 + scale) + shift)  # [B, N, C * pt * ph * pw]
        out = out.view(B, *grid, C, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return out.reshape(B, C, T, H, W)


def build_model(cfg: Config, variant: str, sparsity: float) -> VideoDiT:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    torch.manual_seed(0)  # the same initial weights for every variant (the gate starts at 0)
    if variant == "gated":
        return VideoDiT(cfg, sparsity=sparsity, gated=True)
    if variant == "sparse_eager":
        return VideoDiT(cfg, sparsity=sparsity, gated=False)
    return VideoDiT(cfg)


def flow_loss(model, x0, t, noise):
    """Rectified flow: ``x_t = (1 - t) x0 + t noise``, target velocity ``noise - x0``."""
    tt = t.view(-1, 1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * noise
    return F.mse_loss(model(x_t, t).float(), (noise - x0).float())


@torch.no_grad()
def sample(model, noise, steps, step_context=None):
    """Euler integration of the velocity from t = 1 (``noise``) to t = 0. ``step_context(i)``,
    if given, is entered around step ``i`` (e.g. ``sparse_inductor.sparsity(0.0)`` for a dense
    warm-up). Returns the clips mapped to ``[0, 1]``."""
    x = noise
    for i in range(steps):
        t = torch.full((x.shape[0],), 1.0 - i / steps, device=x.device, dtype=x.dtype)
        with step_context(i) if step_context is not None else _null():
            velocity = model(x, t)
        x = x - velocity / steps
    return ((x.clamp(-1, 1) + 1) / 2).float()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def attention_flops(cfg: Config, variant: str, sparsity: float, kept: float | None = None) -> dict:
    """Attention matmul FLOPs of one training step (forward + backward = 3.5x the forward, the
    convention of benchmarks/RESULTS.md): dense, and what the variant computes.

    ``bsa``'s budget is adaptive: ``kept`` is its measured share of the dense query-key pairs
    (``sparse_inductor.stats().kept()``), required for it and ignored for the others."""
    B, H, D = cfg.batch, cfg.heads, cfg.dim // cfg.heads
    grid = cfg.grid
    N = math.prod(grid)
    layout = sparse_inductor.tile_layout(grid, (4, 4, 4))
    M = layout.num_video_tiles
    dense = 4 * B * H * N * N * D * cfg.layers * 3.5
    if variant == "dense":
        done = dense
    elif variant == "bsa":
        if kept is None:
            raise ValueError("attention_flops('bsa'): the kept fraction is adaptive; pass the measured kept=")
        done = dense * kept
    else:
        # Both configurations' grids divide by the tile, so every kept tile holds 64 keys.
        kept_keys = min(M, max(1, math.ceil(round((1 - sparsity) * M, 9)))) * math.prod(layout.tile)
        done = 4 * B * H * N * kept_keys * D * cfg.layers * 3.5
        if variant == "gated":
            done += 4 * B * H * M * M * D * cfg.layers * 3.5  # the coarse branch's tile attention
    return {"dense_tflop": dense / 1e12, "tflop": done / 1e12, "saved": 1 - done / dense}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def evaluate(model, val, cfg, autocast):
    """Mean flow loss on the fixed validation set (fixed t per clip and fixed noise), in
    batches of the training batch size.

    Runs with gradients enabled (and discards them) on purpose: a compiled model then reuses
    its training graph instead of compiling a second, inference-only one (minutes on a GPU).
    """
    x0, t, noise = val
    total = 0.0
    with autocast():
        for i in range(0, x0.shape[0], cfg.batch):
            total += flow_loss(model, x0[i:i + cfg.batch], t[i:i + cfg.batch], noise[i:i + cfg.batch]).item()
    return total / (x0.shape[0] // cfg.batch)


def evaluate_and_measure(model, val, cfg, autocast) -> tuple[float, dict]:
    """:func:`evaluate` inside ``sparse_inductor.stats()``: the validation loss, and what the
    sparse attention calls of that pass kept: ``kept`` (attention FLOPs kept: query-key pairs
    computed over dense pairs), ``query_keep`` (share of query rows computed), KV tiles kept per
    query tile (``tiles_mean``/``tiles_min``/``tiles_max`` of ``num_tiles``), ``calls``, and per
    site ``{"tiles_mean", "kept"}``. Syncs with the device once per call: not for training steps."""
    with sparse_inductor.stats() as rec:
        loss = evaluate(model, val, cfg, autocast)
    rows = rec.rows
    if not rows:
        raise RuntimeError("sparse_inductor.stats() recorded no sparse attention call in the validation pass: "
                           "the backend kept every site dense (see the explain() line above)")
    point = dict(kept=rec.kept(), query_keep=sum(r["query_keep"] for r in rows) / len(rows),
                 tiles_mean=sum(r["tiles_mean"] for r in rows) / len(rows),
                 tiles_min=min(r["tiles_min"] for r in rows), tiles_max=max(r["tiles_max"] for r in rows),
                 num_tiles=rows[0]["num_tiles"], calls=len(rows),
                 sites={site: {"tiles_mean": s["tiles_mean"], "kept": s["kept"]}
                        for (site, _), s in rec.sites().items()})
    return loss, point


def validation_set(cfg: Config, device):
    """Fixed clips (a seed no training step uses), t spread evenly over (0, 1), fixed noise."""
    n = max(1, cfg.val_clips // cfg.batch) * cfg.batch  # whole batches: one compiled shape
    x0 = make_videos(n, cfg, seed=10**6, device=device)
    g = torch.Generator().manual_seed(10**6 + 1)
    t = torch.linspace(0.05, 0.95, n)[torch.randperm(n, generator=g)].to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    return x0, t, noise


def train(variant: str, cfg: Config, args, device) -> dict:
    """Train one variant for ``args.steps`` steps; returns (and writes) its log."""
    model = build_model(cfg, variant, args.sparsity).to(device)
    if variant in BACKEND_VARIANTS:
        from sparse_inductor.backend import sparse_inductor_backend

        # The backend callable itself: works without `pip install` (no entry point needed).
        runner = torch.compile(model, backend=sparse_inductor_backend)
    elif args.compile:
        runner = torch.compile(model)
    else:
        runner = model
    # The sparse and bsa variants train and validate under the context; min_tokens=0 because
    # the default (12,288) would keep a 4,096-token grid dense.
    level = args.sparsity if variant == "sparse" else 0.0

    def attention_context(step=None):
        """The variant's sparsity; for bsa with ``--query-keep-ramp``, the query keep of ``step``
        (``None``: the target)."""
        if variant == "bsa":
            query_keep = args.query_keep if step is None else ramped_query_keep(
                step, args.query_keep, args.query_keep_ramp, args.ramp_levels)
            return sparse_inductor.sparsity(policy=args.bsa_policy, query_keep=query_keep, min_tokens=0)
        return sparse_inductor.sparsity(level, min_tokens=0)

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16) if args.bf16 else _null()

    if variant in ("dense", *BACKEND_VARIANTS):  # what the backend does with the model's SDPA sites
        explain_context = attention_context() if variant == "bsa" else sparse_inductor.sparsity(args.sparsity,
                                                                                                min_tokens=0)
        with explain_context, torch.no_grad():
            x = torch.zeros(1, cfg.channels, cfg.frames, cfg.size, cfg.size, device=device)
            sites = sparse_inductor.explain(model, x, torch.zeros(1, device=device))
        print(f"[{variant}] explain(): {len(sites.sparse_rows)} of {len(sites)} attention sites sparse, "
              f"grids {sorted({str(r['grid']) for r in sites.rows})}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.01)

    def lr_at(step):  # linear warm-up, then cosine to 10 %
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, args.steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    val = validation_set(cfg, device)
    log = {"variant": variant, "config": asdict(cfg),
           "sparsity": {"dense": 0.0, "bsa": None}.get(variant, args.sparsity),
           "steps_planned": args.steps, "train_loss": [],
           "val": [], "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "torch": torch.__version__, "bf16": args.bf16, "compiled": variant in BACKEND_VARIANTS or args.compile,
           "flops": None if variant == "bsa" else attention_flops(cfg, variant, args.sparsity)}
    if variant == "bsa":
        log.update(policy=args.bsa_policy.describe(), policy_args=asdict(args.bsa_policy), query_keep=args.query_keep,
                   query_keep_ramp=dict(steps=args.query_keep_ramp, levels=args.ramp_levels))
    # Validation passes that measure the FLOPs kept: the first evaluation, the one nearest the
    # middle, the last (and the final one after a --time-limit stop).
    measures = variant in BACKEND_VARIANTS
    middle = max(1, round(args.steps / 2 / args.eval_every)) * args.eval_every
    measure_at = {args.eval_every, middle, args.steps}
    points = []

    def validate(step, measure):
        if not measure:
            return evaluate(runner, val, cfg, autocast)  # (no dropout: train mode is fine)
        t_measure = time.perf_counter()
        loss, point = evaluate_and_measure(runner, val, cfg, autocast)
        point = {"step": step, "val_loss": loss, **point}
        points.append(point)
        if len(points) == 1:
            log["first_measure_s"] = time.perf_counter() - t_measure  # the recording variant's compile
        print(f"[{variant}] step {step} measured over the validation pass: KV tiles kept per query tile "
              f"{point['tiles_mean']:.2f} ({point['tiles_min']}-{point['tiles_max']}) of {point['num_tiles']}, "
              f"query keep {point['query_keep']:.3f}, attention FLOPs kept {point['kept']:.4f} "
              f"(saved {100 * (1 - point['kept']):.1f} %)", flush=True)
        return loss

    step_times = []
    start = time.perf_counter()
    ramp = variant == "bsa" and args.query_keep_ramp > 0
    with attention_context():
        for step in range(args.steps):
            # BSA's ramp: each step, and the validation after it, under that step's query keep.
            with attention_context(step) if ramp else contextlib.nullcontext():
                if args.time_limit and time.perf_counter() - start > 60 * args.time_limit:
                    print(f"[{variant}] time limit of {args.time_limit} min reached at step {step}: stopping")
                    log["stopped_early"] = step
                    break
                g = torch.Generator().manual_seed(step)
                x0 = make_videos(cfg.batch, cfg, seed=step, device=device)
                t = torch.sigmoid(torch.randn(cfg.batch, generator=g)).to(device)  # logit-normal (SD3)
                noise = torch.randn(x0.shape, generator=g).to(device)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step)
                _sync(device)
                t0 = time.perf_counter()
                with autocast():
                    loss = flow_loss(runner, x0, t, noise)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                loss_value = loss.item()  # synchronises
                step_times.append(time.perf_counter() - t0)
                log["train_loss"].append(loss_value)
                if not math.isfinite(loss_value):
                    raise RuntimeError(f"[{variant}] loss is {loss_value} at step {step}")
                if step == 0:
                    print(f"[{variant}] compile + first step: {step_times[0]:.1f} s", flush=True)
                if step == 20:  # early enough to size --steps for the next run
                    ms = 1e3 * _median(step_times[1:])
                    print(f"[{variant}] {ms:.1f} ms/step: {args.steps} steps take about {ms * args.steps / 6e4:.1f} min",
                          flush=True)
                if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                    t_eval = time.perf_counter()
                    val_loss = validate(step + 1, measures and step + 1 in measure_at)
                    log["val"].append([step + 1, val_loss])
                    if len(log["val"]) == 1:
                        log["first_eval_s"] = time.perf_counter() - t_eval
                    recent = log["train_loss"][-20:]
                    ms = 1e3 * _median(step_times[1:] or step_times)
                    print(f"[{variant}] step {step + 1}: train {sum(recent) / len(recent):.4f}  val {val_loss:.4f}  "
                          f"({ms:.1f} ms/step)", flush=True)
    final = len(log["train_loss"])
    need_val = not log["val"] or log["val"][-1][0] != final
    need_measure = measures and (not points or points[-1]["step"] != final)
    if need_val or need_measure:  # a --time-limit stop: validate (and measure) where training ended
        with attention_context():
            val_loss = validate(final, need_measure)
        if need_val:
            log["val"].append([final, val_loss])
    if measures:
        kept = sum(p["kept"] for p in points) / len(points)
        log["measured_flops"] = {"kept": kept, "saved": 1 - kept, "points": points}
        if variant == "bsa":
            log["flops"] = attention_flops(cfg, variant, args.sparsity, kept=kept)
    log["steps"] = len(log["train_loss"])
    log["final_val_loss"] = log["val"][-1][1]
    log["compile_first_step_s"] = step_times[0] if step_times else None
    log["ms_per_step"] = 1e3 * _median(step_times[1:] or step_times) if step_times else None
    log["train_seconds"] = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    torch.save({"config": asdict(cfg), "variant": variant, "sparsity": log["sparsity"],
                "state_dict": model.state_dict(), "steps": log["steps"]}, os.path.join(args.out, f"{variant}.pt"))
    with open(os.path.join(args.out, f"train_{variant}.json"), "w") as f:
        json.dump(log, f)
    return log


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def load_checkpoint(path, device="cpu"):
    """``(model, config)`` from a checkpoint written by this script."""
    ckpt = torch.load(path, map_location=device, weights_only=False)
    cfg = Config(**{**ckpt["config"], "patch": tuple(ckpt["config"]["patch"])})
    model = build_model(cfg, ckpt["variant"], ckpt["sparsity"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), cfg


def fidelity_setup(checkpoint=None, device=None, dtype=None):
    """What ``python -m sparse_inductor fidelity examples/train_tiny_video_dit.py:fidelity_setup
    --checkpoint DIR/dense.pt`` measures: the trained model, 4 validation clips noised at
    t = 0.2, 0.4, 0.6 and 0.8, and a sampler of 4 clips (Euler, 20 steps; 4 for the tiny model)
    from fixed noise.
    ``dtype`` (e.g. ``torch.bfloat16``) casts the model and inputs."""
    if checkpoint is None:
        raise ValueError("fidelity_setup needs checkpoint=PATH (a <variant>.pt written by "
                         "examples/train_tiny_video_dit.py); an untrained model has its attention gated off")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_checkpoint(checkpoint, device)
    dtype = dtype or torch.float32
    model = model.to(dtype)
    tiny = math.prod(cfg.grid) < 1024
    x0, _, noise = validation_set(cfg, device)
    # One batch size for the inputs and the samples: a compiled model then keeps one shape.
    n = min(4, x0.shape[0])
    t = torch.linspace(0.2, 0.8, n, device=device)
    tt = t.view(-1, 1, 1, 1, 1)
    x_t = ((1 - tt) * x0[:n] + tt * noise[:n]).to(dtype)
    sample_noise = torch.randn((n, *x0.shape[1:]), generator=torch.Generator().manual_seed(7)).to(device, dtype)
    steps = 4 if tiny else 20

    def sample_fn(model, step_context):
        return sample(model, sample_noise, steps, step_context)

    return {"model": model, "inputs": (x_t, t.to(dtype)), "sample_fn": sample_fn, "peak": 1.0}


# ---------------------------------------------------------------------------------------------
# Report: table and plot from the logs of one or more runs
# ---------------------------------------------------------------------------------------------
def _setting(log: dict) -> str:
    """The sparsity setting of a run, for the table: the TopK sparsity, or bsa's policy and query keep."""
    if log["variant"] == "bsa":
        ramp = (log.get("query_keep_ramp") or {}).get("steps", 0)
        return f"{log['policy']}, query_keep={log['query_keep']}" + (
            f" (ramped from 1 over {ramp} steps in {log['query_keep_ramp']['levels']} decrements)" if ramp else "")
    return str(log["sparsity"])


def _label(log: dict) -> str:
    """A short legend label."""
    if log["variant"] == "bsa":
        ramp = " ramped" if (log.get("query_keep_ramp") or {}).get("steps", 0) else ""
        return f"bsa (mass p={log['policy_args']['p']}, query_keep={log['query_keep']}{ramp})"
    return f"{log['variant']} ({log['sparsity']})"


def report(logs: list[dict], out_dir: str) -> str:
    """Markdown table of the runs (loss gap against the dense run) and ``loss_curves.png``.

    "measured FLOPs kept": the mean over the recorded validation passes of the attention FLOPs
    the backend's lists kept (variants compiled with the backend; empty for the others); bsa's
    TFLOP/step and FLOPs saved are those measured."""
    dense = next((log for log in logs if log["variant"] == "dense"), None)
    lines = ["| variant | sparsity | steps | final val loss | gap vs dense | ms/step | compile + first step | "
             "attention TFLOP/step (fwd+bwd) | attention FLOPs saved | measured FLOPs kept (per pass) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for log in logs:
        gap = ""
        if dense is not None:
            gap = f"{100 * (log['final_val_loss'] / dense['final_val_loss'] - 1):+.2f} %"
            if log["steps"] != dense["steps"]:
                gap += f" (unequal steps: {log['steps']} vs {dense['steps']})"
        flops = log["flops"]
        measured = log.get("measured_flops")  # (absent from logs of older runs)
        kept = ""
        if measured:
            kept = f"{measured['kept']:.3f} (" + ", ".join(f"step {p['step']}: {p['kept']:.3f}"
                                                           for p in measured["points"]) + ")"
        lines.append(f"| {log['variant']} | {_setting(log)} | {log['steps']} | {log['final_val_loss']:.4f} | {gap} | "
                     f"{log['ms_per_step']:.1f} | {log['compile_first_step_s']:.1f} s | {flops['tflop']:.2f} "
                     f"(dense {flops['dense_tflop']:.2f}) | {100 * flops['saved']:.1f} % | {kept} |")
    table = "\n".join(lines)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "train_table.md"), "w") as f:
        f.write(table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return table
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for log in logs:
        label = _label(log)
        losses = log["train_loss"]
        window = max(1, len(losses) // 50)
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        axes[0].plot(range(1, len(losses) + 1), smooth, label=label, linewidth=1)
        steps, vals = zip(*log["val"])
        axes[1].plot(steps, vals, marker=".", label=label, linewidth=1)
    for ax, title in zip(axes, ("training loss (moving mean)", "validation loss")):
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss_curves.png"), dpi=80)
    plt.close(fig)
    return table


def _at_least(value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"must be an integer >= {low}, got {value}")


def ramped_query_keep(step: int, target: float, ramp_steps: int, levels: int) -> float:
    """The bsa variant's query keep at ``step`` under BSA's ramp (sparsity raised from dense in small
    steps): ``levels + 1`` equal stages over the first ``ramp_steps`` steps, from 1 (every query row)
    down to ``target`` in ``levels`` equal decrements, then ``target``. ``ramp_steps`` 0: no ramp.
    Values are rounded to 4 decimals: each stage is one config (one compiled variant)."""
    if ramp_steps <= 0:
        return target
    stage = min(levels, step * (levels + 1) // ramp_steps)
    return round(1.0 - (1.0 - target) * stage / levels, 4)


def bsa_settings(parser, args) -> None:
    """Sets ``args.bsa_policy`` (the bsa variant's ``CumulativeMass``) from the flags, and checks
    ``--query-keep``; a bad value is a parser error naming its flag."""
    from sparse_inductor.query_keep import check_query_keep

    Mass = sparse_inductor.CumulativeMass
    for flag, check in (("--bsa-p", lambda: Mass(p=args.bsa_p)),
                        ("--bsa-min-tiles", lambda: Mass(min_tiles=args.bsa_min_tiles)),
                        ("--bsa-max-fraction", lambda: Mass(max_fraction=args.bsa_max_fraction)),
                        ("--query-keep", lambda: check_query_keep(args.query_keep)),
                        ("--query-keep-ramp", lambda: _at_least(args.query_keep_ramp, 0)),
                        ("--ramp-levels", lambda: _at_least(args.ramp_levels, 1))):
        try:
            check()
        except ValueError as error:
            parser.error(f"{flag}: {error}")
    args.bsa_policy = Mass(p=args.bsa_p, min_tiles=args.bsa_min_tiles, max_fraction=args.bsa_max_fraction)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=None, help="training steps per variant (default 3000; tiny 20)")
    parser.add_argument("--sparsity", type=float, default=0.875, help="TopK sparsity of sparse, gated, sparse_eager")
    parser.add_argument("--bsa-p", type=float, default=0.9,
                        help="bsa: share of each query tile's coarse attention mass its KV tiles keep, in (0, 1]")
    parser.add_argument("--bsa-min-tiles", type=int, default=4, help="bsa: at least this many KV tiles per query tile")
    parser.add_argument("--bsa-max-fraction", type=float, default=0.5,
                        help="bsa: at most ceil(this x tiles) KV tiles per query tile, in (0, 1]")
    parser.add_argument("--query-keep", type=float, default=0.5,
                        help="bsa: share of each tile's query rows computed, in (0, 1] (BSA: 0.5)")
    parser.add_argument("--query-keep-ramp", type=int, default=0, metavar="STEPS",
                        help="bsa: over the first STEPS steps lower the query keep from 1 to --query-keep in "
                             "--ramp-levels equal steps (BSA ramps sparsity up from dense); default 0: no ramp")
    parser.add_argument("--ramp-levels", type=int, default=2,
                        help="bsa: decrements of the --query-keep-ramp (each stage compiles its own variant)")
    parser.add_argument("--eval-every", type=int, default=None, help="validation every N steps (default steps/10)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="minutes per variant; training stops there (the log says at which step)")
    parser.add_argument("--tiny", action="store_true", help="the tiny CPU configuration of the tests")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile dense/gated with backend='inductor' (default: on CUDA only)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 autocast (default: on CUDA only)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None,
                        help="clip length (default 16; tiny 8); a multiple of 4, the tile's frames")
    parser.add_argument("--size", type=int, default=None,
                        help="clip height and width in pixels (default 64; tiny 32); a multiple of 16, "
                             "the (4, 4) patch times the tile's 4: a larger grid has more tiles per query")
    parser.add_argument("--out", required=True, help="directory for checkpoints, logs, table and PNG")
    parser.add_argument("--report", nargs="+", metavar="DIR",
                        help="no training: merge the train_*.json of these directories into --out")
    args = parser.parse_args(argv)
    if args.report:
        logs = []
        for d in args.report:
            logs += [json.load(open(p)) for p in sorted(glob.glob(os.path.join(d, "train_*.json")))]
        logs.sort(key=lambda log: VARIANTS.index(log["variant"]))
        print(report(logs, args.out))
        return
    sparse_inductor.config.check_sparsity(args.sparsity)
    bsa_settings(parser, args)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    cfg = Config(**TINY) if args.tiny else Config()
    if args.batch:
        cfg.batch = args.batch
    for name, multiple in (("frames", 4), ("size", 16)):
        value = getattr(args, name)
        if value is not None:
            # The FLOP accounting and the gated branch assume grids that divide by the (4, 4, 4) tile.
            if value <= 0 or value % multiple:
                parser.error(f"--{name} must be a positive multiple of {multiple}, got {value}")
            setattr(cfg, name, value)
    args.steps = args.steps or (20 if args.tiny else 3000)
    args.eval_every = args.eval_every or max(1, args.steps // 10)
    if args.compile is None:
        args.compile = device == "cuda"
    if args.bf16 is None:
        args.bf16 = device == "cuda"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    n_params = sum(p.numel() for p in VideoDiT(cfg).parameters())
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}; "
          f"clips {cfg.frames}x{cfg.size}x{cfg.size}, grid {cfg.grid} = {math.prod(cfg.grid)} tokens, "
          f"{cfg.layers} layers, {cfg.heads} heads x {cfg.dim // cfg.heads}, {n_params / 1e6:.2f} M parameters, "
          f"batch {cfg.batch}, {args.steps} steps")
    logs, failed = [], []
    for variant in args.variants:
        try:
            logs.append(train(variant, cfg, args, device))
        except Exception:  # report it and go on: one GPU session should still give the others
            traceback.print_exc()
            failed.append(variant)
    if logs:
        print(report(logs, args.out))
    if failed:
        sys.exit(f"variants that failed: {failed}")


if __name__ == "__main__":
    main()
