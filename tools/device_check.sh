#!/usr/bin/env bash
# One GPU run of the checks and timings, deadline-aware, in about DEADLINE_S seconds (default 480):
#   OUT=/tmp/out bash tools/device_check.sh           # files go to $OUT (default bench/results)
#   ONLY="build smoke graph" bash tools/device_check.sh   # a subset of the steps, in the same order
# Steps, in order (estimated seconds on an H200; the summary at the end prints each step's measured time):
#   build      60  pip install -e . with every core (the CUDA extension), python -m mfm_fast.info
#   smoke      30  tools/gpu_smoke.py under CUDA_LAUNCH_BLOCKING=1: every CUDA kernel at 224 and 112, N = 1
#                  and past one wave, need_grad on and off; error against the torch backend
#   sanitizer  75  compute-sanitizer memcheck, racecheck, synccheck on tools/gpu_smoke.py --one-launch
#   graph      15  tools/gpu_smoke.py --graph: CUDA graph replay of corrupt + loss vs eager, bit for bit
#   tests      90  pytest -m gpu, one process per file that has a GPU-marked test
#   fft_mask  120  bench/fft_mask.py --batch 64 256 --check: official, torch_compile, torch, triton, cuda;
#                  fp32 and bf16 pred; corrupt, loss fwd+bwd, step
#   cufftdx    45  tools/cufftdx_plane.py: NVIDIA's cuFFTDx plane round trip vs ours and a copy
#   ncu        60  Nsight Compute, each kernel once (gpu_smoke.py --one-launch --n 50 --with-cufftdx):
#                  instructions, achieved occupancy, shared-memory bank conflicts, DRAM bytes
#   nopf       40  fft_mask, cuda, B = 256 with MFM_FAST_CUDA_PREFETCH=0 (no L2 prefetch; appended to fft_mask.log)
#   pretrain  150  only when named in ONLY: python -m mfm_fast.pretrain images/s, ViT-S/16 bf16, --method mfm,folk
# Before a step starts, its estimate is compared with the time left: a step that would not fit prints
# "skip <step>: needs ~Ns, M s left" and the next one is tried. Each step runs under a timeout (the smaller
# of its cap and the time left) and a failing step never stops the next. Without a GPU every step says so.
# Files in $OUT (at most 8): device_check.log (this output), build.log, tests.log, sanitizer.log, ncu.txt,
# fft_mask.log and fft_mask's JSON and PNG. cuFFTDx needs PyPI nvidia-mathdx (tools/requirements.txt):
# installed, at $MATHDX_ROOT, or, on a machine without network, its wheel carried in .whl/ at the checkout's root
# (unpacked to /tmp/mathdx). Fetch it where there is network, at constraints.txt's pin, and keep it out of git:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps -d .whl "$(grep '^nvidia-mathdx==' constraints.txt)"
# then carry .whl with the checkout: being ignored, it travels only where the copy to the GPU machine names it
# (docs/gpu-runs.md, tools/README.md). Exit status 1 if a step failed, else 0.
set -uo pipefail
PY=${PYTHON:-python3}
DEADLINE_S=${DEADLINE_S:-480}
ALL_STEPS="build smoke sanitizer graph tests fft_mask cufftdx ncu nopf pretrain"
ONLY=${ONLY:-${ALL_STEPS% pretrain}}
for name in $ONLY; do
  [[ " $ALL_STEPS " == *" $name "* ]] || { echo "ONLY: unknown step '$name'; choose from: $ALL_STEPS" >&2; exit 2; }
done
[[ "$DEADLINE_S" =~ ^[0-9]+$ ]] || { echo "DEADLINE_S: a whole number of seconds, got '$DEADLINE_S'" >&2; exit 2; }
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$repo/bench/results}
mkdir -p "$out" && out=$(cd "$out" && pwd) || { echo "OUT: cannot create '$out'" >&2; exit 2; }
cd "$repo"
log="$out/device_check.log"
: >"$log"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the scripts import this checkout, installed or not
start=$(date +%s)
stamp=$(mktemp)  # files newer than this were written by this run
summary=()
failed=0

