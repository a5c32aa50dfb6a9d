"""(b) The Triton kernels against the float64 reference on the same selection.

On CPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py); on CUDA natively. The
selection is the reference's (float64), handed to the kernels as block lists, so the test
checks the fine stage and the layout, not rounding-dependent tile choices.
"""
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from helpers import (HAS_TRITON, KERNEL_DEVICE, REL_TOL, assert_close_rel, grids, interpreted_examples,
                     joint_token_mask, kernel_dtypes, sparsities, text_key_keep, text_paddings, tiles)
from sparse_inductor import TopK, triton_launch
from sparse_inductor.attention import _valid_keys_first
from sparse_inductor.layout import build_layout, tile_layout
from sparse_inductor.ops import transpose_block_lists
from sparse_inductor.reference import causal_token_mask, reference_attention, reference_selection, token_mask
from sparse_inductor.selection import lists_from_mask, mask_from_lists, select_tiles

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def run_kernels(q, k, v, grad, grid, tile, selected, scale, query_tables_per_head=True):
    """Forward and backward kernels on sequence-order inputs (any strides). With
    ``query_tables_per_head=False`` the query tables are ``[B, n]``, shared by the heads."""
    layout = tile_layout(grid, tile, q.device)
    B, H = q.shape[:2]
    slots, counts = layout.slots.expand(B, -1), layout.counts.expand(B, -1)
    q_slots, q_counts = layout.slots.expand(B, H, -1), layout.counts.expand(B, H, -1)  # per head
    if not query_tables_per_head:
        q_slots, q_counts = slots, counts
    kv_num, kv_idx = lists_from_mask(selected.to(q.device))
    out = torch.empty_like(q)
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    triton_launch.block_sparse_fwd(q, k, v, out, lse, q_slots, slots, q_counts, counts, kv_num, kv_idx, scale)
    delta = (out.float() * grad.float()).sum(-1)
    q_num, q_idx = transpose_block_lists(kv_num, kv_idx, layout.num_tiles)
    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
    triton_launch.block_sparse_bwd(grad, q, k, v, lse, delta, dq, dk, dv, q_slots, slots, q_counts, counts,
                                   kv_num, kv_idx, q_num, q_idx, scale)
    for got, like in ((out, q), (dq, q), (dk, k), (dv, v)):  # laid out like the input (size-1 dims aside)
        assert all(a == b for a, b, n in zip(got.stride(), like.stride(), like.shape) if n > 1)
    return out, lse, dq, dk, dv


