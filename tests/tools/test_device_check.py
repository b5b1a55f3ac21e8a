"""tools/device_check.sh, tools/gpu_smoke.py and tools/cufftdx_plane.py without a GPU.

device_check.sh runs end to end on the CPU with every step skipped and its reason, keeps to its deadline
(a step that would not fit is skipped with the time it needs and the time left; a failing step does not stop
the next) and writes at most 8 files. gpu_smoke.py's comparisons run on the CPU (torch vs reference
backend); cufftdx_plane.py's checks are exercised with a torch.fft stand-in for the kernel (they pass it and
catch a wrong one), and the cuFFTDx kernel itself compiles for sm_90.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_tool as load

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "device_check.sh"
STEPS = ["build", "smoke", "sanitizer", "graph", "tests", "fft_mask", "cufftdx", "ncu", "nopf"]  # the default run
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less path")


def run_check(tmp_path, **env):
    out = tmp_path / "out"
    full = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=full, timeout=120)
    files = [p for p in out.rglob("*") if p.is_file()]
    return proc, files


@needs_no_gpu
def test_device_check_on_cpu_skips_every_step_with_its_reason(tmp_path):
    proc, files = run_check(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for name in STEPS:
        assert any(re.fullmatch(rf"skip {name}: no GPU \(.+\)", line) for line in lines), name
    assert "skip pretrain: not in ONLY" in lines  # only when asked for
    assert "== summary" in proc.stdout
    assert 1 <= len(files) <= 8 and (tmp_path / "out" / "device_check.log").read_text() == proc.stdout


def test_device_check_keeps_to_its_deadline_and_goes_on_after_a_failure(tmp_path):
    """A python that fails after 2 s stands in for every step: graph (~15 s) and cufftdx (~45 s) start within
    a 70 s budget and fail, and tests (~90 s) is skipped with the time it needs and the time left."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nsleep 2\necho \"fake python $*\"\nexit 1\n")
    fake.chmod(0o755)
    proc, files = run_check(tmp_path, DEVICE_CHECK_ASSUME_GPU="1", DEADLINE_S="70", ONLY="graph cufftdx tests",
                            PYTHON=str(fake))
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "== graph (~15 s;" in out and "fake python tools/gpu_smoke.py --graph" in out
    assert "== cufftdx (~45 s;" in out
    m = re.search(r"^skip tests: needs ~90s, (\d+) s left$", out, re.M)
    assert m and 0 < int(m.group(1)) < 70
    assert re.search(r"^graph +FAIL 1 ", out, re.M) and re.search(r"^cufftdx +FAIL 1 ", out, re.M)
    for name in set(STEPS + ["pretrain"]) - {"graph", "cufftdx", "tests"}:
        assert f"skip {name}: not in ONLY" in out
    assert len(files) <= 8


