"""tools/kernel_model.py (the H200 kernel model) and tools/sass_model.py (the SASS walk it counts with).

The walk is checked on toy kernels whose loop trip counts are known: a counted loop with a runtime bound and
a thread-strided loop whose last trip only some warps take. The model itself runs once with --json: the
schema, the calibration rows within 30% of the H200 measurements, and its CLI's bad-flag message."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, load_tool


TOY = r"""
extern "C" __global__ void counted(float* out, int n) {
  float acc = 0.f;
#pragma unroll 1
  for (int k = 0; k < n; ++k) acc = acc * 0.5f + out[k];
  out[threadIdx.x] = acc;
}
extern "C" __global__ void strided(float* out, int n) {
#pragma unroll 1
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = out[i] * 2.f;
}
extern "C" __global__ void fimm(float* out, int n, float g) {
  float acc = 0.f;
  int trips = g == 1.f ? n : 3 * n;
#pragma unroll 1
  for (int k = 0; k < trips; ++k) acc = acc * 0.5f + out[k];
  out[threadIdx.x] = acc;
}
extern "C" __global__ void table(float* out, int n, int sel) {
  float acc = 0.f;
  switch (sel) {
    case 0:
#pragma unroll 1
      for (int k = 0; k < n; ++k) acc = acc * 0.5f + out[k];  // CASE0
      break;
    case 1:
#pragma unroll 1
      for (int k = 0; k < n; ++k) acc = acc * out[k] + 1.f;  // CASE1
      break;
    case 2:
#pragma unroll 1
      for (int k = 0; k < n; ++k) acc = fmaxf(acc, out[2 * k]) - 0.25f;  // CASE2
      break;
    case 3:
#pragma unroll 1
      for (int k = 0; k < n; ++k) acc = acc / (out[k] + 3.f);  // CASE3
      break;
    default:
#pragma unroll 1
      for (int k = 0; k < n; ++k) acc += out[3 * k] * out[k];  // CASE4
  }
  out[threadIdx.x] = acc;
}
"""


def _nvcc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else shutil.which("nvcc")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    if _nvcc() is None:
        pytest.skip("nvcc not found: the walk's toy kernels need it")
    d = tmp_path_factory.mktemp("toy")
    src, cubin = d / "toy.cu", d / "toy.cubin"
    src.write_text(TOY)
    subprocess.run([_nvcc(), "-arch=sm_90", "-cubin", "-O3", "-lineinfo", str(src), "-o", str(cubin)], check=True,
                   timeout=300)
    sass_model = load_tool("sass_model")
    return sass_model, sass_model.Program(str(cubin))


def _params(n):  # counted / strided (float* out, int n): out at c[0x0][0x210], n at 0x218
    return {(0, 0x210): 0x1000, (0, 0x214): 0x7F00, (0, 0x218): n}


def _loop_body(prog, kernel):
    """Static instructions of the kernel's one loop, from its back edge."""
    base = prog.entry[kernel]
    back = [(i, ins.target) for i, ins in enumerate(prog.insns) if ins.op == "BRA" and ins.target is not None
            and base <= ins.target < i and i < base + len(prog.funcs[kernel][0])]  # (BRA-to-self: end padding)
    assert len(back) == 1, back
    i, target = back[0]
    return i - target + 1


def test_counted_loop_trip_count(toy):
    """Warp instructions grow by exactly (loop body) x (extra trips) when the runtime bound grows."""
    sm, prog = toy
    body = _loop_body(prog, "counted")
    steps = {n: sm.walk_cta(prog, "counted", 32, params=_params(n)).steps for n in (10, 20, 47)}
    assert steps[20] - steps[10] == 10 * body
    assert steps[47] - steps[20] == 27 * body


def test_thread_strided_loop_counts_the_tail_warps(toy):
    """for (i = tid; i < n; i += 128) on 4 warps: n = 900 takes 8 + 7 + 7 + 7 = 29 warp trips (lane 0 of warp w
    runs ceil((900 - 32 w) / 128) times), n = 1024 takes 4 x 8 = 32: 3 more trips, body each."""
    sm, prog = toy
    body = _loop_body(prog, "strided")
    s900 = sm.walk_cta(prog, "strided", 128, params=_params(900)).steps
    s1024 = sm.walk_cta(prog, "strided", 128, params=_params(1024)).steps
    assert s1024 - s900 == 3 * body


def test_float_immediate_compare(toy):
    """FSETP's immediate "1" is 1.0f, not the bits 0x1: g = 1.0 takes n trips, g = 2.0 takes 3 n."""
    import struct
    sm, prog = toy
    body = _loop_body(prog, "fimm")

    def steps(g):
        p = _params(10)
        p[(0, 0x21c)] = struct.unpack("<I", struct.pack("<f", g))[0]
        return sm.walk_cta(prog, "fimm", 32, params=p).steps
    assert steps(2.0) - steps(1.0) == 20 * body


