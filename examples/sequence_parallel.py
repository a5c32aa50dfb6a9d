"""Sparse attention under Ulysses sequence parallelism: a Wan-like video DiT over several processes.

Each rank holds 1/P of the video tokens. Before self-attention an all-to-all gives every rank all
the tokens for H/P of the heads (Ulysses), a second one after it brings back the rank's tokens.
The model is compiled with ``backend="sparse_inductor"`` as on one process: the pass sees the
all-to-alls in the graph, finds the (T, H, W) grid of the patch embedding that ran before the
sequence was split, and each rank's attention becomes sparse over the whole sequence with its
heads (selection is per head, so it is the selection of the single-process model). Prints each
rank's ``explain()``, the step time and the error against the same model on one process.

    python examples/sequence_parallel.py --nproc 2              # CPU: gloo, a tiny model
    torchrun --nproc-per-node 2 examples/sequence_parallel.py   # GPUs: NCCL, Wan-1.3B sizes at 480p

``--impl functional`` (default) is a Wan-like DiT (``video_dit.TinyVideoDiT``: Conv3d patch
embedding, 3D RoPE, self- and cross-attention) whose self-attention calls the functional
collectives around ``F.scaled_dot_product_attention`` (the xDiT / FastVideo pattern).
``--impl diffusers`` is diffusers' ``WanTransformer3DModel`` under its own context parallelism
(``enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))``); its hooks break the
graph inside the model's block loop, so the patch embedding runs outside every compiled graph and
the grid is passed as ``sparsity(grid=...)``.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from video_dit import TinyVideoDiT, rope_3d  # noqa: E402

# Model sizes: (dim, heads, layers, text_dim, latent [B, C, T, H, W], text tokens).
SIZES = {
    "tiny": dict(dim=64, heads=4, layers=2, text_dim=16, latent=(1, 4, 4, 16, 24), text=7),
    # Wan2.1-T2V-1.3B's attention sizes: 12 heads of 128, 30 blocks; 480p x 81 frames gives the
    # 21x60x104 latent and the 21x30x52 grid.
    "wan1.3b": dict(dim=1536, heads=12, layers=30, text_dim=4096, latent=(1, 16, 21, 60, 104), text=512),
}


# ---------------------------------------------------------------------------------------------
# Ulysses with functional collectives
# ---------------------------------------------------------------------------------------------
def _all_to_all(x, group):
    """Slab ``j`` of axis 0 to rank ``j``; slab ``j`` of the result came from rank ``j``."""
    import torch.distributed._functional_collectives as funcol

    exchange = getattr(funcol, "all_to_all_single_autograd", funcol.all_to_all_single)
    return funcol.wait_tensor(exchange(x.contiguous(), None, None, group))


def gather_sequence(x, group):
    """``[B, H, n, D]`` (this rank's tokens, every head) -> ``[B, H/P, P*n, D]`` (every token,
    this rank's heads)."""
    P = dist.get_world_size(group)
    B, H, n, D = x.shape
    x = x.reshape(B, P, H // P, n, D).permute(1, 3, 0, 2, 4)  # [P, n, B, H/P, D]: head group j to rank j
    x = _all_to_all(x, group)  # [P, n, B, H/P, D]: the tokens of rank j
    return x.permute(2, 3, 0, 1, 4).reshape(B, H // P, P * n, D)


def scatter_sequence(x, group):
    """The inverse: ``[B, H/P, N, D]`` -> ``[B, H, N/P, D]``."""
    P = dist.get_world_size(group)
    B, h, N, D = x.shape
    x = x.reshape(B, h, P, N // P, D).permute(2, 0, 1, 3, 4)  # [P, B, h, n, D]: the tokens of rank j to it
    x = _all_to_all(x, group)  # [P, B, h, n, D]: head group j, from rank j
    return x.permute(1, 0, 2, 3, 4).reshape(B, P * h, N // P, D)


def shard(x, dim, group):
    """This rank's contiguous chunk of ``x`` along ``dim``."""
    return x.chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)]


class UlyssesVideoDiT(TinyVideoDiT):
    """``TinyVideoDiT`` with its tokens sharded across the ranks of ``group`` after the patch
    embedding and Ulysses all-to-alls around each self-attention; the same parameters give the
    same function as the single-process model."""

    def __init__(self, *args, group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group if group is not None else dist.group.WORLD

        def ulysses_attention(q, k, v):
            q, k, v = (gather_sequence(t, self.group) for t in (q, k, v))
            return scatter_sequence(F.scaled_dot_product_attention(q, k, v), self.group)

        self.use_self_attention(ulysses_attention)

    def forward(self, latents, text):
        import torch.distributed._functional_collectives as funcol

        T, H, W = latents.shape[2:]
        pt, ph, pw = self.patch
        grid = (T // pt, H // ph, W // pw)
        x = self.patch_embed(latents).flatten(2).transpose(1, 2)  # [B, N, dim]: the whole sequence
        cos, sin = rope_3d(grid, self.dim // self.heads, latents.device)
        x, cos, sin = shard(x, 1, self.group), shard(cos, 0, self.group), shard(sin, 0, self.group)
        for block in self.blocks:
            x = block(x, text, cos, sin)
        out = self.out(self.norm_out(x))
        gather = getattr(funcol, "all_gather_tensor_autograd", funcol.all_gather_tensor)
        return gather(out.contiguous(), 1, self.group)


# ---------------------------------------------------------------------------------------------
# The run on each rank
# ---------------------------------------------------------------------------------------------
def build_functional(size, device, dtype, group, layers=None):
    cfg = SIZES[size]
    torch.manual_seed(0)
    kwargs = dict(in_channels=cfg["latent"][1], dim=cfg["dim"], heads=cfg["heads"], layers=layers or cfg["layers"],
                  text_dim=cfg["text_dim"])
    single = TinyVideoDiT(**kwargs).to(device, dtype).eval()
    parallel = UlyssesVideoDiT(**kwargs, group=group).to(device, dtype).eval()
    parallel.load_state_dict(single.state_dict())
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(*cfg["latent"], generator=g).to(device, dtype)
    text = torch.randn(cfg["latent"][0], cfg["text"], cfg["text_dim"], generator=g).to(device, dtype)
    grid = tuple(n // p for n, p in zip(cfg["latent"][2:], (1, 2, 2)))
    return single, parallel, (latents, text), {}, grid


def build_diffusers(size, device, dtype, group, layers=None):
    import diffusers.hooks.context_parallel as cp_hooks
    from diffusers import ContextParallelConfig, WanTransformer3DModel
    from wan_t2v import LATENT_480P, LATENT_TINY, TINY, WAN_1_3B

    if device.type == "cpu":
        # diffusers picks the rank's device as rank % torch.accelerator.device_count(): 0 on a
        # CPU-only machine. Report one (CPU) device; gloo does the communication.
        torch.accelerator.device_count = lambda: 1
    if not hasattr(cp_hooks.logger, "warning_once"):  # diffusers 0.42.1 calls it for Wan 2.1's 1-d timestep
        cp_hooks.logger.warning_once = cp_hooks.logger.warning
    config, latent = (TINY, LATENT_TINY) if size == "tiny" else (WAN_1_3B, LATENT_480P)
    config = dict(config, num_layers=layers or config["num_layers"])
    torch.manual_seed(0)
    single = WanTransformer3DModel(**config).to(device, dtype).eval()
    parallel = WanTransformer3DModel(**config).to(device, dtype).eval()
    parallel.load_state_dict(single.state_dict())
    parallel.enable_parallelism(config=ContextParallelConfig(ulysses_degree=dist.get_world_size(group)))
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(*latent, generator=g).to(device, dtype)
    text = torch.randn(latent[0], 7 if size == "tiny" else 512, config["text_dim"], generator=g).to(device, dtype)
    kwargs = dict(timestep=torch.full((latent[0],), 500.0, device=device), encoder_hidden_states=text,
                  return_dict=False)
    grid = tuple(n // p for n, p in zip(latent[2:], config["patch_size"]))
    return single, parallel, (latents,), kwargs, grid


def _output(result):
    return result[0] if isinstance(result, (tuple, list)) else result


def _timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return out, 1e3 * statistics.median(times)


def run(rank, world, args, device):
    import sparse_inductor

    group = dist.group.WORLD
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    build = build_functional if args.impl == "functional" else build_diffusers
    single, parallel, inputs, kwargs, grid = build(args.size, device, dtype, group, args.layers)
    # The functional model's graph proves its grid; diffusers' patch embedding runs outside the graphs.
    options = dict(min_tokens=0, grid=grid if args.impl == "diffusers" else None)
    with torch.no_grad(), sparse_inductor.sparsity(args.sparsity, **options):
        explanation = sparse_inductor.explain(parallel, *inputs, **kwargs)
        compiled = torch.compile(parallel, backend="sparse_inductor")
        start = time.perf_counter()
        _output(compiled(*inputs, **kwargs))
        compile_s = time.perf_counter() - start
        out, step_ms = _timed(lambda: _output(compiled(*inputs, **kwargs)), device, args.repeats)
        # The same model on one process (every rank computes it alone), sparse through the backend.
        # A fresh Dynamo first: code shared by both models (the blocks' forward), seen with the
        # shards' token count, would recompile with a symbolic count (automatic dynamic shapes).
        torch.compiler.reset()
        reference = torch.compile(single, backend="sparse_inductor")
        expected = _output(reference(*inputs, **kwargs))
        _, single_ms = _timed(lambda: _output(reference(*inputs, **kwargs)), device, args.repeats)
    error = (out.float() - expected.float()).abs().max().item() / max(expected.float().abs().max().item(), 1e-30)
    for r in range(world):  # one rank at a time
        dist.barrier()
        if r == rank:
            print(f"--- rank {rank} of {world} ({device}, {dtype}, {args.impl} {args.size}, grid {grid}, "
                  f"sparsity {args.sparsity})")
            print(explanation)
            print(f"compile + first step {compile_s:.1f} s; step {step_ms:.2f} ms under Ulysses (degree {world}), "
                  f"{single_ms:.2f} ms on one process")
            print(f"max error vs the single-process sparse model (relative to its max |out|): {error:.3e}", flush=True)
    dist.barrier()
    return error


def _worker(rank, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run(rank, world, args, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=("functional", "diffusers"), default="functional")
    parser.add_argument("--size", choices=tuple(SIZES), default=None, help="default: tiny on CPU, wan1.3b on GPUs")
    parser.add_argument("--nproc", type=int, default=2, help="processes to spawn on CPU (without torchrun)")
    parser.add_argument("--sparsity", type=float, default=0.875)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=None, help="fewer transformer blocks (shorter compiles)")
    args = parser.parse_args(argv)
    if "RANK" in os.environ:  # torchrun: one process per GPU, NCCL
        use_cuda = torch.cuda.is_available()
        args.size = args.size or ("wan1.3b" if use_cuda else "tiny")
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        try:
            run(rank, world, args, device)
        finally:
            dist.destroy_process_group()
        return
    args.size = args.size or "tiny"
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(args.nproc, _free_port(), args), nprocs=args.nproc, start_method="spawn")


if __name__ == "__main__":
    main()
