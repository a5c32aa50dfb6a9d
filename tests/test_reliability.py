"""Issue 18: what a demanding user hit. Each test names the item it covers and failed before its
fix (except the torch.export one, which pins a documented limit and its workaround). Shapes are
small (CPU, Triton under the interpreter); threaded tests are bounded in time."""
import math
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import HAS_TRITON, KERNEL_DEVICE, joint_token_mask
from reliability_helpers import INF, NAN, assert_same_nonfinite_and_close, masked_reference, reference_top_k
import sparse_inductor as si
from sparse_inductor import TopK, triton_launch
from sparse_inductor.attention import sparse_attention
from sparse_inductor.layout import tile_layout
from sparse_inductor.ops import transpose_block_lists
from sparse_inductor.reference import tile_ids
from sparse_inductor.selection import lists_from_mask
from video_dit import TinyVideoDiT


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------
# Item 1: NaN / Inf. The fine stage must equal the masked reference (NaN exactly where the kept
# keys or the query give NaN, finite elsewhere) on the CPU op and in the kernels; selection ranks
# NaN scores lowest, on both devices.
# ---------------------------------------------------------------------------------------------
POISONS = {
    "nan k": ("k", (0, 0, 37, 3), NAN),
    "nan q": ("q", (0, 1, 5, 0), NAN),
    "+inf q": ("q", (0, 0, 70, 2), INF),
    "-inf k": ("k", (0, 1, 12, 1), -INF),
    "nan v": ("v", (0, 0, 100, 4), NAN),
}


def poisoned_inputs(which, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 128, 8, generator=g).to(dtype) for _ in range(3))
    name, index, value = POISONS[which]
    dict(q=q, k=k, v=v)[name][index] = value
    return q, k, v


