#!/bin/bash
# The GPU suite beyond the tier, in slices whose summaries survive the call's limit
# (benchmarks/NOTES.md, "Next GPU run (ninth)"). Logs go to $OUT.
set -u
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" > "$OUT/versions.txt" 2>&1
wheels() {  # pure-Python / cp312 wheels carried in .whl (diffusers, fastvideo-kernel): device README
  [ -d .whl ] || return 0
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/wheels.log" 2>&1 && export PYTHONPATH=/tmp/site:$PWD
  echo "wheels: rc=$? $(ls .whl | tr '\n' ' ')"
}
step() {  # step NAME SECONDS pytest-args...
  local name=$1 secs=$2; shift 2
  echo "== $name ($(date +%T))"
  timeout "$secs" python -m pytest -q -p no:cacheprovider "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$?"; tail -n 25 "$OUT/$name.log" | grep -v PytestBenchmarkWarning | grep -v 'warner('
}
case "${1:-diagnose}" in
diagnose)
  step 1_tier 280 -m tier -n 4 tests/test_gpu_tier.py tests/test_tma_query_keep.py
  CUDA_LAUNCH_BLOCKING=1 step 2_unlisted 120 -x --tb=long tests/test_op.py -k "unlisted_blocks"
  step 3_test_op 150 -n 8 --tb=short -rf tests/test_op.py
  ;;
more)
  step 3_test_op 130 -n 8 --tb=short -rf tests/test_op.py tests/test_kernels.py::test_kernels_take_query_tables_shared_by_the_heads
  step 4_tma 200 -n 8 --tb=short -rf tests/test_tma_attention.py tests/test_tma_block_sparse.py tests/test_tma_block_sparse_bwd.py
  step 5_rest 180 -n 8 --tb=short -rf tests/test_selection.py tests/test_nn.py tests/test_layout.py tests/test_box_lists.py
  ;;
tma)  # one file per step so each summary survives; tier first (DESIGN: before anything else on the GPU)
  step 1_tier 170 -m tier -n 4 tests/test_gpu_tier.py tests/test_tma_query_keep.py
  step 4a_tma_attention 100 -n 8 --tb=short -rf tests/test_tma_attention.py
  step 4b_tma_block_sparse 130 -n 8 --tb=short -rf tests/test_tma_block_sparse.py
  step 4c_tma_block_sparse_bwd 170 -n 8 --tb=short -rf tests/test_tma_block_sparse_bwd.py
  ;;
v25)  # tier, v25's GPU cases, then the compiled 128-token-tile forward (NOTES v25)
  step 1_tier 170 -m tier -n 4 tests/test_gpu_tier.py tests/test_tma_query_keep.py
  step 2_v25_tests 60 -n 8 --tb=short -rf tests/test_tma_forward_path.py tests/test_tma_block_sparse.py -k "128_slot or kept_query_rows"
  echo "== 3_bench ($(date +%T))"
  timeout 170 python benchmarks/bench_attention.py --cases wan1.3b-480p --sparsity 0.875 --no-flex --tile128 \
    --only dense_sdpa sparse_compiled_t128 selection --out-dir "$OUT" > "$OUT/3_bench_t128_compiled.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/3_bench_t128_compiled.log" | grep -v 'warner(' | tail -n 30
  echo "== 4_qk ($(date +%T))"
  timeout 110 python benchmarks/bench_query_keep_compiled.py --tile 4 4 8 --keeps 1 0.5 --paths compiled \
    --passes fwd > "$OUT/4_qk_t128.log" 2>&1
  echo "rc=$?"; tail -n 12 "$OUT/4_qk_t128.log"
  ;;
v26)  # tier, v26's GPU cases, the backward kernels at 128-token tiles (NOTES v26)
  step 1_tier 240 -m tier -n 4 tests/test_gpu_tier.py tests/test_tma_query_keep.py
  step 2_v26_tests 120 -n 8 --tb=short -rf tests/test_tma_forward_path.py tests/test_tma_block_sparse_bwd.py \
    tests/test_box_lists.py -k "128_slot or half_tiles"
  echo "== 3_bwd ($(date +%T))"
  timeout 200 python benchmarks/bench_tma_backward.py --tile 4 4 8 --configs 4,2 8,2 --variants default \
    --whole-tiles > "$OUT/3_bwd_t128.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/3_bwd_t128.log" | grep -v 'warner(' | tail -n 12
  ;;