def check_against_reference(grid, tile, sparsity, dtype, B, H, D, seed, heads_inner=False):
    """``heads_inner``: Q, K, V as ``[B, N, H, D].transpose(1, 2)`` views, as DiTs pass them."""
    g = torch.Generator().manual_seed(seed)
    N = math.prod(grid)
    if heads_inner:
        q, k, v, grad = (torch.randn(B, N, H, D, generator=g).to(dtype).transpose(1, 2) for _ in range(4))
    else:
        q, k, v, grad = (torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(4))
    scale = 1.0 / math.sqrt(D)
    selected = reference_selection(q, k, grid, sparsity, tile)
    out, lse, dq, dk, dv = run_kernels(*(x.to(KERNEL_DEVICE) for x in (q, k, v, grad)), grid, tile, selected, scale)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref, ref_lse = reference_attention(q64, k64, v64, token_mask(selected, grid, tile), scale)
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    tol = REL_TOL[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close_rel(out, ref, tol["out"], "out")
    assert_close_rel(lse, ref_lse, tol["lse"], "lse")
    for name, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_close_rel(got, want, tol["grad"], name)


@interpreted_examples(6)
@given(grid=grids(200), tile=tiles, sparsity=sparsities, dtype=kernel_dtypes, B=st.integers(1, 2),
       H=st.integers(1, 2), D=st.sampled_from([16, 32, 48, 64]), seed=st.integers(0, 2**16),
       heads_inner=st.booleans())
def test_kernels_match_reference(grid, tile, sparsity, dtype, B, H, D, seed, heads_inner):
    check_against_reference(grid, tile, sparsity, dtype, B, H, D, seed, heads_inner)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_kernels_head_dims(dtype, D):
    # A non-dividing grid (5 frames), the default tile, VSA's sparsity.
    check_against_reference((5, 4, 8), (4, 4, 4), 0.5, dtype, 1, 2, D, seed=D)


@pytest.mark.parametrize("chunk", [4, 16])
def test_kernels_pack_border_rows_over_several_chunks(monkeypatch, chunk):
    # The forward and dQ loops pack the valid rows of border tiles (8..48 of 64 tokens) so that
    # several tiles share one loop step, CHUNK list entries at a time: with about 18 of 24 tiles
    # listed per query tile, chunk 4 takes five passes and chunk 16 two, each ending on a partly
    # filled step.
    monkeypatch.setattr(triton_launch, "PACK_CHUNK", chunk)
    # (One head: the chunk passes are per query tile, and TopK lists 18 tiles for every head.)
    check_against_reference((6, 10, 14), (4, 4, 4), 0.25, torch.float32, 1, 1, 32, seed=chunk)


def test_kernels_rows_with_very_negative_scores():
    # Every score is about -150, so LSE is too: a padding key slot (score 0) would get
    # p = exp2(-LSE * log2 e) = inf if it took part in the softmax or the gradients unmasked.
    # The 5-frame grid has partial tiles, whose padding slots share steps with valid keys.
    # fp32 only: with keys this alike, dQ cancels to ~1 % of its terms, below fp16's rounding.
    grid, tile, dtype = (5, 4, 8), (4, 4, 4), torch.float32
    g = torch.Generator().manual_seed(0)
    N, D = math.prod(grid), 16
    q = (-6.0 + 0.1 * torch.randn(1, 2, N, D, generator=g)).to(dtype)
    k = (6.0 + 0.1 * torch.randn(1, 2, N, D, generator=g)).to(dtype)
    v, grad = (torch.randn(1, 2, N, D, generator=g).to(dtype) for _ in range(2))
    selected = reference_selection(q, k, grid, 0.5, tile)
    out, lse, dq, dk, dv = run_kernels(*(x.to(KERNEL_DEVICE) for x in (q, k, v, grad)), grid, tile, selected, 0.25)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref, ref_lse = reference_attention(q64, k64, v64, token_mask(selected, grid, tile), 0.25)
    assert ref_lse.max() < -100
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    tol = REL_TOL[dtype]
    assert_close_rel(out, ref, tol["out"], "out")
    for name, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_close_rel(got, want, tol["grad"], name)


def test_kernels_take_query_tables_shared_by_the_heads():
    # The op's documented query tables are [B, H, n]; [B, n] (what the KV tables are) must mean
    # "the same for every head", not a head stride of 1 (which read the next slot, and past the
    # table for the last head: an illegal address on the H200, tenth session).
    grid, tile, dtype = (3, 5, 6), (2, 4, 4), torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(2, 3, math.prod(grid), 16, generator=g).to(dtype) for _ in range(4))
    selected = reference_selection(q, k, grid, 0.5, tile)
    inputs = [x.to(KERNEL_DEVICE) for x in (q, k, v, grad)]
    per_head = run_kernels(*inputs, grid, tile, selected, 0.25)
    shared = run_kernels(*inputs, grid, tile, selected, 0.25, query_tables_per_head=False)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), per_head, shared):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


@interpreted_examples(4)  # 7 took 112 s on CPU (ninth session); the GPU runs the profile's count
@given(grid=grids(120), tile=st.sampled_from([(4, 4, 4), (2, 2, 2), (2, 3, 5)]), sparsity=sparsities,
       dtype=kernel_dtypes, before=st.integers(0, 70), after=st.integers(0, 20),
       padding=text_paddings, seed=st.integers(0, 2**16))
