set -u
export PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=name,driver_version --format=csv > $L/gpu.txt 2>&1
python -c "import torch,triton;print(torch.__version__, triton.__version__)" > $L/versions.txt 2>&1
( time timeout 300 python -m pytest -q -p no:warnings --show-capture=no -m tier -n 4 tests/test_gpu_tier.py tests/test_tma_query_keep.py ) > $L/1_tier.log 2>&1
( time timeout 120 python -m pytest -q -p no:warnings --show-capture=no tests/test_policies.py -k "graph_constants or argument_of_a_compiled" ) > $L/2_float_constants.log 2>&1
( time SPARSE_INDUCTOR_FORWARD_KERNEL=tma timeout 120 python benchmarks/host_overhead_qk.py --keeps 1 0.5 ) > $L/3_host_qk_tma.log 2>&1
( time timeout 90 python benchmarks/host_overhead_qk.py --keeps 1 0.5 ) > $L/4_host_qk_gather.log 2>&1
( time SPARSE_INDUCTOR_FORWARD_KERNEL=tma timeout 150 python benchmarks/bench_query_keep_compiled.py --keeps 1 0.5 --paths compiled ) > $L/5_qk_compiled_tma.log 2>&1
tail -n 4 $L/*.log