v26b)  # the compiled path at 128-token tiles with gradients, query_keep 0.5, and the forward's profile
  echo "== 4_bench ($(date +%T))"
  timeout 220 python benchmarks/bench_attention.py --cases wan1.3b-480p --sparsity 0.875 --no-flex --tile128 \
    --only dense_sdpa sparse_compiled sparse_compiled_t128 --out-dir "$OUT" > "$OUT/4_bench_t128.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/4_bench_t128.log" | grep -v 'warner(' | tail -n 30
  echo "== 5_qk ($(date +%T))"
  timeout 170 python benchmarks/bench_query_keep_compiled.py --tile 4 4 8 --keeps 1 0.5 --paths compiled \
    > "$OUT/5_qk_t128.log" 2>&1
  echo "rc=$?"; tail -n 14 "$OUT/5_qk_t128.log"
  echo "== 6_profile ($(date +%T))"
  timeout 150 python benchmarks/profile_compiled.py --tile 4 4 8 > "$OUT/6_profile_t128.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/6_profile_t128.log" | tail -n 46
  ;;
v26c)  # after the 128-row query box default (Q from shared memory): compiled rows again, qk 0.5's profile
  echo "== 7_bench ($(date +%T))"
  timeout 200 python benchmarks/bench_attention.py --cases wan1.3b-480p --sparsity 0.875 --no-flex --tile128 \
    --only dense_sdpa sparse_compiled_t128 --out-dir "$OUT" > "$OUT/7_bench_t128.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/7_bench_t128.log" | grep -v 'warner(' | grep -v Autotune | tail -n 12
  echo "== 8_qk ($(date +%T))"
  timeout 150 python benchmarks/bench_query_keep_compiled.py --tile 4 4 8 --keeps 1 0.5 --paths compiled \
    > "$OUT/8_qk_t128.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/8_qk_t128.log" | grep -v warn | tail -n 8
  echo "== 9_profile_qk ($(date +%T))"
  timeout 150 python benchmarks/profile_compiled.py --tile 4 4 8 --query-keep 0.5 > "$OUT/9_profile_qk_t128.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/9_profile_qk_t128.log" | tail -n 46
  ;;
v26d)  # 128-token tiles: 720p, the other sparsities, the dividing grid; qk after the sort went (NOTES v26)
  step 10_v26_tests 100 -n 8 --tb=short -rf tests/test_tma_forward_path.py tests/test_tma_block_sparse_bwd.py \
    tests/test_box_lists.py -k "128_slot or half_tiles"
  echo "== 11_qk ($(date +%T))"
  timeout 100 python benchmarks/bench_query_keep_compiled.py --tile 4 4 8 --keeps 1 0.5 --paths compiled \
    > "$OUT/11_qk_t128.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/11_qk_t128.log" | grep -v warn | tail -n 6
  echo "== 12_host_qk ($(date +%T))"
  timeout 80 python benchmarks/host_overhead_qk.py --tile 4 4 8 > "$OUT/12_host_qk_t128.log" 2>&1
  echo "rc=$?"; grep "query_keep" "$OUT/12_host_qk_t128.log" | tail -n 4
  echo "== 13_bench ($(date +%T))"
  timeout 250 python benchmarks/bench_attention.py --cases wan1.3b-480p dividing-20x32x52 wan14b-720p \
    --sparsity 0.875 0.75 0.9375 --no-flex --tile128 --only dense_sdpa sparse_compiled_t128 --out-dir "$OUT" \
    > "$OUT/13_bench_t128.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/13_bench_t128.log" | grep -v 'warner(' | grep -v Autotune | grep -v '^{' | tail -n 40
  ;;
v27)  # tier; FastVideo's Triton kernel (its wheel carried in .whl) against ours on both 480p grids
  wheels
  step 1_tier 240 -m tier -n 4 tests/test_gpu_tier.py tests/test_tma_query_keep.py
  echo "== 2_bench_fastvideo ($(date +%T))"
  timeout 290 python benchmarks/bench_attention.py --cases wan1.3b-480p dividing-20x32x52 --sparsity 0.875 --no-flex \
    --tile128 --only dense_sdpa sparse_compiled tma_packed_kernel tma_t128 fastvideo selection --out-dir "$OUT" \
    > "$OUT/2_bench_fastvideo.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/2_bench_fastvideo.log" | grep -v 'warner(' | grep -v Autotune | grep -v '^{' | tail -n 40
  ;;
