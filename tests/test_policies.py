"""Selection policies (DESIGN.md §3.7): each policy's lists against its float64 / brute-force
definition, the clamps, ties, the per-head mix with Skip and Full against the reference with
gradients, and BSA's query_keep (output and gradients against the reference definition)."""
import math

import pytest
import torch
from helpers import (
    HAS_TRITON,
    KERNEL_DEVICE,
    REL_TOL,
    assert_close_rel,
    grids,
    joint_token_mask,
    text_key_keep,
    text_paddings,
    tiles,
)
from hypothesis import assume, given
from hypothesis import strategies as st

import sparse_inductor as si
from sparse_inductor import triton_launch
from sparse_inductor.attention import sparse_attention
from sparse_inductor.layout import build_layout
from sparse_inductor.policies.mass import mass_cut_torch
from sparse_inductor.reference import (
    cut_margin,
    reference_attention,
    reference_attention_query_keep,
    reference_mass_selection,
    reference_pattern,
    reference_query_keep,
    reference_selection,
    tile_coords,
    tile_ids,
    token_mask,
)
from sparse_inductor.selection import mask_from_lists

DEVICE = KERNEL_DEVICE
op_dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16]
                            + ([] if DEVICE == "cuda" else [torch.float64]))


def _qkv(B, H, N, D, dtype, seed, scale_q=1.0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g) * scale_q
    k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(2))
    return [x.to(DEVICE, dtype).requires_grad_(requires_grad) for x in (q, k, v)]


def _num_tiles(grid, tile):
    return int(tile_ids(grid, tile).max()) + 1


# ---------------------------------------------------------------------------------------------
# TopK as a policy
# ---------------------------------------------------------------------------------------------
@given(grid=grids(300), tile=tiles, sparsity=st.sampled_from([0.0, 0.5, 0.875]), seed=st.integers(0, 2**16))
def test_topk_policy_is_the_sparsity_keyword(grid, tile, sparsity, seed):
    q, k, v = _qkv(1, 2, math.prod(grid), 16, torch.float32, seed)
    a = si.select_blocks(q, k, grid, sparsity=sparsity, tile=tile)
    b = si.select_blocks(q, k, grid, policy=si.TopK(sparsity), tile=tile)
    assert torch.equal(a.kv_num_blocks, b.kv_num_blocks) and torch.equal(a.kv_indices, b.kv_indices)
    assert torch.equal(si.video_sparse_attention(q, k, v, grid, sparsity=sparsity, tile=tile),
                       si.video_sparse_attention(q, k, v, grid, policy=si.TopK(sparsity), tile=tile))


def test_policies_are_frozen_hashable_and_validated():
    assert hash(si.CumulativeMass(0.9)) == hash(si.CumulativeMass(0.9))
    assert si.Window(1, 1, 1) | si.Stripe(first_frames=1) == si.Window(1, 1, 1) | si.Stripe(first_frames=1)
    assert len({si.TopK(0.5), si.TopK(0.5), si.Window(1, 1, 1)}) == 2
    with pytest.raises(ValueError, match="CumulativeMass p"):
        si.CumulativeMass(p=0.0)
    with pytest.raises(ValueError, match="min_tiles"):
        si.CumulativeMass(min_tiles=0)
    with pytest.raises(ValueError, match="max_fraction"):
        si.CumulativeMass(max_fraction=1.5)
    with pytest.raises(ValueError, match="Window rt"):
        si.Window(-1, 0, 0)
    with pytest.raises(ValueError, match="Stripe tiles"):
        si.Stripe(tiles=((0.0, 1.0, 0.0),))
    with pytest.raises(ValueError, match="PerHead policies\\[1\\]"):
        si.PerHead([si.Full(), 0.5])
    with pytest.raises(ValueError, match="query_keep"):
        si.video_sparse_attention(*_qkv(1, 1, 64, 16, torch.float32, 0), (4, 4, 4), query_keep=0.0)
    with pytest.raises(ValueError, match="PerHead has 3 policies but the site has 2 heads"):
        si.video_sparse_attention(*_qkv(1, 2, 64, 16, torch.float32, 0), (4, 4, 4), policy=si.PerHead([si.Full()] * 3))
    with pytest.raises(TypeError, match="policy must be a selection policy"):
        si.select_blocks(*_qkv(1, 1, 64, 16, torch.float32, 0)[:2], (4, 4, 4), policy=0.5)


