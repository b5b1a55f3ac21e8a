#!/usr/bin/env bash
# One device session: install, GPU tests, kernel tuning sweep, benchmark. Usage on a GPU machine:
#   bash bench/device_check.sh [tests|tune|bench|all]   (writes logs to $OUT or bench/results/)
set -uo pipefail
what=${1:-all}
out=${OUT:-bench/results}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
pip install -q -e . --no-build-isolation --no-deps 2>&1 | tail -2
python -m mfm_fast.info | tee -a "$out/gpu.txt"
if [[ $what == all || $what == tests ]]; then
  timeout 240 python -m pytest -q -m gpu -x --benchmark-disable -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | tail -15
fi
if [[ $what == all || $what == tune ]]; then
  timeout 200 python bench/tune_corrupt.py --json "$out/tune_corrupt.json" 2>&1 | tee "$out/tune.log"
fi
if [[ $what == all || $what == bench ]]; then
  timeout 200 python bench/fft_mask.py --check --batch 64 256 2>&1 | tee "$out/fft_mask.log"
  cp bench/results/fft_mask-*.json "$out/" 2>/dev/null || true
fi
