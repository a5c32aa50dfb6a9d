"""Sparse attention vs dense SDPA vs FlexAttention on the same block selection (GPU).

All competitors run in this one process on the same inputs; times are medians of
``triton.testing.do_bench``. Rows:

* ``dense_sdpa``: ``F.scaled_dot_product_attention`` (default backend) on raster inputs.
* ``sparse_op``: ``video_sparse_attention`` in eager mode — everything the rewrite adds for one
  call: coarse selection and the block-sparse kernel (which gathers and scatters rows through
  the slot table: no permuted copies).
* ``sparse_compiled``: the same function under ``torch.compile`` — the path the backend takes:
  selection compiled by Inductor; on Hopper the compact TMA kernels (Q/K/V gathered into compact
  tile-major order by Inductor, the v17 forward and the v19 backward as extern calls); elsewhere
  the op rendered from our templates (autotuned).
* ``sparse_compiled_gather``: the same with the gather forward template (``forward_kernel="gather"``).
* ``sparse_kernel``: the block-sparse op alone (eager kernel) with a fixed selection.
* ``selection``: the coarse selection alone (forward only), with its own pooling pass, timed as a
  CUDA graph replay (GPU time); ``selection_launch``: the same with ``do_bench``, which for these
  short kernels is mostly host launch latency. (Since v28 ``sparse_compiled`` pools in the pass that
  permutes Q and K, so this row overstates what the selection adds there: profile_compiled.py splits it.)
* ``sparse_compiled_unfused`` / ``sparse_compiled_t128_unfused``: ``sparse_compiled`` / ``_t128`` with the
  separate Q/K permutation and pool passes (``attention.POOL_IN_PERMUTATION = False``), v28's A/B.
* ``tma_op``: our compact TMA op alone (eager) on compact inputs and a fixed selection, forward and
  forward+backward: the kernel-only row against ``fastvideo_triton``.
* ``flex_kernel``: compiled FlexAttention on tile-major copies of the inputs and the identical
  selection (a ``BlockMask`` built from our lists; a ``mask_mod`` masks padding slots).
* ``flex_dense``: compiled FlexAttention without a mask: what a Triton attention kernel reaches
  at full density on this GPU (its TFLOP/s is the ceiling the sparse kernel is compared with).
* ``fastvideo_pipeline``: the same kernel with what a rewrite around it must add, comparable to
  ``sparse_op``: the (compiled) selection, tile-major copies of Q, K, V, the output copied back.
* ``tma_list_kernel``: our TMA ceiling kernel (kernel_templates/tma_attention.py) on padded tile-major
  copies, one 64-row box per listed tile.
* ``tma_packed_kernel``: the compact tile-major TMA kernel (kernel_templates/tma_block_sparse.py) on
  compact copies and box lists made outside the timed region; ``tma_packed_kernel_qreg`` the same
  with Q in registers (wgmma RS), ``tma_packed_unmerged`` with one box per listed tile (no runs).
  ``tma_packed_boxes`` times the box-list pass (the Triton kernel, kernel_templates/box_lists.py,
  which also makes the kernel rows' boxes), ``tma_packed_boxes_torch`` the same pass in torch ops,
  ``tma_packed_permute`` the permutation of q, k, v to compact order (both would fuse into the
  selection and the producing kernels).
* ``sparse_compiled_t128`` / ``sparse_kernel_t128`` (``--tile128``): ``sparse_compiled`` and
  ``sparse_kernel`` with (4, 4, 8) tiles of 128 tokens at the same sparsity (FLOPs from their own lists);
  ``tma_t128_w4`` / ``_w8`` (``_qreg``): the compact TMA forward kernel on those tiles, 4 or 8 warps.
* ``fastvideo_triton``: FastVideo's Triton VSA kernel (``fastvideo-kernel`` 0.3.5,
  ``FASTVIDEO_VSA_TRITON=1``) on tile-major copies and the identical selection, when the
  package is importable (install it with ``pip install --no-deps fastvideo-kernel==0.3.5``).

Writes RESULTS.md and results.json into ``--out-dir`` (default: this folder).

    PYTHONPATH=$PWD python benchmarks/bench_attention.py
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sparse_inductor as si  # noqa: E402
from sparse_inductor.attention import sparse_attention  # noqa: E402
from sparse_inductor.layout import from_tiles, tile_layout, to_tiles  # noqa: E402
from sparse_inductor.selection import select_tiles  # noqa: E402

CASES = {
    "wan1.3b-480p": dict(H=12, grid=(21, 30, 52)),
    "wan14b-720p": dict(H=40, grid=(21, 45, 80)),
    # A grid of about the same size that divides by the tile (no partial tiles), for the
    # per-token cost of the 21-frame grids' border tiles.
    "dividing-20x32x52": dict(H=12, grid=(20, 32, 52)),
}


#: ``--cuda-graph``: every row timed as a CUDA graph replay (GPU time, no host launch overhead), forward
#: and forward+backward, e.g. eager kernel rows against each other; a row that cannot be captured fails
#: with its error printed.
GRAPH_TIMING = False


def bench(fn, warmup=25, rep=100):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def bench_gpu_time(fn, rep=100):
    """GPU time of ``fn`` replayed as a CUDA graph: no launch gaps between its kernels.

    The coarse selection is a handful of short kernels; timed alone with ``do_bench`` it
    measures mostly host launch latency (0.2-0.7 ms across runs), which inside a model is
    hidden behind the GPU work queued before it.
    """
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def kept_pair_tokens(selection) -> float:
    """Sum over kept (query tile, KV tile) pairs of valid-query x valid-key token counts."""
    counts = selection.counts.double()
    mask = selection.dense_mask().double()  # [B, H, M, M]
    return float(torch.einsum("bhij,i,j->", mask, counts, counts))


def flex_setup(layout, selection, N):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    valid_slot = layout.gather_index < N

    def mask_mod(b, h, q_idx, kv_idx):
        return valid_slot[kv_idx]

    # Flex wants kv_indices as wide as the number of KV blocks; ours are k wide. Pad with 0s
    # (entries past kv_num_blocks are ignored).
    B, H, M, K = selection.kv_indices.shape
    kv_indices = torch.nn.functional.pad(selection.kv_indices, (0, M - K))
    block_mask = BlockMask.from_kv_blocks(
        selection.kv_num_blocks, kv_indices, BLOCK_SIZE=layout.block_size,
        mask_mod=mask_mod, seq_lengths=(layout.num_slots, layout.num_slots),
    )
    flex = torch.compile(flex_attention, dynamic=False)
    # Flex's default 128-row tiles cannot run 64-token blocks; ask for 64x64 tiles.
    options = {"BLOCK_M": layout.block_size, "BLOCK_N": layout.block_size}
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask, kernel_options=options)


def fastvideo_setup(layout, selection):
    """FastVideo's Triton block-sparse attention on tile-major inputs, or None (reason printed)."""
    os.environ["FASTVIDEO_VSA_TRITON"] = "1"
    try:
        from fastvideo_kernel.block_sparse_attn import block_sparse_attn_from_indices
    except Exception as e:  # not installed, or an import of an unrelated part failed
        print(f"fastvideo_kernel not usable: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        return None
    counts = layout.counts.to(torch.int32).contiguous()

    def run(q, k, v, kv_num_blocks=selection.kv_num_blocks, kv_indices=selection.kv_indices):
        return block_sparse_attn_from_indices(q, k, v, kv_indices, kv_num_blocks, counts)[0]

    return run


def fwd_bwd(fn, inputs, grad):
    def run():
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, grad)

    return run