# ---------------------------------------------------------------------------------------------
# CumulativeMass
# ---------------------------------------------------------------------------------------------
@given(grid=grids(400), tile=tiles, p=st.sampled_from([0.3, 0.7, 0.9, 0.99, 1.0]), min_tiles=st.integers(1, 6),
       max_fraction=st.sampled_from([0.1, 0.5, 1.0]), B=st.integers(1, 2), H=st.integers(1, 2),
       sharp=st.sampled_from([0.5, 4.0]), seed=st.integers(0, 2**16))
def test_cumulative_mass_matches_reference(grid, tile, p, min_tiles, max_fraction, B, H, sharp, seed):
    """The CPU op (float64 inputs) against the loop definition, row by row; a row whose
    cumulative mass at the cut lies within 1e-9 of p may be cut differently by rounding."""
    g = torch.Generator().manual_seed(seed)
    N = math.prod(grid)
    q = torch.randn(B, H, N, 16, generator=g, dtype=torch.float64) * sharp
    k = torch.randn(B, H, N, 16, generator=g, dtype=torch.float64)
    policy = si.CumulativeMass(p, min_tiles, max_fraction)
    sel = si.select_blocks(q, k, grid, policy=policy, tile=tile)
    want = reference_mass_selection(q, k, grid, p, min_tiles, max_fraction, tile)
    got = sel.dense_mask()
    clear = cut_margin(q, k, grid, p, tile) > 1e-9
    assert torch.equal(got[clear], want[clear])
    M = _num_tiles(grid, tile)
    lo, hi = min(min_tiles, M), max(math.ceil(max_fraction * M - 1e-9), min(min_tiles, M))
    assert ((sel.kv_num_blocks >= lo) & (sel.kv_num_blocks <= hi)).all()
    assert sel.kv_indices.shape[-1] == hi, "the list width is the clamp's upper bound"
    for b, h, i in torch.nonzero(sel.kv_num_blocks >= 2).tolist()[:20]:
        n = int(sel.kv_num_blocks[b, h, i])
        assert (sel.kv_indices[b, h, i, :n].diff() > 0).all(), "kept tiles listed once, increasing"


def test_cumulative_mass_clamps_and_extremes():
    grid, tile = (4, 8, 8), (2, 2, 2)  # 32 tiles
    q, k, v = _qkv(1, 2, 256, 16, torch.float64 if DEVICE == "cpu" else torch.float32, 3, scale_q=3.0)
    M = 32
    tiny = si.select_blocks(q, k, grid, policy=si.CumulativeMass(1e-6, min_tiles=3, max_fraction=1.0), tile=tile)
    assert (tiny.kv_num_blocks == 3).all(), "p below the largest tile's mass: min_tiles wins"
    full = si.select_blocks(q, k, grid, policy=si.CumulativeMass(1.0, min_tiles=1, max_fraction=1.0), tile=tile)
    assert (full.kv_num_blocks == M).all(), "p = 1 keeps every tile"
    capped = si.select_blocks(q, k, grid, policy=si.CumulativeMass(1.0, min_tiles=1, max_fraction=0.25), tile=tile)
    assert (capped.kv_num_blocks == 8).all(), "ceil(0.25 * 32) caps the rows"
    crossed = si.select_blocks(q, k, grid, policy=si.CumulativeMass(0.5, min_tiles=10, max_fraction=0.1), tile=tile)
    assert (crossed.kv_num_blocks == 10).all(), "min_tiles wins over max_fraction"
    # p = 1 and max_fraction = 1 is dense attention, equal to SDPA.
    out = si.video_sparse_attention(q, k, v, grid, policy=si.CumulativeMass(1.0, 1, 1.0), tile=tile)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert_close_rel(out, dense, REL_TOL[q.dtype]["out"], "p=1 vs SDPA")
    # The kept tiles are the top-k of P: ties (equal pooled keys) go to the lower index.
    flat = torch.ones_like(k)
    ties = si.select_blocks(q, flat, grid, policy=si.CumulativeMass(0.2, 1, 1.0), tile=tile)
    n = math.ceil(0.2 * M - 1e-9)  # equal P = 1/M each
    assert (ties.kv_num_blocks == n).all()
    assert (ties.kv_indices[..., :n] == torch.arange(n, dtype=torch.int32, device=ties.kv_indices.device)).all()