def test_kernels_joint_text_and_key_padding(grid, tile, sparsity, dtype, before, after, padding, seed):
    # Text blocks are listed by every query block (DESIGN.md §3.5) and a key-padding mask moves a
    # batch's hidden text keys past its text blocks' counts: their dK, dV rows must be exactly 0.
    B, H, D = 2, 2, 32
    N = math.prod(grid)
    L = before + N + after
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(B, H, L, D, generator=g).to(dtype) for _ in range(4))
    keep = text_key_keep(B, before, N, after, padding, g)
    layout = build_layout(grid, tile, before, after)
    slots, counts = layout.slots.expand(B, -1), layout.counts.expand(B, -1)
    q_slots, q_counts = layout.slots.expand(B, H, -1), layout.counts.expand(B, H, -1)
    kv_slots, kv_counts = (slots, counts) if padding == "none" else _valid_keys_first(layout, keep.view(B, 1, 1, L))
    scale = D ** -0.5
    kv_num, kv_idx = select_tiles(q, k, layout, TopK(sparsity), scale)
    dev = [x.to(KERNEL_DEVICE) for x in (q, k, v, grad)]
    tables = [t.to(KERNEL_DEVICE) for t in (q_slots, kv_slots, q_counts, kv_counts, kv_num, kv_idx)]
    out, lse = torch.empty_like(dev[0]), torch.empty(B, H, L, device=KERNEL_DEVICE)
    triton_launch.block_sparse_fwd(*dev[:3], out, lse, *tables, scale)
    delta = (out.float() * dev[3].float()).sum(-1)
    q_num, q_idx = transpose_block_lists(tables[4], tables[5], layout.num_tiles)
    dq, dk, dv = (torch.empty_like(x) for x in dev[:3])
    triton_launch.block_sparse_bwd(dev[3], *dev[:3], lse, delta, dq, dk, dv, *tables, q_num, q_idx, scale)

    # The reference builds its own token mask; only the video-to-video tile choice is taken from
    # the lists (a rounding-dependent choice; the selection has its own tests).
    Mv = layout.num_video_tiles
    selected = mask_from_lists(kv_num, kv_idx, layout.num_tiles)[:, :, :Mv, :Mv]
    mask = joint_token_mask(selected, grid, tile, before, after, keep)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref, ref_lse = reference_attention(q64, k64, v64, mask, scale)
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    tol = REL_TOL[dtype]
    assert_close_rel(out, ref, tol["out"], "out")
    assert_close_rel(lse, ref_lse, tol["lse"], "lse")
    for name, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_close_rel(got, want, tol["grad"], name)
    hidden = ~keep.to(KERNEL_DEVICE)
    for got in (dk, dv):
        assert (got.transpose(1, 2)[hidden] == 0).all()


@pytest.mark.slow
@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="large shapes are too slow for the interpreter")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_kernels_large_grid_cuda(dtype, D):
    check_against_reference((9, 14, 22), (4, 4, 4), 0.875, dtype, 2, 3, D, seed=7)


@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="bitwise repeatability is a property of the GPU kernels")
def test_gradients_are_bitwise_deterministic():
    grid, tile = (9, 14, 22), (4, 4, 4)
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(1, 4, math.prod(grid), 128, generator=g).to("cuda", torch.bfloat16) for _ in range(4))
    selected = reference_selection(q.cpu(), k.cpu(), grid, 0.75, tile)
    first = run_kernels(q, k, v, grad, grid, tile, selected, 0.1)
    for _ in range(3):
        again = run_kernels(q, k, v, grad, grid, tile, selected, 0.1)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@interpreted_examples(5)
@given(grid=grids(150), tile=tiles, r=st.sampled_from([0.25, 0.5, 0.75]), dtype=kernel_dtypes,
       seed=st.integers(0, 2**16))
# The CPU profile's five draws hold r = 0.25 and 0.5 only: r = 0.75 and bfloat16 pinned here, and
# the 64-slot tile at r = 0.5 and 0.75 (its 32- and 64-slot query blocks, checked below).
@example(grid=(3, 2, 1), tile=(2, 2, 2), r=0.75, dtype=torch.float16, seed=65536)
@example(grid=(5, 6, 4), tile=(4, 4, 4), r=0.5, dtype=torch.bfloat16, seed=1)
@example(grid=(5, 6, 4), tile=(4, 4, 4), r=0.75, dtype=torch.float32, seed=2)
def test_kernels_query_keep(grid, tile, r, dtype, seed):
    """query_keep in the kernels: per-head query tables, query blocks smaller than KV blocks
    (e.g. 32 query slots against 64-slot KV tiles), kept rows computed, dropped rows given
    dQ = 0; outputs and gradients against the float64 definition (DESIGN.md §3.7)."""
    block, block_m, _, _ = check_query_keep_kernels(grid, tile, r, dtype, 2, 2, 32, 0, 0, "none", None, seed)
    if block == 64:  # a 64-slot tile keeps at most 16 / 32 / 48 rows: 16 / 32 / 64-slot query blocks
        assert block_m == {0.25: 16, 0.5: 32, 0.75: 64}[r]


