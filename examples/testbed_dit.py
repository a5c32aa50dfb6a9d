"""The quality testbed of issue 17: a 12-layer video DiT with caption cross-attention, trained
by rectified flow on procedural video (camera motion, occluding textured objects), so that the
policies can be compared on a model whose attention has learned structure.

    python examples/testbed_dit.py train --out runs/testbed --minutes 7.5    # GPU; run it again to resume
    python examples/testbed_dit.py train --tiny --steps 6 --out /tmp/t      # CPU, seconds
    python examples/testbed_dit.py report --out runs/testbed                # loss_curve.png + summary.md
    python examples/testbed_dit.py explain [--tiny]                         # the backend's view of the sites
    python -m sparse_inductor fidelity examples/testbed_dit.py:setup --checkpoint runs/testbed

Model (``Config``): Conv3d patchify (1, 4, 4) -> ``.flatten(2).transpose(1, 2)`` (raster token
order over the grid (T, H, W), w fastest), 12 blocks of [adaLN-modulated self-attention with
qk RMS-norm and 3D RoPE (plain ``F.scaled_dot_product_attention`` on ``[B, 4, N, 64]``: the
sites ``backend="sparse_inductor"`` makes sparse) -> cross-attention to the caption (key/value =
10 caption tokens: stays dense) -> adaLN-modulated MLP], dim 256 = 4 heads x 64. Timestep
conditioning is PixArt-alpha's "adaLN-single" (arXiv 2310.00426): one shared projection of the
timestep embedding to 6 x dim, plus a learned per-block table; gates start at 0 (every block
starts as the identity, as adaLN-Zero, arXiv 2212.09748). The caption encoder is a token
table plus an MLP over the whole caption (no attention call). 14.04 M parameters (12.65 M in
the blocks; ``parameter_count(Config())``); the bf16 weights (28.1 MB) are written as 2 files
of < 16 MiB: ``weights.pt`` (14.7 MiB, also the index) and ``weights.1.pt`` (12.1 MiB).

Data (``sample_params`` -> ``render``, ``caption_tokens``): 16-frame 128x128 RGB clips, a pure
function of a seed. All random parameters come from a CPU ``torch.Generator`` (every device
sees the same clips); the rendering is vectorised torch on the target device. A camera pans
(8 directions or none) and/or zooms (in, out or none) over a world holding a background of
coarse colour blobs, a colour gradient and fine stripes; 3 objects (disc, square, diamond,
ring, cross) with fine stripes, fine checks or coarse blobs as texture, a colour from an
8-colour palette, translation (8 directions), rotation and growth, drawn back to front (they
all cross the centre of the frame around mid-clip, so they often occlude each other). The
caption is 3 tokens per object in depth order (kind, colour, motion direction) plus one
camera token (pan x zoom class): 10 tokens from a vocabulary of 48, embedded by a learned table.
Grid 16 x 32 x 32 = 16,384 tokens = 256 tiles of (4, 4, 4).

Objective: rectified flow, ``x_t = (1 - t) x0 + t eps``, the model predicts ``eps - x0``; t
logit-normal (SD3); AdamW (lr 5e-4, betas (0.9, 0.99), weight decay 0.01), linear warm-up
(100 steps) then cosine to 10 % over ``--schedule-steps`` (3,000); gradient clipping 1.0;
bf16 autocast and ``torch.compile(backend="inductor")`` on CUDA. Batch ``b`` of step ``s``
(clip parameters, t and noise) depends only on ``(seed, s)``, so a resumed run sees exactly the
batches an uninterrupted one would (bitwise-identical weights on CPU, tested). Validation: 32
fixed clips (a seed no training step uses), t spread over (0.05, 0.95), fixed noise, in whole
batches, every 100 steps.

Resuming: ``DIR/state.pt`` (model + AdamW moments + step + RNG; 169 MB, not carried) is written
every ``--save-every`` steps and at the end, and a run with the same ``--out`` continues from it
exactly. ``DIR/weights.pt`` (+ shards) holds the bf16 weights and the step: what is carried
between machines; ``train --resume`` with only the weights continues from them with fresh AdamW
moments (not bitwise: the log says so). ``DIR/log.json`` accumulates every run's losses and
timings. The summary states whether validation loss has stopped improving (no gain > 0.5 % in
the last 3 evaluations over the best before them), i.e. whether another run is worth it.

GPU budget (H200, bf16, estimate): attention FLOPs dominate. Self-attention forward per layer
and clip is 4 N^2 dim = 4 x 16384^2 x 256 = 0.275 TFLOP; forward + backward 3.5x that = 0.96
TFLOP; x 12 layers = 11.5 TFLOP per clip, at ~300 TFLOP/s (head dim 64) 38 ms. The linears
(6 x 11 M block parameters that act on video tokens x 16,384 tokens = 1.1 TFLOP per clip) add
~3 ms, elementwise
work (norms, RoPE, modulation, GELU: memory-bound, fused by Inductor) and the caption
cross-attention a few ms more: ~45 ms per clip, so ~180 ms per step at batch 4. With ~90 s
for compilation and start-up, a 7.5-minute run does ~2,000 steps: the 3,000-step schedule
takes two runs (the first run prints its measured ms/step and the number of runs it implies
at step 20). Rendering a batch on the GPU is ~1-3 ms (small kernels). Activation memory at
batch 4: ~1 GB per block, ~15 GB in all.
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
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (ROOT, HERE):  # run from a checkout without `pip install`; import the neighbours
    if _path not in sys.path:
        sys.path.insert(0, _path)
from train_tiny_video_dit import timestep_embedding  # noqa: E402
from video_dit import apply_rope, rope_3d  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class Config:
    frames: int = 16
    size: int = 128
    channels: int = 3
    patch: tuple = (1, 4, 4)
    dim: int = 256
    heads: int = 4  # head dim 64
    layers: int = 12
    mlp_ratio: int = 4
    caption_dim: int = 64  # width of the caption encoder (projected to dim for the cross-attention)
    objects: int = 3
    batch: int = 4
    lr: float = 5e-4
    warmup_steps: int = 100
    schedule_steps: int = 3000
    val_clips: int = 32
    eval_every: int = 100
    save_every: int = 500
    rope_base: float = 100.0  # an axis has at most 32 positions: lower frequencies would barely turn

    @property
    def grid(self):
        pt, ph, pw = self.patch
        return (self.frames // pt, self.size // ph, self.size // pw)

    @property
    def caption_length(self):
        return 3 * self.objects + 1

    @property
    def tokens(self):
        return math.prod(self.grid)


#: The CPU configuration of the tests: 8 frames of 32x32, an 8x8x8 grid (512 tokens).
TINY = dict(frames=8, size=32, dim=32, heads=2, layers=2, caption_dim=16, batch=2, lr=2e-3, warmup_steps=2,
            schedule_steps=20, val_clips=4, eval_every=5, save_every=5)


def config_from_dict(d: dict) -> Config:
    known = {f.name for f in fields(Config)}
    d = {k: v for k, v in d.items() if k in known}
    if "patch" in d:
        d["patch"] = tuple(d["patch"])
    return Config(**d)


# ---------------------------------------------------------------------------------------------
# Procedural video: parameters (CPU generator) -> rendering (vectorised, any device) and captions
# ---------------------------------------------------------------------------------------------
KINDS = ("disc", "square", "diamond", "ring", "cross")
TEXTURES = ("stripes", "checks", "blobs")
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "magenta", "white")
PALETTE = torch.tensor([[0.9, -0.7, -0.7], [0.9, 0.1, -0.8], [0.85, 0.8, -0.7], [-0.6, 0.8, -0.6],
                        [-0.7, 0.75, 0.8], [-0.6, -0.4, 0.9], [0.8, -0.6, 0.8], [0.85, 0.85, 0.85]])
DIRECTIONS = 8  # motion direction class d: angle d * 45 degrees, x right, y down (0 = right, 2 = down)
PAN_CLASSES = 9  # 0: no pan, 1 + d: pan in direction d
ZOOM_CLASSES = 3  # 0: none, 1: zoom in (things grow), 2: zoom out
#: Caption vocabulary: field offsets; the caption is [kind, colour, direction] per object (back
#: to front), then the camera class pan * 3 + zoom.
KIND_OFFSET = 0
COLOUR_OFFSET = KIND_OFFSET + len(KINDS)
DIRECTION_OFFSET = COLOUR_OFFSET + len(COLOURS)
CAMERA_OFFSET = DIRECTION_OFFSET + DIRECTIONS
VOCAB = CAMERA_OFFSET + PAN_CLASSES * ZOOM_CLASSES


def sample_params(n: int, cfg: Config, seed: int) -> dict:
    """The random parameters of ``n`` clips: a dict of CPU tensors, a pure function of ``seed``.

    Geometry is in world units (the frame shows 1 x 1 unit at mid-clip); ``t`` runs over [0, 1]
    across the clip. Objects are listed back to front (index 0 is drawn first).
    """
    g = torch.Generator().manual_seed(int(seed))
    K = cfg.objects

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=g)

    def randint(high, *shape):
        return torch.randint(0, high, (n, *shape), generator=g)

    p = {}
    # Camera: a pan of 0.15-0.35 units over the clip in one of 8 directions (or none) and a
    # zoom of 0.25-0.5 in log scale (in, out or none).
    p["pan_class"], p["zoom_class"] = randint(PAN_CLASSES), randint(ZOOM_CLASSES)
    pan_angle = (p["pan_class"] - 1) * (math.pi / 4) + uniform(-math.pi / 16, math.pi / 16)
    pan_speed = torch.where(p["pan_class"] > 0, uniform(0.15, 0.35), torch.zeros(n))
    p["pan"] = torch.stack([pan_speed * pan_angle.cos(), pan_speed * pan_angle.sin()], dim=-1)  # [n, 2]
    rate = uniform(0.25, 0.5)
    p["zoom_rate"] = torch.where(p["zoom_class"] == 1, rate, torch.where(p["zoom_class"] == 2, -rate, 0 * rate))
    # Background: base colour, gradient, coarse blobs (a 12x12 grid over 2 x 2 world units),
    # fine stripes (10-20 cycles per unit).
    p["bg_base"], p["bg_slope"] = uniform(-0.5, 0.5, 3), uniform(-0.4, 0.4, 2, 3)
    p["bg_blobs"] = torch.randn(n, 3, 12, 12, generator=g) * uniform(0.1, 0.35, 1, 1, 1)
    p["bg_stripe"] = torch.stack([uniform(10, 20), uniform(0, math.pi), uniform(0.03, 0.15)], dim=-1)  # f, angle, amp
    # Objects [n, K].
    p["kind"], p["colour"], p["texture"] = randint(len(KINDS), K), randint(len(COLOURS), K), randint(len(TEXTURES), K)
    p["colour_jitter"] = uniform(-0.1, 0.1, K, 3)
    p["tex_freq"], p["contrast"] = uniform(2.5, 5.0, K), uniform(0.3, 0.7, K)  # cycles per object radius
    p["obj_blobs"] = torch.randn(n, K, 5, 5, generator=g)
    p["direction"] = randint(DIRECTIONS, K)
    angle = p["direction"] * (math.pi / 4) + uniform(-math.pi / 16, math.pi / 16, K)
    speed = uniform(0.25, 0.6, K)  # units per clip
    p["velocity"] = torch.stack([speed * angle.cos(), speed * angle.sin()], dim=-1)  # [n, K, 2]
    # Every object crosses a point near the centre around mid-clip: paths cross, objects occlude.
    p["cross_point"], p["cross_time"] = uniform(0.3, 0.7, K, 2), uniform(0.3, 0.7, K)
    p["angle0"], p["spin"] = uniform(0, 2 * math.pi, K), uniform(-math.pi, math.pi, K)
    p["size0"], p["growth"] = uniform(0.08, 0.16, K), uniform(-0.5, 0.5, K)
    return p


#: The per-object entries of ``sample_params``' dict (first two dims ``[n, objects]``).
OBJECT_KEYS = ("kind", "colour", "texture", "colour_jitter", "tex_freq", "contrast", "obj_blobs", "direction",
               "velocity", "cross_point", "cross_time", "angle0", "spin", "size0", "growth")


def caption_tokens(params: dict) -> torch.Tensor:
    """``[n, 3 * objects + 1]`` int64 tokens: per object (back to front) kind, colour, motion
    direction; then the camera class."""
    per_object = torch.stack([KIND_OFFSET + params["kind"], COLOUR_OFFSET + params["colour"],
                              DIRECTION_OFFSET + params["direction"]], dim=-1).flatten(1)
    camera = CAMERA_OFFSET + params["pan_class"] * ZOOM_CLASSES + params["zoom_class"]
    return torch.cat([per_object, camera[:, None]], dim=1).long()


def _shape_radius(kind, u, v):
    """Shape-local 'radius' (< 1 inside) of each kind, selected per object."""
    rho = torch.sqrt(u * u + v * v + 1e-12)
    au, av = u.abs(), v.abs()
    radii = (rho, torch.maximum(au, av), au + av, (rho - 0.65).abs() / 0.35,
             torch.minimum(torch.maximum(au, av / 0.35), torch.maximum(au / 0.35, av)))
    out = radii[-1]
    for i in range(len(radii) - 2, -1, -1):
        out = torch.where(kind == i, radii[i], out)
    return out


def render(params: dict, cfg: Config, device="cpu", return_masks: bool = False):
    """Clips ``[n, 3, frames, size, size]`` in ``[-1, 1]`` from ``sample_params``' output (and,
    with ``return_masks``, the objects' coverage ``[n, objects, frames, size, size]`` in [0, 1])."""
    p = {k: v.to(device) for k, v in params.items()}
    n, K = p["kind"].shape
    T, S = cfg.frames, cfg.size
    f32 = dict(device=device, dtype=torch.float32)
    t = torch.linspace(0, 1, T, **f32).view(1, T, 1, 1)
    coords = (torch.arange(S, **f32) + 0.5) / S

    def per_clip(x):  # [n] -> [n, 1, 1, 1]
        return x.view(n, 1, 1, 1)

    # Camera: screen (x, y) at time t shows world cam(t) + (screen - 0.5) * span(t).
    span = torch.exp(-per_clip(p["zoom_rate"]) * (t - 0.5))  # [n, T, 1, 1]
    wx = 0.5 + per_clip(p["pan"][:, 0]) * (t - 0.5) + (coords.view(1, 1, 1, S) - 0.5) * span  # [n, T, 1, S]
    wy = 0.5 + per_clip(p["pan"][:, 1]) * (t - 0.5) + (coords.view(1, 1, S, 1) - 0.5) * span  # [n, T, S, 1]
    wx, wy = torch.broadcast_tensors(wx, wy)  # [n, T, S, S]
    # Background.
    video = (p["bg_base"].view(n, 3, 1, 1, 1) + p["bg_slope"][:, 0].view(n, 3, 1, 1, 1) * (wx - 0.5).unsqueeze(1)
             + p["bg_slope"][:, 1].view(n, 3, 1, 1, 1) * (wy - 0.5).unsqueeze(1))
    where = torch.stack([wx - 0.5, wy - 0.5], dim=-1).reshape(n, T * S, S, 2)  # world [-0.5, 1.5] -> [-1, 1]
    blobs = F.grid_sample(p["bg_blobs"], where, mode="bicubic", padding_mode="reflection", align_corners=False)
    freq, angle, amp = p["bg_stripe"].unbind(-1)
    stripes = per_clip(amp) * torch.sin(2 * math.pi * per_clip(freq) * (per_clip(angle.cos()) * wx
                                                                       + per_clip(angle.sin()) * wy))
    video = video + blobs.view(n, 3, T, S, S) + stripes.unsqueeze(1)
    # Objects, all K at once: [n, K, T, S, S].

    def per_obj(x):  # [n, K] -> [n, K, 1, 1, 1]
        return x.view(n, K, 1, 1, 1)

    tk = t.unsqueeze(1)  # [1, 1, T, 1, 1]
    px = per_obj(p["cross_point"][..., 0]) + per_obj(p["velocity"][..., 0]) * (tk - per_obj(p["cross_time"]))
    py = per_obj(p["cross_point"][..., 1]) + per_obj(p["velocity"][..., 1]) * (tk - per_obj(p["cross_time"]))
    rot = per_obj(p["angle0"]) + per_obj(p["spin"]) * tk
    scale = per_obj(p["size0"]) * torch.exp(per_obj(p["growth"]) * (tk - 0.5))
    dx, dy = wx.unsqueeze(1) - px, wy.unsqueeze(1) - py
    cos, sin = rot.cos(), rot.sin()
    u, v = (dx * cos + dy * sin) / scale, (-dx * sin + dy * cos) / scale
    radius = _shape_radius(per_obj(p["kind"]), u, v)
    pixels_per_unit = S / span.unsqueeze(1)  # [n, 1, T, 1, 1]
    mask = torch.sigmoid((1 - radius) * scale * pixels_per_unit * 1.5)  # about one pixel of soft edge
    f = per_obj(p["tex_freq"])
    stripe = torch.sin(math.pi * f * u)
    check = stripe * torch.sin(math.pi * f * v)
    blob = F.grid_sample(p["obj_blobs"].reshape(n * K, 1, 5, 5),
                         torch.stack([u / 1.5, v / 1.5], dim=-1).reshape(n * K, T * S, S, 2),
                         mode="bilinear", padding_mode="border", align_corners=False).view(n, K, T, S, S)
    kind_tex = per_obj(p["texture"])
    tex = torch.where(kind_tex == 0, stripe, torch.where(kind_tex == 1, check, 1.5 * blob))
    mix = torch.sigmoid(4 * tex).unsqueeze(2)  # [n, K, 1, T, S, S]
    colour_a = (PALETTE.to(device)[p["colour"]] + p["colour_jitter"]).view(n, K, 3, 1, 1, 1)
    colour_b = colour_a * (1 - 2 * p["contrast"].view(n, K, 1, 1, 1, 1))
    colour = colour_a + (colour_b - colour_a) * mix  # [n, K, 3, T, S, S]
    for k in range(K):  # back to front
        m = mask[:, k].unsqueeze(1)
        video = video * (1 - m) + colour[:, k] * m
    video = video.clamp(-1, 1).contiguous()
    return (video, mask) if return_masks else video