def packed_setup(layout, selection, q, k, v, sparse_kernel):
    """The compact-layout TMA rows: kernel variants on compact copies and ready box lists, the
    box-list pass (Triton and torch) and the permutation alone. Prints the kernel's error against
    ``sparse_kernel`` and whether the Triton box lists equal the torch ones; where they differ or
    the box kernel fails, says so and the kernel rows take the torch lists (no ``tma_packed_boxes``
    row then). Where the setup fails (the kernel does not compile or run on this GPU), prints why
    and returns no rows: the case's other rows still run (report, never hide)."""
    from sparse_inductor.compact_layout import compact_layout, from_compact, kv_boxes_by_class, to_compact
    import kernel_templates.tma_block_sparse as tma_block_sparse

    compact = compact_layout(layout)
    num, idx = selection.kv_num_blocks, selection.kv_indices

    def kernel(boxes, q_in_registers=False, device_descriptors=False):
        return lambda q, k, v: tma_block_sparse.tma_packed_block_sparse_attention(
            q, k, v, num, idx, compact, boxes=boxes, q_in_registers=q_in_registers,
            device_descriptors=device_descriptors)[0]

    def box_lists(impl):
        return lambda n, i: kv_boxes_by_class(n, i, compact, impl=impl)

    box_rows = [("tma_packed_boxes", box_lists("triton"), (num, idx)),
                ("tma_packed_boxes_torch", box_lists("torch"), (num, idx))]
    try:
        merged, unmerged = (kv_boxes_by_class(num, idx, compact, merge_adjacent=m, impl="torch") for m in (True, False))
        try:
            boxes = [kv_boxes_by_class(num, idx, compact, merge_adjacent=m, impl="triton") for m in (True, False)]
            same = all(torch.equal(a, b) for got, want in zip(boxes, (merged, unmerged)) for a, b in zip(got, want))
            print(f"tma_packed_boxes triton == torch: {same}"
                  + ("" if same else " (the kernel rows take the torch lists; no tma_packed_boxes row)"), flush=True)
            if same:
                merged, unmerged = boxes
            else:
                box_rows = box_rows[1:]
        except Exception as e:
            print(f"tma_packed_boxes dropped, the box-list kernel failed ({type(e).__name__}: "
                  f"{(str(e).splitlines() or [''])[0][:200]}); the kernel rows take the torch lists", flush=True)
            box_rows = box_rows[1:]
        inputs = tuple(to_compact(x, compact).contiguous() for x in (q, k, v))
        with torch.no_grad():
            ref = sparse_kernel(q, k, v).float()
            for label, fn in (("tma_packed", kernel(merged)), ("tma_packed_qreg", kernel(merged, True)),
                              ("tma_packed_devdesc", kernel(merged, device_descriptors=True))):
                err = (from_compact(fn(*inputs), compact).float() - ref).norm() / ref.norm()
                print(f"{label} vs sparse_kernel: relative L2 {err.item():.2e}", flush=True)
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:200]
        print(f"tma_packed rows dropped, setup failed: {type(e).__name__}: {first}", flush=True)
        traceback.print_exc(limit=3)
        return []
    return [("tma_packed_kernel", kernel(merged), inputs),
            ("tma_packed_kernel_qreg", kernel(merged, True), inputs),
            ("tma_packed_kernel_devdesc", kernel(merged, device_descriptors=True), inputs),
            ("tma_packed_unmerged", kernel(unmerged), inputs),
            *box_rows,
            ("tma_packed_permute", lambda q, k, v: [to_compact(x, compact) for x in (q, k, v)], (q, k, v))]


