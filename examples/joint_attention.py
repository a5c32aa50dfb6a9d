"""A joint text+video attention model (diffusers CogVideoX) compiled with backend="sparse_inductor".

CogVideoX's self-attention runs over ``[226 text tokens | video tokens]``. The pass finds the
video span behind the concatenation; video query tiles attend to their top-k video tiles plus
every text token, text queries attend to everything (DESIGN.md §3.5). One denoising step at
sparsity 0.875 is timed against backend="inductor" in the same process.

    python examples/joint_attention.py           # GPU: CogVideoX-2B architecture, 49 frames at 480x720
    python examples/joint_attention.py --tiny    # CPU: a tiny CogVideoX configuration

Weights are random unless --checkpoint names a local diffusers checkpoint (nothing is downloaded).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import compare  # noqa: E402

# CogVideoX-2B is diffusers' default CogVideoXTransformer3DModel configuration: 30 layers,
# 30 heads x 64, patch 2, 226 text tokens; 49 frames at 480x720 give a 13x60x90 latent, so the
# video grid is 13x30x45 (17,550 tokens) behind 226 text tokens.
COGVIDEOX_2B = dict()
LATENT_2B = (1, 13, 16, 60, 90)  # [B, frames, channels, H, W]
TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2,
            patch_size=2, text_embed_dim=32, time_embed_dim=32, sample_height=16, sample_width=16,
            sample_frames=17, max_text_seq_length=7)
LATENT_TINY = (1, 5, 4, 16, 16)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configuration on CPU (also on a GPU machine)")
    parser.add_argument("--checkpoint", help="a local diffusers CogVideoX checkpoint directory")
    parser.add_argument("--sparsity", type=float, default=0.875)
    args = parser.parse_args()
    from diffusers import CogVideoXTransformer3DModel

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.checkpoint:
        model = CogVideoXTransformer3DModel.from_pretrained(args.checkpoint, subfolder="transformer",
                                                            local_files_only=True)
    else:
        torch.manual_seed(0)
        model = CogVideoXTransformer3DModel(**(TINY if args.tiny else COGVIDEOX_2B))
    model = model.to(device, dtype).eval()
    cfg = model.config
    latents = torch.randn(LATENT_TINY if device == "cpu" else LATENT_2B, device=device, dtype=dtype)
    text = torch.randn(1, cfg.max_text_seq_length, cfg.text_embed_dim, device=device, dtype=dtype)
    step = dict(encoder_hidden_states=text, timestep=torch.tensor([999], device=device), return_dict=False)
    print(f"CogVideoX transformer: {cfg.num_layers} layers, {cfg.num_attention_heads} heads x "
          f"{cfg.attention_head_dim}, latent {list(latents.shape)}, {cfg.max_text_seq_length} text tokens, "
          f"{dtype}, {device}")
    compare(model, (latents,), step, device, args.sparsity)


if __name__ == "__main__":
    main()
