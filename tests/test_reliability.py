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
import sparse_inductor as si
from sparse_inductor import TopK, triton_launch
from sparse_inductor.attention import sparse_attention
from sparse_inductor.layout import tile_layout
from sparse_inductor.ops import transpose_block_lists
from sparse_inductor.reference import tile_ids
from sparse_inductor.selection import lists_from_mask, mask_from_lists
from video_dit import TinyVideoDiT

NAN, INF = float("nan"), float("inf")


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------
# Item 1: NaN / Inf. The fine stage must equal the masked reference (NaN exactly where the kept
# keys or the query give NaN, finite elsewhere) on the CPU op and in the kernels; selection ranks
# NaN scores lowest, on both devices.
# ---------------------------------------------------------------------------------------------
def masked_reference(q, k, v, selected, grid, tile, scale):
    """float64 ``(out, lse)``: every query row attends to the tokens of its tile's kept tiles only
    (gathered, so nothing outside them, NaN included, is ever touched). Differentiable."""
    ids = tile_ids(grid, tile)
    B, H, N, D = q.shape
    q64, k64, v64 = (x.double() for x in (q, k, v))
    outs, lses = [], []
    for b in range(B):
        for h in range(H):
            out = q64.new_zeros(N, D)
            lse = q64.new_full((N,), -INF)
            for i in range(int(ids.max()) + 1):
                rows = torch.nonzero(ids == i).flatten()
                keys = torch.nonzero(selected[b, h, i][ids]).flatten()
                if len(keys) == 0:
                    continue
                s = q64[b, h, rows] @ k64[b, h, keys].T * scale
                out = out.index_put((rows,), torch.softmax(s, -1) @ v64[b, h, keys])
                lse = lse.index_put((rows,), torch.logsumexp(s, -1))
            outs.append(out)
            lses.append(lse)
    return torch.stack(outs).view(B, H, N, D), torch.stack(lses).view(B, H, N)


def assert_same_nonfinite_and_close(got, want, tol, what, nan_exact=True):
    """Non-finite at the same places (NaN at the same places unless ``nan_exact`` is False: an LSE
    over +inf scores may be +inf or NaN), finite values close."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), f"{what}: non-finite at different places"
    if nan_exact:
        assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN at different places"
    if finite.any():
        err = (got[finite] - want[finite]).abs().max().item()
        assert err <= tol * max(1.0, want[finite].abs().max().item()), f"{what}: max error {err:.2e}"


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


def reference_top_k(row, k):
    """Columns of the k highest values, NaN below everything (-inf included), ties to the lower
    column, increasing."""
    order = sorted(range(len(row)), key=lambda j: (math.isnan(row[j]), -row[j] if not math.isnan(row[j]) else 0, j))
    return sorted(order[:k])


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