def tma_op_row(layout, selection, qkv, scale, grad, flops):
    """``tma_op``: the compact TMA op alone (eager) on compact Q, K, V and a fixed selection, forward and
    forward+backward: the kernels the compiled path runs (the forward, the backward's box lists, dQ,
    dK/dV), plus the op's own small passes (delta, dO / LSE / delta into compact order), without the
    selection or the Q/K/V permutation. The same-process kernel-only row against ``fastvideo_triton``."""
    from sparse_inductor.compact_layout import compact_layout, compact_slots, to_compact
    from sparse_inductor.ops import KERNEL_VERSION

    compact = compact_layout(layout)
    seq_q = qkv[0].detach()  # the op reads only its shape and strides (the output's layout)
    tables = (layout.slots, compact_slots(compact), compact.counts, compact.tile_offsets, compact.positions,
              selection.kv_num_blocks, selection.kv_indices, scale, KERNEL_VERSION)

    def run(qc, kc, vc):
        return torch.ops.sparse_inductor.tma_block_sparse_attn_fwd(seq_q, qc, kc, vc, *tables)[0]

    inputs = tuple(to_compact(x, compact).contiguous() for x in qkv)
    return ("tma_op", run, inputs, grad, flops)


def kernel_for(layout, selection, B, H, scale):
    """Our attention kernel alone (no selection) on ``selection``'s lists, the layout's tables shared
    by every batch and head."""
    slots, counts = layout.slots.expand(B, -1), layout.counts.expand(B, -1)
    q_slots, q_counts = layout.slots.expand(B, H, -1), layout.counts.expand(B, H, -1)  # per head

    def kernel(q, k, v):
        return torch.ops.sparse_inductor.block_sparse_attn_fwd(
            q, k, v, q_slots, slots, q_counts, counts, selection.kv_num_blocks, selection.kv_indices, scale)[0]

    return kernel