def test_device_check_tests_step_fails_when_no_gpu_test_is_collected(tmp_path):
    """The tests step runs every file that has a GPU-marked test, found by collection; a collection that finds
    none (here: a python that cannot even load the suite) fails the step instead of passing it empty."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ImportError while loading conftest' >&2\nexit 4\n")
    fake.chmod(0o755)
    proc, files = run_check(tmp_path, DEVICE_CHECK_ASSUME_GPU="1", DEADLINE_S="400", ONLY="tests", PYTHON=str(fake))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "tests: no GPU-marked test collected" in proc.stdout and re.search(r"^tests +FAIL 1 ", proc.stdout, re.M)
    assert "ImportError while loading conftest" in (tmp_path / "out" / "tests.log").read_text()


def test_device_check_with_no_time_left_starts_nothing(tmp_path):
    proc, _ = run_check(tmp_path, DEVICE_CHECK_ASSUME_GPU="1", DEADLINE_S="0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in STEPS:
        assert re.search(rf"^skip {name}: needs ~\d+s, 0 s left$", proc.stdout, re.M), name
    assert "\n== build" not in proc.stdout


# ------------------------------------------------------------------ gpu_smoke.py
def test_gpu_smoke_harness_on_cpu(capsys):
    smoke = load("gpu_smoke")
    assert smoke.main(["--device", "cpu", "--backend", "torch", "--against", "reference", "--sizes", "112",
                       "--n", "1"]) == 0
    out = capsys.readouterr().out
    cases = re.findall(r"^PASS (corrupt|loss +need_grad=[01]) +112 N=1 .* torch vs reference: (.*) \(", out, re.M)
    assert len(cases) == 6, out  # corrupt, loss with / without need_grad; without and with the mask_band promise
    assert all("e-0" in detail or "0.0e+00" in detail for _, detail in cases)
    assert "gpu_smoke smoke: all passed" in out


def test_gpu_smoke_reports_a_mismatch(capsys, monkeypatch):
    smoke = load("gpu_smoke")
    real = smoke.rel_err
    monkeypatch.setattr(smoke, "rel_err", lambda a, e: real(a, e) + 1.0)  # as if the backend were wrong
    assert smoke.main(["--device", "cpu", "--backend", "torch", "--against", "reference", "--sizes", "112",
                       "--n", "1"]) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL ") >= 6 and "6 FAILED" in out


def test_gpu_smoke_one_launch_on_cpu(capsys):
    smoke = load("gpu_smoke")
    argv = ["--one-launch", "--device", "cpu", "--backend", "torch", "--sizes", "112", "--with-cufftdx"]
    assert smoke.main(argv) == 0
    out = capsys.readouterr().out
    assert "launched 112 N=1 (3 planes): corrupt, loss need_grad=1, loss need_grad=0" in out
    assert "cuFFTDx kernels not launched: they run on CUDA tensors only" in out


@needs_no_gpu
def test_gpu_smoke_without_a_device_says_so(capsys):
    smoke = load("gpu_smoke")
    for argv in ([], ["--graph"], ["--one-launch"]):
        assert smoke.main(argv) == 0
        assert "no CUDA device" in capsys.readouterr().out


def test_gpu_smoke_covers_both_sizes_and_a_second_wave():
    smoke = load("gpu_smoke")
    args = smoke.parse_args([])
    assert args.sizes == [224, 112] and smoke.batches(args, 224) == [1, 50] and smoke.batches(args, 112) == [1, 200]
    # more planes than an H200 holds at once: 132 SMs x 1 CTA at 224, x 4 at 112 (shared memory per plane)
    assert 3 * 50 > 132 and 3 * 200 > 4 * 132
    assert smoke.batches(smoke.parse_args(["--one-launch"]), 224) == [1]


# ------------------------------------------------------------------ cufftdx_plane.py
def test_cufftdx_checks_pass_the_exact_maths_and_catch_a_wrong_one():
    bench = load("cufftdx_plane")
    errs = bench.check_side(bench.TorchPlanes(), 112, torch.device("cpu"), n=2)
    assert set(errs) == {"roundtrip", "forward", "masked"} and max(errs.values()) <= 1e-6, errs

    class Conjugated(bench.TorchPlanes):  # the spectrum's sign convention flipped
        def forward(self, x):
            return super().forward(x).conj()

    class Unmasked(bench.TorchPlanes):  # the mask step left out
        def roundtrip(self, x, mask=None, mean=None, std=None, out=None):
            return super().roundtrip(x, None, mean, std)

    assert bench.check_side(Conjugated(), 112, torch.device("cpu"), n=2)["forward"] > 1e-2
    assert bench.check_side(Unmasked(), 112, torch.device("cpu"), n=2)["masked"] > 1e-2
    assert bench.rel_err(torch.full((2,), float("nan")), torch.ones(2)) == float("inf")  # unwritten output


def test_device_check_cufftdx_step_finds_the_installed_headers(tmp_path):
    """The cufftdx step looks nvidia-mathdx up through tools/cufftdx_plane.py: installed (tools/requirements.txt),
    it neither asks for a carried wheel nor unpacks one, and runs the script (which, without a GPU, says so)."""
    if load("cufftdx_plane").mathdx_root() is None:
        pytest.fail("nvidia-mathdx is not installed: pip install -r tools/requirements.txt -c constraints.txt")
    proc, _ = run_check(tmp_path, DEVICE_CHECK_ASSUME_GPU="1", ONLY="cufftdx", DEADLINE_S="100")
    assert "== cufftdx (~45 s;" in proc.stdout, proc.stdout + proc.stderr
    assert "no .whl/nvidia_mathdx" not in proc.stdout and "headers from" not in proc.stdout, proc.stdout
    assert "tools/cufftdx_plane.py" not in proc.stderr, proc.stderr  # the lookup imports it without an error
    if not torch.cuda.is_available():
        assert "needs a CUDA device" in proc.stdout and proc.returncode == 0, proc.stdout + proc.stderr


@needs_no_gpu
def test_cufftdx_without_a_device_says_so(capsys):
    assert load("cufftdx_plane").main([]) == 0
    assert "needs a CUDA device" in capsys.readouterr().out


def test_cufftdx_ptxas_report_is_parsed():
    bench = load("cufftdx_plane")
    text = ("ptxas info    : Function properties for _ZN11mfm_cufftdx12plane_kernelILi224ELb0EEEvNS_4ArgsE\n"
            "    0 bytes stack frame, 0 bytes spill stores, 8 bytes spill loads\n"
            "ptxas info    : Used 128 registers, used 1 barriers\n")
    facts = {bench.kernel_label(k): v for k, v in bench.parse_ptxas(text).items()}
    assert facts == {"plane_kernel<224, roundtrip>": {"stack": 0, "spill_stores": 0, "spill_loads": 8,
                                                       "registers": 128}}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.isfile("/usr/local/cuda/bin/nvcc"),
                    reason="nvcc not found")
def test_cufftdx_kernel_compiles_for_sm90_without_spills():
    """nvidia-mathdx is in tools/requirements.txt, which make test installs: a missing install fails here rather
    than skipping."""
    bench = load("cufftdx_plane")
    assert bench.mathdx_root() is not None, ("nvidia-mathdx is not installed: pip install -r tools/requirements.txt "
                                             "-c constraints.txt")
    lib, facts = bench.build("sm_90", force=True)
    assert lib.is_file() and facts["arch"] == "sm_90"
    assert set(facts["kernels"]) == {f"plane_kernel<{s}, {m}>" for s in (224, 112) for m in ("forward", "roundtrip")}
    for name, k in facts["kernels"].items():
        assert k["spill_stores"] == 0 and k["spill_loads"] == 0 and k["stack"] == 0, (name, k)
        assert 0 < k["registers"] <= 255, (name, k)
    nm = subprocess.run(["nm", "-D", str(lib)], capture_output=True, text=True).stdout
    for sym in ("cufftdx_plane_roundtrip", "cufftdx_plane_forward", "cufftdx_plane_threads",
                "cufftdx_plane_smem_bytes", "cufftdx_plane_error_string"):
        assert re.search(rf" T {sym}$", nm, re.M), sym
    impl = bench.CufftdxPlanes(lib)  # static cudart: loads without a GPU; these entry points make no CUDA call
    assert impl.launch_shape(224) == (256, 224 * 113 * 8 + 16 * 1792)  # half spectrum + 16 lines of scratch
    assert impl.launch_shape(112) == (256, 112 * 57 * 8 + 32 * 896)
    assert impl.launch_shape(224)[1] <= bench.SMEM_PER_BLOCK and impl.launch_shape(64) == (0, 0)
    assert impl.lib.cufftdx_plane_error_string(2).decode() == "out of memory"
    with pytest.raises(ValueError, match="CUDA planes"):
        impl.roundtrip(torch.rand(1, 3, 112, 112))


@pytest.mark.parametrize("env, message", [({"ONLY": "smoke bogus"}, "ONLY: unknown step 'bogus'"),
                                          ({"DEADLINE_S": "8min"}, "DEADLINE_S: a whole number of seconds")])
def test_device_check_bad_settings_name_the_variable(tmp_path, env, message):
    proc, files = run_check(tmp_path, **env)
    assert proc.returncode == 2 and message in proc.stderr and not files
