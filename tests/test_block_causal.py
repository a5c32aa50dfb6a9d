"""Block-causal masks over frames (diffusion forcing) composed with the sparse selection.

The semantics are in :func:`sparse_inductor.reference.causal_token_mask`: every policy chooses
among each query tile's allowed KV tiles (those not wholly in its future; TopK keeps
``max(1, ceil((1 - sparsity) · A_i))`` of the ``A_i``), every row also keeps its own tile, and
straddling tiles are masked per token. Checked here against the float64 reference: the tile
rule, each policy's selection, the kernels (interpreted on CPU) forward and backward, the eager
op, compiled graphs (extern op and Inductor templates), the pass's recognition of the mask (and
its refusal of every other mask), and diffusers' SkyReels-V2 diffusion-forcing transformer.
"""
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import HAS_TRITON, KERNEL_DEVICE, REL_TOL, assert_close_rel, grids, kernel_dtypes, rel_l2
import sparse_inductor as si
from sparse_inductor import causal, triton_launch
from sparse_inductor.attention import sparse_attention
from sparse_inductor.layout import tile_layout
from sparse_inductor.ops import transpose_block_lists
from sparse_inductor.reference import (causal_allowed_tiles, causal_tiles_split_blocks, causal_token_mask, cut_margin,
                                       reference_attention, reference_attention_query_keep,
                                       reference_causal_attention_mask, reference_causal_restrict,
                                       reference_mass_selection, reference_pattern, reference_query_keep,
                                       reference_selection, tile_coords, tile_ids)
from sparse_inductor.selection import lists_from_mask, mask_from_lists
from test_lowering import template_backend  # noqa: F401  (the fixture renders templates on CPU)

DEVICE = KERNEL_DEVICE
# Tiles of 1 to 4 frames, so that causal blocks of 1 to 5 frames straddle some of them.
tiles = st.sampled_from([(4, 4, 4), (2, 4, 4), (4, 2, 2), (1, 4, 8), (3, 3, 3), (2, 3, 5), (4, 4, 2)])
block_sizes = st.integers(1, 5)
sparsities = st.sampled_from([0.0, 0.3, 0.5, 0.75, 0.9])
video_grids = grids(300).filter(lambda g: g[0] >= 2)  # at least two frames: something to mask


def _qkv(B, H, N, D, dtype, seed, requires_grad=False, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g).to(device, dtype).requires_grad_(requires_grad) for _ in range(3)]


def _num_tiles(grid, tile):
    return int(tile_ids(grid, tile).max()) + 1


def _fine_reference(q, k, v, grad, selected, grid, tile, c, scale=None):
    """Float64 output and gradients of attention over ``selected`` tiles under the causal mask (a
    row that keeps no key, e.g. of a skipped head, is 0 with LSE -inf, as the op defines it)."""
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    mask = reference_causal_attention_mask(selected.cpu(), grid, tile, c)
    empty = ~mask.any(-1, keepdim=True)
    out, lse = reference_attention(q64, k64, v64, mask | empty, scale)
    out, lse = torch.where(empty, 0.0, out), torch.where(empty[..., 0], float("-inf"), lse)
    return (out, lse, *torch.autograd.grad(out, (q64, k64, v64), grad.cpu().double()))


# ---------------------------------------------------------------------------------------------
# The tile rule and the budget
# ---------------------------------------------------------------------------------------------
@given(grid=grids(400), tile=tiles, c=st.integers(1, 8))
def test_allowed_tiles_and_block_splits_follow_the_token_rule(grid, tile, c):
    """The closed form the selection uses against the reference's count of allowed token pairs."""
    assert torch.equal(causal.allowed_tiles(grid, tile, c), causal_allowed_tiles(grid, tile, c))
    assert causal.tiles_split_blocks(grid, tile, c) == causal_tiles_split_blocks(grid, tile, c)
    assert causal_allowed_tiles(grid, tile, c).diagonal().all(), "a tile is always allowed for itself"


