#!/usr/bin/env bash
# The CUDA checks and measurements that the README's GPU numbers come from, in one run on a machine with a GPU:
#
#   tools/cuda_checks.sh OUT_DIR [WORKERS]
#
# the machine (GPU, driver, torch, CPU); every CUDA test (`pytest -k cuda`: engines, evaluate, streaming and
# training against the original's outputs and the CPU's); benchmarks/bench_train.py on the GPU (model-only
# clips/s in fp32, TF32, autotuned, channels-last, bf16, fp16, and x3dnet train's whole pipeline with WORKERS
# DataLoader workers); and the fixed learn command on the GPU, timed. Each part has its own time
# limit, so one that hangs leaves the others their time. Logs go to OUT_DIR. It needs x3dnet importable
# (PYTHONPATH=. will do) with its dependencies, PyAV included: on a machine without a package index, carry
# PyAV's wheel and pip install it first (an H200 session did: torch 2.11 there, av 18.1.0).
set -u
out=${1:?usage: tools/cuda_checks.sh OUT_DIR [WORKERS]}
workers=${2:-$(($(nproc) - 2))}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    $py -c "import torch, av; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'av', av.__version__)"
    lscpu | grep -E "^Model name|^CPU\(s\)"
} 2>&1 | tee "$out/machine.txt"
echo "== tests"
timeout 170 $py -m pytest -q -s -rs -p no:cacheprovider -k cuda tests 2>&1 | tee "$out/tests.txt"
echo "== bench_train --device cuda --workers $workers"
timeout 170 $py benchmarks/bench_train.py --device cuda --workers "$workers" --videos 160 2>&1 | tee "$out/bench.txt"
echo "== bench_train --learn --device cuda (--workers $workers)"
timeout 170 $py benchmarks/bench_train.py --learn --device cuda --train-flags --workers "$workers" 2>&1 | tee "$out/learn.txt"