v27b)  # the Wan-1.3B step at 128-token tiles (diffusers carried); FastVideo at 720p
  wheels
  echo "== 3_wan_t128 ($(date +%T))"
  timeout 330 python examples/wan_t2v.py --steps 2 --warmup 0 --tile 4 4 8 > "$OUT/3_wan_t128.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/3_wan_t128.log" | grep -v 'warner(' | tail -n 14
  echo "== 4_bench_fastvideo_720p ($(date +%T))"
  timeout 200 python benchmarks/bench_attention.py --cases wan14b-720p --sparsity 0.875 --no-flex --tile128 \
    --only dense_sdpa sparse_compiled tma_packed_kernel fastvideo --out-dir "$OUT" > "$OUT/4_bench_fastvideo_720p.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/4_bench_fastvideo_720p.log" | grep -v 'warner(' | grep -v Autotune | grep -v '^{' | tail -n 30
  ;;
v27c)  # the 128-token forward's pipeline depth (stages 2 / 3 / 4); where the compiled path's host time goes
  echo "== 5_bench_stages ($(date +%T))"
  timeout 200 python benchmarks/bench_attention.py --cases wan1.3b-480p --sparsity 0.875 --no-flex --tile128 \
    --only dense_sdpa sparse_compiled_t128 tma_t128_s64_w4 --out-dir "$OUT" > "$OUT/5_bench_stages.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/5_bench_stages.log" | grep -v 'warner(' | grep -v Autotune | grep -v '^{' | tail -n 16
  echo "== 6_host_cprofile ($(date +%T))"
  timeout 150 python benchmarks/host_overhead_qk.py --tile 4 4 8 --cprofile > "$OUT/6_host_cprofile.log" 2>&1
  echo "rc=$?"; grep "compiled fwd" "$OUT/6_host_cprofile.log"
  ;;
v27d)  # FastVideo's kernel against ours at 0.75 and 0.9375 on both 480p grids
  wheels
  echo "== 7_bench_fastvideo_sparsities ($(date +%T))"
  timeout 420 python benchmarks/bench_attention.py --cases wan1.3b-480p dividing-20x32x52 --sparsity 0.75 0.9375 \
    --no-flex --only dense_sdpa sparse_compiled tma_packed_kernel_qreg fastvideo_triton --out-dir "$OUT" \
    > "$OUT/7_bench_fastvideo_sparsities.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/7_bench_fastvideo_sparsities.log" | grep -v 'warner(' | grep -v Autotune | grep '^\[\|relative L2' | tail -n 50
  ;;
v28)  # tier; the pool fused into the Q/K permutation (NOTES v28) against the separate passes, 480p
  step 1_tier 250 -m tier -n 4 tests/test_gpu_tier.py tests/test_tma_query_keep.py
  echo "== 2_bench_v28 ($(date +%T))"
  timeout 300 python benchmarks/bench_attention.py --cases wan1.3b-480p --sparsity 0.875 --no-flex --tile128 \
    --only dense_sdpa sparse_compiled= sparse_compiled_unfused sparse_compiled_t128 selection= --out-dir "$OUT" \
    > "$OUT/2_bench_v28.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/2_bench_v28.log" | grep -v 'warner(' | grep -v Autotune | grep '^\[' | tail -n 30
  ;;
v28b)  # v28: the passes alone (warps), kernels per pass (profile), the dividing grid
  # (v28c: the same after the warps fix, with the 480p A/B first)
  echo "== 3_compact_pool ($(date +%T))"
  timeout 90 python benchmarks/bench_compact_pool.py > "$OUT/3_compact_pool.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/3_compact_pool.log" | grep '^tile\|^device\|Error'
  for t in "4 4 8" "4 4 4"; do
    echo "== 3_profile_${t// /} ($(date +%T))"
    timeout 100 python benchmarks/profile_compiled.py --tile $t > "$OUT/3_profile_${t// /}.log" 2>&1
    echo "rc=$?"; grep -v Warn "$OUT/3_profile_${t// /}.log" | grep -A9 '^===='
  done
  echo "== 4_bench_v28_more ($(date +%T))"
  timeout 330 python benchmarks/bench_attention.py --cases dividing-20x32x52 --sparsity 0.875 --no-flex \
    --tile128 --only dense_sdpa sparse_compiled= sparse_compiled_unfused sparse_compiled_t128 --out-dir "$OUT" \
    > "$OUT/4_bench_v28_more.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/4_bench_v28_more.log" | grep -v 'warner(' | grep -v Autotune | grep '^\[' | tail -n 30
  ;;