def test_rows_with_fewer_allowed_tiles_keep_proportionally_fewer():
    """Grid 9 x 8 x 4, tile (4, 4, 4): 3 tile frames x 2 tiles. With 5 frames per causal block the
    first tile frame (frames 0-3) may see tile frames 0 and 1 (frame 4 is in its block): A = 4;
    the others see all 6. TopK(0.5) keeps k_i = ceil(0.5 · A_i) = 2, 3, 3. The pooled q of each
    tile is a distinct basis vector and k = q, so every row's best tile is its own."""
    grid, tile, c = (9, 8, 4), (4, 4, 4), 5
    ids = tile_ids(grid, tile)
    q = torch.nn.functional.one_hot(ids, 16).to(torch.float64).view(1, 1, -1, 16) * 4.0
    assert causal_allowed_tiles(grid, tile, c).sum(-1).tolist() == [4, 4, 6, 6, 6, 6]
    sel = si.select_blocks(q, q, grid, sparsity=0.5, tile=tile, causal_block_size=c)
    assert sel.kv_num_blocks[0, 0].tolist() == [2, 2, 3, 3, 3, 3]
    assert sel.kv_indices.shape[-1] == 4, "the width: the unmasked k (3) plus the own tile"
    mask = sel.dense_mask()[0, 0]
    assert mask.diagonal().all() and not mask[:2, 4:].any(), "own tiles kept, future tiles never"
    # Sparsity 0 keeps every allowed tile: the masked dense attention.
    dense = si.select_blocks(q, q, grid, sparsity=0.0, tile=tile, causal_block_size=c)
    assert torch.equal(dense.dense_mask()[0, 0], causal_allowed_tiles(grid, tile, c))


# ---------------------------------------------------------------------------------------------
# Selection of every policy against the reference
# ---------------------------------------------------------------------------------------------
@given(grid=video_grids, tile=tiles, c=block_sizes, sparsity=sparsities, seed=st.integers(0, 2**16))
def test_topk_selection_matches_reference(grid, tile, c, sparsity, seed):
    q, k, _ = _qkv(2, 2, math.prod(grid), 16, torch.float64, seed, device="cpu")
    sel = si.select_blocks(q, k, grid, sparsity=sparsity, tile=tile, causal_block_size=c)
    want = reference_selection(q, k, grid, sparsity, tile, causal_block_size=c)
    assert torch.equal(sel.dense_mask(), want)
    idx, n = sel.kv_indices, sel.kv_num_blocks.unsqueeze(-1)
    both_listed = torch.arange(1, idx.shape[-1]) < n  # entries j - 1 and j
    assert (idx[..., 1:] > idx[..., :-1])[both_listed].all(), "kept tiles listed once, increasing"


@given(grid=video_grids, tile=tiles, c=block_sizes, p=st.sampled_from([0.3, 0.8, 0.95, 1.0]),
       min_tiles=st.integers(1, 4), max_fraction=st.sampled_from([0.25, 0.5, 1.0]), seed=st.integers(0, 2**16))
def test_cumulative_mass_selection_matches_reference(grid, tile, c, p, min_tiles, max_fraction, seed):
    """Softmax, cut and clamp over each row's allowed tiles; rows whose mass at the cut lies
    within 1e-9 of p may be cut differently by rounding and are exempt."""
    q, k, _ = _qkv(2, 2, math.prod(grid), 16, torch.float64, seed, device="cpu")
    q = q * 3.0
    policy = si.CumulativeMass(p, min_tiles, max_fraction)
    sel = si.select_blocks(q, k, grid, policy=policy, tile=tile, causal_block_size=c)
    want = reference_mass_selection(q, k, grid, p, min_tiles, max_fraction, tile, causal_block_size=c)
    clear = cut_margin(q, k, grid, p, tile, causal_block_size=c) > 1e-9
    assert torch.equal(sel.dense_mask()[clear], want[clear])