def test_cumulative_mass_weights_partial_tiles_by_their_tokens():
    # Two KV tiles with the same pooled key, one full (16 tokens) and one of 1 token: the full
    # one holds 16/17 of the mass (ln n_j in the logits), so p = 0.9 keeps it alone.
    grid, tile = (1, 1, 17), (1, 1, 16)
    q = torch.ones(1, 1, 17, 16, dtype=torch.float64)
    k = torch.ones(1, 1, 17, 16, dtype=torch.float64)
    sel = si.select_blocks(q, k, grid, policy=si.CumulativeMass(0.9, min_tiles=1, max_fraction=1.0), tile=tile)
    assert sel.kv_num_blocks.tolist() == [[[1, 1]]] and sel.kv_indices[0, 0, :, 0].tolist() == [0, 0]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@given(rows=st.integers(1, 5), cols=st.integers(1, 300), p=st.sampled_from([0.05, 0.5, 0.9, 0.999, 1.0]),
       data=st.data(), sharp=st.sampled_from([0.1, 2.0, 8.0]), levels=st.sampled_from([None, 2]),
       seed=st.integers(0, 2**16))
def test_mass_cut_kernel_matches_torch(rows, cols, p, data, sharp, levels, seed):
    """The CUDA path's kernel (interpreted on CPU) against the CPU op's sort + cumsum, in fp32;
    rows whose cumulative mass at the cut is within 1e-5 of p are exempt (summation order)."""
    lo = data.draw(st.integers(1, cols))
    hi = data.draw(st.integers(lo, cols))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, cols, generator=g) * sharp
    if levels:
        logits = torch.round(logits * levels) / levels  # exact ties
    counts = torch.randint(1, 65, (cols,), generator=g, dtype=torch.int32)
    num = torch.empty(rows, dtype=torch.int32, device=KERNEL_DEVICE)
    out = torch.zeros(rows, hi, dtype=torch.int32, device=KERNEL_DEVICE)
    triton_launch.mass_cut_tiles(logits.to(KERNEL_DEVICE), counts.to(KERNEL_DEVICE), p, lo, hi, num, out)
    want_num, want_idx = mass_cut_torch(logits, counts, p, lo, hi)
    prob = torch.softmax(logits.double() + counts.double().log(), -1)
    cum = torch.cumsum(torch.sort(prob, -1, descending=True).values, -1)
    clear = (cum - p).abs().min(-1).values > 1e-5
    assert torch.equal(num.cpu()[clear], want_num[clear])
    got_mask = mask_from_lists(num.cpu().view(1, 1, rows), out.cpu().view(1, 1, rows, hi), cols)[0, 0]
    want_mask = mask_from_lists(want_num.view(1, 1, rows), want_idx.view(1, 1, rows, hi), cols)[0, 0]
    assert torch.equal(got_mask[clear], want_mask[clear])


# ---------------------------------------------------------------------------------------------
# Static patterns
# ---------------------------------------------------------------------------------------------
radii = st.integers(0, 3)


