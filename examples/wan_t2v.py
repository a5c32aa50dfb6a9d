"""The diffusers Wan 2.1 text-to-video transformer, compiled with backend="sparse_inductor".

Times one denoising step at sparsity 0.875 against backend="inductor" (dense) in the same
process, prints explain(), compile time and peak memory of both, and runs a short sampling loop
with a dense warm-up (the first steps dense through the context manager).

    python examples/wan_t2v.py                    # GPU: Wan-1.3B architecture, 480p, 81 frames
    python examples/wan_t2v.py --tiny             # CPU: a tiny Wan configuration
    python examples/wan_t2v.py --checkpoint DIR   # local diffusers checkpoint (nothing is downloaded)

Without a checkpoint the weights are random (attention close to uniform, the hardest case for any
selection): the error printed is not the quality on the trained model.
"""
from __future__ import annotations

import argparse
import time

import torch

import sparse_inductor

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


def timed(fn, device, repeats=3):
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=1, rep=repeats * 1000 // 2, return_mode="median")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def first_call(fn, device):
    """Seconds for compile + first call, and the peak memory of a second call (bytes, GPU only)."""
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    return seconds, peak


def sample(model, latents, text, steps, warmup, sparsity):
    """A flow-matching Euler loop; the first ``warmup`` steps run dense (sparsity 0)."""
    x = latents
    for i in range(steps):
        t = 1.0 - i / steps
        level = 0.0 if i < warmup else sparsity
        with sparse_inductor.sparsity(level):
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

    sparse_model = torch.compile(model, backend="sparse_inductor")
    dense_model = torch.compile(model, backend="inductor")
    # min_tokens=0 so that the tiny model is rewritten too (real sizes pass the default anyway).
    with torch.no_grad(), sparse_inductor.sparsity(args.sparsity, min_tokens=0):
        print(sparse_inductor.explain(model, latents, **step))
        sparse_s, sparse_peak = first_call(lambda: sparse_model(latents, **step), device)
        dense_s, dense_peak = first_call(lambda: dense_model(latents, **step), device)
        sparse_out = sparse_model(latents, **step)[0]
        dense_out = dense_model(latents, **step)[0]
        sparse_ms = timed(lambda: sparse_model(latents, **step), device)
        dense_ms = timed(lambda: dense_model(latents, **step), device)
        rel = ((sparse_out.float() - dense_out.float()).norm() / dense_out.float().norm()).item()

        print(f"compile + first call: inductor {dense_s:.1f} s, sparse_inductor {sparse_s:.1f} s "
              f"({sparse_s / dense_s:.2f}x)")
        if device == "cuda":
            print(f"peak memory of a step: inductor {dense_peak / 2**30:.2f} GiB, "
                  f"sparse_inductor {sparse_peak / 2**30:.2f} GiB")
        print(f"output relative L2 vs dense: {rel:.3e}")
        print(f"denoising step: inductor {dense_ms:.1f} ms, sparse_inductor {sparse_ms:.1f} ms, "
              f"speedup {dense_ms / sparse_ms:.2f}x")

        print(f"sampling {args.steps} steps, the first {args.warmup} dense:")
        sample(sparse_model, latents, text, args.steps, args.warmup, args.sparsity)


if __name__ == "__main__":
    main()