v28c)  # v28 after the warps fix (4 warps at 128 slots): the passes alone, the 480p A/B, the (4, 4, 8) profile
  step 4_tier_pool 120 -m tier tests/test_gpu_tier.py -k "compact_pool or tma_path_at_128 or tma_forward_path"
  echo "== 5_compact_pool ($(date +%T))"
  timeout 90 python benchmarks/bench_compact_pool.py > "$OUT/5_compact_pool.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/5_compact_pool.log" | grep '^tile\|^device\|Error'
  echo "== 6_bench_v28c ($(date +%T))"
  timeout 260 python benchmarks/bench_attention.py --cases wan1.3b-480p --sparsity 0.875 --no-flex --tile128 \
    --only dense_sdpa sparse_compiled= sparse_compiled_unfused sparse_compiled_t128 --out-dir "$OUT" \
    > "$OUT/6_bench_v28c.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/6_bench_v28c.log" | grep -v 'warner(' | grep -v Autotune | grep '^\[' | tail -n 30
  echo "== 7_profile_448 ($(date +%T))"
  timeout 100 python benchmarks/profile_compiled.py --tile 4 4 8 > "$OUT/7_profile_448.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/7_profile_448.log" | grep -A9 '^===='
  ;;
v28d)  # the whole tier after v28; our TMA op alone (fwd+bwd, same process) against FastVideo's kernels, dividing grid
  wheels
  step 8_tier 250 -m tier -n 4 tests/test_gpu_tier.py tests/test_tma_query_keep.py
  echo "== 9_bench_tma_op_fastvideo ($(date +%T))"
  timeout 300 python benchmarks/bench_attention.py --cases dividing-20x32x52 --sparsity 0.9375 0.875 --no-flex \
    --only dense_sdpa sparse_compiled= tma_op fastvideo_triton --out-dir "$OUT" > "$OUT/9_bench_tma_op_fastvideo.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/9_bench_tma_op_fastvideo.log" | grep -v 'warner(' | grep -v Autotune | grep '^\[\|relative L2' | tail -n 30
  ;;
v28e)  # the same rows at 480p
  wheels
  echo "== 10_bench_tma_op_fastvideo_480p ($(date +%T))"
  timeout 300 python benchmarks/bench_attention.py --cases wan1.3b-480p --sparsity 0.9375 0.875 --no-flex \
    --only dense_sdpa sparse_compiled= tma_op fastvideo_triton --out-dir "$OUT" > "$OUT/10_bench_tma_op_fastvideo_480p.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/10_bench_tma_op_fastvideo_480p.log" | grep -v 'warner(' | grep -v Autotune | grep '^\[\|relative L2' | tail -n 30
  ;;
v28f)  # the tier without diffusers (as call 1); our TMA op and FastVideo's kernels as CUDA graphs, dividing 0.9375
  step 11_tier 250 -m tier -n 4 -rA tests/test_gpu_tier.py tests/test_tma_query_keep.py
  grep -c PASSED "$OUT/11_tier.log"; grep "FAILED\|ERROR" "$OUT/11_tier.log" | head
  wheels
  echo "== 12_graph_tma_op_fastvideo ($(date +%T))"
  timeout 200 python benchmarks/bench_attention.py --cases dividing-20x32x52 --sparsity 0.9375 --no-flex --cuda-graph \
    --only dense_sdpa tma_op fastvideo_triton --out-dir "$OUT" > "$OUT/12_graph_tma_op_fastvideo.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/12_graph_tma_op_fastvideo.log" | grep -v 'warner(' | grep -v Autotune | grep '^\[\|relative L2\|rror' | tail -n 20
  ;;
v29)  # next session first (NOTES "Next GPU run", fourteenth): the tier with time to finish and its slowest tests,
  # the CUDA-graph capture fix, then our kernels alone against FastVideo's as CUDA graphs (the open row)
  step 13_tier 400 -m tier -n 4 -rA --durations=15 tests/test_gpu_tier.py tests/test_tma_query_keep.py
  grep -A16 "slowest" "$OUT/13_tier.log" | head -18
  step 14_graph_capture 150 tests/test_tma_forward_path.py -k cuda_graph
  echo "== 14b_compact_pool ($(date +%T))"  # the pooling kernels' shared-helper form, first time on a GPU
  timeout 90 python benchmarks/bench_compact_pool.py > "$OUT/14b_compact_pool.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/14b_compact_pool.log" | grep '^tile\|^device\|Error'
  wheels
  echo "== 15_graph_tma_op_fastvideo ($(date +%T))"
  timeout 300 python benchmarks/bench_attention.py --cases dividing-20x32x52 --sparsity 0.9375 0.875 --no-flex --cuda-graph \
    --only dense_sdpa tma_op fastvideo_triton --out-dir "$OUT" > "$OUT/15_graph_tma_op_fastvideo.log" 2>&1
  echo "rc=$?"; grep -v Warn "$OUT/15_graph_tma_op_fastvideo.log" | grep -v 'warner(' | grep -v Autotune | grep '^\[\|relative L2\|rror' | tail -n 20
  ;;
esac