@given(grid=grids(500), tile=tiles, rt=radii, rh=radii, rw=radii, seed=st.integers(0, 2**16))
def test_static_patterns_match_brute_force(grid, tile, rt, rh, rw, seed):
    q, k, _ = _qkv(2, 1, math.prod(grid), 16, torch.float32, seed)
    M = _num_tiles(grid, tile)
    coords = tile_coords(grid, tile)
    for policy, want in (
        (si.Window(rt, rh, rw), reference_pattern("window", grid, tile, rt=rt, rh=rh, rw=rw)),
        (si.Temporal(rh, rw), reference_pattern("temporal", grid, tile, rh=rh, rw=rw)),
    ):
        sel = si.select_blocks(q, k, grid, policy=policy, tile=tile)
        assert torch.equal(sel.dense_mask().cpu(), want.expand(2, 1, M, M)), policy
        assert sel.kv_indices.shape[-1] == max(1, int(want.sum(-1).max())), "width = the widest row"
    # A stripe of a few tiles named by their coordinates, and the first frame's tiles.
    g = torch.Generator().manual_seed(seed)
    picked = sorted(set(torch.randint(0, M, (3,), generator=g).tolist()))
    nt = -(-grid[0] // tile[0])
    tile_grid = (nt, -(-grid[1] // tile[1]), -(-grid[2] // tile[2]))
    stripe = si.Stripe.at([tuple(coords[j].tolist()) for j in picked], tile_grid, first_frames=1)
    kept = set(picked) | {j for j in range(M) if int(coords[j, 0]) == 0}
    sel = si.select_blocks(q, k, grid, policy=stripe, tile=tile)
    assert torch.equal(sel.dense_mask().cpu(), reference_pattern("stripe", grid, tile, kept=kept).expand(2, 1, M, M))
    # A union keeps what any member keeps.
    union = si.Window(rt, rh, rw) | stripe
    sel = si.select_blocks(q, k, grid, policy=union, tile=tile)
    want = reference_pattern("window", grid, tile, rt=rt, rh=rh, rw=rw) | reference_pattern("stripe", grid, tile,
                                                                                               kept=kept)
    assert torch.equal(sel.dense_mask().cpu(), want.expand(2, 1, M, M))


def test_stripe_positions_carry_over_resolutions():
    # Calibrated on a 4x6x8 tile grid at tile (1, 3, 5) = first frame, middle row, right edge.
    stripe = si.Stripe.at([(1, 3, 7)], (4, 6, 8))
    assert stripe.tile_indices((4, 6, 8)) == [(1 * 6 + 3) * 8 + 7]
    # At twice the resolution the tile's centre is the corner of tiles (2..3, 6..7, 14..15): the
    # upper tile is taken on every axis.
    assert stripe.tile_indices((8, 12, 16)) == [(3 * 12 + 7) * 16 + 15]
    # At a resolution that does not divide, the tile holding the same relative place.
    assert stripe.tile_indices((5, 7, 9)) == [(int(1.5 / 4 * 5) * 7 + int(3.5 / 6 * 7)) * 9 + int(7.5 / 8 * 9)]
    assert si.Stripe(first_frames=2).tile_indices((3, 2, 2)) == list(range(8))


@given(grid=grids(240), tile=st.sampled_from([(2, 2, 2), (1, 4, 4), (2, 3, 5)]), dtype=op_dtypes,
       before=st.sampled_from([0, 9]), after=st.sampled_from([0, 5]), seed=st.integers(0, 2**16))
def test_per_head_mix_matches_reference_with_gradients(grid, tile, dtype, before, after, seed):
    """Skip (output and gradients exactly 0, text rows too), Full, a window and a dynamic
    policy in one site, joint text included, against the float64 reference."""
    N = math.prod(grid)
    L = before + N + after
    policy = si.PerHead([si.Skip(), si.Full(), si.Window(0, 1, 1) | si.Stripe(first_frames=1),
                         si.CumulativeMass(0.8, 2, 0.5)])
    q, k, v = _qkv(2, 4, L, 16, dtype, seed, requires_grad=True)
    out = sparse_attention(q, k, v, grid, tile=tile, policy=policy, text_before=before, text_after=after)
    g = torch.Generator().manual_seed(seed + 1)
    grad = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    video = slice(before, before + N)
    sel = si.select_blocks(q[:, :, video], k[:, :, video], grid, policy=policy, tile=tile)
    keep = torch.ones(2, L, dtype=torch.bool)
    mask = joint_token_mask(sel.dense_mask().cpu(), grid, tile, before, after, keep)
    assert not sel.dense_mask()[:, 0].any(), "the skipped head keeps no tile"
    # The skipped head (0) is exactly zero; the other heads follow the reference.
    assert (out[:, 0] == 0).all() and (dq[:, 0] == 0).all() and (dk[:, 0] == 0).all() and (dv[:, 0] == 0).all()
    q64, k64, v64 = (x.detach()[:, 1:].cpu().double().requires_grad_() for x in (q, k, v))
    ref, _ = reference_attention(q64, k64, v64, mask[:, 1:])
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), grad[:, 1:].cpu().double())
    tol = REL_TOL[dtype]
    assert_close_rel(out[:, 1:], ref, tol["out"], "out")
    for name, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_close_rel(got[:, 1:], want, tol["grad"], name)


# ---------------------------------------------------------------------------------------------
# query_keep
# ---------------------------------------------------------------------------------------------
@given(grid=grids(300), tile=tiles, r=st.sampled_from([0.25, 0.5, 0.75, 1.0]), seed=st.integers(0, 2**16))
def test_query_keep_selection_matches_reference(grid, tile, r, seed):
    from sparse_inductor.query_keep import select_queries

    q, _, _ = _qkv(2, 2, math.prod(grid), 16, torch.float64 if DEVICE == "cpu" else torch.float32, seed)
    keep = select_queries(q, build_layout(grid, tile, device=q.device), r)
    kept, _ = reference_query_keep(q, grid, tile, r)
    assert torch.equal(keep.kept.cpu(), kept.cpu())


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@given(grid=grids(300), tile=tiles, r=st.sampled_from([0.25, 0.5, 0.75, 1.0]), B=st.integers(1, 2),
       H=st.integers(1, 2), D=st.sampled_from([16, 40, 64]), values=st.sampled_from(["integers", "gaussian"]),
       heads_inner=st.booleans(), nan_row=st.booleans(), seed=st.integers(0, 2**16))
def test_query_rank_kernel_matches_torch(grid, tile, r, B, H, D, values, heads_inner, nan_row, seed):
    """The CUDA path's query ranking kernel (interpreted on CPU) gives exactly the torch path's
    tables: per tile the centre first, then the lowest cosine similarity to it, ties to the lower
    slot, dropped slots marked. Small integer queries make the similarities exact in both and
    give many exact ties (repeated rows); Gaussian fp64 ones have none; a NaN row ranks as the
    most similar."""
    from sparse_inductor.query_keep import num_kept, rank_query_rows_torch

    g = torch.Generator().manual_seed(seed)
    layout = build_layout(grid, tile)
    L = math.prod(grid)
    shape = (B, L, H, D) if heads_inner else (B, H, L, D)
    if values == "integers":
        q = torch.randint(-1, 2, shape, generator=g).float()
    else:
        q = torch.randn(shape, generator=g, dtype=torch.float64)
    if heads_inner:
        q = q.transpose(1, 2)
    if nan_row:
        q[0, 0, L // 2] = float("nan")
    Mv, S = layout.num_video_tiles, layout.block_size
    n_kept = num_kept(r, layout.counts[:Mv].long()).to(torch.int32)
    want_tables, want_kept = rank_query_rows_torch(q, layout.slots[: Mv * S], layout.counts[:Mv], n_kept)
    tables = torch.full((B, H, Mv, S), -99, dtype=torch.int32, device=KERNEL_DEVICE)
    kept = torch.zeros((B, H, Mv, S), dtype=torch.int8, device=KERNEL_DEVICE)
    dev = KERNEL_DEVICE
    triton_launch.rank_query_rows(q.to(dev), layout.slots[: Mv * S].to(dev), layout.counts[:Mv].to(dev),
                                  n_kept.to(dev), tables, kept)
    assert torch.equal(tables.cpu(), want_tables)
    assert torch.equal(kept.cpu().bool(), want_kept)


@given(grid=grids(200), tile=tiles, policy=st.sampled_from([si.TopK(0.5), si.CumulativeMass(0.7, 2, 0.5),
                                                            si.Window(1, 0, 1)]),
       r=st.sampled_from([0.25, 0.5, 0.7]), dtype=op_dtypes, B=st.integers(1, 2), H=st.integers(1, 2),
       before=st.sampled_from([0, 7]), after=st.sampled_from([0, 20]), padding=text_paddings,
       seed=st.integers(0, 2**16))
def test_query_keep_matches_reference_with_gradients(grid, tile, policy, r, dtype, B, H, before, after, padding,
                                                     seed):
    """Output and gradients of query_keep (composed with a KV policy, joint text, key padding)
    against the float64 definition: kept rows attend, dropped rows copy their centre; the
    gradient of that (a dropped row's dO flows into its centre's row)."""
    N = math.prod(grid)
    L = before + N + after
    q, k, v = _qkv(B, H, L, 16, dtype, seed, requires_grad=True)
    g = torch.Generator().manual_seed(seed + 1)
    keep_keys = text_key_keep(B, before, N, after, padding, g)
    kpm = None if padding == "none" else keep_keys.view(B, 1, 1, L).to(DEVICE)
    out = sparse_attention(q, k, v, grid, tile=tile, policy=policy, query_keep=r, text_before=before,
                           text_after=after, key_padding_mask=kpm)
    grad = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    video = slice(before, before + N)
    sel = si.select_blocks(q[:, :, video], k[:, :, video], grid, policy=policy, tile=tile)
    mask = joint_token_mask(sel.dense_mask().cpu(), grid, tile, before, after, keep_keys)
    kept, source = reference_query_keep(q[:, :, video].cpu(), grid, tile, r)
    full_source = torch.arange(L).expand(B, H, L).clone()
    full_source[:, :, video] = source + before
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    ref = reference_attention_query_keep(q64, k64, v64, mask, full_source)
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), grad.cpu().double())
    tol = REL_TOL[dtype]
    assert_close_rel(out, ref, tol["out"], "out")
    for name, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_close_rel(got, want, tol["grad"], name)
    dropped = ~kept
    assert (dq[:, :, video].cpu()[dropped] == 0).all(), "a dropped query gets dQ = 0"


