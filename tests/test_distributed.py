"""Sparse attention under torch.distributed on CPU (gloo), processes spawned from pytest.

Ulysses sequence parallelism with the functional collectives (the xDiT / FastVideo pattern): the
grid walk sees through the all-to-alls, each rank's attention is sparse over the whole sequence
with H/P heads and equals the single-process sparse model (float64, to 1e-10: the selection is
per head, so it does not depend on the sharding). Ring-style attention (keys exchanged between
ranks), uneven splits and out-of-order shards stay dense with their reasons. FSDP2 training
through the backend matches one process. diffusers' own context parallelism is traced on CPU
too; its compiled run is a GPU test.

Every spawn is bounded in time (a hang fails the test) and runs several checks, so each world
size starts its processes once.
"""
from __future__ import annotations

import datetime
import os
import queue
import socket
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, ROOT)

from sequence_parallel import gather_sequence, scatter_sequence, shard  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo")

GRID = (4, 4, 8)  # T, H, W after the (1, 2, 2) patch embedding: 128 tokens, 2 tiles of 4x4x4
LATENT = (2, 4, 4, 8, 16)
SPARSITY = 0.75
F64_TOL = dict(rtol=0, atol=1e-10)  # float64: the sharded and the single-process runs agree to rounding


# ---------------------------------------------------------------------------------------------
# Spawning
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, results, timeout):
    os.environ.pop("TRITON_INTERPRET", None)  # the CPU op runs in torch; nothing to interpret
    sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        torch.manual_seed(0)
        results.put((rank, True, fn(rank, world)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world: int, timeout: float = 240.0) -> list:
    """Run ``fn(rank, world)`` in ``world`` processes joined by gloo; its return values by rank.
    A failure on any rank, or no answer within ``timeout`` seconds, fails the test (the processes
    are killed, so a hung collective cannot stall the run)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, rank, world, port, results, timeout), daemon=True)
             for rank in range(world)]
    for p in procs:
        p.start()
    answers, deadline = {}, time.monotonic() + timeout
    try:
        while len(answers) < world:
            try:
                rank, ok, payload = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"{fn.__name__} on {world} processes: no answer from ranks "
                            f"{sorted(set(range(world)) - set(answers))} within {timeout:.0f} s")
            if not ok:
                pytest.fail(f"{fn.__name__}: rank {rank} of {world} failed:\n{payload}")
            answers[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [answers[r] for r in range(world)]


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
class UlyssesAttention(nn.Module):
    """A Conv3d patch embedding, then one self-attention block whose tokens are sharded across the
    ranks of ``group`` (Ulysses all-to-alls around SDPA; ``group=None``: one process, no
    collectives). ``variant`` makes the ways it can go wrong: ``"ring"`` attends the local
    queries over all-gathered keys and values, ``"shifted"`` gives each rank the next rank's
    shard, ``"uneven"`` splits the heads unevenly across ranks (a head count the degree does not
    divide)."""

    def __init__(self, heads=4, head_dim=16, group=None, variant="ulysses", gather_output=True):
        super().__init__()
        self.heads, self.head_dim, self.group, self.variant = heads, head_dim, group, variant
        self.gather_output = gather_output
        dim = heads * head_dim
        self.patch = nn.Conv3d(LATENT[1], dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_fn = F.scaled_dot_product_attention  # the single-process reference swaps in the eager op

    def forward(self, latents):
        x = self.patch(latents).flatten(2).transpose(1, 2)  # [B, N, dim]
        if self.group is not None:
            if self.variant == "shifted":
                P, r = dist.get_world_size(self.group), dist.get_rank(self.group)
                x = x.chunk(P, dim=1)[(r + 1) % P]
            else:
                x = shard(x, 1, self.group)
        B, n, C = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.group is None:
            o = self.attention_fn(q, k, v)
        elif self.variant == "ring":
            k, v = (_all_gather_tokens(t, self.group) for t in (k, v))
            o = F.scaled_dot_product_attention(q, k, v)
        elif self.variant == "uneven":
            o = _uneven_heads_attention(q, k, v, self.group)
        else:
            o = scatter_sequence(F.scaled_dot_product_attention(
                *(gather_sequence(t, self.group) for t in (q, k, v))), self.group)
        x = x + self.proj(o.transpose(1, 2).reshape(B, n, C))
        if self.group is not None and self.gather_output:
            x = _all_gather_tokens(x.transpose(0, 1), self.group).transpose(0, 1)  # gather along tokens
        return x


def _all_gather_tokens(x, group):
    """Concatenate the ranks' ``x`` along axis 2 ([B, H, n, D]) or axis 0 (as given)."""
    import torch.distributed._functional_collectives as funcol

    gather = getattr(funcol, "all_gather_tensor_autograd", funcol.all_gather_tensor)
    dim = 2 if x.dim() == 4 else 0
    return gather(x.contiguous(), dim, group)


def _uneven_heads_attention(q, k, v, group):
    """Ulysses with the heads split as evenly as possible (rank r gets ``H // P`` or one more),
    through all-to-alls with uneven splits along a head-major axis."""
    import torch.distributed._functional_collectives as funcol

    P, r = dist.get_world_size(group), dist.get_rank(group)
    B, H, n, D = q.shape
    per_rank = [H // P + (i < H % P) for i in range(P)]
    mine = per_rank[r]

    def gather(t):  # [B, H, n, D] -> [B, mine, P*n, D]
        t = t.permute(1, 2, 0, 3).contiguous()  # [H, n, B, D]
        t = funcol.wait_tensor(funcol.all_to_all_single(t, [mine] * P, per_rank, group))  # [P*mine, n, B, D]
        return t.reshape(P, mine, n, B, D).permute(3, 1, 0, 2, 4).reshape(B, mine, P * n, D)

    o = F.scaled_dot_product_attention(gather(q), gather(k), gather(v))  # [B, mine, N, D]
    o = o.reshape(B, mine, P, n, D).permute(2, 1, 3, 0, 4).reshape(P * mine, n, B, D).contiguous()
    o = funcol.wait_tensor(funcol.all_to_all_single(o, per_rank, [mine] * P, group))  # [H, n, B, D]
    return o.permute(2, 0, 1, 3)


def _models(heads, variant="ulysses", dtype=torch.float64):
    """The single-process model and its sharded copy (same parameters)."""
    torch.manual_seed(0)
    single = UlyssesAttention(heads).to(dtype)
    sharded = UlyssesAttention(heads, group=dist.group.WORLD, variant=variant).to(dtype)
    sharded.load_state_dict(single.state_dict())
    latents = torch.randn(*LATENT, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return single, sharded, latents


def _sparse_reference(single, latents, sparsity=SPARSITY, grid=GRID):
    """The single-process model with its attention replaced by the eager sparse op."""
    import sparse_inductor as si

    single.attention_fn = lambda q, k, v: si.video_sparse_attention(q, k, v, grid, sparsity=sparsity)
    try:
        return single(latents)
    finally:
        single.attention_fn = F.scaled_dot_product_attention


class GraphCounter:
    """A backend that counts the graphs Dynamo hands to ``sparse_inductor``."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs, **kwargs):
        from sparse_inductor.backend import sparse_inductor_backend

        self.graphs += 1
        return sparse_inductor_backend(gm, example_inputs, **kwargs)


def _rows(explanation):
    return [(r["module"], r["decision"], r["grid"], r["q"][1], r["parallel"], r["reason"]) for r in explanation]


# ---------------------------------------------------------------------------------------------
# Ulysses: 2 and 4 processes
# ---------------------------------------------------------------------------------------------
def ulysses_checks(rank, world):
    import sparse_inductor as si

    heads = 4
    single, sharded, latents = _models(heads)
    report = {}
    with torch.no_grad(), si.sparsity(SPARSITY, min_tokens=0):
        report["explain"] = _rows(si.explain(sharded, latents))
        expected = _sparse_reference(single, latents)
        dense = single(latents)
        torch._dynamo.utils.counters.clear()
        counter = GraphCounter()
        out = torch.compile(sharded, backend=counter)(latents)
        report["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
        report["graphs"] = counter.graphs
    report["error"] = (out - expected).abs().max().item()
    report["dense_gap"] = (out - dense).abs().max().item()
    # What can go wrong stays dense, with the reason.
    with torch.no_grad(), si.sparsity(SPARSITY, min_tokens=0):
        for variant in ("ring", "shifted", "uneven") if world == 2 else ():
            _, model, x = _models(3 if variant == "uneven" else heads, variant)
            report[variant] = _rows(si.explain(model, x))
    return report


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_sparse_equals_single_process(world):
    reports = spawn(ulysses_checks, world)
    for rank, report in enumerate(reports):
        # explain() on each rank: the self-attention site is sparse over the whole sequence's grid
        # with H/P heads, and says it is sequence-parallel.
        assert report["explain"] == [("<top>", "sparse", GRID, 4 // world, f"sequence-parallel (Ulysses, degree {world})",
                                      "")], (rank, report["explain"])
        assert report["error"] <= F64_TOL["atol"], (rank, report["error"])
        assert report["dense_gap"] > 1e-3, "the sparse selection must change the output (else the test cannot fail)"
        assert report["graphs"] == 1 and report["graph_breaks"] == 0, report
        if world == 2:  # what can go wrong, once
            (ring,) = report["ring"]
            assert ring[1] == "dense" and ring[5].startswith("ring attention") and "all_gather" in ring[5], ring
            (shifted,) = report["shifted"]
            assert shifted[1] == "dense" and "would not gather the sequence in order" in shifted[5], shifted
            (uneven,) = report["uneven"]
            assert uneven[1] == "dense" and "splits unevenly" in uneven[5], uneven


# ---------------------------------------------------------------------------------------------
# Training: FSDP2 and Ulysses on the same two processes
# ---------------------------------------------------------------------------------------------
TRAIN_LATENT = (1, 4, 8, 16, 16)  # grid (8, 8, 8): 8 tiles, so sparsity 0.875 keeps 1 of them
TRAIN_GRID = (8, 8, 8)
TRAIN_STEPS = 3


def _train(model, opt, latents, steps, step_loss):
    losses = []
    for _ in range(steps):
        loss = step_loss(model(latents))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses


def fsdp_ulysses_training(rank, world):
    """FSDP2 shards the weights over the two ranks, Ulysses the sequence; the compiled model
    trains for a few steps. Each rank's loss is the mean square over its tokens, so the average of
    the ranks' gradients (FSDP's reduce-scatter) is the gradient of the whole sequence's loss."""
    from torch.distributed.fsdp import fully_shard

    import sparse_inductor as si

    torch.manual_seed(0)
    single = UlyssesAttention(4).double()
    sharded = UlyssesAttention(4, group=dist.group.WORLD, gather_output=False).double()
    sharded.load_state_dict(single.state_dict())
    fully_shard(sharded)
    # The optimizer takes the sharded parameters now: after a forward under no_grad (explain below)
    # FSDP2 leaves the unsharded ones registered on the module.
    opt = torch.optim.SGD(sharded.parameters(), lr=0.5)
    latents = torch.randn(*TRAIN_LATENT, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sparse = lambda q, k, v: si.video_sparse_attention(q, k, v, TRAIN_GRID, sparsity=0.875)  # noqa: E731
    single.attention_fn = sparse
    expected = _train(single, torch.optim.SGD(single.parameters(), lr=0.5), latents, TRAIN_STEPS,
                      lambda out: out.square().mean())
    with si.sparsity(0.875, min_tokens=0):
        with torch.no_grad():
            explanation = _rows(si.explain(sharded, latents))
        compiled = torch.compile(sharded, backend="sparse_inductor")
        losses = _train(compiled, opt, latents, TRAIN_STEPS, lambda out: out.square().mean())
    for loss in losses:  # the whole sequence's loss: the mean of the ranks' (equal shards)
        dist.all_reduce(loss)
        loss /= world
    params = {name: p.full_tensor() for name, p in sharded.named_parameters()}
    return dict(explain=explanation, losses=[x.item() for x in losses], expected=[x.item() for x in expected],
                param_error=max((params[n] - p).abs().max().item() for n, p in single.named_parameters()))


def test_fsdp2_ulysses_training_matches_one_process():
    reports = spawn(fsdp_ulysses_training, 2)
    for rank, report in enumerate(reports):
        assert report["explain"] == [("<top>", "sparse", TRAIN_GRID, 2, "sequence-parallel (Ulysses, degree 2)", "")]
        assert report["losses"] == pytest.approx(report["expected"], rel=1e-9, abs=1e-12), report
        assert len(set(report["losses"])) == TRAIN_STEPS  # it trains (the loss moves)
        assert report["param_error"] <= 1e-9, (rank, report["param_error"])


# ---------------------------------------------------------------------------------------------
# diffusers' own context parallelism (Wan), traced on CPU
# ---------------------------------------------------------------------------------------------
WAN_GRID = (5, 8, 8)  # tests/diffusers_models.wan(): 8 tiles


def _rewrite_only(gm, example_inputs):
    """The backend's pass without Inductor: the rewritten graph runs eagerly (diffusers' parallel
    Wan compiles 7 graphs; its compiled run is the GPU test below)."""
    import sparse_inductor as si
    from passes.sites import analyze, plan, rewrite

    cfg = si.current_config()
    return rewrite(gm, plan(analyze(gm), cfg), cfg.tile).forward


def diffusers_context_parallel(rank, world):
    """Wan under ``enable_parallelism(ContextParallelConfig(ulysses_degree=world))``: diffusers'
    hooks break the graph in the block loop, so the patch embedding runs outside every graph and
    ``grid=`` names the grid; each block's graph sees the flattened all-to-alls."""
    import diffusers_models

    import sparse_inductor as si
    from sequence_parallel import build_diffusers  # noqa: F401 - (its CPU workarounds, applied below)

    single, parallel, args, kwargs = _diffusers_wan(world)
    with torch.no_grad(), si.sparsity(0.875, min_tokens=0, grid=WAN_GRID):
        rows = _rows(si.explain(parallel, *args, **kwargs))
        out = torch.compile(parallel, backend=_rewrite_only)(*args, **kwargs)[0]
        torch.compiler.reset()
        expected = torch.compile(single, backend=_rewrite_only)(*args, **kwargs)[0]
        torch.compiler.reset()
        dense = single(*args, **kwargs)[0]
    del diffusers_models
    return dict(explain=rows, error=(out - expected).abs().max().item(), dense_gap=(out - dense).abs().max().item())


def _diffusers_wan(world):
    import diffusers.hooks.context_parallel as cp_hooks
    import diffusers_models
    from diffusers import ContextParallelConfig

    torch.accelerator.device_count = lambda: 1  # diffusers picks rank % device_count: 0 on CPU
    if not hasattr(cp_hooks.logger, "warning_once"):  # diffusers 0.42.1, Wan 2.1's 1-d timestep
        cp_hooks.logger.warning_once = cp_hooks.logger.warning
    torch.manual_seed(0)
    single, args, kwargs, _ = diffusers_models.wan()
    parallel, _, _, _ = diffusers_models.wan()
    single, parallel = single.double(), parallel.double()
    parallel.load_state_dict(single.state_dict())
    parallel.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    args = tuple(a.double() for a in args)
    kwargs = dict(kwargs, encoder_hidden_states=kwargs["encoder_hidden_states"].double())
    return single, parallel, args, kwargs


def test_diffusers_context_parallel_traced():
    pytest.importorskip("diffusers")
    reports = spawn(diffusers_context_parallel, 2)
    for rank, report in enumerate(reports):
        # Each block is its own graph under diffusers' hooks: module paths are relative to the block.
        attn1 = [r for r in report["explain"] if r[0].endswith("attn1")]
        assert len(attn1) == 2 and len(report["explain"]) == 4, report["explain"]
        assert all(r[1:5] == ("sparse", WAN_GRID, 1, "sequence-parallel (Ulysses, degree 2)") for r in attn1), attn1
        assert report["error"] <= F64_TOL["atol"], (rank, report)
        assert report["dense_gap"] > 1e-3, report