@pytest.mark.parametrize("which", list(POISONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def neighbour_lists(M, B=1, H=2):
    """Every query tile i keeps tiles i and i + 1 (mod M): a poisoned tile reaches two query tiles."""
    mask = torch.zeros(B, H, M, M, dtype=torch.bool)
    for i in range(M):
        mask[:, :, i, [i, (i + 1) % M]] = True
    return mask, *lists_from_mask(mask)


def fixed_tables(grid, tile, B=1, H=2):
    layout = tile_layout(grid, tile)
    slots, counts = layout.slots.expand(B, -1), layout.counts.expand(B, -1)
    return layout, (slots.expand(B, H, -1), slots, counts.expand(B, H, -1), counts)


@pytest.mark.parametrize("which", list(POISONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nonfinite_inputs_match_masked_reference_on_cpu(which, dtype):
    """Item 1: the CPU op used to treat any non-finite LSE as "no keys" and return 0."""
    grid, tile, scale = (2, 8, 8), (2, 4, 4), 8 ** -0.5
    q, k, v = (x.requires_grad_() for x in poisoned_inputs(which, dtype))
    layout, tables = fixed_tables(grid, tile)
    mask, kv_num, kv_idx = neighbour_lists(layout.num_tiles)
    out, lse = torch.ops.sparse_inductor.block_sparse_attn_fwd(q, k, v, *tables, kv_num, kv_idx, scale)
    ref, ref_lse = masked_reference(q, k, v, mask, grid, tile, scale)
    assert not torch.isfinite(ref).all()  # the poison reaches some kept block
    assert torch.isfinite(ref).any()  # ... and not every row
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_same_nonfinite_and_close(out, ref, tol, "out")
    assert_same_nonfinite_and_close(lse, ref_lse, tol, "lse", nan_exact=which != "+inf q")
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_same_nonfinite_and_close(g, w, 10 * tol, name)
    q, k, v = (x.detach() for x in (q, k, v))
    # the eager API (its own selection, NaN scores ranked last) against the same reference
    for sparsity in (0.0, 0.5):
        sel = si.select_blocks(q, k, grid, sparsity=sparsity, tile=tile, scale=scale)
        api = si.video_sparse_attention(q, k, v, grid, sparsity=sparsity, tile=tile, scale=scale)
        want, _ = masked_reference(q, k, v, sel.dense_mask(), grid, tile, scale)
        assert_same_nonfinite_and_close(api, want, tol, f"video_sparse_attention at sparsity {sparsity}")
        if sparsity == 0.0:  # every tile kept: non-finite exactly where SDPA is
            sdpa = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
            assert torch.equal(torch.isnan(api), torch.isnan(sdpa))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("which", ["nan k", "nan q", "+inf q", "nan v"])
def test_nonfinite_inputs_kernels_agree_with_cpu_op(which):
    """Item 1: the Triton forward and backward propagate NaN exactly as the CPU op does (the
    forward used to report LSE = -inf, "no keys", for a NaN row, and the backward gave it zero
    gradients)."""
    grid, tile, scale = (2, 8, 8), (2, 4, 4), 8 ** -0.5
    q, k, v = poisoned_inputs(which)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    layout, tables = fixed_tables(grid, tile)
    _, kv_num, kv_idx = neighbour_lists(layout.num_tiles)
    tables = (*tables, kv_num, kv_idx)

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    cpu_out, cpu_lse = torch.ops.sparse_inductor.block_sparse_attn_fwd(*leaves, *tables, scale)
    cpu_grads = torch.autograd.grad(cpu_out, leaves, grad)

    dev = [x.to(KERNEL_DEVICE) for x in (q, k, v, grad)]
    tables = [t.to(KERNEL_DEVICE) for t in tables]
    out, lse = torch.empty_like(dev[0]), torch.empty(1, 2, 128, device=KERNEL_DEVICE)
    triton_launch.block_sparse_fwd(*dev[:3], out, lse, *tables, scale)
    delta = (out.float() * dev[3].float()).sum(-1)
    q_num, q_idx = transpose_block_lists(tables[4], tables[5], layout.num_tiles)
    dq, dk, dv = (torch.empty_like(x) for x in dev[:3])
    triton_launch.block_sparse_bwd(dev[3], *dev[:3], lse, delta, dq, dk, dv, *tables, q_num, q_idx, scale)
    assert_same_nonfinite_and_close(out, cpu_out, 1e-5, "out")
    assert_same_nonfinite_and_close(lse, cpu_lse, 1e-5, "lse", nan_exact=which != "+inf q")
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), cpu_grads):
        assert_same_nonfinite_and_close(got, want, 1e-4, name)


SCORE_ROWS = [
    [0.5, NAN, 0.1, 2.0, NAN, -1.0, 0.1, 3.0],
    [NAN] * 8,
    [-INF, NAN, -INF, 1.0, INF, -0.0, 0.0, NAN],
    [NAN, 0.0, NAN, -0.0, NAN, 0.0, NAN, -INF],
    [1.0, 1.0, 1.0, NAN, 1.0, 1.0, 1.0, 1.0],
]


@pytest.mark.parametrize("k", [1, 3, 6, 8])
def test_top_k_ranks_nan_lowest_on_both_devices(k):
    """Item 1: NaN scores rank below every number (-inf included); torch's sort put them first on
    CPU, and the GPU kernel ranked +NaN first and -NaN last."""
    scores = torch.tensor(SCORE_ROWS, dtype=torch.float32)
    scores[3, 2] = torch.tensor(NAN).neg()  # a NaN with the sign bit set
    want = [reference_top_k(r.tolist(), k) for r in scores]
    cpu = torch.ops.sparse_inductor.top_k_tiles(scores, k)
    assert cpu.tolist() == want
    assert torch.ops.sparse_inductor.top_k_tiles(scores.double(), k).tolist() == want
    if HAS_TRITON:
        out = torch.empty(len(SCORE_ROWS), k, dtype=torch.int32, device=KERNEL_DEVICE)
        triton_launch.top_k_tiles(scores.to(KERNEL_DEVICE), k, out)
        assert out.cpu().tolist() == want


MASS_ROWS = [
    [0.5, NAN, 0.1, 2.0, NAN, -1.0, 0.1, 3.0],  # NaN tiles have no mass
    [NAN] * 8,  # no coarse softmax: min tiles, lowest first
    [-INF] * 8,
    [0.0, INF, 1.0, NAN, 0.0, 2.0, -INF, 1.0],  # +inf: the softmax is undefined too
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
]


@pytest.mark.parametrize("p", [0.5, 0.9, 1.0])
def test_mass_cut_with_nan_is_defined_and_devices_agree(p):
    """Item 1: CumulativeMass with NaN or infinite coarse logits: NaN tiles carry no mass (ranked
    last), a row whose softmax is undefined keeps the minimum, lowest tiles first; CPU and
    kernel agree (the kernel used to keep every tile of such rows, the CPU op the minimum)."""
    logits = torch.tensor(MASS_ROWS, dtype=torch.float32)
    counts = torch.tensor([64, 64, 64, 32, 64, 64, 16, 64], dtype=torch.int32)
    lo, hi = 2, 6
    num, idx = torch.ops.sparse_inductor.mass_cut_tiles(logits, counts, p, lo, hi)
    kept = [set(idx[r, : num[r]].tolist()) for r in range(len(MASS_ROWS))]
    assert not kept[0] & {1, 4}  # NaN tiles are not needed to reach the mass
    undefined_len = lo if p < 1.0 else hi
    for r in (1, 2, 3):
        assert kept[r] == set(range(undefined_len)), (r, kept[r])
    if HAS_TRITON:
        g_num = torch.empty(len(MASS_ROWS), dtype=torch.int32, device=KERNEL_DEVICE)
        g_idx = torch.zeros(len(MASS_ROWS), hi, dtype=torch.int32, device=KERNEL_DEVICE)
        triton_launch.mass_cut_tiles(logits.to(KERNEL_DEVICE), counts.to(KERNEL_DEVICE), p, lo, hi, g_num, g_idx)
        assert g_num.cpu().tolist() == num.tolist()
        assert [set(g_idx.cpu()[r, : num[r]].tolist()) for r in range(len(MASS_ROWS))] == kept


def test_selection_with_nan_query_and_key_tiles():
    """Item 1, as documented: a query tile whose pooled query is NaN has only NaN scores and keeps
    tiles 0..k-1; a KV tile whose pooled key is NaN is ranked last by every query tile."""
    grid, tile = (2, 8, 8), (1, 4, 4)  # 8 tiles of 16 tokens
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, 128, 8, generator=g) for _ in range(2))
    q[0, 0, 40, 0] = NAN  # token 40 is in tile 2 (t=0, h=5, w=0)
    k[0, 0, 127, 3] = NAN  # the last tile
    ids = tile_ids(grid, tile)
    sel = si.select_blocks(q, k, grid, sparsity=0.5, tile=tile)  # keep 4 of 8
    mask = sel.dense_mask()[0, 0]
    nan_q_tile, nan_k_tile = int(ids[40]), int(ids[127])
    assert mask[nan_q_tile].nonzero().flatten().tolist() == [0, 1, 2, 3]
    for i in range(8):
        if i != nan_q_tile:
            assert not mask[i, nan_k_tile]