def unfused_pool(fn):
    """``fn`` compiled and called with ``attention.POOL_IN_PERMUTATION = False``: v28's A/B, the
    separate Q/K permutation and pool passes (the graph is traced and run under that value)."""
    from sparse_inductor import attention

    compiled = torch.compile(fn, fullgraph=True)

    def run(*args):
        before, attention.POOL_IN_PERMUTATION = attention.POOL_IN_PERMUTATION, False
        try:
            return compiled(*args)
        finally:
            attention.POOL_IN_PERMUTATION = before

    return run


def tile128_rows(q, k, v, grad, grid, sparsity, B, H, scale, only=None) -> list:
    """``sparse_compiled_t128`` / ``sparse_kernel_t128``: our path with (4, 4, 8) tiles of 128 tokens
    (KV blocks and query blocks of 128 rows) at the same sparsity, FLOPs from its own lists."""
    tile = (4, 4, 8)
    layout = tile_layout(grid, tile, "cuda")
    selection = si.select_blocks(q, k, grid, sparsity=sparsity, tile=tile)
    flops = 4.0 * q.shape[-1] * kept_pair_tokens(selection)
    compiled = torch.compile(
        lambda q, k, v: sparse_attention(q, k, v, grid, sparsity=sparsity, tile=tile, layout=layout), fullgraph=True)
    kernel = kernel_for(layout, selection, B, H, scale)
    rows = [("sparse_compiled_t128", compiled, (q, k, v), grad, flops),
            ("sparse_compiled_t128_unfused", unfused_pool(lambda q, k, v: sparse_attention(
                q, k, v, grid, sparsity=sparsity, tile=tile, layout=layout)), (q, k, v), grad, flops),
            ("sparse_kernel_t128", kernel, (q, k, v), grad, flops)]
    if only and not any(p.startswith("tma_t128") or "tma_t128".startswith(p) for p in only):
        return rows  # its setup compiles and runs every variant
    tma_rows = tma_t128_setup(layout, selection, q, k, v, kernel, only)
    return rows + [(impl, fn, inputs, None, flops * share) for impl, fn, inputs, share in tma_rows]