def make_clips(n: int, cfg: Config, seed: int, device="cpu"):
    """``(clips [n, 3, T, H, W], caption tokens [n, L])`` of ``seed``, rendered in chunks of the
    batch size (bounded memory for the validation set)."""
    params = sample_params(n, cfg, seed)
    chunk = max(1, cfg.batch)
    clips = [render({k: v[i:i + chunk] for k, v in params.items()}, cfg, device) for i in range(0, n, chunk)]
    return torch.cat(clips), caption_tokens(params).to(device)


# Streams of random numbers: each (seed, kind, index) gets its own generator seed.
_TRAIN_DATA, _TRAIN_NOISE, _VAL, _INIT, _SAMPLE = range(5)
MAX_SEED = 1 << 20
MAX_INDEX = 1 << 27


def stream_seed(seed: int, kind: int, index: int = 0) -> int:
    """A 32-bit generator seed, distinct for every (kind, index) of one ``seed``.

    32 bits because the CPU generator (mt19937) keeps only the low 32 bits of its seed: seeds that
    differ above bit 31 give the same numbers. ``(kind, index)`` fill the bits, and the run's seed
    is mixed in by XOR with a multiplicative hash of it (a bijection for a fixed seed)."""
    if not 0 <= index < MAX_INDEX:
        raise ValueError(f"stream index must be in [0, {MAX_INDEX}), got {index}")
    return ((int(kind) << 27) | int(index)) ^ ((int(seed) * 0x9E3779B1) & 0xFFFFFFFF)


