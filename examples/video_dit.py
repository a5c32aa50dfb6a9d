"""A small 3D video DiT (used by the demo and the compiler tests), with the variations real
models show:
Conv3d (channels-first) or reshape+Linear (channels-last) patchify, 3D RoPE built from
``arange`` grids, q/k/v as ``[B, N, H, D]`` transposed or reshaped straight to ``[B, H, N, D]``,
self-attention through SDPA (optionally joint with a text span before or after the video),
cross-attention to text, an MLP.

``self_attention_fn`` lets a test swap the self-attention for the eager sparse op.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def rope_3d(grid, head_dim, device, base=10000):
    """cos/sin ``[N, head_dim]`` for a 3D grid: the head dim is split over t, h, w."""
    T, H, W = grid
    parts = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]
    t, h, w = torch.meshgrid(torch.arange(T, device=device), torch.arange(H, device=device),
                             torch.arange(W, device=device), indexing="ij")
    angles = []
    for pos, n in zip((t, h, w), parts):
        freqs = 1.0 / (base ** (torch.arange(n, device=device, dtype=torch.float32) / max(n, 1)))
        angles.append(pos.reshape(-1, 1).float() * freqs)
    angles = torch.cat(angles, dim=-1).repeat_interleave(2, dim=-1)  # [N, head_dim]
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x: [B, N, heads, D]; rotate pairs."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


class Block(nn.Module):
    def __init__(self, dim, heads, text_dim, qkv_layout, joint):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv_layout, self.joint = qkv_layout, joint
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_q = nn.Linear(dim, dim)
        self.cross_kv = nn.Linear(text_dim, 2 * dim)
        self.cross_out = nn.Linear(dim, dim)
        self.text_qkv = nn.Linear(text_dim, 3 * dim) if joint else None
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.self_attention_fn = F.scaled_dot_product_attention

    def _heads(self, x):
        B, N, _ = x.shape
        if self.qkv_layout == "bnhd":
            return x.view(B, N, self.heads, self.head_dim).transpose(1, 2)
        return x.reshape(B, N, self.heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, x, text, cos, sin):
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q = apply_rope(q.unflatten(-1, (self.heads, self.head_dim)), cos, sin).flatten(-2)
        k = apply_rope(k.unflatten(-1, (self.heads, self.head_dim)), cos, sin).flatten(-2)
        if self.joint:
            tq, tk, tv = self.text_qkv(text).chunk(3, dim=-1)
            join = (lambda a, b: torch.cat([b, a], dim=1)) if self.joint == "before" else \
                (lambda a, b: torch.cat([a, b], dim=1))
            q, k, v = join(q, tq), join(k, tk), join(v, tv)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        attn = self.self_attention_fn(q, k, v)
        attn = attn.transpose(1, 2).reshape(B, -1, C)
        if self.joint == "before":
            attn = attn[:, text.shape[1]:]
        elif self.joint == "after":
            attn = attn[:, :N]
        x = x + self.proj(attn)
        # cross-attention to the text (query tokens != key tokens: stays dense)
        cq = self._heads(self.cross_q(self.norm2(x)))
        ck, cv = (self._heads(t) for t in self.cross_kv(text).chunk(2, dim=-1))
        x = x + self.cross_out(F.scaled_dot_product_attention(cq, ck, cv).transpose(1, 2).reshape(B, N, C))
        return x + self.mlp(self.norm3(x))


class TinyVideoDiT(nn.Module):
    def __init__(self, in_channels=4, dim=32, heads=2, layers=2, patch=(1, 2, 2), text_dim=16,
                 channels_last=False, qkv_layout="bnhd", joint=None):
        super().__init__()
        self.patch, self.channels_last = patch, channels_last
        self.heads, self.dim = heads, dim
        if channels_last:
            self.patch_embed = nn.Linear(in_channels * math.prod(patch), dim)
        else:
            self.patch_embed = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)
        self.blocks = nn.ModuleList(Block(dim, heads, text_dim, qkv_layout, joint) for _ in range(layers))
        self.norm_out = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, in_channels * math.prod(patch))

    def forward(self, latents, text):
        """latents ``[B, C, T, H, W]``, text ``[B, L, text_dim]`` -> tokens ``[B, N, C*p]``."""
        B, C, T, H, W = latents.shape
        pt, ph, pw = self.patch
        grid = (T // pt, H // ph, W // pw)
        if self.channels_last:
            x = latents.permute(0, 2, 3, 4, 1)  # [B, T, H, W, C]
            x = x.reshape(B, grid[0], pt, grid[1], ph, grid[2], pw, C)
            x = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(B, grid[0], grid[1], grid[2], -1)
            x = self.patch_embed(x).reshape(B, -1, self.dim)
        else:
            x = self.patch_embed(latents).flatten(2).transpose(1, 2)
        cos, sin = rope_3d(grid, self.dim // self.heads, latents.device)
        for block in self.blocks:
            x = block(x, text, cos, sin)
        return self.out(self.norm_out(x))

    def use_self_attention(self, fn):
        for block in self.blocks:
            block.self_attention_fn = fn