def tma_t128_setup(layout, selection, q, k, v, sparse_kernel, only=None) -> list:
    """The compact TMA forward kernel on (4, 4, 8) tiles, forward only, kernel only; a variant that
    fails to build says why.

    - ``tma_t128_w8[_qreg]``: 128-row query boxes and 128-column steps (v24 probe), 8 warps;
    - ``tma_t128_s64_w{4,8}[_qreg]``: 128-row query boxes over 64-row KV steps (v25: the structure of
      issue 22's 6.9x ceiling probe), Q in shared memory or registers;
    - ``tma_t128_qk05_m64_w{4,8}[_qreg]``: query_keep 0.5's kept rows (64 of a full tile) in 64-row
      query boxes over the same 64-row steps (issue 15: the forward of qk 0.5 against ``tma_t128_s64``);
      the gather of the kept rows is not timed, its FLOPs are the kept rows' share;
    - ``tma_t128_s64_w4_s{3,4}``: ``tma_t128_s64_w4`` (the compiled path's configuration) with 3 or 4
      pipeline stages instead of 2.

    Variants whose names no ``--only`` prefix selects are not built."""
    from sparse_inductor.compact_layout import compact_layout, from_compact, kv_boxes_by_class, to_compact
    from sparse_inductor.query_keep import kept_layout
    import kernel_templates.tma_block_sparse as tma_block_sparse

    compact = compact_layout(layout)
    num, idx = selection.kv_num_blocks, selection.kv_indices
    boxes = kv_boxes_by_class(num, idx, compact)
    inputs = tuple(to_compact(x, compact).contiguous() for x in (q, k, v))
    with torch.no_grad():
        ref = sparse_kernel(q, k, v).float()
    boxes64 = kv_boxes_by_class(num, idx, compact, step=64)
    kl = kept_layout(q, layout, 0.5)
    kept_rows = kl.positions[..., None].expand(-1, -1, -1, q.shape[-1])
    kept_inputs = (q.gather(2, kept_rows).contiguous(),) + inputs[1:]
    ref_kept = ref.gather(2, kept_rows)
    rows = []
    variants = ([("tma_t128_w8", 128, 128, 8, 2, (False, True))]
                + [(f"tma_t128_s64_w{w}", 64, 128, w, 2, (False, True)) for w in (4, 8)]
                + [(f"tma_t128_s64_w4_s{s}", 64, 128, 4, s, (False,)) for s in (3, 4)]
                + [(f"tma_t128_qk05_m64_w{w}", 64, 64, w, 2, (False, True)) for w in (4, 8)])
    for base, step, query_rows, warps, stages, qregs in variants:
        kept = "qk05" in base
        for qreg in qregs:
            name = base + ("_qreg" if qreg else "")
            if only and not name.startswith(tuple(only)):
                continue

            def fn(q, k, v, step=step, query_rows=query_rows, warps=warps, qreg=qreg, kept=kept, stages=stages):
                return tma_block_sparse.tma_packed_block_sparse_attention(
                    q, k, v, num, idx, compact, boxes=boxes64 if step == 64 else boxes, q_in_registers=qreg,
                    num_warps=warps, num_stages=stages, step=step, query_rows=query_rows,
                    q_layout=kl.compact if kept else None)[0]
            try:
                with torch.no_grad():
                    got = fn(*(kept_inputs if kept else inputs)).float()
                    want = ref_kept if kept else ref
                    err = ((got if kept else from_compact(got, compact).float()) - want).norm() / want.norm()
                print(f"{name} vs sparse_kernel_t128: relative L2 {err.item():.2e}", flush=True)
                rows.append((name, fn, kept_inputs if kept else inputs, kl.compact.num_tokens / q.shape[2] if kept
                             else 1.0))
            except Exception as e:  # report, never hide
                print(f"{name} dropped: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}", flush=True)
    return rows