# ---------------------------------------------------------------------------------------------
# Item 2: remembered grids are scoped to one call and never beat an explicit grid=.
# ---------------------------------------------------------------------------------------------
class PrePacked(nn.Module):
    """Tokens arrive already flattened: no graph can prove the grid."""

    def forward(self, tokens):
        B, N, C = tokens.shape
        q = k = v = tokens.view(B, N, 2, C // 2).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v)


class BrokenPatchify(nn.Module):
    """A graph break between a Conv3d patch embedding and the attention."""

    def __init__(self, patch=(1, 2, 2)):
        super().__init__()
        self.embed = nn.Conv3d(4, 32, kernel_size=patch, stride=patch)

    def forward(self, latents):
        tokens = self.embed(latents).flatten(2).transpose(1, 2)
        torch._dynamo.graph_break()
        B, N, C = tokens.shape
        q = k = v = tokens.view(B, N, 2, 16).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v)


def test_cache_isolation_grid_does_not_leak_into_another_model():
    """Item 2: a grid remembered while compiling one model made an unrelated model with the same
    token count sparse on that grid, and beat an explicit grid=."""
    torch._dynamo.reset()
    latents = torch.randn(2, 4, 4, 16, 16)  # -> grid (4, 8, 8) = 256 tokens
    packed = torch.randn(2, 256, 32)
    q = packed.view(2, 256, 2, 16).transpose(1, 2)
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0):
        a = torch.compile(BrokenPatchify(), backend="sparse_inductor")
        a(latents)
        got = torch.compile(PrePacked(), backend="sparse_inductor")(packed)
        torch.testing.assert_close(got, F.scaled_dot_product_attention(q, q, q))  # dense: no grid
        row = list(si.explain(PrePacked(), packed))[0]
        assert row["decision"] == "dense" and "grid=(T, H, W)" in row["reason"]
        with si.sparsity(grid=(1, 16, 16)):
            torch._dynamo.reset()
            a = torch.compile(BrokenPatchify(), backend="sparse_inductor")
            a(latents)
            got = torch.compile(PrePacked(), backend="sparse_inductor")(packed)
            want = si.video_sparse_attention(q, q, q, (1, 16, 16), sparsity=0.5)
            torch.testing.assert_close(got, want)
    torch._dynamo.reset()