say() { echo "$*" | tee -a "$log"; }
left() {  # seconds of the budget left, at least 0
  local l=$((DEADLINE_S - ($(date +%s) - start)))
  echo $((l > 0 ? l : 0))
}
# limit CAP CMD...: CMD under a timeout of min(CAP, time left) seconds (at least 1).
limit() {
  local cap=$1 l
  shift
  l=$(left)
  ((l > cap)) && l=$cap
  ((l < 1)) && l=1
  timeout -k 5 "$l" "$@"
}
# step NAME ESTIMATE CAP FUNCTION: run FUNCTION if NAME is selected, a GPU is there and ESTIMATE seconds fit.
step() {
  local name=$1 est=$2 cap=$3 fn=$4 l t0 rc
  l=$(left)
  if [[ " $ONLY " != *" $name "* ]]; then
    say "skip $name: not in ONLY"
  elif [ -n "$no_gpu" ]; then
    say "skip $name: $no_gpu"
    summary+=("$(printf '%-10s skipped: %s' "$name" "$no_gpu")")
  elif ((l < est)); then
    say "skip $name: needs ~${est}s, ${l} s left"
    summary+=("$(printf '%-10s skipped: needs ~%ss, %s s left' "$name" "$est" "$l")")
  else
    say ""
    say "== $name (~${est} s; ${l} s left)"
    t0=$(date +%s)
    STEP_CAP=$cap "$fn"
    rc=$?
    ((rc != 0)) && failed=1
    summary+=("$(printf '%-10s %-8s %4s s' "$name" "$([ $rc -eq 0 ] && echo ok || echo "FAIL $rc")" $(($(date +%s) - t0)))")
  fi
}
find_tool() {  # the first of PATH / CUDA's bin / Nsight's folder that holds $1
  command -v "$1" 2>/dev/null || ls /usr/local/cuda/bin/"$1" /opt/nvidia/nsight-compute/*/"$1" 2>/dev/null | head -1
}

run_build() {
  MAX_JOBS=${MAX_JOBS:-$(nproc)} limit "$STEP_CAP" "$PY" -m pip install -e . --no-build-isolation --no-deps \
    >"$out/build.log" 2>&1
  local rc=$?
  ((rc != 0)) && tail -20 "$out/build.log" | tee -a "$log"
  limit 60 "$PY" -m mfm_fast.info 2>&1 | tee -a "$log"
  return $rc
}

run_smoke() {
  CUDA_LAUNCH_BLOCKING=1 limit "$STEP_CAP" "$PY" tools/gpu_smoke.py 2>&1 | tee -a "$log"
  return "${PIPESTATUS[0]}"
}

# sanitize TOOL [FILTER...]: compute-sanitizer TOOL on one gpu_smoke.py --one-launch run, output in $tmp
sanitize() {
  local tool=$1
  shift
  limit "$((STEP_CAP / 3 + 10))" "$cs" --tool "$tool" "$@" --error-exitcode 9 --print-limit 20 \
    "$PY" tools/gpu_smoke.py --one-launch >"$tmp" 2>&1
}

run_sanitizer() {
  local cs tool tmp rc=0 r
  cs=$(find_tool compute-sanitizer)
  [ -z "$cs" ] && { say "compute-sanitizer not found (PATH, /usr/local/cuda/bin)"; return 1; }
  tmp=$(mktemp)
  : >"$out/sanitizer.log"
  for tool in memcheck racecheck synccheck; do
    if (($(left) < 20)); then
      say "skip sanitizer $tool: $(left) s left"
      continue
    fi
    sanitize "$tool" --kernel-name kns=mfm
    r=$?
    if ! grep -q "SUMMARY" "$tmp" && grep -qiE "kernel-name|unrecognized|invalid (option|value)" "$tmp"; then
      say "sanitizer $tool: the kernel filter was refused, again without it: $(grep -m1 -iE 'kernel-name|unrecognized|invalid' "$tmp")"
      sanitize "$tool"
      r=$?
    fi
    { echo "== compute-sanitizer --tool $tool: rc=$r"; cat "$tmp"; } >>"$out/sanitizer.log"
    say "sanitizer $tool: rc=$r | $(grep -E 'SUMMARY|not supported|Error|error' "$tmp" | head -4 | tr '\n' '|')"
    ((r != 0)) && rc=1
  done
  rm -f "$tmp"
  return $rc
}

run_graph() {
  limit "$STEP_CAP" "$PY" tools/gpu_smoke.py --graph 2>&1 | tee -a "$log"
  return "${PIPESTATUS[0]}"
}

run_tests() {
  local f rc=0 r files
  : >"$out/tests.log"
  # every file with a GPU-marked test, one process each (a kernel fault cannot take the other files down)
  files=$("$PY" -m pytest --collect-only -q -m gpu -p no:cacheprovider tests 2>>"$out/tests.log" | grep "::" |
          cut -d: -f1 | sort -u)
  if [ -z "$files" ]; then
    say "tests: no GPU-marked test collected (pytest --collect-only -m gpu; tests.log says why)"
    tail -5 "$out/tests.log" | tee -a "$log"
    return 1
  fi
  say "tests: $(echo $files | wc -w) files with GPU-marked tests"
  for f in $files; do
    if (($(left) < 10)); then
      say "skip tests $f: $(left) s left"
      continue
    fi
    echo "== pytest -m gpu $f" >>"$out/tests.log"
    limit "$STEP_CAP" "$PY" -m pytest -q -rs -m gpu --benchmark-disable -p no:cacheprovider "$f" >>"$out/tests.log" 2>&1
    r=$?
    say "tests $f: rc=$r | $(tail -1 "$out/tests.log")"
    ((r != 0 && r != 5)) && rc=1  # 5: nothing collected (every test deselected)
  done
  grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -20 | tee -a "$log"
  return $rc
}

run_fft_mask() {
  limit "$STEP_CAP" "$PY" bench/fft_mask.py --batch 64 256 --check --providers official,torch_compile,torch,triton,cuda \
    --dtype fp32 bf16 --work corrupt loss step --quick --plot --markdown --out-dir "$out" >"$out/fft_mask.log" 2>&1
  local rc=$?
  grep -E "check |^skipped|FAIL|wrote|done in" "$out/fft_mask.log" | head -60 | tee -a "$log"
  sed -n '/^| B | size/,$p' "$out/fft_mask.log" | head -90 | tee -a "$log"
  return $rc
}

run_cufftdx() {
  local whl
  if ! "$PY" -c "import sys; sys.path.insert(0, 'tools'); import cufftdx_plane as c; sys.exit(c.mathdx_root() is None)"; then
    whl=$(ls .whl/nvidia_mathdx-*.whl 2>/dev/null | head -1)
    if [ -z "$whl" ]; then
      say "cufftdx: nvidia-mathdx is not installed and no .whl/nvidia_mathdx-*.whl was carried (docs/gpu-runs.md)"
      return 1
    fi
    "$PY" -m zipfile -e "$whl" /tmp/mathdx && export MATHDX_ROOT=/tmp/mathdx/nvidia/mathdx
    say "cufftdx: headers from $whl"
  fi
  limit "$STEP_CAP" "$PY" tools/cufftdx_plane.py --batch 256 2>&1 | tee -a "$log"
  return "${PIPESTATUS[0]}"
}

NCU_METRICS=smsp__inst_executed.sum,sm__warps_active.avg.pct_of_peak_sustained_active,\
l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum,\
l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum,\
dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum,launch__grid_size,launch__block_size,\
launch__registers_per_thread,launch__occupancy_limit_shared_mem,sm__throughput.avg.pct_of_peak_sustained_elapsed,\
dram__throughput.avg.pct_of_peak_sustained_elapsed
NCU_METRICS_MIN=smsp__inst_executed.sum,sm__warps_active.avg.pct_of_peak_sustained_active,dram__bytes_read.sum,\
dram__bytes_write.sum,gpu__time_duration.sum,launch__grid_size

# profile METRICS: ncu on the mfm kernels of one gpu_smoke.py --one-launch run, output in ncu.txt
profile() {
  limit "$STEP_CAP" "$ncu" --target-processes all --clock-control none --kernel-name-base demangled --kernel-name regex:mfm \
    --metrics "$1" "$PY" tools/gpu_smoke.py --one-launch --n 50 --with-cufftdx >"$out/ncu.txt" 2>&1
}

run_ncu() {
  local ncu rc
  ncu=$(find_tool ncu)
  [ -z "$ncu" ] && { say "ncu not found (PATH, /usr/local/cuda/bin, /opt/nvidia/nsight-compute)"; return 1; }
  profile "$NCU_METRICS"
  rc=$?
  if grep -qiE "failed to find metric|invalid metric" "$out/ncu.txt" && (($(left) > 30)); then
    say "ncu: $(grep -m1 -iE 'failed to find metric|invalid metric' "$out/ncu.txt"); again with fewer metrics"
    profile "$NCU_METRICS_MIN"
    rc=$?
  fi
  grep -E "mfm|inst_executed|warps_active|bank_conflicts|dram__bytes|grid_size|==ERROR==|==PROF==" "$out/ncu.txt" \
    | head -120 | tee -a "$log"
  return $rc
}

run_nopf() {
  MFM_FAST_CUDA_PREFETCH=0 limit "$STEP_CAP" "$PY" bench/fft_mask.py --batch 256 --providers cuda --work corrupt loss \
    --quick --markdown --no-json >>"$out/fft_mask.log" 2>&1
  local rc=$?
  echo "(MFM_FAST_CUDA_PREFETCH=0)" | tee -a "$log"
  tail -8 "$out/fft_mask.log" | tee -a "$log"
  return $rc
}

run_pretrain() {
  limit "$STEP_CAP" "$PY" -m mfm_fast.pretrain --synthetic --model vit_small_patch16_224 --batch-size 256 --steps 40 \
    --timing-warmup 15 --no-checkpoint --vis-num 0 --no-progress --log-every 40 --report-throughput \
    --method mfm,folk --output-dir /tmp/device_check_pretrain 2>&1 | tee -a "$log" | grep '^{'
  return "${PIPESTATUS[0]}"
}

no_gpu=""
if [ -z "${DEVICE_CHECK_ASSUME_GPU:-}" ]; then  # set: skip the detection (tests of the deadline logic)
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    no_gpu="no GPU (nvidia-smi finds none)"
  elif ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" >/dev/null 2>&1; then
    no_gpu="no GPU (torch.cuda.is_available() is False for $PY)"
  fi
fi
say "device_check | $(date -u +%FT%TZ) | git $(git rev-parse --short HEAD 2>/dev/null || echo '?') | budget ${DEADLINE_S} s | out $out"
[ -z "$no_gpu" ] && command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader 2>&1 | tee -a "$log"

step build 60 150 run_build
step smoke 30 90 run_smoke
step sanitizer 75 180 run_sanitizer
step graph 15 60 run_graph
step tests 90 180 run_tests
step fft_mask 120 240 run_fft_mask
step cufftdx 45 120 run_cufftdx
step ncu 60 150 run_ncu
step nopf 40 60 run_nopf
step pretrain 150 240 run_pretrain

say ""
say "== summary ($(($(date +%s) - start)) s of ${DEADLINE_S} s)"
for line in ${summary[@]+"${summary[@]}"}; do say "$line"; done
files=$(find "$out" -type f -newer "$stamp" | sort)
n=$(printf '%s' "$files" | grep -c . || true)
rm -f "$stamp"
say "files written to $out: $n (at most 8 come back)"
printf '%s\n' "$files" | sed '/^$/d; s|^|  |' | tee -a "$log"
exit $failed
