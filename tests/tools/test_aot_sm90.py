"""The Triton kernels compiled for Hopper (sm_90) on a machine without a GPU (tools/aot_sm90.py).

Checks what the interpreter cannot: the kernels compile, fit Hopper's shared memory (e.g. a
256-wide loss inverse of 260 KiB, the corruption band path at R > 32 of 320 KiB), and every
3xTF32 group of the loss's and the corruption band path's products still starts from a zero accumulator
after Triton's passes (a pass that folded the running sum back into the MMA would bring back the H200
gamma = 0.5 error), and the corruption band path at R = 16 stays within 128 registers without spills."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # Triton AOT compiles for sm_90: minutes on 2 cores

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOPPER_SMEM = 227 * 1024  # largest dynamic shared memory per block on sm_90
BAND_REGISTERS = 128  # corruption band path at R = 16: 4 programs of 4 warps (2 of 8 warps) per SM by registers
BAND_KERNELS = ("corrupt_band_coef", "corrupt_band_out")
SCRIPT = ("import json, sys; sys.path.insert(0, 'tools'); import aot_sm90; "
          "r = aot_sm90.compile_all(size=int(sys.argv[1]), precision=sys.argv[2], ops=sys.argv[3:]); "
          "print(json.dumps({k: {f: v for f, v in d.items() if f != 'ttgir'} for k, d in r.items()}))")


def _compile(size, precision, ops=("loss", "corrupt")):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(size), precision, *ops], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip(f"Triton's CUDA compiler is not usable here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("size", [224, 112, 256, 200])
def test_kernels_fit_hopper_and_tf32x3_products_start_from_zero(size):
    """Every side the launchers accept (up to 256; the band kernels at their widest band)."""
    results = _compile(size, "tf32x3")
    factored = {"fact_fwd", "fact_inv"} if size in (224, 112) else set()  # the transforms factored 7 x 2^k
    band = {f"{name}{suffix}" for name in BAND_KERNELS for suffix in ("", "_r32")}
    assert set(results) == {"full_fwd", "full_inv", "band", "corrupt_general", "corrupt_rows"} | band | factored
    for name, r in results.items():
        assert r["shared"] <= HOPPER_SMEM, f"{name}: {r['shared']} B of shared memory"
        assert r["dots"] > 0 and r["wgmma"] + r["mma_sync"] > 0, name  # tensor-core MMAs, not FMA loops
    for name in ("full_fwd", "full_inv", "band", *factored, *band):  # hand-split 3xTF32
        r = results[name]
        assert 3 * r["zero_started"] == r["dots"], f"{name}: {r['zero_started']} of {r['dots']} dots start from 0"


@pytest.mark.parametrize("precision", ["tf32x3", "tf32", "ieee"])
def test_corruption_band_path_off_the_register_wall(precision):
    """Both band-path kernels at R = 16, 224 x 224, specialised as Triton's launcher does for a contiguous
    fp32 batch: at most BAND_REGISTERS registers and no spills (ptxas -v on Triton's PTX)."""
    results = _compile(224, precision, ("corrupt",))
    for name in BAND_KERNELS:
        r = results[name]
        if r["registers"] is None:
            pytest.skip("Triton's ptxas gave no register count here")
        assert r["registers"] <= BAND_REGISTERS and r["spill_bytes"] == 0, f"{name}: {r}"