class Patchify(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv3d(4, 32, kernel_size=(1, 2, 2), stride=(1, 2, 2))

    def forward(self, latents):
        return self.embed(latents).flatten(2).transpose(1, 2)


def test_cache_isolation_for_a_model_whose_forward_is_torch_code():
    """Item 2: an nn.Sequential's forward lives in torch; its grids must still stay with its call."""
    torch._dynamo.reset()
    packed = torch.randn(2, 256, 32)
    q = packed.view(2, 256, 2, 16).transpose(1, 2)
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0):
        torch.compile(nn.Sequential(Patchify(), nn.Identity()), backend="sparse_inductor")(torch.randn(2, 4, 4, 16, 16))
        got = torch.compile(PrePacked(), backend="sparse_inductor")(packed)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, q, q))
    torch._dynamo.reset()


def test_explicit_grid_wins_over_the_grid_of_an_earlier_graph():
    """Item 2: across a graph break the grid of the earlier graph is used, unless grid= says
    otherwise; explain() reports the grid the run uses."""
    torch._dynamo.reset()
    model = BrokenPatchify()
    latents = torch.randn(2, 4, 4, 16, 16)
    tokens = model.embed(latents).flatten(2).transpose(1, 2)
    q = tokens.view(2, 256, 2, 16).transpose(1, 2)
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0):
        row = list(si.explain(model, latents))[0]
        assert row["grid"] == (4, 8, 8) and row["grid_source"] == "earlier graph"
        got = torch.compile(model, backend="sparse_inductor")(latents)
        torch.testing.assert_close(got, si.video_sparse_attention(q, q, q, (4, 8, 8), sparsity=0.5))
        with si.sparsity(grid=(1, 16, 16)):
            row = list(si.explain(model, latents))[0]
            assert row["grid"] == (1, 16, 16) and row["grid_source"] == "config"
            torch._dynamo.reset()
            got = torch.compile(model, backend="sparse_inductor")(latents)
            torch.testing.assert_close(got, si.video_sparse_attention(q, q, q, (1, 16, 16), sparsity=0.5))
    torch._dynamo.reset()


def test_explicit_grid_contradicting_the_graph_is_an_error():
    """Item 2: a grid= with the token count of a grid the graph proves, but other sizes, names both."""
    model = TinyVideoDiT(layers=1).eval()
    x, text = torch.randn(2, 4, 5, 12, 20), torch.randn(2, 7, 16)  # grid (5, 6, 10)
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0, grid=(1, 30, 10)):
        with pytest.raises(ValueError, match=r"\(1, 30, 10\).*\(5, 6, 10\)"):
            si.explain(model, x, text)
        with si.sparsity(grid=(5, 6, 10)):  # agreeing is fine
            assert si.explain(model, x, text).sparse_rows