def test_jump_table_takes_the_case_of_its_index(toy):
    """A switch compiled to BRX through a constant-bank-2 jump table: each sel runs its own case's loop
    (the case's source line issues once per trip), none raises."""
    sm, prog = toy
    assert any(ins.op == "BRX" for ins in prog.funcs["table"][0]), "the toy switch has no jump table any more"
    lines = {f"CASE{c}": i + 1 for i, text in enumerate(TOY.splitlines()) for c in range(5) if f"CASE{c}" in text}
    for sel, case in ((0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (7, 4)):
        p = _params(20)
        p[(0, 0x21c)] = sel
        s = sm.walk_cta(prog, "table", 32, params=p)
        hot = {ln for (f, ln), n in s.by_src.items() if f == "toy.cu" and n >= 20}
        assert lines[f"CASE{case}"] in hot, (sel, hot)
        assert not (hot & {v for k, v in lines.items() if k != f"CASE{case}"}), (sel, hot)


def test_unknown_loop_bound_is_an_error(toy):
    """A loop whose bound the walk cannot know (here: n not given) stops with a clear error, not a number."""
    sm, prog = toy
    with pytest.raises(sm.WalkError, match="loop branch"):
        sm.walk_cta(prog, "counted", 32, params={(0, 0x210): 0x1000, (0, 0x214): 0x7F00})


@pytest.fixture(scope="module")
def model_json():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "kernel_model.py"), "--json"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=3000)
    if proc.returncode != 0 and ("nvcc not found" in proc.stderr or "ptxas" in proc.stderr):
        pytest.skip(f"no CUDA toolchain for the model: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_model_schema(model_json):
    names = [k["name"] for k in model_json["kernels"]]
    for want in ("cuda corrupt", "cuda loss fwd+bwd", "cuda loss forward only (full planes)", "triton corrupt band",
                 "triton corrupt general", "triton loss fwd+bwd"):
        assert want in names
    for k in model_json["kernels"]:
        assert "name" in k and "modelled_ms" in k
        if "registers" in k:  # a launch row
            for field in ("spill_bytes", "ctas_per_sm", "warp_insns_per_cta", "smem_wavefronts_per_cta",
                          "hbm_bytes", "issue_ms", "smem_ms", "hbm_ms", "x_floor"):
                assert field in k, (k["name"], field)
            assert k["warp_insns_per_cta"] > 0 and k["modelled_ms"] > 0
    assert {c["name"] for c in model_json["calibration"]} == {"triton corrupt band (measured version)",
                                                              "triton loss (measured version)"}
    band = next(k for k in model_json["kernels"] if k["name"] == "triton corrupt band")
    assert len(band["launches"]) == 2  # kernels/corrupt.py's band path: coefficients, then the low-pass pass


@pytest.mark.slow
def test_cuda_loss_total_is_full_half_plus_band_half_plus_glue(model_json):
    rows = {k["name"]: k for k in model_json["kernels"]}
    band, low, total = (rows["cuda loss (band planes)"], rows["cuda loss fwd+bwd (full planes, low-pass half)"],
                        rows["cuda loss fwd+bwd"])
    assert band["spill_bytes"] == 0 and band["modelled_ms"] > 0 and band["grid"] == low["grid"] == 384
    assert band["exit_ms"] > 0 and low["exit_ms"] > 0  # the other half's CTAs exit at once, counted
    assert total["launches"][1:3] == [low["name"], band["name"]] and total["launches"][0] == "removed_kernel"
    assert 0 < total["removed_kernel_ms"] <= total["glue_ms"] < total["without_mask_band_ms"]
    assert abs(total["modelled_ms"] - (low["modelled_ms"] + band["modelled_ms"] + total["glue_ms"])) < 1e-3


@pytest.mark.slow
def test_calibration_within_30_percent(model_json):
    for c in model_json["calibration"]:
        assert c["measured_ms"] > 0
        assert 0.7 <= c["modelled_ms"] / c["measured_ms"] <= 1.3, c


def test_bad_flag_names_the_flag():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "kernel_model.py"), "--batch", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "kernel_model.py: error: --batch:" in proc.stderr


def test_kernel_model_cache_variable_pointing_at_a_file(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cache = str(a_file)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "kernel_model.py")], capture_output=True, text=True,
                          env=dict(os.environ, MFM_FAST_MODEL_CACHE=cache), timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("kernel_model.py: error: MFM_FAST_MODEL_CACHE: ") and repr(cache) in lines[0]
    assert ": is a file, not a folder;" in lines[0], lines[0]


def test_kernel_model_cache_below_a_file_names_the_file(tmp_path):
    """The cache-folder check is the just-in-time build's (mfm_fast.backends._jit_build.cache_dir_problem): a path
    under a file names that file."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cache = str(a_file / "cache")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "kernel_model.py")], capture_output=True, text=True,
                          env=dict(os.environ, MFM_FAST_MODEL_CACHE=cache), timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert repr(cache) in lines[0] and f": {a_file} is a file, not a folder;" in lines[0], lines[0]
    assert not os.path.exists(cache)


def test_smem_bank_model_runs_and_sees_the_old_conflicts(capsys):
    """tools/smem_banks.py (a model of csrc/fft.cuh's index maps) runs; its --compare column shows the
    k-consecutive unpack gather that the pair-group mapping replaced, at > 10 wavefronts per access."""
    import re
    mod = load_tool("smem_banks")
    mod.main(["--compare"])
    out = capsys.readouterr().out
    gather = re.search(r"224 x 224.*?unpack gather\s+([\d.]+)\s+\(before: ([\d.]+)\)", out, re.S)
    assert gather and float(gather.group(1)) <= 2.0 and float(gather.group(2)) > 10.0, out
    assert mod.freq_pos(1, 224) == 32 and mod.freq_pos(7, 224) == 16  # k = 7 -> q = 1 -> bitrev_5(1) = 16