@given(grid=grids(200), tile=tiles, dtype=op_dtypes, seed=st.integers(0, 2**16))
def test_query_keep_one_is_exactly_the_op(grid, tile, dtype, seed):
    q, k, v = _qkv(1, 2, math.prod(grid), 16, dtype, seed, requires_grad=True)
    a = si.video_sparse_attention(q, k, v, grid, sparsity=0.5, tile=tile)
    b = si.video_sparse_attention(q, k, v, grid, sparsity=0.5, tile=tile, query_keep=1.0)
    assert torch.equal(a, b)
    ga = torch.autograd.grad(a.sum(), (q, k, v))
    gb = torch.autograd.grad(b.sum(), (q, k, v))
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_query_keep_as_an_argument_of_a_compiled_function():
    """A query_keep that changes between calls of a compiled function (Dynamo made the float symbolic
    after the first recompile; a graph constant per value now) traces with fullgraph and gives the eager result; it
    failed with "Failed to trace builtin operator repr" (H200, 2026-12-01), and still must not
    silently reuse another value's graph: 0.3 and 0.2 differ in their query block size (32 / 16), 2/3
    keeps 32 of a 48-token tile."""
    grid, tile = (4, 8, 8), (4, 4, 4)
    q, k, v = _qkv(1, 2, math.prod(grid), 16, torch.float32, 0)

    def attend(q, k, v, query_keep):
        return si.video_sparse_attention(q, k, v, grid, sparsity=0.5, tile=tile, query_keep=query_keep)

    compiled = torch.compile(attend, fullgraph=True, backend="eager")
    for r in (1.0, 0.5, 0.3, 0.2, 2 / 3, 0.3):
        torch.testing.assert_close(compiled(q, k, v, r), attend(q, k, v, r), rtol=0, atol=0)