def check_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be an int in [0, {MAX_SEED}), got {seed!r}")
    return seed


def training_batch(cfg: Config, seed: int, step: int, device="cpu"):
    """``(x0, caption, t, noise)`` of training step ``step``: a function of ``(seed, step)`` only.

    Clip parameters and t come from CPU generators; the noise from a generator on ``device``
    (fast; identical across runs on the same kind of device)."""
    x0, caption = make_clips(cfg.batch, cfg, stream_seed(seed, _TRAIN_DATA, step), device)
    g = torch.Generator().manual_seed(stream_seed(seed, _TRAIN_NOISE, step))
    t = torch.sigmoid(torch.randn(cfg.batch, generator=g)).to(device)  # logit-normal (SD3)
    gd = torch.Generator(device=device).manual_seed(stream_seed(seed, _TRAIN_NOISE, step))
    noise = torch.randn(x0.shape, generator=gd, device=device)
    return x0, caption, t, noise


def validation_set(cfg: Config, seed: int, device="cpu"):
    """``(x0, caption, t, noise)``: fixed clips of whole batches, t spread over (0.05, 0.95)."""
    n = max(1, cfg.val_clips // cfg.batch) * cfg.batch
    x0, caption = make_clips(n, cfg, stream_seed(seed, _VAL, 0), device)
    g = torch.Generator().manual_seed(stream_seed(seed, _VAL, 1))
    t = torch.linspace(0.05, 0.95, n)[torch.randperm(n, generator=g)].to(device)
    gd = torch.Generator(device=device).manual_seed(stream_seed(seed, _VAL, 2))
    noise = torch.randn(x0.shape, generator=gd, device=device)
    return x0, caption, t, noise


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


class SelfAttention(nn.Module):
    """qkv -> per-head RMS-norm of q, k -> 3D RoPE -> plain SDPA on ``[B, heads, N, head_dim]``."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm_q = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin):
        B, N, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = apply_rope(self.norm_q(q.unflatten(-1, (self.heads, self.head_dim))), cos, sin)
        k = apply_rope(self.norm_k(k.unflatten(-1, (self.heads, self.head_dim))), cos, sin)
        v = v.unflatten(-1, (self.heads, self.head_dim))
        # One dtype: under autocast the norms may leave q, k in float32 while v is bfloat16.
        q, k, v = (z.to(v.dtype).transpose(1, 2) for z in (q, k, v))  # [B, heads, N, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Video tokens (queries) attend to the caption (keys/values): N_q != N_k, stays dense."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.norm_q = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)  # starts as the identity (the residual branch is 0)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x, context):
        B, N, C = x.shape
        q = self.norm_q(self.q(x).unflatten(-1, (self.heads, self.head_dim)))
        k, v = self.kv(context).chunk(2, dim=-1)
        k = self.norm_k(k.unflatten(-1, (self.heads, self.head_dim)))
        v = v.unflatten(-1, (self.heads, self.head_dim))
        q, k, v = (z.to(v.dtype).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.cross = CrossAttention(dim, heads)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim))
        # adaLN-single: this block's learned offsets to the shared modulation (zero: identity at init).
        self.modulation = nn.Parameter(torch.zeros(6, dim))

    def forward(self, x, mod, context, cos, sin):
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation[None] + mod).unsqueeze(2).unbind(1)
        x = x + gate1 * self.attn(_modulate(self.norm1(x), shift1, scale1), cos, sin)
        x = x + self.cross(self.norm2(x), context)
        return x + gate2 * self.mlp(_modulate(self.norm3(x), shift2, scale2))


class CaptionEncoder(nn.Module):
    """Token table + position table, then an MLP over the whole flattened caption (every token
    sees the others without an attention call), projected to the model width."""

    def __init__(self, length, width, dim):
        super().__init__()
        self.table = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.randn(length, width) * 0.02)
        self.mix = nn.Sequential(nn.LayerNorm(length * width), nn.Linear(length * width, length * width), nn.GELU(),
                                 nn.Linear(length * width, length * width))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))

    def forward(self, caption):
        e = self.table(caption) + self.position[None]  # [B, L, width]
        e = e + self.mix(e.flatten(1)).view_as(e)
        return self.out(e)


class TestbedDiT(nn.Module):
    """Velocity model: ``forward(x_t [B, C, T, H, W], t [B], caption [B, L] int) -> [B, C, T, H, W]``."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        if dim % cfg.heads or (dim // cfg.heads) % 2:
            raise ValueError(f"dim {dim} must split into {cfg.heads} heads of an even size")
        self.patch_embed = nn.Conv3d(cfg.channels, dim, kernel_size=cfg.patch, stride=cfg.patch)
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))  # adaLN-single: shared
        nn.init.zeros_(self.time_modulation[1].weight)
        nn.init.zeros_(self.time_modulation[1].bias)
        self.caption = CaptionEncoder(cfg.caption_length, cfg.caption_dim, dim)
        self.blocks = nn.ModuleList(Block(dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.out_modulation = nn.Parameter(torch.zeros(2, dim))
        self.out = nn.Linear(dim, cfg.channels * math.prod(cfg.patch))
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, t, caption):
        B, C, T, H, W = x.shape
        pt, ph, pw = self.cfg.patch
        grid = (T // pt, H // ph, W // pw)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, dim], raster order
        c = self.time_mlp(timestep_embedding(t, self.cfg.dim).to(tokens.dtype))  # [B, dim]
        mod = self.time_modulation(c).view(B, 6, self.cfg.dim)
        context = self.caption(caption)  # [B, L, dim]
        cos, sin = rope_3d(grid, self.cfg.dim // self.cfg.heads, x.device, base=self.cfg.rope_base)
        for block in self.blocks:
            tokens = block(tokens, mod, context, cos, sin)
        shift, scale = (self.out_modulation[None] + c[:, None]).unsqueeze(2).unbind(1)
        out = self.out(_modulate(self.norm_out(tokens), shift, scale))  # [B, N, C * pt * ph * pw]
        out = out.view(B, *grid, C, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return out.reshape(B, C, T, H, W)


def build_model(cfg: Config, seed: int = 0) -> TestbedDiT:
    """The initial weights are a function of ``seed`` (global RNG state is restored after)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, _INIT))
        return TestbedDiT(cfg)


def parameter_count(cfg: Config) -> int:
    """Parameters of the model of ``cfg``, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in TestbedDiT(cfg).parameters())


def flow_loss(model, x0, caption, t, noise):
    """Rectified flow: ``x_t = (1 - t) x0 + t noise``, target velocity ``noise - x0``."""
    tt = t.view(-1, 1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * noise
    return F.mse_loss(model(x_t, t, caption).float(), (noise - x0).float())


@torch.no_grad()
def sample(model, noise, caption, steps, step_context=None):
    """Euler integration of the velocity from t = 1 (``noise``) to 0 with the caption as the
    conditioning; ``step_context(i)``, if given, is entered around step ``i``. Clips in [0, 1]."""
    x = noise
    for i in range(steps):
        t = torch.full((x.shape[0],), 1.0 - i / steps, device=x.device, dtype=x.dtype)
        with step_context(i) if step_context is not None else _Null():
            velocity = model(x, t, caption)
        x = x - velocity / steps
    return ((x.clamp(-1, 1) + 1) / 2).float()


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------
# Checkpoints: exact state (state.pt) and bf16 weights in shards of < 16 MiB (weights.pt, ...)
# ---------------------------------------------------------------------------------------------
STATE = "state.pt"
WEIGHTS = "weights.pt"
LOG = "log.json"
SHARD_LIMIT = 16 * 2 ** 20
#: Tensor bytes per shard: below the limit with room for torch.save's per-tensor overhead.
SHARD_BYTES = 15 * 2 ** 20


def shard_plan(sizes: dict, limit: int = SHARD_BYTES) -> list:
    """Groups of names (in order) whose byte sizes sum to at most ``limit`` each."""
    shards, current, used = [], [], 0
    for name, size in sizes.items():
        if size > limit:
            raise ValueError(f"tensor {name} has {size} bytes, more than a shard ({limit})")
        if current and used + size > limit:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current or not shards:
        shards.append(current)
    return shards


def _atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_weights(model, directory, meta: dict, limit: int = SHARD_BYTES) -> list:
    """Writes the bf16 weights: ``weights.pt`` (metadata, the shard list and the first shard's
    tensors) and ``weights.<i>.pt`` for the others. Returns the paths written."""
    tensors = {k: v.detach().to("cpu", torch.bfloat16).clone() for k, v in model.state_dict().items()}
    plan = shard_plan({k: v.numel() * v.element_size() for k, v in tensors.items()}, limit)
    names = [WEIGHTS] + [f"weights.{i}.pt" for i in range(1, len(plan))]
    paths = []
    for i in range(len(plan) - 1, -1, -1):  # the index last, so a complete weights.pt means complete shards
        obj = {"tensors": {k: tensors[k] for k in plan[i]}}
        if i == 0:
            obj.update({k: v for k, v in meta.items() if k not in ("format", "shards", "tensors")},
                       format="testbed-weights-v1", shards=names[1:])
        path = os.path.join(directory, names[i])
        _atomic_save(obj, path)
        paths.append(path)
    for stale in glob.glob(os.path.join(directory, "weights.*.pt")):
        if os.path.basename(stale) not in names:
            os.remove(stale)
    return paths[::-1]


def load_weights(path) -> tuple[dict, dict]:
    """``(state_dict in bf16, metadata)`` from ``weights.pt`` (or its directory) and its shards."""
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHTS)
    index = torch.load(path, map_location="cpu", weights_only=True)
    if index.get("format") != "testbed-weights-v1":
        raise ValueError(f"{path} is not a testbed weights file")
    tensors = dict(index.pop("tensors"))
    for name in index["shards"]:
        tensors.update(torch.load(os.path.join(os.path.dirname(path), name), map_location="cpu",
                                  weights_only=True)["tensors"])
    return tensors, index


def load_model(path, device="cpu", dtype=None):
    """``(model in eval mode, config, metadata)`` from a run directory, ``state.pt`` or ``weights.pt``.

    A directory is read through its ``weights.pt`` if present, else its ``state.pt``."""
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHTS) if os.path.exists(os.path.join(path, WEIGHTS)) else os.path.join(path, STATE)
    if os.path.basename(path).startswith("weights"):
        tensors, meta = load_weights(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=False)
        tensors, meta = state["model"], {k: state[k] for k in ("config", "step", "seed", "schedule_steps")}
    cfg = config_from_dict(meta["config"])
    model = build_model(cfg, meta.get("seed", 0))
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model.to(device=device, dtype=dtype or torch.float32).eval(), cfg, meta


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def lr_at(step: int, cfg: Config, schedule_steps: int, cooldown: tuple | None = None) -> float:
    """Linear warm-up over ``cfg.warmup_steps``, then cosine to 10 % at ``schedule_steps``; past it the
    rate stays at 10 %, unless ``cooldown = (start, end)`` (global steps past the schedule) decays it
    linearly from there to 0 at ``end``: the usual way to finish a run whose loss keeps creeping down."""
    if cooldown is not None and step >= cooldown[0]:
        start, end = cooldown
        return cfg.lr * 0.1 * max(0.0, (end - step) / max(1, end - start))
    warmup = min(cfg.warmup_steps, max(1, schedule_steps // 4))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, schedule_steps - warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def plateau(val: list, window: int = 3, rel: float = 0.005) -> dict:
    """Whether validation loss stopped improving: the best of the last ``window`` evaluations
    is not more than ``rel`` below the best before them. ``val``: ``[[step, loss], ...]``."""
    losses = [v for _, v in val]
    best_i = min(range(len(losses)), key=losses.__getitem__) if losses else None
    out = {"evaluations": len(losses), "best_step": val[best_i][0] if losses else None,
           "best": losses[best_i] if losses else None, "stopped": False, "gain": None}
    if len(losses) > window:
        before, recent = min(losses[:-window]), min(losses[-window:])
        out["gain"] = 1 - recent / before
        out["stopped"] = out["gain"] <= rel
    return out


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def evaluate(runner, val, cfg, autocast, compiled: bool) -> float:
    """Mean flow loss over the validation batches. A compiled model runs with gradients enabled
    (and discards them) so it reuses its training graph instead of compiling an inference one."""
    x0, caption, t, noise = val
    total, batches = 0.0, x0.shape[0] // cfg.batch
    with torch.enable_grad() if compiled else torch.no_grad(), autocast():
        for i in range(0, batches * cfg.batch, cfg.batch):
            sl = slice(i, i + cfg.batch)
            total += flow_loss(runner, x0[sl], caption[sl], t[sl], noise[sl]).item()
    return total / batches


def _read_log(out):
    path = os.path.join(out, LOG)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def _write_log(out, log):
    tmp = os.path.join(out, LOG + ".tmp")
    with open(tmp, "w") as f:
        json.dump(log, f)
    os.replace(tmp, os.path.join(out, LOG))


def _fmt_s(seconds):
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"


def train(args) -> dict:
    """One invocation of ``train``: fresh, or resumed from ``args.out``. Returns the log."""
    t_start = time.perf_counter()
    out = args.out
    os.makedirs(out, exist_ok=True)
    state_path, weights_path = os.path.join(out, STATE), os.path.join(out, WEIGHTS)
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    state, resumed_from = None, None
    if os.path.exists(state_path) and not args.fresh:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        resumed_from = "state"
    elif os.path.exists(weights_path) and not args.fresh:
        if not args.resume:
            raise SystemExit(f"{out} holds {WEIGHTS} but no {STATE}: pass --resume to continue from the weights "
                             "(fresh AdamW moments, not bitwise), or --fresh to start over")
        tensors, meta = load_weights(weights_path)
        state = {**meta, "model": {k: v.float() for k, v in tensors.items()}, "optimizer": None, "rng": None}
        resumed_from = "weights"
    elif args.resume:
        raise SystemExit(f"--resume: nothing to resume in {out} (no {STATE} or {WEIGHTS})")

    if state is not None:
        if args.set:
            raise SystemExit(f"--set applies to a new run only; {out} holds one (use another --out or --fresh)")
        cfg = config_from_dict(state["config"])
        seed, schedule_steps, step = state["seed"], state["schedule_steps"], state["step"]
        for name in ("seed", "schedule_steps", "batch"):
            given = getattr(args, name, None)
            have = {"seed": seed, "schedule_steps": schedule_steps, "batch": cfg.batch}[name]
            if given is not None and given != have:
                raise SystemExit(f"--{name.replace('_', '-')} {given} differs from the run in {out} ({have}); "
                                 "use another --out or --fresh")
    else:
        cfg = Config(**TINY) if args.tiny else Config()
        for item in args.set or ():
            _set_field(cfg, item)
        if args.batch:
            cfg.batch = args.batch
        seed = check_seed(0 if args.seed is None else args.seed)
        schedule_steps = args.schedule_steps or args.steps or cfg.schedule_steps
        step = 0
    for name in ("eval_every", "save_every"):
        if getattr(args, name):
            setattr(cfg, name, getattr(args, name))
    if args.past_schedule and not args.steps:
        raise SystemExit("--past-schedule needs --steps: the global step to train to past the schedule's end")
    # Past the schedule's end the learning rate stays at its final value (lr_at clamps): how one checks
    # that a finished schedule's validation loss has plateaued without restarting the schedule.
    target = args.steps if args.past_schedule else min(schedule_steps, args.steps) if args.steps else schedule_steps
    cooldown = None
    if args.cooldown_from is not None:
        if not args.past_schedule:
            raise SystemExit("--cooldown-from needs --past-schedule and --steps: it decays the rate to 0 at --steps")
        if not schedule_steps <= args.cooldown_from < target:
            raise SystemExit(f"--cooldown-from must lie in [{schedule_steps}, {target}) (the schedule's end, --steps); "
                             f"got {args.cooldown_from}")
        cooldown = (args.cooldown_from, target)
    compiled = device.startswith("cuda") if args.compile is None else args.compile
    bf16 = device.startswith("cuda") if args.bf16 is None else args.bf16
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    model = build_model(cfg, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.01)
    if state is not None:
        model.load_state_dict(state["model"])
        if state.get("rng") is not None:
            torch.set_rng_state(state["rng"])
    model.to(device)
    if state is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])  # after .to(device): the moments follow the parameters
    del state
    attention = parse_attention(args.attention)
    if attention:  # trained sparse: the backend rewrites every self-attention site
        import sparse_inductor
        from sparse_inductor.backend import sparse_inductor_backend

        runner = torch.compile(model, backend=sparse_inductor_backend)
        stack = contextlib.ExitStack()
        stack.enter_context(sparse_inductor.sparsity(min_tokens=0, **attention))
    else:
        runner = torch.compile(model) if compiled else model
        stack = contextlib.ExitStack()

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else _Null()

    log = _read_log(out) if resumed_from else None
    if log is not None and log.get("attention", "dense") != args.attention:
        raise SystemExit(f"--attention {args.attention} differs from the run in {out} ({log.get('attention', 'dense')})")
    if step >= target and log is not None:
        print(f"nothing to do: the run in {out} is at step {step} (target {target}); "
              f"{summary_verdict(log, plateau(log['val']))}")
        return log
    if log is None:
        log = {"config": asdict(cfg), "seed": seed, "schedule_steps": schedule_steps, "attention": args.attention,
               "parameters": sum(p.numel() for p in model.parameters()), "train_loss": [], "val": [], "runs": []}

    # Entries past the state's step come from a run that stopped before saving: drop them.
    log["train_loss"] = [e for e in log["train_loss"] if e[0] <= step]
    log["val"] = [e for e in log["val"] if e[0] <= step]
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    run = {"start_step": step, "resumed_from": resumed_from, "device": name, "torch": torch.__version__,
           "compiled": compiled, "bf16": bf16, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if cooldown is not None:
        run["cooldown"] = list(cooldown)
    log["runs"].append(run)
    print(f"device {device} ({name}), torch {torch.__version__}; clips {cfg.frames}x{cfg.size}x{cfg.size}, grid "
          f"{cfg.grid} = {cfg.tokens} tokens, {cfg.layers} layers, {cfg.heads} heads x {cfg.dim // cfg.heads}, "
          f"{log['parameters'] / 1e6:.2f} M parameters, batch {cfg.batch}; step {step} -> {target} of a "
          f"{schedule_steps}-step schedule" + (f" (resumed from {resumed_from})" if resumed_from else ""), flush=True)
    if resumed_from == "weights":
        print("note: resumed from bf16 weights with fresh AdamW moments: not bitwise the uninterrupted run")

    val = validation_set(cfg, seed, device)
    budget = None if args.minutes is None else 60 * args.minutes
    eval_seconds, save_seconds = 0.0, 0.0
    pending = []  # (step, loss tensor) not yet read back: one sync per few steps
    step_times, t_last, first_step_s = [], None, None
    use_bar = sys.stderr.isatty() and not args.no_progress
    bar = None
    if use_bar and step < target:
        from tqdm import tqdm

        bar = tqdm(total=target, initial=step, unit="step", dynamic_ncols=True)
    print_every = 10 if args.tiny else 50

    def flush_losses():
        if pending:
            values = torch.stack([v for _, v in pending]).tolist()
            for (s, _), value in zip(pending, values):
                if not math.isfinite(value):
                    raise RuntimeError(f"loss is {value} at step {s}")
                log["train_loss"].append([s, value])
            pending.clear()

    def save():
        nonlocal save_seconds
        t0 = time.perf_counter()
        flush_losses()
        meta = {"config": asdict(cfg), "step": step, "seed": seed, "schedule_steps": schedule_steps}
        _atomic_save({**meta, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "rng": torch.get_rng_state()}, state_path)
        save_weights(model, out, meta)
        run.update(end_step=step, seconds=time.perf_counter() - t_start,
                   ms_per_step=1e3 * _median(step_times) if step_times else None, first_step_s=first_step_s)
        log["plateau"] = plateau(log["val"])
        _write_log(out, log)
        save_seconds = max(save_seconds, time.perf_counter() - t0)

    stop_reason = "target step reached"
    stack.__enter__()
    while step < target:
        if budget is not None:
            per_step = _median(step_times) if step_times else 0.0
            # The last evaluation, save, plot and export must fit in the budget too.
            reserve = eval_seconds + save_seconds + 2 * per_step + min(5.0, 0.02 * budget)
            if time.perf_counter() - t_start + reserve > budget:
                stop_reason = f"time limit of {args.minutes} min"
                break
        x0, caption, t, noise = training_batch(cfg, seed, step, device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg, schedule_steps, cooldown)
        with autocast():
            loss = flow_loss(runner, x0, caption, t, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        pending.append((step, loss.detach()))
        if first_step_s is None:
            _sync(device)
            first_step_s = time.perf_counter() - t_start
            print(f"start-up + compile + first step: {first_step_s:.1f} s", flush=True)
            t_last, steps_at_last = time.perf_counter(), step
        if bar is not None:
            bar.update(1)
        if step % print_every == 0 or step == target:
            flush_losses()  # synchronises
            now = time.perf_counter()
            if step > steps_at_last:
                step_times += [(now - t_last) / (step - steps_at_last)] * (step - steps_at_last)
            t_last, steps_at_last = now, step
            ms = 1e3 * _median(step_times) if step_times else float("nan")
            recent = [v for _, v in log["train_loss"][-print_every:]]
            if bar is not None:
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", ms=f"{ms:.0f}")
            else:
                eta = (target - step) * ms / 1e3
                print(f"step {step}/{target}: train {sum(recent) / len(recent):.4f}  {ms:.1f} ms/step  "
                      f"elapsed {_fmt_s(now - t_start)}  to target {_fmt_s(eta)}", flush=True)
            if step - run["start_step"] == 2 * print_every and not args.tiny and step < schedule_steps:
                runs = math.ceil(max(0, schedule_steps - step) * ms / 1e3 / max(1.0, 60 * (args.minutes or 8) - 90))
                print(f"{ms:.1f} ms/step: the remaining {schedule_steps - step} steps of the schedule take "
                      f"{_fmt_s((schedule_steps - step) * ms / 1e3)}: about {runs} more run(s) of "
                      f"{args.minutes or 8} min", flush=True)
        if step % cfg.eval_every == 0 or step == target:
            t0 = time.perf_counter()
            log["val"].append([step, evaluate(runner, val, cfg, autocast, compiled)])
            eval_seconds = max(eval_seconds, time.perf_counter() - t0)
            t_last += time.perf_counter() - t0  # evaluations are not training time
            msg = f"step {step}: val {log['val'][-1][1]:.4f}"
            if bar is not None:
                bar.write(msg)
            else:
                print(msg, flush=True)
        if step % cfg.save_every == 0:
            t0 = time.perf_counter()
            save()
            t_last += time.perf_counter() - t0
    if bar is not None:
        bar.close()
    flush_losses()
    if not log["val"] or log["val"][-1][0] != step:
        log["val"].append([step, evaluate(runner, val, cfg, autocast, compiled)])
    stack.close()
    run["stop_reason"] = stop_reason
    save()
    status = plateau(log["val"])
    verdict = summary_verdict(log, status)
    print(f"stopped at step {step} ({stop_reason}); val {log['val'][-1][1]:.4f}; {verdict}")
    if args.plot:
        report(out)
    if args.export:
        export(out, args.export)
    return log


def parse_attention(spec: str) -> dict:
    """``--attention``: ``dense`` (default), ``topk:SPARSITY``, ``mass:P`` (``CumulativeMass(P)``
    with BSA's 4-tile floor), each optionally followed by ``,qk:R`` (query_keep) — the
    :func:`sparse_inductor.sparsity` keywords to train and validate under (``{}`` for dense)."""
    import sparse_inductor

    if spec in (None, "dense"):
        return {}
    settings = {}
    for part in spec.split(","):
        kind, _, value = part.partition(":")
        try:
            number = float(value)
        except ValueError:
            raise SystemExit(f"--attention {spec!r}: {part!r} needs a number, e.g. mass:0.9,qk:0.5") from None
        if kind == "topk":
            settings["sparsity"] = number
        elif kind == "mass":
            settings["policy"] = sparse_inductor.CumulativeMass(number, min_tiles=4, max_fraction=0.5)
        elif kind == "qk":
            settings["query_keep"] = number
        else:
            raise SystemExit(f"--attention {spec!r}: unknown part {kind!r} (accepted: dense, topk:S, mass:P, qk:R)")
    sparse_inductor.config.make_config(sparse_inductor.SparsityConfig(), **settings)  # validates the values
    return settings


def _set_field(cfg: Config, item: str):
    """``KEY=VALUE`` from ``--set``: a Config field, converted to the field's type."""
    key, sep, value = item.partition("=")
    kinds = {f.name: type(getattr(cfg, f.name)) for f in fields(Config)}
    if not sep or key not in kinds:
        raise SystemExit(f"--set expects KEY=VALUE with KEY one of {sorted(kinds)}, got {item!r}")
    try:
        parsed = tuple(int(v) for v in value.split(",")) if kinds[key] is tuple else kinds[key](value)
    except ValueError:
        raise SystemExit(f"--set {key}: cannot read {value!r} as {kinds[key].__name__}") from None
    setattr(cfg, key, parsed)


def summary_verdict(log, status) -> str:
    step = log["val"][-1][0] if log["val"] else 0
    if step > log["schedule_steps"]:
        cooldowns = [r["cooldown"] for r in log["runs"] if r.get("cooldown")]
        start, end = cooldowns[-1] if cooldowns else (step, None)
        head = (f"the {log['schedule_steps']}-step schedule is complete and training went on "
                f"{start - log['schedule_steps']} steps past its end at the final learning rate")
        if cooldowns:
            head += (f", then decayed it linearly to 0 from step {start} to {end}"
                     + ("" if step >= end else f" (cut off at step {step}: run the same command again to finish)"))
    elif step == log["schedule_steps"]:
        head = f"the {log['schedule_steps']}-step schedule is complete"
    else:
        head = (f"{log['schedule_steps'] - step} steps of the schedule remain: run train again with the same --out "
                "to resume")
    if status["stopped"]:
        return (f"{head}; validation loss stopped improving (best {status['best']:.4f} at step "
                f"{status['best_step']}, the last 3 evaluations gained {100 * status['gain']:.2f} % <= 0.5 %)")
    if status["gain"] is None:
        return f"{head}; too few evaluations to judge the plateau"
    return (f"{head}; validation loss is still improving (the last 3 evaluations gained "
            f"{100 * status['gain']:.2f} % over the best before them)")


def _median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else None


# ---------------------------------------------------------------------------------------------
# Report: loss curve and summary
# ---------------------------------------------------------------------------------------------
def report(out) -> str:
    """Writes ``loss_curve.png`` (train moving mean + val) and ``summary.md`` from ``log.json``."""
    log = _read_log(out)
    if log is None:
        raise SystemExit(f"no {LOG} in {out}")
    cfg = config_from_dict(log["config"])
    status = plateau(log["val"])
    lines = [f"# Testbed DiT training ({out})", "",
             f"Model: {cfg.layers} layers, dim {cfg.dim} = {cfg.heads} heads x {cfg.dim // cfg.heads}, "
             f"{log['parameters'] / 1e6:.2f} M parameters; clips {cfg.frames}x{cfg.size}x{cfg.size}, grid "
             f"{cfg.grid} = {cfg.tokens} tokens; batch {cfg.batch}; seed {log['seed']}; "
             f"{log['schedule_steps']}-step schedule (lr {cfg.lr}, warm-up {cfg.warmup_steps}).", "",
             "| run | device | torch | steps | resumed from | start-up + first step | ms/step | wall | stopped by |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(log["runs"]):
        lines.append(f"| {i} | {r['device']} | {r['torch']} | {r['start_step']} -> {r.get('end_step', '?')} | "
                     f"{r['resumed_from'] or ''} | {_num(r.get('first_step_s'), '.1f')} s | "
                     f"{_num(r.get('ms_per_step'), '.1f')} | {_num(r.get('seconds'), '.0f')} s | "
                     f"{r.get('stop_reason', '')} |")
    lines += ["", "| step | val loss |", "|---|---|"] + [f"| {s} | {v:.4f} |" for s, v in log["val"]]
    lines += ["", f"**Status:** {summary_verdict(log, status)}." if log["val"] else "**Status:** no evaluation yet."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return text
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    if log["train_loss"]:
        steps, losses = zip(*log["train_loss"])
        window = max(1, min(100, len(losses) // 20))
        csum = [0.0]
        for value in losses:
            csum.append(csum[-1] + value)
        smooth = [(csum[i + 1] - csum[max(0, i - window + 1)]) / (i + 1 - max(0, i - window + 1))
                  for i in range(len(losses))]
        ax.plot(steps, smooth, linewidth=1, label=f"train (moving mean of {window})")
    if log["val"]:
        ax.plot(*zip(*log["val"]), marker=".", linewidth=1, label="validation")
    for r in log["runs"][1:]:
        ax.axvline(r["start_step"], color="grey", alpha=0.3, linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    ax.set_title(f"testbed DiT ({log['parameters'] / 1e6:.1f} M, grid {cfg.grid}); grey: resumed runs", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_curve.png"), dpi=90)
    plt.close(fig)
    return text


def _num(x, spec):
    return "" if x is None else format(x, spec)


def export(out, dest):
    """Copies the small files (weights shards, log, plot, summary) to ``dest``."""
    import shutil

    os.makedirs(dest, exist_ok=True)
    names = [WEIGHTS, LOG, "loss_curve.png", "summary.md"] + [os.path.basename(p) for p in
                                                             glob.glob(os.path.join(out, "weights.*.pt"))]
    for name in names:
        if os.path.exists(os.path.join(out, name)):
            shutil.copy2(os.path.join(out, name), os.path.join(dest, name))


# ---------------------------------------------------------------------------------------------
# What `python -m sparse_inductor fidelity` and the census call
# ---------------------------------------------------------------------------------------------
def eval_inputs(cfg: Config, seed: int, device, dtype=torch.float32, clips: int = 4, ts=(0.2, 0.4, 0.6, 0.8)):
    """``(x_t, t, caption)``: the first validation clips noised at ``ts`` (one t per clip, cycled)."""
    x0, caption, _, noise = validation_set(cfg, seed, device)
    n = min(clips, x0.shape[0])
    t = torch.tensor([ts[i % len(ts)] for i in range(n)], device=device, dtype=torch.float32)
    tt = t.view(-1, 1, 1, 1, 1)
    x_t = (1 - tt) * x0[:n] + tt * noise[:n]
    return x_t.to(dtype), t.to(dtype), caption[:n]


def setup(checkpoint=None, device=None, dtype=None):
    """What ``python -m sparse_inductor fidelity examples/testbed_dit.py:setup --checkpoint
    runs/testbed`` measures: the trained model, 4 validation clips noised at t = 0.2, 0.4, 0.6,
    0.8 with their captions (``kwargs``), and a sampler of those 4 captions from fixed noise
    (Euler, 20 steps; 4 for the tiny model). ``dtype`` (e.g. ``torch.bfloat16``) casts the
    model and the float inputs."""
    if checkpoint is None:
        raise ValueError("setup needs checkpoint=DIR or a weights.pt/state.pt written by examples/testbed_dit.py")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or torch.float32
    model, cfg, meta = load_model(checkpoint, device, dtype)
    x_t, t, caption = eval_inputs(cfg, meta.get("seed", 0), device, dtype)
    g = torch.Generator(device=device).manual_seed(stream_seed(meta.get("seed", 0), _SAMPLE))
    noise = torch.randn(x_t.shape, generator=g, device=device).to(dtype)
    steps = 4 if cfg.tokens < 1024 else 20

    def sample_fn(model, step_context):
        return sample(model, noise, caption, steps, step_context)

    return {"model": model, "inputs": (x_t, t), "kwargs": {"caption": caption}, "sample_fn": sample_fn,
            "peak": 1.0}


def explain_sites(model, cfg: Config, device="cpu", sparsity: float = 0.875):
    """``sparse_inductor.explain`` of the model on one clip, under ``sparsity(sparsity, min_tokens=0)``."""
    import sparse_inductor

    x = torch.zeros(1, cfg.channels, cfg.frames, cfg.size, cfg.size, device=device)
    caption = torch.zeros(1, cfg.caption_length, dtype=torch.long, device=device)
    with sparse_inductor.sparsity(sparsity, min_tokens=0), torch.no_grad():
        return sparse_inductor.explain(model, x, torch.zeros(1, device=device), caption=caption)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train, or resume the run in --out")
    tr.add_argument("--out", required=True, help="run directory: state.pt, weights*.pt, log.json, plot, summary")
    tr.add_argument("--tiny", action="store_true", help="the tiny CPU configuration of the tests")
    tr.add_argument("--steps", type=int, help="stop at this global step (default: the schedule's end)")
    tr.add_argument("--past-schedule", action="store_true",
                    help="let --steps go past the schedule's end, at its final learning rate (10 %%): the plateau check")
    tr.add_argument("--cooldown-from", type=int, metavar="STEP",
                    help="with --past-schedule: decay the learning rate linearly from its final 10 %% at global "
                         "step STEP to 0 at --steps (repeat the same flags to resume a cut-off cooldown)")
    tr.add_argument("--minutes", type=float, help="wall-clock budget of this invocation, start-up and compile included")
    tr.add_argument("--schedule-steps", type=int, help="length of the lr schedule (a new run only; default 3000, "
                                                       "tiny 20, or --steps if given)")
    tr.add_argument("--seed", type=int, help="data, noise and initial weights (a new run only; default 0)")
    tr.add_argument("--batch", type=int, help="a new run only (default 4; tiny 2)")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="a new run only: override a Config field, e.g. --set layers=8 --set size=64")
    tr.add_argument("--eval-every", type=int)
    tr.add_argument("--save-every", type=int)
    tr.add_argument("--resume", action="store_true", help="continue; needed to resume from weights.pt alone")
    tr.add_argument("--fresh", action="store_true", help="start over, overwriting what is in --out")
    tr.add_argument("--attention", default="dense",
                    help="dense (default) or train through backend='sparse_inductor' under topk:S / mass:P, "
                         "optionally ,qk:R (query_keep), e.g. mass:0.9,qk:0.5 (BSA's setting); a new run only")
    tr.add_argument("--device", help="default: cuda if available (cpu with --tiny)")
    tr.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    tr.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    tr.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                    help="write loss_curve.png and summary.md at the end (default on)")
    tr.add_argument("--export", metavar="DIR", help="copy weights shards, log, plot and summary to DIR at the end")
    tr.add_argument("--no-progress", action="store_true", help="periodic lines instead of a tqdm bar")
    rp = sub.add_parser("report", help="loss_curve.png and summary.md from --out/log.json")
    rp.add_argument("--out", required=True)
    rp.add_argument("--export", metavar="DIR")
    ex = sub.add_parser("explain", help="print sparse_inductor.explain() of the model's attention sites")
    ex.add_argument("--tiny", action="store_true")
    ex.add_argument("--checkpoint")
    args = parser.parse_args(argv)
    if getattr(args, "tiny", False) and not torch.cuda.is_available():
        # The tiny model's tensors are too small for intra-op threads, and threads slow down
        # many-fold when another process keeps a core busy.
        torch.set_num_threads(1)
    if args.command == "train":
        for name in ("steps", "schedule_steps", "batch", "eval_every", "save_every"):
            value = getattr(args, name)
            if value is not None and value < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if args.minutes is not None and args.minutes <= 0:
            parser.error(f"--minutes must be > 0, got {args.minutes}")
        return train(args)
    if args.command == "report":
        print(report(args.out))
        if args.export:
            export(args.out, args.export)
        return None
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.checkpoint:
        model, cfg, _ = load_model(args.checkpoint, device)
    else:
        cfg = Config(**TINY) if args.tiny else Config()
        model = build_model(cfg).to(device)
    print(explain_sites(model, cfg, device))
    return None


if __name__ == "__main__":
    main()