def run_case(name, H, grid, sparsity, records, meta, with_flex=True, with_dense=True, only=None, tile128=False):
    # A fresh Dynamo per case: otherwise the second sparsity recompiles the same lambdas with the
    # captured float marked dynamic (a SymFloat), which the selection cannot take.
    torch.compiler.reset()
    B, D, dtype = 1, 128, torch.bfloat16
    N = math.prod(grid)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    layout = tile_layout(grid, (4, 4, 4), "cuda")
    tq, tk, tv, tgrad = (to_tiles(x, layout) for x in (q, k, v, grad))
    selection = si.select_blocks(q, k, grid, sparsity=sparsity)
    scale = 1.0 / math.sqrt(D)
    dense_flops = 4.0 * B * H * N * N * D
    sparse_flops = 4.0 * D * kept_pair_tokens(selection)

    def dense(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    def sparse_op(q, k, v):
        return si.video_sparse_attention(q, k, v, grid, sparsity=sparsity)

    # The layout's tables are constants of the graph, as the backend's rewrite makes them.
    sparse_compiled = torch.compile(
        lambda q, k, v: sparse_attention(q, k, v, grid, sparsity=sparsity, tile=(4, 4, 4), layout=layout),
        fullgraph=True)
    # v17's A/B: the same compiled path with the gather forward kernel (the default, "auto", takes
    # the compact TMA forward on Hopper).
    sparse_compiled_gather = torch.compile(
        lambda q, k, v: sparse_attention(q, k, v, grid, sparsity=sparsity, tile=(4, 4, 4), layout=layout,
                                         forward_kernel="gather"),
        fullgraph=True)
    selection_compiled = torch.compile(
        lambda q, k: select_tiles(q, k, layout, si.TopK(sparsity), scale), fullgraph=True)
    sparse_kernel = kernel_for(layout, selection, B, H, scale)

    impls = [("dense_sdpa", dense, (q, k, v), grad, dense_flops)] if with_dense else []
    impls += [("sparse_op", sparse_op, (q, k, v), grad, sparse_flops),
             ("sparse_compiled", sparse_compiled, (q, k, v), grad, sparse_flops),
             ("sparse_compiled_unfused", unfused_pool(lambda q, k, v: sparse_attention(
                 q, k, v, grid, sparsity=sparsity, tile=(4, 4, 4), layout=layout)), (q, k, v), grad, sparse_flops),
             ("sparse_compiled_gather", sparse_compiled_gather, (q, k, v), grad, sparse_flops),
             ("sparse_kernel", sparse_kernel, (q, k, v), grad, sparse_flops),
             ("selection", selection_compiled, (q, k), None, None),
             ("selection_launch", selection_compiled, (q, k), None, None)]
    if tile128:  # issue 22 item 1: 128-token tiles (4, 4, 8), 128-row blocks, the same sparsity
        impls += tile128_rows(q, k, v, grad, grid, sparsity, B, H, scale, only)
    if with_flex:
        try:
            impls.append(("flex_kernel", flex_setup(layout, selection, N), (tq, tk, tv), tgrad, sparse_flops))
        except Exception as e:  # report, never hide
            print(f"[{name}] FlexAttention setup failed: {type(e).__name__}: {e}")
        if with_dense:
            from torch.nn.attention.flex_attention import flex_attention

            impls.insert(1, ("flex_dense", torch.compile(flex_attention, dynamic=False), (q, k, v), grad,
                             dense_flops))
    # Issue 22's ceiling: our TMA-descriptor forwards (kernel_templates/tma_attention.py), dense and
    # walking the same lists over contiguous tile-major inputs; forward only.
    from kernel_templates.tma_attention import tma_block_list_attention, tma_dense_attention

    if with_dense:
        impls.append(("tma_dense", tma_dense_attention, (q, k, v), None, dense_flops))
    tq_t, tk_t, tv_t = (x.contiguous() for x in (tq, tk, tv))
    impls.append(("tma_list_kernel", lambda q, k, v: tma_block_list_attention(
        q, k, v, selection.kv_num_blocks, selection.kv_indices, layout.counts), (tq_t, tk_t, tv_t), None, sparse_flops))
    # Issue 22 item 2: the compact tile-major TMA forward on the same selection (forward only); its
    # setup compiles and runs the kernel, so it is skipped when --only selects none of its rows.
    if not only or any("tma_packed".startswith(p) or p.startswith("tma_packed") for p in only):
        for impl, fn, inputs in packed_setup(layout, selection, q, k, v, sparse_kernel):
            impls.append((impl, fn, inputs, None,
                          sparse_flops if impl.endswith(("kernel", "qreg", "devdesc", "unmerged")) else None))
    if not only or any("tma_op".startswith(p.rstrip("=")) or p.startswith("tma_op") for p in only):
        impls.append(tma_op_row(layout, selection, (q, k, v), scale, grad, sparse_flops))
    fastvideo = fastvideo_setup(layout, selection)
    if fastvideo is not None:
        tq_c, tk_c, tv_c, tg_c = (x.contiguous() for x in (tq, tk, tv, tgrad))
        try:  # same selection, same attention: their output against our eager kernel's
            with torch.no_grad():
                got, want = from_tiles(fastvideo(tq_c, tk_c, tv_c), layout).float(), sparse_kernel(q, k, v).float()
            print(f"fastvideo_triton vs sparse_kernel: relative L2 {((got - want).norm() / want.norm()).item():.2e}",
                  flush=True)
        except Exception as e:  # report, never hide
            print(f"fastvideo_triton check failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
        impls.append(("fastvideo_triton", fastvideo, (tq_c, tk_c, tv_c), tg_c, sparse_flops))

        def fastvideo_pipeline(q, k, v):
            # What a rewrite built on FastVideo's kernel adds: our selection, tile-major copies
            # in, their kernel, the output back to raster order.
            with torch.no_grad():
                lists = selection_compiled(q, k)
            tiled = [to_tiles(x, layout).contiguous() for x in (q, k, v)]
            return from_tiles(fastvideo(*tiled, *lists), layout)

        impls.append(("fastvideo_pipeline", fastvideo_pipeline, (q, k, v), grad, sparse_flops))

    if only:  # --only: the rows whose names start with one of these ("name=": that row alone)
        impls = [x for x in impls if any(x[0] == p[:-1] if p.endswith("=") else x[0].startswith(p) for p in only)]
    # Dense is measured once per case (at its first sparsity) and reused for the ratios.
    dense_ms = {r["pass"]: r["ms"] for r in records if r["case"] == name and r["impl"] == "dense_sdpa"}
    for impl, fn, inputs, impl_grad, flops in impls:
        for pass_ in ("fwd", "fwd+bwd") if impl_grad is not None else ("fwd",):
            try:
                if pass_ == "fwd":
                    with torch.no_grad():
                        timer = bench_gpu_time if impl == "selection" or GRAPH_TIMING else bench
                        ms = timer(lambda: fn(*inputs))
                else:
                    leaf = tuple(x.detach().requires_grad_() for x in inputs)
                    ms = (bench_gpu_time if GRAPH_TIMING else bench)(fwd_bwd(fn, leaf, impl_grad))
            except Exception as e:
                print(f"[{name}] {impl} {pass_} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                traceback.print_exc(limit=2)
                ms = None
            if impl == "dense_sdpa":
                dense_ms[pass_] = ms
            flop_factor = 1.0 if pass_ == "fwd" else 3.5  # bwd does 2.5x the fwd matmul work
            records.append(dict(
                case=name, impl=impl, **{"pass": pass_}, sparsity=0.0 if impl in ("dense_sdpa", "flex_dense") else sparsity,
                ms=ms, ns_per_token=(ms * 1e6 / N) if ms else None,
                speedup_vs_dense=(dense_ms[pass_] / ms) if ms and dense_ms.get(pass_) and flops else None,
                tflops=(flops * flop_factor / (ms * 1e-3) / 1e12) if ms and flops else None, **meta,
            ))
            print(f"[{name}] {impl:16s} {pass_:8s} {ms if ms is None else round(ms, 3)} ms", flush=True)
    del q, k, v, grad, tq, tk, tv, tgrad
    torch.cuda.empty_cache()


BEGIN, END = "<!-- bench_attention.py: begin -->", "<!-- bench_attention.py: end -->"


def write_results(records, meta, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(records, f, indent=1)
    lines = [
        "# Benchmark results",
        "",
        f"Device: {meta['device']}; torch {meta['torch']}; triton {meta['triton']}; date {meta['date']}.",
        "B=1, D=128, bf16, tile (4, 4, 4). Medians of `triton.testing.do_bench`; one process, same inputs.",
        "TFLOP/s counts only the FLOPs of kept blocks (valid tokens); fwd+bwd counts 3.5x the forward.",
        "Reproduce: `PYTHONPATH=$PWD python benchmarks/bench_attention.py` on the GPU machine.",
        "",
        "| case | impl | pass | sparsity | ms | ns/token | speedup vs dense | TFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        ms = "failed" if r["ms"] is None else f"{r['ms']:.3f}"
        sp = "" if r["speedup_vs_dense"] is None else f"{r['speedup_vs_dense']:.2f}x"
        tf = "" if r["tflops"] is None else f"{r['tflops']:.0f}"
        nt = "" if r.get("ns_per_token") is None else f"{r['ns_per_token']:.1f}"
        lines.append(f"| {r['case']} | {r['impl']} | {r['pass']} | {r['sparsity']} | {ms} | {nt} | {sp} | {tf} |")
    # Only the part between the markers is generated; notes written around it are kept.
    path = os.path.join(out_dir, "RESULTS.md")
    table = BEGIN + "\n" + "\n".join(lines[1:]) + "\n" + END
    text = open(path).read() if os.path.exists(path) else lines[0] + "\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + table + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + table + "\n"
    with open(path, "w") as f:
        f.write(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=["wan1.3b-480p", "wan14b-720p"], choices=list(CASES))
    parser.add_argument("--sparsity", type=float, nargs="*", default=[0.75, 0.875, 0.9375])
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--tile128", action="store_true",
                        help="also time our path with (4, 4, 8) tiles of 128 tokens (rows *_t128)")
    parser.add_argument("--only", nargs="*", help="time only the rows whose names start with these (e.g. dense_sdpa "
                        "sparse_kernel tma_); a name ending in '=' selects that row alone (sparse_compiled=)")
    parser.add_argument("--merge", action="store_true", help="keep other cases' rows of an existing results.json")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="time every row as a CUDA graph replay (GPU time), forward+backward included")
    parser.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU")
    global GRAPH_TIMING
    GRAPH_TIMING = args.cuda_graph
    import triton

    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.date.today().isoformat())
    earlier = []
    path = os.path.join(args.out_dir, "results.json")
    if args.merge and os.path.exists(path):  # keep rows of other cases (e.g. one case per device call)
        with open(path) as f:
            earlier = [r for r in json.load(f) if r["case"] not in args.cases]
    records = []
    for name in args.cases:
        for i, sparsity in enumerate(args.sparsity):
            run_case(name, **CASES[name], sparsity=sparsity, records=records, meta=meta, with_flex=not args.no_flex,
                     with_dense=i == 0, only=args.only, tile128=args.tile128)
            write_results(earlier + records, meta, args.out_dir)  # after each case: a cut-off run keeps its rows
    records = earlier + records
    print("\nratios (dense ms / impl ms):")
    for r in records:
        if r["impl"] in ("selection", "selection_launch") and r["ms"]:
            whole = [x["ms"] for x in records if x["case"] == r["case"] and x["sparsity"] == r["sparsity"]
                     and x["impl"] == "sparse_compiled" and x["pass"] == "fwd" and x["ms"]]
            if whole:
                print(f"  {r['case']:14s} {r['impl']} share of the compiled sparse forward, sparsity {r['sparsity']}: "
                      f"{100 * r['ms'] / whole[0]:.1f}%")
        elif r["impl"] != "dense_sdpa":
            sp = "failed" if r["speedup_vs_dense"] is None else f"{r['speedup_vs_dense']:.2f}x"
            print(f"  {r['case']:14s} {r['impl']:14s} {r['pass']:8s} sparsity {r['sparsity']}: {sp}")


if __name__ == "__main__":
    main()
