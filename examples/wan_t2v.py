"""The diffusers Wan 2.1 text-to-video transformer, compiled with backend="sparse_inductor".

Times one denoising step at sparsity 0.875 against backend="inductor" (dense) in the same
process, prints explain(), compile time and peak memory of both, and runs a short sampling loop
with a dense warm-up (the first steps dense through the context manager).

    python examples/wan_t2v.py                    # GPU: Wan-1.3B architecture, 480p, 81 frames
    python examples/wan_t2v.py --tiny             # CPU: a tiny Wan configuration
    python examples/wan_t2v.py --checkpoint DIR   # local diffusers checkpoint (nothing is downloaded)
    python examples/wan_t2v.py --tile 4 4 8       # 128-token tiles

Without a checkpoint the weights are random (attention close to uniform, the hardest case for any
selection): the error printed is not the quality on the trained model.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import sparse_inductor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import compare  # noqa: E402

# Wan2.1-T2V-1.3B's transformer config (diffusers WanTransformer3DModel).
WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
TINY = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
)
# 480p, 81 frames: the VAE gives a 21x60x104 latent; patches (1, 2, 2) make the 21x30x52 grid.
LATENT_480P = (1, 16, 21, 60, 104)
LATENT_TINY = (1, 16, 5, 16, 16)


def build(args, device, dtype):
    from diffusers import WanTransformer3DModel

    if args.checkpoint:
        model = WanTransformer3DModel.from_pretrained(args.checkpoint, subfolder="transformer", local_files_only=True)
    else:
        torch.manual_seed(0)
        model = WanTransformer3DModel(**(TINY if args.tiny else WAN_1_3B))
    return model.to(device, dtype).eval()


def sample(model, latents, text, steps, warmup, sparsity, tile=(4, 4, 4)):
    """A flow-matching Euler loop; the first ``warmup`` steps run dense (sparsity 0)."""
    x = latents
    for i in range(steps):
        t = 1.0 - i / steps
        level = 0.0 if i < warmup else sparsity
        with sparse_inductor.sparsity(level, min_tokens=0, tile=tile):
            start = time.perf_counter()
            velocity = model(x, timestep=torch.full((x.shape[0],), t * 1000, device=x.device), encoder_hidden_states=text,
                             return_dict=False)[0]
            if x.is_cuda:
                torch.cuda.synchronize()
            print(f"  step {i}: sparsity {level:<6} {1e3 * (time.perf_counter() - start):8.1f} ms")
        x = x - velocity / steps
    return x


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configuration on CPU (also on a GPU machine)")
    parser.add_argument("--checkpoint", help="a local diffusers Wan checkpoint directory (random weights without)")
    parser.add_argument("--sparsity", type=float, default=0.875)
    parser.add_argument("--steps", type=int, default=4, help="steps of the sampling loop")
    parser.add_argument("--warmup", type=int, default=1, help="dense steps at the start of the loop")
    parser.add_argument("--tile", type=int, nargs=3, default=(4, 4, 4), metavar=("T", "H", "W"),
                        help="tile shape; 4 4 8 gives 128-token tiles (faster kernels on Hopper, RESULTS.md)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build(args, device, dtype)
    cfg = model.config
    latents = torch.randn(LATENT_TINY if device == "cpu" else LATENT_480P, device=device, dtype=dtype)
    text = torch.randn(1, 7 if device == "cpu" else 512, cfg.text_dim, device=device, dtype=dtype)
    timestep = torch.tensor([999.0], device=device)
    step = dict(timestep=timestep, encoder_hidden_states=text, return_dict=False)
    print(f"Wan transformer: {cfg.num_layers} layers, {cfg.num_attention_heads} heads x {cfg.attention_head_dim}, "
          f"latent {list(latents.shape)}, {dtype}, {device}")

    tile = tuple(args.tile)
    sparse_model = compare(model, (latents,), step, device, args.sparsity, tile)
    with torch.no_grad():
        print(f"sampling {args.steps} steps, the first {args.warmup} dense:")
        sample(sparse_model, latents, text, args.steps, args.warmup, args.sparsity, tile)


if __name__ == "__main__":
    main()