def check_query_keep_kernels(grid, tile, r, dtype, B, H, D, before, after, padding, causal_block_size, seed):
    """The kernels under query_keep, with joint text, key padding or a block-causal mask, against
    the float64 definition (kept rows attend under their own mask, dropped rows copy their
    centre). Returns what the dK/dV loop saw: ``(BLOCK, BLOCK_M, q_num, q_counts)`` (the
    transposed list lengths and the query blocks' counts), for the callers to check coverage."""
    from sparse_inductor import causal
    from sparse_inductor.query_keep import broadcast_centres, select_queries
    from sparse_inductor.reference import reference_attention_query_keep, reference_query_keep

    N = math.prod(grid)
    L = before + N + after
    assert causal_block_size is None or L == N, "a block-causal mask takes video-only sequences"
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(B, H, L, D, generator=g).to(dtype) for _ in range(4))
    scale = D ** -0.5
    keep_keys = text_key_keep(B, before, N, after, padding, g)
    layout = build_layout(grid, tile, before, after)
    Mv, M = layout.num_video_tiles, layout.num_tiles
    slots, counts = layout.slots.expand(B, -1), layout.counts.expand(B, -1)
    kv_slots, kv_counts = ((slots, counts) if padding == "none"
                           else _valid_keys_first(layout, keep_keys.view(B, 1, 1, L)))
    video = slice(before, before + N)
    # Video queries keep the reference's video tiles (block-causal rules included) and every text
    # block; text queries list every block (a full row).
    selected = reference_selection(q[:, :, video], k[:, :, video], grid, 0.5, tile, causal_block_size=causal_block_size)
    tiles = torch.ones(B, H, M, M, dtype=torch.bool)
    tiles[:, :, :Mv, :Mv] = selected
    kv_num, kv_idx = lists_from_mask(tiles)
    dev = [x.to(KERNEL_DEVICE) for x in (q, k, v, grad)]
    keep = select_queries(dev[0], build_layout(grid, tile, before, after, KERNEL_DEVICE), r)
    q_num_rows, q_idx_rows = keep.query_lists(kv_num.to(KERNEL_DEVICE), kv_idx.to(KERNEL_DEVICE))
    tables = [t.to(KERNEL_DEVICE) for t in (keep.q_slots, kv_slots, keep.q_counts, kv_counts, q_num_rows, q_idx_rows)]
    causal_tokens = causal.tokens_per_block(grid, causal_block_size)
    attn, lse = torch.empty_like(dev[0]), torch.empty(B, H, L, device=KERNEL_DEVICE)
    triton_launch.block_sparse_fwd(*dev[:3], attn, lse, *tables, scale, causal_tokens=causal_tokens)
    attn = torch.where(keep.kept.unsqueeze(-1), attn, 0)
    leaf = attn.detach().float().requires_grad_()
    out = broadcast_centres(leaf, keep)
    (d_attn,) = torch.autograd.grad(out, leaf, dev[3].float())
    d_attn = d_attn.to(dtype)
    delta = (attn.float() * d_attn.float()).sum(-1)
    q_num, q_idx = transpose_block_lists(tables[4], tables[5], M)
    dq, dk, dv = (torch.full_like(x, float("nan")) for x in dev[:3])  # every row must be written
    triton_launch.block_sparse_bwd(d_attn, *dev[:3], lse, delta, dq, dk, dv, *tables, q_num, q_idx, scale,
                                   causal_tokens=causal_tokens)

    kept, source = reference_query_keep(q[:, :, video], grid, tile, r)
    assert torch.equal(keep.kept.cpu()[:, :, video], kept)
    full_source = torch.arange(L).expand(B, H, L).clone()
    full_source[:, :, video] = source + before
    mask = joint_token_mask(selected, grid, tile, before, after, keep_keys)
    if causal_block_size is not None:
        mask = mask & causal_token_mask(grid, causal_block_size)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref = reference_attention_query_keep(q64, k64, v64, mask, full_source, scale)
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    tol = REL_TOL[dtype]
    assert_close_rel(out.to(dtype), ref, tol["out"], "out")
    for name, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_close_rel(got, want, tol["grad"], name)
    assert (dq.cpu()[~keep.kept.cpu()] == 0).all()
    hidden = ~keep_keys.to(KERNEL_DEVICE)
    for got in (dk, dv):
        assert (got.transpose(1, 2)[hidden] == 0).all()
    return layout.block_size, keep.block, q_num.cpu(), keep.q_counts.cpu()