# ---------------------------------------------------------------------------------------------
# Item 3: threads compiling new variants at once.
# ---------------------------------------------------------------------------------------------
def run_threads(targets, timeout=300):
    errors = []

    def guard(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        return run

    threads = [threading.Thread(target=guard(fn), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread did not finish in time"
    if errors:
        raise errors[0]


def test_concurrent_threads_each_in_its_own_sparsity_compile_cold_variants():
    """Item 3: two threads compiling new variants at once crashed (one saved tracing context
    re-entered by both). Each thread's result must be its own config's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyVideoDiT(layers=1).eval()
    x, text = torch.randn(2, 4, 5, 12, 20), torch.randn(2, 7, 16)
    compiled = torch.compile(model, backend="sparse_inductor")
    with torch.no_grad():
        compiled(x, text)  # dense (default min_tokens): Dynamo has traced the graph
    values = [0.25, 0.5, 0.75]
    barrier = threading.Barrier(len(values))
    results = {}

    def work(s):
        def run():
            with torch.no_grad(), si.sparsity(s, min_tokens=0):
                barrier.wait(timeout=60)
                results[s] = compiled(x, text)
        return run

    run_threads([work(s) for s in values])
    for s in values:
        oracle = TinyVideoDiT(layers=1).eval()
        oracle.load_state_dict(model.state_dict())
        oracle.use_self_attention(lambda q, k, v, s=s: si.video_sparse_attention(q, k, v, (5, 6, 10), sparsity=s))
        with torch.no_grad():
            assert rel(results[s], oracle(x, text)) < 1e-5, s
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Item 4: keys from another video (same grid) are not self-attention.
# ---------------------------------------------------------------------------------------------
class TwoVideos(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv3d(4, 32, kernel_size=(1, 2, 2), stride=(1, 2, 2))

    def tok(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        B, N, _ = t.shape
        return t.view(B, N, 2, 16).transpose(1, 2)

    def forward(self, x, y):
        return F.scaled_dot_product_attention(self.tok(x), self.tok(y), self.tok(y))


class TwoInputs(nn.Module):
    """Pre-packed queries and keys from two different inputs (the grid comes from grid=)."""

    def forward(self, a, b):
        B, N, C = a.shape
        return F.scaled_dot_product_attention(a.view(B, N, 2, 16).transpose(1, 2), b.view(B, N, 2, 16).transpose(1, 2),
                                              b.view(B, N, 2, 16).transpose(1, 2))


def test_keys_from_another_video_stay_dense():
    """Item 4: sdpa(tok(x), tok(y), tok(y)) with the same grid was rewritten (x != y)."""
    torch._dynamo.reset()
    model = TwoVideos()
    x, y = torch.randn(2, 4, 4, 16, 16), torch.randn(2, 4, 4, 16, 16)
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0):
        row = list(si.explain(model, x, y))[0]
        assert row["decision"] == "dense" and "keys do not come" in row["reason"], row
        got = torch.compile(model, backend="sparse_inductor")(x, y)
        torch.testing.assert_close(got, model(x, y))
        a, b = torch.randn(2, 256, 32), torch.randn(2, 256, 32)
        with si.sparsity(grid=(4, 8, 8)):
            row = list(si.explain(TwoInputs(), a, b))[0]
            assert row["decision"] == "dense" and "keys do not come" in row["reason"], row
            row = list(si.explain(TwoInputs(), a, a))[0]  # the same tensor twice: self-attention
            assert row["decision"] == "sparse", row
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Item 5: a call under FakeTensorMode must not poison the layout cache.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fake_first", [True, False])
def test_fake_tensor_mode_does_not_poison_the_layout_cache(fake_first):
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    grid = (3, 5, 7) if fake_first else (3, 5, 9)  # a grid no other test caches first
    N = math.prod(grid)
    real = [torch.randn(1, 2, N, 16) for _ in range(3)]
    want = si.video_sparse_attention(*real, grid, sparsity=0.5) if not fake_first else None
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in real]
        out = si.video_sparse_attention(*fake, grid, sparsity=0.5)
        assert isinstance(out, FakeTensor) and out.shape == real[0].shape
    layout = tile_layout(grid)
    assert not isinstance(layout.counts, FakeTensor) and not isinstance(layout.gather_index, FakeTensor)
    got = si.video_sparse_attention(*real, grid, sparsity=0.5)
    if want is not None:
        torch.testing.assert_close(got, want)
    assert torch.isfinite(got).all()


# ---------------------------------------------------------------------------------------------
# Item 6: empty batch / heads.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(0, 2, 64, 16), (2, 0, 64, 16), (0, 0, 64, 16)])
@pytest.mark.parametrize("query_keep", [1.0, 0.5])
def test_empty_batch_or_heads(shape, query_keep):
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    out = si.video_sparse_attention(q, k, v, (4, 4, 4), sparsity=0.5, tile=(2, 2, 2), query_keep=query_keep)
    want = F.scaled_dot_product_attention(q, k, v)
    assert out.shape == want.shape == q.shape
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(g.shape == q.shape for g in grads)
    sel = si.select_blocks(q, k, (4, 4, 4), sparsity=0.5, tile=(2, 2, 2))
    assert sel.kv_num_blocks.shape[:2] == shape[:2]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_empty_batch_kernel_launches_are_skipped():
    """Item 6 on the kernel path: a grid with no programs is not launched."""
    layout = tile_layout((4, 4, 4), (2, 2, 2), KERNEL_DEVICE)
    q, k, v = (torch.randn(0, 2, 64, 16, device=KERNEL_DEVICE) for _ in range(3))
    slots, counts = layout.slots.expand(0, -1), layout.counts.expand(0, -1)
    q_slots, q_counts = layout.slots.expand(0, 2, -1), layout.counts.expand(0, 2, -1)
    out, lse = torch.empty_like(q), torch.empty(0, 2, 64, device=KERNEL_DEVICE)
    kv_num = torch.zeros(0, 2, 8, dtype=torch.int32, device=KERNEL_DEVICE)
    kv_idx = torch.zeros(0, 2, 8, 4, dtype=torch.int32, device=KERNEL_DEVICE)
    triton_launch.block_sparse_fwd(q, k, v, out, lse, q_slots, slots, q_counts, counts, kv_num, kv_idx, 0.25)
    triton_launch.top_k_tiles(torch.empty(0, 2, 8, 8, device=KERNEL_DEVICE), 4,
                              torch.empty(0, 2, 8, 4, dtype=torch.int32, device=KERNEL_DEVICE))


# ---------------------------------------------------------------------------------------------
# Item 7: double backward and torch.func.
# ---------------------------------------------------------------------------------------------
def _tiny(seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, 32, 4, generator=g, dtype=torch.float64).requires_grad_(requires_grad)
            for _ in range(3)]


@pytest.mark.parametrize("query_keep", [1.0, 0.5])
def test_double_backward_is_exact(query_keep):
    """Item 7: second-order gradients (create_graph=True) raised "no autograd formula"."""
    q, k, v = _tiny()

    def fn(q, k, v):
        return si.video_sparse_attention(q, k, v, (2, 4, 4), sparsity=0.5, tile=(1, 2, 4), query_keep=query_keep)

    assert torch.autograd.gradgradcheck(fn, (q, k, v), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("query_keep", [1.0, 0.5])
def test_torch_func_grad_matches_autograd(query_keep):
    """Item 7: torch.func.grad raised "must override setup_context"."""
    q, k, v = _tiny(requires_grad=False)

    def loss(q, k, v):
        return si.video_sparse_attention(q, k, v, (2, 4, 4), sparsity=0.5, tile=(1, 2, 4),
                                         query_keep=query_keep).square().sum()

    got = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want = torch.autograd.grad(loss(*leaves), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("query_keep", [1.0, 0.5])
def test_forward_mode_ad_keeps_the_tangent(query_keep):
    """Item 7: with torch.autograd.forward_ad duals the op silently returned no tangent."""
    import torch.autograd.forward_ad as fwAD

    q, k, v = _tiny(requires_grad=False)
    tangent = torch.randn(q.shape, generator=torch.Generator().manual_seed(5), dtype=q.dtype)

    def fn(q):
        return si.video_sparse_attention(q, k, v, (2, 4, 4), sparsity=0.5, tile=(1, 2, 4), query_keep=query_keep)

    with fwAD.dual_level():
        got = fwAD.unpack_dual(fn(fwAD.make_dual(q, tangent))).tangent
    assert got is not None
    eps = 1e-6
    torch.testing.assert_close(got, (fn(q + eps * tangent) - fn(q - eps * tangent)) / (2 * eps), rtol=1e-5,
                               atol=1e-7)


def test_vmap_and_per_sample_gradients():
    """Item 7: torch.vmap already ran (torch's per-sample fallback for custom ops); vmap over
    torch.func.grad (per-sample gradients) raised like grad did."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 1, 2, 32, 4, generator=g, dtype=torch.float64) for _ in range(3))

    def f(q, k, v):
        return si.video_sparse_attention(q, k, v, (2, 4, 4), sparsity=0.5, tile=(1, 2, 4))

    torch.testing.assert_close(torch.vmap(f)(q, k, v), torch.stack([f(q[i], k[i], v[i]) for i in range(3)]))
    per_sample = torch.vmap(torch.func.grad(lambda q, k, v: f(q, k, v).square().sum()))(q, k, v)
    for i in range(3):
        leaf = q[i].clone().requires_grad_()
        (want,) = torch.autograd.grad(f(leaf, k[i], v[i]).square().sum(), leaf)
        torch.testing.assert_close(per_sample[i], want)


# ---------------------------------------------------------------------------------------------
# Item 8.
# ---------------------------------------------------------------------------------------------
class MaskedJoint(nn.Module):
    """Joint attention over [video | text] with a bool key-padding mask given by the caller."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv3d(4, 32, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.text = nn.Linear(16, 32)

    def forward(self, latents, text, mask):
        x = torch.cat([self.embed(latents).flatten(2).transpose(1, 2), self.text(text)], dim=1)
        B, L, _ = x.shape
        q = k = v = x.view(B, L, 2, 16).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_joint_mask_that_masks_video_keys_is_exact():
    """Item 8: a key-padding mask over video keys crashed at run time ("attn_mask masks video
    keys"). Masked keys (text or video) never take part; the result is the masked reference."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MaskedJoint()
    latents, text = torch.randn(2, 4, 4, 16, 16), torch.randn(2, 7, 16)
    grid, N, L = (4, 8, 8), 256, 263
    keep = torch.rand(2, L, generator=torch.Generator().manual_seed(1)) < 0.7
    keep[:, 0] = True
    mask = keep.view(2, 1, 1, L)
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0):
        assert si.explain(model, latents, text, mask).sparse_rows
        got = torch.compile(model, backend="sparse_inductor")(latents, text, mask)
        x = torch.cat([model.embed(latents).flatten(2).transpose(1, 2), model.text(text)], dim=1)
        q = x.view(2, L, 2, 16).transpose(1, 2)
        eager = sparse_attention(q, q, q, grid, sparsity=0.5, tile=(4, 4, 4), text_after=7, key_padding_mask=mask)
        selected = si.select_blocks(q[:, :, :N], q[:, :, :N], grid, sparsity=0.5).dense_mask()
        token_mask = joint_token_mask(selected, grid, (4, 4, 4), 0, 7, keep)
        s = (q.double() @ q.double().transpose(-1, -2)) / 4.0
        ref = torch.softmax(s.masked_fill(~token_mask, -INF), -1) @ q.double()
    assert (got - ref).abs().max() < 1e-5
    assert (eager - ref).abs().max() < 1e-5
    torch._dynamo.reset()


@pytest.mark.parametrize("before, after, tile", [(0, 7, (4, 4, 4)), (19, 0, (2, 3, 5))])
def test_key_padding_mask_over_video_keys_op_and_kernels(before, after, tile):
    """Item 8: masked video keys (besides text keys) in the op and in the kernels, with gradients:
    the masked reference, and dK = dV = 0 for every hidden key."""
    from sparse_inductor.attention import _valid_keys_first
    from sparse_inductor.layout import build_layout
    from sparse_inductor.reference import reference_attention

    grid, B, H, D = (3, 6, 10), 2, 2, 16
    N = math.prod(grid)
    L = before + N + after
    g = torch.Generator().manual_seed(before)
    q, k, v, grad = (torch.randn(B, H, L, D, generator=g) for _ in range(4))
    keep = torch.rand(B, L, generator=g) < 0.6
    keep[1, before: before + N // 2] = False  # whole tiles hidden in batch 1
    mask = keep.view(B, 1, 1, L)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = sparse_attention(*leaves, grid, sparsity=0.5, tile=tile, text_before=before, text_after=after,
                           key_padding_mask=mask)
    got = torch.autograd.grad(out, leaves, grad)
    video = slice(before, before + N)
    selected = si.select_blocks(q[:, :, video], k[:, :, video], grid, sparsity=0.5, tile=tile).dense_mask()
    token_mask = joint_token_mask(selected, grid, tile, before, after, keep)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref, _ = reference_attention(q64, k64, v64, token_mask)
    ref = torch.nan_to_num(ref)  # a query row that sees no key: 0 (the reference's softmax is NaN there)
    want = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    assert (out - ref).abs().max() < 1e-5
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert (a - torch.nan_to_num(b)).abs().max() < 1e-4, name
    for a in got[1:]:
        assert (a.transpose(1, 2)[~keep] == 0).all()
    if HAS_TRITON:
        layout = build_layout(grid, tile, before, after)
        kv_slots, kv_counts = _valid_keys_first(layout, mask)
        q_slots, q_counts = layout.slots.expand(B, H, -1), layout.counts.expand(B, H, -1)
        from sparse_inductor.selection import select_tiles

        kv_num, kv_idx = select_tiles(q, k, layout, TopK(0.5), D ** -0.5)
        dev = [x.to(KERNEL_DEVICE) for x in (q, k, v, grad)]
        tables = [t.to(KERNEL_DEVICE) for t in (q_slots, kv_slots, q_counts, kv_counts, kv_num, kv_idx)]
        k_out, lse = torch.empty_like(dev[0]), torch.empty(B, H, L, device=KERNEL_DEVICE)
        triton_launch.block_sparse_fwd(*dev[:3], k_out, lse, *tables, D ** -0.5)
        assert (k_out.cpu() - ref).abs().max() < 1e-5


def test_layers_pattern_that_matches_no_site_warns_once(caplog):
    torch._dynamo.reset()
    model = TinyVideoDiT(layers=1).eval()
    x, text = torch.randn(2, 4, 5, 12, 20), torch.randn(2, 7, 16)
    compiled = torch.compile(model, backend="sparse_inductor")
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0, layers={"block.0.*": 0.0, "blocks.0.*": 0.25}):
        with caplog.at_level("WARNING", logger="sparse_inductor"):
            for _ in range(3):
                compiled(x, text)
        warnings = [r.getMessage() for r in caplog.records if "block.0.*" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert "blocks.0" in warnings[0] and "blocks.0.*" not in warnings[0].split("matches")[0]
        caplog.clear()
        with caplog.at_level("WARNING", logger="sparse_inductor"):
            si.explain(model, x, text)
        assert any("block.0.*" in r.getMessage() for r in caplog.records)
    torch._dynamo.reset()


def test_unknown_option_is_a_plain_value_error():
    """Item 8: an unknown options= key surfaced wrapped in BackendCompilerFailed."""
    from torch._dynamo.exc import BackendCompilerFailed

    torch._dynamo.reset()
    compiled = torch.compile(PrePacked(), backend="sparse_inductor", options={"sparsty": 0.5})
    with pytest.raises(ValueError, match="sparsty") as info:
        compiled(torch.randn(1, 16, 32))
    assert not isinstance(info.value, BackendCompilerFailed)
    assert "accepted keys" in str(info.value)
    torch._dynamo.reset()


def test_float64_model_becomes_sparse_on_cpu():
    """Item 8: float64 stayed dense although the op supports it on CPU."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyVideoDiT(layers=1).double().eval()
    x, text = torch.randn(2, 4, 5, 12, 20, dtype=torch.float64), torch.randn(2, 7, 16, dtype=torch.float64)
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0):
        rows = list(si.explain(model, x, text))
        assert rows[0]["decision"] == "sparse", rows[0]
        got = torch.compile(model, backend="sparse_inductor")(x, text)
        oracle = TinyVideoDiT(layers=1).double().eval()
        oracle.load_state_dict(model.state_dict())
        oracle.use_self_attention(lambda q, k, v: si.video_sparse_attention(q, k, v, (5, 6, 10), sparsity=0.5))
        assert rel(got, oracle(x, text)) < 1e-8  # the model's RoPE tables are float32
        assert rel(got, model(x, text)) > 1e-3  # really sparse
    torch._dynamo.reset()


def test_export_carries_the_sparse_op_of_a_model_built_on_it():
    """Item 8 (torch.export): export does not run the backend, so a model exported under
    sparsity() keeps its dense SDPA (README, Guarantees); a model built on the eager op or
    VideoSparseAttention exports the sparse op, and the exported program gives the same result."""
    from sparse_inductor.nn import VideoSparseAttention

    torch.manual_seed(0)
    layer = VideoSparseAttention(32, 2, sparsity=0.5, gated=False).eval()
    x = torch.randn(1, 128, 32)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x, (2, 8, 8))

    exported = torch.export.export(Wrapper(), (x,))
    assert "sparse_inductor.block_sparse_attn_fwd" in str(exported.graph)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), layer(x, (2, 8, 8)))