def test_sparsity_as_an_argument_of_a_compiled_function():
    """The same for ``sparsity``: it failed to trace from its second value on ("repr_impl not
    implemented", torch 2.11 and 2.13) and now gives the eager result for each value."""
    grid, tile = (4, 8, 8), (4, 4, 4)
    q, k, v = _qkv(1, 2, math.prod(grid), 16, torch.float32, 0)

    def attend(q, k, v, sparsity):
        return si.video_sparse_attention(q, k, v, grid, sparsity=sparsity, tile=tile)

    compiled = torch.compile(attend, fullgraph=True, backend="eager")
    for s in (0.5, 0.75, 0.3, 0.875, 0.75):
        torch.testing.assert_close(compiled(q, k, v, s), attend(q, k, v, s), rtol=0, atol=0)


@pytest.mark.parametrize("argument", ["query_keep", "sparsity"])
def test_float_arguments_of_a_compiled_function_are_graph_constants(argument):
    """Each value of a float argument gets its own graph, with the float a constant: Dynamo's automatic
    dynamic floats made a changed query_keep a graph input, and that graph built the kept-layout tables
    per call (273 Inductor kernels instead of 15 on CPU, 8.8 ms of host time per call on the H200,
    NOTES eighth session). The graphs' inputs are q, k and v only, and each value gives the eager result."""
    grid, tile = (4, 8, 8), (4, 4, 4)
    q, k, v = _qkv(1, 2, math.prod(grid), 16, torch.float32, 0)
    values = (1.0, 0.5, 0.25) if argument == "query_keep" else (0.5, 0.75, 0.25)
    graph_inputs = []

    def record(gm, example_inputs):
        graph_inputs.append([tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                             for x in example_inputs])
        return gm.forward

    def attend(q, k, v, value):
        return si.video_sparse_attention(q, k, v, grid, tile=tile, **{argument: value})

    torch.compiler.reset()
    try:
        compiled = torch.compile(attend, fullgraph=True, backend=record)
        for value in values:
            torch.testing.assert_close(compiled(q, k, v, value), attend(q, k, v, value), rtol=0, atol=0)
    finally:
        torch.compiler.reset()
    assert graph_inputs == [[tuple(q.shape)] * 3] * len(values), graph_inputs