@interpreted_examples(6)
@given(grid=grids(150), tile=st.sampled_from([(4, 4, 4), (2, 4, 4), (1, 4, 8), (3, 3, 3), (2, 3, 5)]),
       r=st.sampled_from([0.25, 0.5]), dtype=kernel_dtypes, H=st.integers(1, 2), D=st.sampled_from([16, 32]),
       case=st.sampled_from(["video", "text", "text, key padding", "block-causal"]),
       text=st.sampled_from([(7, 0), (0, 20), (7, 20)]), padding=st.sampled_from(["some", "all text"]),
       causal_block_size=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_kernels_query_keep_dkdv_groups(grid, tile, r, dtype, H, D, case, text, padding, causal_block_size, seed):
    """Under query_keep a dK/dV step takes ``BLOCK // BLOCK_M`` listed query blocks at once (2 or
    4 here: 32 or 16 query slots against 64, 16 against 32), row ``r`` being slot ``r % BLOCK_M``
    of entry ``i + r // BLOCK_M``; the drawn cases hold odd list lengths (a half-empty last step),
    partial tiles (fewer kept rows than ``BLOCK_M``), text blocks split into query blocks (a
    second one may hold no row), hidden text keys, and block-causal masks whose blocks may cut a
    tile (the mask is per row, and one step's rows come from different tiles)."""
    before, after = (0, 0) if case in ("video", "block-causal") else text
    padding = padding if case == "text, key padding" else "none"
    causal_block_size = causal_block_size if case == "block-causal" else None
    check_query_keep_kernels(grid, tile, r, dtype, 2, H, D, before, after, padding, causal_block_size, seed)


@pytest.mark.parametrize("r, group", [(0.5, 2), (0.25, 4)])
@pytest.mark.parametrize("case", ["text and key padding", "block-causal"])
def test_kernels_query_keep_dkdv_groups_cover_the_tails(r, group, case):
    """Fixed cases that hold, for sure, what the property draws: groups of 2 and 4 query blocks
    per dK/dV step, list lengths that are no multiple of the group (the last step part empty),
    kept counts below ``BLOCK_M`` (border tiles), hidden text keys, a block-causal mask."""
    if case == "text and key padding":
        args = dict(before=7, after=20, padding="some", causal_block_size=None)
    else:
        args = dict(before=0, after=0, padding="none", causal_block_size=2)  # cuts the 4-frame tiles
    block, block_m, q_num, q_counts = check_query_keep_kernels((6, 5, 6), (4, 4, 4), r, torch.float32, 1, 2, 16,
                                                               seed=group, **args)
    assert block // block_m == group
    assert (q_num % group != 0).any()
    assert ((q_counts > 0) & (q_counts < block_m)).any()


def test_kernels_query_keep_write_dropped_rows_as_zero():
    """The forward writes every position, as an epilogue fused into its store expects: query_keep's
    dropped rows (excluded slots ``-(p + 2)``) as 0 with LSE -inf — those in a partial tile's own
    32-slot query block next to its kept rows as well as those in the tile's second block — and the
    kept rows as their attention. Fails if the kernel's taking-part flag picks the wrong rows."""
    from sparse_inductor.query_keep import select_queries

    grid, tile, B, H, D = (5, 6, 6), (4, 4, 4), 1, 2, 32  # border tiles of 48, 32, 16, 8 ... tokens
    N = math.prod(grid)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    scale = D ** -0.5
    layout = tile_layout(grid, tile, KERNEL_DEVICE)
    selected = reference_selection(q, k, grid, 0.5, tile)
    kv_num, kv_idx = lists_from_mask(selected)
    dev = [x.to(KERNEL_DEVICE) for x in (q, k, v)]
    keep = select_queries(dev[0], layout, 0.5)
    assert keep.block == 32
    blocks = keep.q_slots.view(B, H, -1, 32)
    first = blocks[:, :, : 2 * layout.num_video_tiles : 2]  # each tile's first query block
    assert (first < -1).any()  # excluded slots beside kept rows (partial tiles) are exercised
    q_num, q_idx = keep.query_lists(kv_num.to(KERNEL_DEVICE), kv_idx.to(KERNEL_DEVICE))
    slots, counts = layout.slots.expand(B, -1), layout.counts.expand(B, -1)
    out = torch.full_like(dev[0], float("nan"))
    lse = torch.full((B, H, N), float("nan"), device=KERNEL_DEVICE)
    triton_launch.block_sparse_fwd(*dev, out, lse, keep.q_slots, slots, keep.q_counts, counts, q_num, q_idx, scale)
    kept = keep.kept
    assert (~kept).any()
    assert (out[~kept] == 0).all() and (lse[~kept] == float("-inf")).all()
    q64, k64, v64 = (x.double() for x in (q, k, v))
    ref, ref_lse = reference_attention(q64, k64, v64, token_mask(selected, grid, tile), scale)
    kept = kept.cpu()
    assert_close_rel(out.cpu()[kept], ref[kept], REL_TOL[torch.float32]["out"], "kept rows")
    assert_close_rel(lse.cpu()[kept], ref_lse[kept], REL_TOL[torch.float32]["lse"], "kept rows' LSE")
