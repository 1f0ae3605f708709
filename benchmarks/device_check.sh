#!/usr/bin/env bash
# The GPU check, in one command (a CUDA machine, from the repository root):
#   1. the kernel tests with the kernels compiled for the GPU (TestKernelsCompiled);
#   2. benchmarks/quant.py with the Pallas path, plus --device-check (compiled
#      kernels against the jnp references, bandwidth against a device copy).
# Writes gpu_tests.log, gpu_bench.log and quant_gpu.json to $OUT (default
# benchmarks/results). It runs from a scratch copy of the tree in which
# kernels/ and models/ sit under kvjax/, so the device's own Python (no
# install, no downloads) imports kvjax.kernels as the installed package does.
set -uo pipefail
OUT=$(realpath "${OUT:-benchmarks/results}")
mkdir -p "$OUT"
work=$(mktemp -d)
cp -r kvjax kernels models tests benchmarks pyproject.toml "$work"/
cp -r kernels "$work/kvjax/kernels"
cp -r models "$work/kvjax/models"
cd "$work" || exit 1
export PYTHONPATH="$work" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda
nvidia-smi -L
python3 -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())"
[ -n "${SKIP_TESTS:-}" ] || timeout 150 python3 -m pytest -q -n 0 -p no:cacheprovider tests/test_kernels.py \
  2>&1 | tee "$OUT/gpu_tests.log"
timeout 240 python3 benchmarks/quant.py --pallas --device-check --out "$OUT/quant_gpu.json" \
  2>&1 | tee "$OUT/gpu_bench.log"