@given(grid=video_grids, tile=tiles, c=block_sizes, seed=st.integers(0, 2**16))
def test_static_patterns_full_skip_and_per_head_are_intersected(grid, tile, c, seed):
    """Window | Stripe, Temporal, Full and Skip in one PerHead site: each head's pattern ∩ the
    allowed tiles, plus own tiles; Skip keeps nothing; Full keeps every allowed tile."""
    M = _num_tiles(grid, tile)
    g = torch.Generator().manual_seed(seed)
    picked = sorted(set(torch.randint(0, M, (2,), generator=g).tolist()))
    coords = tile_coords(grid, tile)
    tile_grid = tuple(-(-a // b) for a, b in zip(grid, tile))
    stripe = si.Stripe.at([tuple(coords[j].tolist()) for j in picked], tile_grid)
    policy = si.PerHead([si.Window(0, 1, 0) | stripe, si.Skip(), si.Full(), si.Temporal(0, 1)])
    q, k, _ = _qkv(1, 4, math.prod(grid), 16, torch.float64, seed, device="cpu")
    sel = si.select_blocks(q, k, grid, policy=policy, tile=tile, causal_block_size=c)
    patterns = torch.stack([
        reference_pattern("window", grid, tile, rt=0, rh=1, rw=0) | reference_pattern("stripe", grid, tile,
                                                                                       kept=set(picked)),
        torch.zeros(M, M, dtype=torch.bool), torch.ones(M, M, dtype=torch.bool),
        reference_pattern("temporal", grid, tile, rh=0, rw=1)])[None]
    want = reference_causal_restrict(patterns, grid, tile, c, skipped_heads=[False, True, False, False])
    assert torch.equal(sel.dense_mask(), want)
    assert torch.equal(want[0, 2], causal_allowed_tiles(grid, tile, c))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@given(rows=st.integers(1, 3), Mq=st.integers(1, 6), cols=st.integers(1, 200), p=st.sampled_from([0.3, 0.9, 1.0]),
       density=st.sampled_from([0.2, 0.7, 1.0]), ties=st.booleans(), seed=st.integers(0, 2**16))
def test_selection_kernels_under_a_mask_match_torch(rows, Mq, cols, p, density, ties, seed):
    """The CUDA path's top-k and mass-cut kernels (interpreted on CPU) with an allowed mask and
    per-row budgets, against the CPU ops (fp32; rows within 1e-5 of p at the cut are exempt)."""
    from sparse_inductor.policies.mass import mass_cut_allowed_torch
    from sparse_inductor.selection import top_k_allowed_tiles

    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, Mq, cols, generator=g) * 3.0
    if ties:
        scores = torch.round(scores)
    allowed = torch.rand(Mq, cols, generator=g) < density
    allowed[:, 0] = True  # every row allows something
    A = allowed.sum(-1).to(torch.int32)
    k_rows = torch.randint(0, 1 << 16, (Mq,), generator=g).remainder(A).to(torch.int32) + 1
    width = int(A.max())
    out = torch.zeros(rows, Mq, width, dtype=torch.int32, device=DEVICE)
    triton_launch.top_k_tiles_allowed(scores.to(DEVICE), allowed.to(DEVICE), k_rows.to(DEVICE), out)
    assert torch.equal(out.cpu(), top_k_allowed_tiles(scores, allowed, k_rows, width))
    want_sel = mask_from_lists(k_rows.expand(rows, Mq)[None], top_k_allowed_tiles(scores, allowed, k_rows, width)[None],
                               cols)[0]
    assert not (want_sel & ~allowed).any() and (want_sel.sum(-1) == k_rows).all()

    lo = torch.minimum(torch.full_like(A, 2), A)
    hi = torch.maximum((A + 1) // 2, lo)
    counts = torch.randint(1, 65, (cols,), generator=g, dtype=torch.int32)
    num = torch.empty(rows, Mq, dtype=torch.int32, device=DEVICE)
    idx = torch.zeros(rows, Mq, width, dtype=torch.int32, device=DEVICE)
    triton_launch.mass_cut_tiles_allowed(scores.to(DEVICE), counts.to(DEVICE), allowed.to(DEVICE), p, lo.to(DEVICE),
                                         hi.to(DEVICE), num, idx)
    want_num, want_idx = mass_cut_allowed_torch(scores, counts, allowed, p, lo, hi, width)
    prob = torch.softmax((scores.double() + counts.double().log()).masked_fill(~allowed, float("-inf")), -1)
    cum = torch.cumsum(torch.sort(prob, -1, descending=True).values, -1)
    clear = (cum - p).abs().min(-1).values > 1e-5
    assert torch.equal(num.cpu()[clear], want_num[clear])
    got = mask_from_lists(num.cpu()[None], idx.cpu()[None], cols)[0]
    want = mask_from_lists(want_num[None], want_idx[None], cols)[0]
    assert torch.equal(got[clear], want[clear]) and not (want & ~allowed).any()


# ---------------------------------------------------------------------------------------------
# The kernels (forward and backward) on the reference's selection
# ---------------------------------------------------------------------------------------------
def run_kernels(q, k, v, grad, grid, tile, selected, scale, causal_tokens):
    layout = tile_layout(grid, tile, q.device)
    B, H = q.shape[:2]
    slots, counts = layout.slots.expand(B, -1), layout.counts.expand(B, -1)
    q_slots, q_counts = layout.slots.expand(B, H, -1), layout.counts.expand(B, H, -1)
    kv_num, kv_idx = lists_from_mask(selected.to(q.device))
    out = torch.empty_like(q)
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    triton_launch.block_sparse_fwd(q, k, v, out, lse, q_slots, slots, q_counts, counts, kv_num, kv_idx, scale,
                                   causal_tokens=causal_tokens)
    delta = (out.float() * grad.float()).sum(-1)
    q_num, q_idx = transpose_block_lists(kv_num, kv_idx, layout.num_tiles)
    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
    triton_launch.block_sparse_bwd(grad, q, k, v, lse, delta, dq, dk, dv, q_slots, slots, q_counts, counts,
                                   kv_num, kv_idx, q_num, q_idx, scale, causal_tokens=causal_tokens)
    return out, lse, dq, dk, dv


def check_kernels(grid, tile, c, sparsity, dtype, B, H, D, seed):
    N = math.prod(grid)
    q, k, v = _qkv(B, H, N, D, dtype, seed, device="cpu")
    grad = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    scale = D ** -0.5
    selected = reference_selection(q, k, grid, sparsity, tile, causal_block_size=c)
    got = run_kernels(*(x.to(DEVICE) for x in (q, k, v, grad)), grid, tile, selected, scale,
                      causal.tokens_per_block(grid, c))
    want = _fine_reference(q, k, v, grad, selected, grid, tile, c, scale)
    tol = REL_TOL[dtype]
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert_close_rel(a, b, tol["lse" if name == "lse" else "out" if name == "out" else "grad"], name)
    return q, k, v, grad, selected, scale


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@settings(max_examples=8)
@given(grid=grids(160).filter(lambda g: g[0] >= 2), tile=tiles, c=block_sizes, sparsity=sparsities,
       dtype=kernel_dtypes, B=st.integers(1, 2), H=st.integers(1, 2), D=st.sampled_from([16, 32]),
       seed=st.integers(0, 2**16))
def test_kernels_match_reference(grid, tile, c, sparsity, dtype, B, H, D, seed):
    check_kernels(grid, tile, c, sparsity, dtype, B, H, D, seed)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_mask_straddling_tiles(dtype):
    """Tile (4, 4, 4) spans 4 frames; with 3 frames per causal block most kept tiles straddle the
    boundary. The same lists without the per-token mask are far from the reference (so the
    masking, not the lists alone, makes the kernels agree)."""
    grid, tile, c = (9, 4, 8), (4, 4, 4), 3
    q, k, v, grad, selected, scale = check_kernels(grid, tile, c, 0.5, dtype, 1, 2, 64, seed=9)
    unmasked = run_kernels(*(x.to(DEVICE) for x in (q, k, v, grad)), grid, tile, selected, scale, 0)
    want = _fine_reference(q, k, v, grad, selected, grid, tile, c, scale)
    assert rel_l2(unmasked[0], want[0]) > 10 * REL_TOL[dtype]["out"]
    assert rel_l2(unmasked[3], want[3]) > 10 * REL_TOL[dtype]["grad"]


# ---------------------------------------------------------------------------------------------
# The eager op (on CPU: the op's torch implementation)
# ---------------------------------------------------------------------------------------------
policies = st.sampled_from([si.TopK(0.5), si.TopK(0.875), si.CumulativeMass(0.7, 2, 0.5),
                            si.Window(0, 1, 1) | si.Stripe(first_frames=1), si.PerHead([si.Skip(), si.TopK(0.6)])])
op_dtypes = st.sampled_from([torch.float32, torch.bfloat16] + ([] if DEVICE == "cuda" else [torch.float64]))


@given(grid=video_grids, tile=tiles, c=block_sizes, policy=policies, dtype=op_dtypes, seed=st.integers(0, 2**16))
def test_op_matches_reference_with_gradients(grid, tile, c, policy, dtype, seed):
    """Output and gradients of the op against the float64 reference on the op's own selection
    (the selection itself is held to the reference in float64 above)."""
    N = math.prod(grid)
    q, k, v = _qkv(1, 2, N, 16, dtype, seed, requires_grad=True)
    out = si.video_sparse_attention(q, k, v, grid, policy=policy, tile=tile, causal_block_size=c)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    sel = si.select_blocks(q, k, grid, policy=policy, tile=tile, causal_block_size=c).dense_mask()
    assert not (sel.cpu() & ~causal_allowed_tiles(grid, tile, c)).any(), "no tile wholly in the future"
    want = _fine_reference(q, k, v, grad, sel, grid, tile, c)
    tol = REL_TOL[dtype]
    assert_close_rel(out, want[0], tol["out"], "out")
    for name, got, ref in zip(("dq", "dk", "dv"), grads, want[2:]):
        assert_close_rel(got, ref, tol["grad"], name)


@given(grid=video_grids, tile=tiles, c=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_sparsity_zero_is_masked_sdpa(grid, tile, c, seed):
    """Sparsity 0 (and Full) under the mask: SDPA with the block-causal attn_mask, with gradients."""
    dtype = torch.float64 if DEVICE == "cpu" else torch.float32
    q, k, v = _qkv(2, 2, math.prod(grid), 16, dtype, seed, requires_grad=True)
    mask = causal_token_mask(grid, c).to(DEVICE)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    want_grads = torch.autograd.grad(want.sum(), (q, k, v))
    for policy in (si.TopK(0.0), si.Full()):
        out = si.video_sparse_attention(q, k, v, grid, policy=policy, tile=tile, causal_block_size=c)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        tol = REL_TOL[dtype]
        assert_close_rel(out, want, tol["out"], f"{policy} vs masked SDPA")
        for got, ref in zip(grads, want_grads):
            assert_close_rel(got, ref, tol["grad"], f"{policy} grad vs masked SDPA")


@given(grid=video_grids, tile=st.sampled_from([(2, 4, 4), (1, 4, 8), (4, 2, 2)]), r=st.sampled_from([0.25, 0.5]),
       seed=st.integers(0, 2**16))
def test_query_keep_composes_when_tiles_stay_in_one_causal_block(grid, tile, r, seed):
    """Causal blocks of a multiple of the tile's frames: query_keep's centre sees the keys of every
    token of its tile, so the definition (dropped rows copy their centre) is exact; with gradients."""
    c = 2 * tile[0]
    N = math.prod(grid)
    q, k, v = _qkv(1, 2, N, 16, torch.float32, seed, requires_grad=True)
    out = si.video_sparse_attention(q, k, v, grid, sparsity=0.5, tile=tile, query_keep=r, causal_block_size=c)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    sel = si.select_blocks(q, k, grid, sparsity=0.5, tile=tile, causal_block_size=c).dense_mask()
    _, source = reference_query_keep(q.cpu(), grid, tile, r)
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    ref = reference_attention_query_keep(q64, k64, v64, reference_causal_attention_mask(sel.cpu(), grid, tile, c),
                                         source)
    rq, rk, rv = torch.autograd.grad(ref.sum(), (q64, k64, v64))
    tol = REL_TOL[torch.float32]
    assert_close_rel(out, ref, tol["out"], "out")
    for name, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_close_rel(got, want, tol["grad"], name)


@pytest.mark.skipif(DEVICE != "cpu", reason="float64 runs on the CPU path")
def test_gradients_are_exact():
    """gradcheck of the op (float64, CPU path) under a mask whose 1-frame causal blocks straddle
    every 2-frame tile (a static policy, so no perturbation can change the selection); the same
    gradient under torch.func."""
    grid, tile = (3, 2, 3), (2, 2, 2)
    q, k, v = _qkv(1, 1, math.prod(grid), 2, torch.float64, 0, requires_grad=True)

    def attend(q, k, v):
        return si.video_sparse_attention(q, k, v, grid, policy=si.Window(0, 0, 1), tile=tile, causal_block_size=1)

    assert torch.autograd.gradcheck(attend, (q, k, v))
    grads = torch.func.grad(lambda q: attend(q, k, v).square().sum())(q)
    assert torch.allclose(grads, torch.autograd.grad(attend(q, k, v).square().sum(), q)[0])


def test_bad_causal_arguments_are_named():
    q, k, v = _qkv(1, 1, 6 * 16, 16, torch.float32, 0)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="causal_block_size must be None .* or an int >= 1"):
            si.video_sparse_attention(q, k, v, (6, 4, 4), causal_block_size=bad)
    with pytest.raises(ValueError, match="query_keep=0.5 does not compose with causal_block_size=3"):
        si.video_sparse_attention(q, k, v, (6, 4, 4), tile=(4, 4, 4), query_keep=0.5, causal_block_size=3)
    with pytest.raises(ValueError, match="query_keep"):
        si.select_blocks(q, k, (6, 4, 4), tile=(2, 4, 4), query_keep=0.5, causal_block_size=3)
    # One causal block of every frame masks nothing: exactly the unmasked op.
    assert torch.equal(si.video_sparse_attention(q, k, v, (6, 4, 4), sparsity=0.5, causal_block_size=6),
                       si.video_sparse_attention(q, k, v, (6, 4, 4), sparsity=0.5))


# ---------------------------------------------------------------------------------------------
# Compiled: the op inside a graph (extern call), and the Inductor templates
# ---------------------------------------------------------------------------------------------
def _attend(grid, tile, c, policy):
    def attend(q, k, v):
        return sparse_attention(q, k, v, grid, tile=tile, policy=policy, causal_block_size=c) * 2.0
    return attend


def _check_compiled(attend, q, k, v, dtype):
    """The compiled ``attend`` against the eager one, forward and backward; returns the compiled
    output, gradients and the output gradient used."""
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.device, dtype)
    torch._dynamo.reset()
    out = torch.compile(attend, backend="inductor", fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    want = attend(q, k, v)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    tol = REL_TOL[dtype]
    assert_close_rel(out, want, tol["out"], "compiled vs eager op")
    for got, ref in zip(grads, want_grads):
        assert_close_rel(got, ref, tol["grad"], "compiled grad vs eager op")
    return out, grads, grad


@pytest.mark.parametrize("policy", [si.TopK(0.5), si.CumulativeMass(0.7, 1, 0.5)])
def test_compiled_op_matches_eager_and_reference(policy):
    grid, tile, c = (6, 4, 8), (4, 4, 4), 3
    q, k, v = _qkv(2, 2, math.prod(grid), 16, torch.float32, 3, requires_grad=True)
    out, grads, grad = _check_compiled(_attend(grid, tile, c, policy), q, k, v, torch.float32)
    sel = si.select_blocks(q, k, grid, policy=policy, tile=tile, causal_block_size=c).dense_mask()
    want = _fine_reference(q, k, v, 2.0 * grad, sel, grid, tile, c)  # attend returns 2 * attention
    tol = REL_TOL[torch.float32]
    assert_close_rel(out / 2.0, want[0], tol["out"], "compiled vs reference")
    for name, got, ref in zip(("dq", "dk", "dv"), grads, want[2:]):
        assert_close_rel(got, ref, tol["grad"], name + " vs reference")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_templates_match_eager_and_reference(template_backend, caplog):
    """The Inductor templates (forward and backward) with the per-token mask: rendered (no extern
    fallback), equal to the eager op and the float64 reference on the same selection."""
    from torch._inductor.utils import run_and_get_code

    import torch._inductor.config as inductor_config

    grid, tile, c, dtype = (6, 4, 8), (4, 4, 4), 3, torch.float32
    D = 16 if DEVICE == "cpu" else 64
    q, k, v = _qkv(1, 2, math.prod(grid), D, dtype, 5, requires_grad=True)
    attend = _attend(grid, tile, c, si.TopK(0.5))
    torch._dynamo.reset()
    with caplog.at_level("WARNING", logger="sparse_inductor"), inductor_config.patch(fx_graph_cache=False):
        out, code = run_and_get_code(torch.compile(attend, backend="inductor", fullgraph=True), q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert not [r for r in caplog.records if "stays an extern call" in r.getMessage()], caplog.text
    assert "fwd_tile(" in "\n".join(code) and "CAUSAL_TOKENS" in "\n".join(code)
    want = attend(q, k, v)
    want_grads = torch.autograd.grad(want, (q, k, v), torch.ones_like(want))
    tol = REL_TOL[dtype]
    assert_close_rel(out, want, tol["out"], "template vs eager op")
    for got, ref in zip(grads, want_grads):
        assert_close_rel(got, ref, tol["grad"], "template grad vs eager op")
    sel = si.select_blocks(q, k, grid, sparsity=0.5, tile=tile, causal_block_size=c).dense_mask()
    ref = _fine_reference(q, k, v, torch.full_like(q, 2.0), sel, grid, tile, c)
    assert_close_rel(out / 2.0, ref[0], tol["out"], "template vs reference")
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref[2:]):
        assert_close_rel(got, want, tol["grad"], name + " vs reference")


# ---------------------------------------------------------------------------------------------
# The pass: recognition of the mask, and refusal of every other mask
# ---------------------------------------------------------------------------------------------
class MaskedAttention(torch.nn.Module):
    """Self-attention over patchified video tokens with a mask built in forward (``kind``):
    SkyReels-style block-causal over frames, or masks that are not."""

    def __init__(self, kind="block_causal", c=2):
        super().__init__()
        self.kind, self.c = kind, c
        self.proj = torch.nn.Linear(8, 3 * 2 * 16)
        self.out = torch.nn.Linear(32, 8)

    def mask(self, T, H, W, device):
        N = T * H * W
        if self.kind in ("block_causal", "float", "frame_window"):
            r = torch.arange(T // self.c, device=device).repeat_interleave(self.c)
            frames = r.unsqueeze(0) <= r.unsqueeze(1)
            if self.kind == "frame_window":  # built like SkyReels' mask, but not causal
                frames = (r.unsqueeze(0) - r.unsqueeze(1)).abs() <= 1
            m = frames.view(T, 1, 1, T, 1, 1).repeat(1, H, W, 1, H, W).reshape(N, N)
            if self.kind == "float":
                m = torch.zeros(N, N, device=device).masked_fill(~m, float("-inf"))
            return m[None, None]
        if self.kind == "token_causal":  # causal over tokens, not frames
            return torch.ones(N, N, dtype=torch.bool, device=device).tril()[None, None]
        if self.kind == "anti_causal":
            f = torch.arange(N, device=device) // (H * W)
            return (f.unsqueeze(0) >= f.unsqueeze(1))[None, None]
        if self.kind == "window":  # a sliding window of frames: the first query sees a prefix, later ones do not
            f = torch.arange(N, device=device) // (H * W)
            return ((f.unsqueeze(0) - f.unsqueeze(1)).abs() <= 1)[None, None]
        if self.kind == "random":
            return (torch.rand(N, N, device=device) > 0.3)[None, None]
        if self.kind == "bias":
            f = torch.arange(N, device=device) // (H * W)
            return torch.where(f.unsqueeze(0) <= f.unsqueeze(1), 0.0, -1.0)[None, None]
        raise ValueError(self.kind)

    def forward(self, x, mask=None):
        B, C, T, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        q, k, v = self.proj(tokens).view(B, -1, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
        mask = self.mask(T, H, W, x.device) if mask is None else mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(out.transpose(1, 2).reshape(B, -1, 32))

    def sparse_oracle(self, x, c, **settings):
        B, C, T, H, W = x.shape
        q, k, v = self.proj(x.flatten(2).transpose(1, 2)).view(B, -1, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
        out = si.video_sparse_attention(q, k, v, (T, H, W), causal_block_size=c, **settings)
        return self.out(out.transpose(1, 2).reshape(B, -1, 32))


GRID = (6, 4, 8)


def _video(seed=0):
    return torch.randn(2, 8, *GRID, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind,c", [("block_causal", 3), ("float", 2)])
def test_block_causal_mask_is_recognised_and_sparse_with_gradients(kind, c):
    torch.manual_seed(0)
    model = MaskedAttention(kind, c)
    x = _video()
    with si.sparsity(0.5, min_tokens=0):
        explanation = si.explain(model, x)
        rows = list(explanation)
        assert [r["decision"] for r in rows] == ["sparse"], rows
        assert rows[0]["mask"] == f"block-causal ({c} frames per block)" and "block-causal" in str(explanation)
        torch._dynamo.reset()
        got = torch.compile(model, backend="sparse_inductor")(x)
        got.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want = model.sparse_oracle(x, c, sparsity=0.5)
    want.square().sum().backward()
    assert rel_l2(got, want) < 1e-5
    for n, p in model.named_parameters():
        assert rel_l2(grads[n], p.grad) < 1e-4, n
    with torch.no_grad():
        assert rel_l2(got, model(x)) > 1e-3, "the sparse path was taken"
        assert rel_l2(model.sparse_oracle(x, None, sparsity=0.5), want) > 1e-3, "the causal mask matters"


@pytest.mark.parametrize("kind,words", [
    ("token_causal", "not block-causal over frames of the grid"),
    ("anti_causal", "not block-causal over frames"),
    ("window", "not block-causal over frames of the grid"),
    ("frame_window", "not block-causal over frames of the grid"),
    ("random", "random op"),
    ("bias", "values other than 0 and -inf"),
    ("input", "graph input"),
])
def test_other_masks_stay_dense_with_a_reason(kind, words, caplog):
    torch.manual_seed(0)
    model = MaskedAttention("block_causal" if kind == "input" else kind, 2)
    x = _video()
    args = (x, model.mask(*GRID, "cpu")) if kind == "input" else (x,)
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0), caplog.at_level("INFO", logger="sparse_inductor"):
        rows = list(si.explain(model, *args))
        assert [r["decision"] for r in rows] == ["dense"] and words in rows[0]["reason"], rows
        if kind in ("input", "bias"):
            torch._dynamo.reset()
            got = torch.compile(model, backend="sparse_inductor")(*args)
            assert torch.allclose(got, model(*args), atol=1e-5), "a dense site is plain SDPA with its mask"
    assert any("stays dense" in r.getMessage() and words in r.getMessage() for r in caplog.records)


def test_a_mask_repeated_from_frames_is_checked_on_its_frames(monkeypatch):
    """Where the graph shows the token mask repeating a [T, T] frame mask (SkyReels), only that is
    evaluated: recognised with no N x N tensor at compile time; a mask built another way still
    needs its full value, here refused as too large."""
    from passes import masks

    monkeypatch.setattr(masks, "MAX_MASK_ELEMENTS", 100)  # a [6, 6] frame mask fits, [192, 192] does not
    x = _video()
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0):
        assert [r["decision"] for r in si.explain(MaskedAttention("block_causal", 3), x)] == ["sparse"]
        rows = list(si.explain(MaskedAttention("float", 3), x))
    assert rows[0]["decision"] == "dense" and "too large to check" in rows[0]["reason"], rows


def test_sparsity_zero_compiles_the_masked_sdpa():
    torch.manual_seed(0)
    model = MaskedAttention("block_causal", 3)
    x = _video()
    with torch.no_grad(), si.sparsity(0.0, min_tokens=0):
        assert [r["decision"] for r in si.explain(model, x)] == ["dense"]
        torch._dynamo.reset()
        got = torch.compile(model, backend="sparse_inductor")(x)
        want = model(x)
        assert rel_l2(got, want) < 1e-5
        assert rel_l2(got, model.sparse_oracle(x, 3, sparsity=0.0)) < 1e-5, "the op at sparsity 0 agrees"


def test_export_keeps_the_block_causal_mask():
    """sparse_inductor.export rewrites a recognised block-causal site with the mask as
    causal_block_size (not as a key-padding mask): the exported program equals the eager op."""
    torch.manual_seed(0)
    model = MaskedAttention("block_causal", 3).eval()
    x = _video()
    with torch.no_grad():
        program = si.export(model, (x,), sparsity=0.5, min_tokens=0)
        assert rel_l2(program.module()(x), model.sparse_oracle(x, 3, sparsity=0.5)) < 1e-5


def test_query_keep_on_straddling_tiles_stays_dense():
    model = MaskedAttention("block_causal", 3)
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0, query_keep=0.5):
        rows = list(si.explain(model, _video()))
    assert rows[0]["decision"] == "dense" and "query_keep=0.5 with a block-causal mask" in rows[0]["reason"]
    model = MaskedAttention("block_causal", 2)
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0, query_keep=0.5, tile=(2, 4, 4)):
        assert [r["decision"] for r in si.explain(model, _video())] == ["sparse"]


# ---------------------------------------------------------------------------------------------
# End to end: SkyReels-V2 diffusion forcing (diffusers)
# ---------------------------------------------------------------------------------------------
def test_skyreels_diffusion_forcing_is_sparse_and_equals_the_masked_reference(monkeypatch):
    """SkyReelsV2Transformer3DModel with num_frame_per_block=3 (``causal_block_size``, set by its
    diffusion-forcing pipeline through ``_set_ar_attention``) and per-frame timesteps: both
    self-attention sites are rewritten under the block-causal mask (tile (4, 4, 4) straddles the
    3-frame blocks) and the compiled model equals the model with the eager op in their place. The
    mask is recognised from its [T, T] frame mask (no N x N tensor at compile time: a real 720p
    model has N = 90,000)."""
    pytest.importorskip("diffusers")
    from diffusers import SkyReelsV2Transformer3DModel

    from passes import masks

    monkeypatch.setattr(masks, "MAX_MASK_ELEMENTS", 100)

    torch.manual_seed(0)
    model = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, qk_norm="rms_norm_across_heads").eval()
    model._set_ar_attention(3)
    grid = (6, 8, 8)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 16, 6, 16, 16, generator=g),)
    kwargs = dict(timestep=torch.tensor([[7, 7, 7, 3, 3, 3]]), encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
                  enable_diffusion_forcing=True, return_dict=False)
    N = math.prod(grid)
    sdpa = F.scaled_dot_product_attention
    seen = []

    def oracle_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if query.shape[2] == key.shape[2] == N:  # the video self-attentions
            assert torch.equal(attn_mask.reshape(N, N), causal_token_mask(grid, 3))
            seen.append(True)
            return sparse_attention(query, key, value, grid, tile=(4, 4, 4), scale=scale, sparsity=0.5,
                                    causal_block_size=3)
        return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    **kw)

    with torch.no_grad():
        with mock.patch.object(F, "scaled_dot_product_attention", oracle_sdpa):
            want = model(*args, **kwargs)[0]
        assert len(seen) == 2
        dense = model(*args, **kwargs)[0]
        with si.sparsity(0.5, min_tokens=0):
            rows = si.explain(model, *args, **kwargs)
            assert len(rows.sparse_rows) == 2 and all(r["grid"] == grid for r in rows.sparse_rows), str(rows)
            torch._dynamo.reset()
            got = torch.compile(model, backend="sparse_inductor")(*args, **kwargs)[0]
        with si.sparsity(0.0, min_tokens=0):  # (compiled masked SDPA: test_sparsity_zero_compiles_the_masked_sdpa)
            assert all(r["reason"] == "sparsity 0 (dense SDPA)" for r in si.explain(model, *args, **kwargs)
                       if r["q"][2] == r["k"][2])
    assert rel_l2(got, want) < 1e-4
    assert rel_l2(got, dense) > 1e-3, "the sparse path was taken"


@pytest.mark.parametrize("name", ["fidelity", "calibrate"])
def test_fidelity_and_calibrate_refuse_block_causal_sites(name):
    """They measure sites through the key-padding path, which would drop the causality: a clear
    error instead of numbers for another attention."""
    torch.manual_seed(0)
    model = MaskedAttention("block_causal", 3)
    with pytest.raises(NotImplementedError, match=f"{name}: site.*block-causal"):
        getattr(si, name)(model, _video(), min_tokens=0)
