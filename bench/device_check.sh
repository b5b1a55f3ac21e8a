#!/usr/bin/env bash
# One GPU session in one call: install, GPU tests, benchmarks, kernel variant sweeps.
#   bash bench/device_check.sh            # on a GPU machine; logs and results go to $OUT (or bench/results)
# Every step has its own timeout (seconds, overridable) and a failure does not stop the next one.
# At most 7 files are written (the device tool brings back 8).
set -uo pipefail
out=${OUT:-bench/results}
export PYTHONUNBUFFERED=1
# On the lent H200 (2026-11-30) `pip install -e .` left `import mfm_fast` failing outside the repo root
# (run 3: silently; run 4: "error originates from a subprocess"), so the checkout goes on the path too.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log="$out/gpu.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv | tee "$log"
MAX_JOBS=${MAX_JOBS:-8} python -m pip install -e . --no-build-isolation --no-deps > "$out/pip.log" 2>&1 || tail -30 "$out/pip.log"
python -m mfm_fast.info >> "$log" 2>&1
echo "== CUDA extension tests (own process: a kernel fault cannot take the other steps down)" | tee -a "$log"
timeout ${CUDA_EXT_S:-180} python -m pytest -q -rs --benchmark-disable -p no:cacheprovider tests/test_cuda_ext.py 2>&1 \
  | tee -a "$log" | tail -12
echo "== GPU tests" | tee -a "$log"
timeout ${TESTS_S:-120} python -m pytest -q -rs -m gpu --benchmark-disable -p no:cacheprovider \
  tests/test_gpu.py tests/test_triton_corrupt.py tests/test_triton_loss.py tests/test_adaptive_masks.py 2>&1 | tee -a "$log" | tail -8
echo "== fft_mask"
timeout ${BENCH_S:-120} python bench/fft_mask.py --batch 64 256 --check --plot --markdown --quick --out-dir "$out" \
  > "$out/fft_mask.log" 2>&1
grep -E "check |x-floor|^corrupt|^loss|^step|B = |skipped" "$out/fft_mask.log" | head -70
echo "== CUDA extension without its L2 prefetch of the next plane (MFM_FAST_CUDA_PREFETCH=0; appended to fft_mask.log)"
MFM_FAST_CUDA_PREFETCH=0 timeout ${NOPF_S:-40} python bench/fft_mask.py --batch 256 --providers cuda --work corrupt loss \
  --quick --markdown --no-json >> "$out/fft_mask.log" 2>&1
tail -12 "$out/fft_mask.log"
echo "== Triton loss: transforms factored 7 x 32 vs direct (tune.log)" | tee "$out/tune.log"
timeout ${TUNE_LOSS_S:-90} python bench/tune_loss.py --quick 2>&1 | tee -a "$out/tune.log"
echo "== FOLK ops (appended to fft_mask.log)"
timeout ${FOLK_S:-90} python bench/folk_ops.py --check --no-json >> "$out/fft_mask.log" 2>&1
sed -n '/folk_ops bench/,$p' "$out/fft_mask.log" | head -40
echo "== corruption tile sweep"
timeout ${TUNE_S:-60} python bench/tune_corrupt.py >> "$out/tune.log" 2>&1
sed -n '/corruption\|band fp32/,$p' "$out/tune.log" | grep -v "^ *File\|^    " | head -40
echo "== e2e_step"
timeout ${E2E_S:-60} python bench/e2e_step.py --models vit_s16 --out-dir "$out" > "$out/e2e.log" 2>&1
tail -10 "$out/e2e.log"
echo "== pretrain images/s, ViT-S/16 bf16: official vs mfm_fast, then --method mfm vs folk (appended to e2e.log)"
pre="python -m mfm_fast.pretrain --synthetic --model vit_small_patch16_224 --batch-size ${PRE_B:-256} --steps 40
     --timing-warmup 15 --no-checkpoint --vis-num 0 --no-progress --log-every 40 --report-throughput"
timeout ${PRE_S:-150} $pre --pipeline official,mfm_fast --output-dir /tmp/pre1 >> "$out/e2e.log" 2>&1
timeout ${PRE_S:-150} $pre --method mfm,folk --output-dir /tmp/pre2 >> "$out/e2e.log" 2>&1
grep '^{' "$out/e2e.log"