DECIMAL_FRACTIONS = st.one_of(st.integers(1, 10**9).map(lambda i: i / 10**9),
                              st.integers(1, 10**4).map(lambda i: i / 10**4),
                              st.sampled_from([1 / 3, 2 / 3, 1 / 6, 5 / 6, 1 / 7, 6 / 7, 0.1, 0.3, 0.7, 0.875]))


@given(r=DECIMAL_FRACTIONS, n=st.integers(1, 4096))
def test_kept_counts_follow_the_reference_rule(r, n):
    """query_keep's ``max(1, ceil(round(r * n, 9)))`` and TopK's ``max(1, ceil(round((1 - s) * n, 9)))``,
    the float64 reference's rules, for fractions of up to 9 decimal places and common ratios, on
    ints and tensors of any integer dtype (int32 counts must not overflow)."""
    from sparse_inductor.layout import MAX_BLOCK_SIZE
    from sparse_inductor.query_keep import num_kept
    from sparse_inductor.selection import num_selected

    want = max(1, math.ceil(round(r * n, 9)))
    assert num_kept(r, n) == want
    # Tensors hold counts of one block (at most MAX_BLOCK_SIZE tokens: num_kept's lookup table).
    m = min(n, MAX_BLOCK_SIZE)
    want_m = max(1, math.ceil(round(r * m, 9)))
    for dtype in (torch.int32, torch.int64):
        assert num_kept(r, torch.tensor([m, m, 0], dtype=dtype)).tolist() == [want_m, want_m, 1]
    want = max(1, math.ceil(round((1.0 - r) * n, 9)))
    assert num_selected(r, n) == want
    assert num_selected(r, torch.tensor([n], dtype=torch.int32)).tolist() == [want]


def test_num_kept_exact_cases():
    from sparse_inductor.query_keep import num_kept

    assert num_kept(0.1, 10) == 1 and num_kept(0.3, 10) == 3 and num_kept(0.7, 10) == 7
    assert num_kept(2 / 3, 48) == 32 and num_kept(1 / 6, 12) == 2 and num_kept(1 / 3, 64) == 22
    assert num_kept(0.01, 64) == 1 and num_kept(1.0, 64) == 64 and num_kept(0.5, 64) == 32
    assert num_kept(0.5, torch.tensor([64, 16], dtype=torch.int32)).tolist() == [32, 8]


def test_query_keep_flops_and_selection_counts():
    grid, tile = (4, 8, 8), (4, 4, 4)
    q, k, _ = _qkv(1, 2, 256, 16, torch.float32, 0)
    full = si.select_blocks(q, k, grid, sparsity=0.5, tile=tile)
    half = si.select_blocks(q, k, grid, sparsity=0.5, tile=tile, query_keep=0.5)
    assert full.kept_fraction() == pytest.approx(0.5)
    assert half.kept_fraction() == pytest.approx(0.25)
    assert (half.query_counts == 32).all()


def test_reference_selection_unchanged_by_policies():
    # The TopK oracle is still the §3.2 definition.
    grid, tile = (3, 5, 6), (2, 2, 2)
    q, k, _ = _qkv(1, 1, 90, 16, torch.float32, 4)
    sel = si.select_blocks(q, k, grid, policy=si.TopK(0.75), tile=tile)
    assert torch.equal(sel.dense_mask().cpu(), reference_selection(q.cpu(), k.cpu(), grid, 0.75, tile))
    assume(True)
    assert token_mask(sel.dense_mask().cpu(), grid, tile).shape[-1] == 90
