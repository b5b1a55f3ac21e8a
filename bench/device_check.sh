#!/usr/bin/env bash
# One GPU session in one call: install, GPU tests, corruption tile sweep, benchmarks.
#   bash bench/device_check.sh            # on a GPU machine; logs and results go to $OUT (or bench/results)
# Every step has its own timeout and a failure does not stop the next one.
set -uo pipefail
out=${OUT:-bench/results}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv | tee "$out/gpu.txt"
pip install -q -e . --no-build-isolation --no-deps 2>&1 | grep -v -i "warning" | tail -2
python -m mfm_fast.info >> "$out/gpu.txt" 2>&1
echo "== GPU tests"
timeout ${TESTS_S:-150} python -m pytest -q -m gpu --benchmark-disable -p no:cacheprovider \
  tests/test_gpu.py tests/test_triton_corrupt.py $(ls tests/test_triton_loss.py 2>/dev/null) \
  2>&1 | tee "$out/gpu_tests.log" | tail -12
echo "== corruption tile sweep"
timeout ${TUNE_S:-90} python bench/tune_corrupt.py > "$out/tune.log" 2>&1
grep -A3 -E "^(band|general) fp32->fp32|^precision|u8->bf16" "$out/tune.log" | head -30
echo "== fft_mask"
timeout ${BENCH_S:-150} python bench/fft_mask.py --batch 64 256 --check --plot --markdown --quick --out-dir "$out" \
  > "$out/fft_mask.log" 2>&1
tail -60 "$out/fft_mask.log"
echo "== e2e_step"
timeout ${E2E_S:-80} python bench/e2e_step.py --models vit_s16 --out-dir "$out" > "$out/e2e.log" 2>&1
tail -12 "$out/e2e.log"
