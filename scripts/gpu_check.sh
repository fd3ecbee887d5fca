#!/usr/bin/env bash
# One call on a machine with an NVIDIA GPU, nvcc and its own torch: build lrpcpp from source against
# that torch, run the whole test suite with the CUDA cases enabled, run the GPU benchmark, and print a
# short table. Logs go to $OUT (or build/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build/gpu-check}
mkdir -p "$out"
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} LRPCPP_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
status=0
start=$(date +%s)

echo "== build (sm $TORCH_CUDA_ARCH_LIST, torch $($PY -c 'import torch; print(torch.__version__)'))"
if ! $PY setup.py build_ext --inplace >"$out/build.log" 2>&1; then
  tail -n 40 "$out/build.log"; echo "build failed"; exit 1
fi
echo "   built in $(( $(date +%s) - start )) s"

echo "== tests (CUDA cases enabled)"
PYTHONPATH=python $PY -m pytest -q -p no:cacheprovider tests --deselect tests/test_wheel.py \
  2>&1 | tee "$out/tests.log" | tail -n 15 || status=1
grep -q "skipped" "$out/tests.log" && grep -E "SKIPPED|skipped" "$out/tests.log" | tail -n 3

echo "== benchmark"
PYTHONPATH=python $PY benchmarks/bench_gpu.py --out "$out/bench.md" || status=1

echo "== done in $(( $(date +%s) - start )) s, status $status"
exit $status
