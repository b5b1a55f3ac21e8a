"""NVIDIA's reference point for our plane FFT: a cuFFTDx round trip of 224 x 224 (and 112) fp32 planes.

    python tools/cufftdx_plane.py --compile-only      # no GPU needed: build for sm_90, print registers / spills
    python tools/cufftdx_plane.py                     # on a GPU: build, check against torch.fft, time
    python tools/cufftdx_plane.py --batch 256 --sizes 224 112 --rounds 5 --json out.json

The kernel (tools/cufftdx/plane_roundtrip.cu) runs one CTA per image plane, as the CUDA extension does: R2C
rows, C2C columns forward, an optional mask step, C2C columns inverse, C2R rows and the corruption epilogue
(clamp, normalise), the half spectrum in shared memory and the 1D transforms from cuFFTDx's block FFTs.
It needs PyPI nvidia-mathdx (header-only cuFFTDx, found through the `nvidia` namespace package, or at
$MATHDX_ROOT) and nvcc; the library is built into <tmp>/mfm_fast_cufftdx/ (again when the .cu is newer than
it) and loaded with ctypes. Nothing here is part of the installed package.

On a GPU it first checks, on fresh random planes, that the round trip returns its input and that the
forward half spectrum and the masked round trip (MFM disc masks) match torch.fft; then it times, in
interleaved rounds (bench/timing.py: triton.testing.do_bench, L2 cleared per call; the median of each
round's reps, then the median over rounds):
  copy         out.copy_(x): read + write the batch once (the floor)
  cuda         torch.ops.mfm_fast.corrupt_cuda with an all-ones mask: our plane round trip (it also reads the mask)
  cufftdx      the cuFFTDx kernel without the mask step
  cuda_mfm     corrupt_cuda with MFM masks
  cufftdx_mfm  the cuFFTDx kernel with the same masks (same bytes as cuda_mfm)
and prints which plane FFT is faster. Without a CUDA device it says so and exits 0 (--compile-only builds).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without `pip install -e .`
import mfm_fast  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tools"))
from sass_model import parse_ptxas  # noqa: E402
from timing import interleaved, summary  # noqa: E402  (bench/timing.py: the benchmarks' one timer)

SOURCE = ROOT / "tools" / "cufftdx" / "plane_roundtrip.cu"
SIDES = (224, 112)
SMEM_PER_BLOCK = 232448  # sm_90's opt-in shared memory per block
CHECK_TOL = 1e-5         # max |error| / max |expected|


# ---- build --------------------------------------------------------------------------------------------

def mathdx_root() -> Path | None:
    """The nvidia/mathdx folder (holding include/cufftdx.hpp): $MATHDX_ROOT, else the `nvidia` namespace package."""
    candidates = [Path(os.environ["MATHDX_ROOT"])] if os.environ.get("MATHDX_ROOT") else []
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "mathdx" for p in spec.submodule_search_locations]
    return next((c for c in candidates if (c / "include" / "cufftdx.hpp").is_file()), None)


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return shutil.which("nvcc") or next((p for p in (f"{home}/bin/nvcc",) if os.path.isfile(p)), None)


def library_path(arch: str) -> Path:
    return Path(tempfile.gettempdir()) / "mfm_fast_cufftdx" / f"libcufftdx_plane_{arch}.so"


def kernel_label(mangled: str) -> str:
    """_ZN11mfm_cufftdx12plane_kernelILi224ELb0EEEvNS_4ArgsE -> plane_kernel<224, roundtrip>."""
    m = re.search(r"plane_kernelILi(\d+)ELb([01])E", mangled)
    return f"plane_kernel<{m.group(1)}, {'forward' if m.group(2) == '1' else 'roundtrip'}>" if m else mangled


def build(arch: str = "sm_90", force: bool = False) -> tuple[Path, dict]:
    """Compile plane_roundtrip.cu into a shared library (cached by mtime); returns (path, build facts).

    Raises RuntimeError naming what is missing (nvcc, nvidia-mathdx) or nvcc's error."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    root = mathdx_root()
    if root is None:
        raise RuntimeError("nvidia-mathdx is not installed (pip install nvidia-mathdx, or set MATHDX_ROOT to the "
                           "folder holding include/cufftdx.hpp)")
    lib = library_path(arch)
    facts_path = lib.with_suffix(".json")
    if not force and lib.is_file() and facts_path.is_file() and lib.stat().st_mtime >= SOURCE.stat().st_mtime:
        return lib, dict(json.loads(facts_path.read_text()), cached=True)
    lib.parent.mkdir(parents=True, exist_ok=True)
    cmd = [nvcc, "-std=c++17", "-O3", f"-arch={arch}", "-shared", "-Xcompiler", "-fPIC",
           "-Xcompiler", "-Wno-deprecated-declarations", "-Xptxas", "-v",
           "-I", str(root / "include"), "-I", str(root / "external" / "cutlass" / "include"),
           str(SOURCE), "-o", str(lib)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:])
        raise RuntimeError(f"nvcc failed ({proc.returncode}) after {seconds:.0f} s:\n{tail}")
    kernels = {kernel_label(k): v for k, v in parse_ptxas(proc.stdout + proc.stderr).items()}
    facts = {"arch": arch, "compile_s": round(seconds, 1), "nvcc": nvcc, "mathdx": str(root),
             "cufftdx_version": _cufftdx_version(root), "kernels": kernels, "library": str(lib)}
    facts_path.write_text(json.dumps(facts, indent=1))
    return lib, dict(facts, cached=False)


def _cufftdx_version(root: Path) -> str:
    text = (root / "include" / "cufftdx" / "cufftdx_version.hpp").read_text()
    parts = [re.search(rf"CUFFTDX_VERSION_{k} (\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(p.group(1) for p in parts) if all(parts) else "?"


def print_build(facts: dict) -> None:
    how = "cached build" if facts.get("cached") else f"compiled in {facts['compile_s']:.1f} s"
    print(f"cuFFTDx {facts['cufftdx_version']} plane kernels for {facts['arch']}: {how} ({facts['library']})")
    for name, k in sorted(facts["kernels"].items()):
        print(f"  {name:30s} {k.get('registers', '?'):>3} registers, {k.get('stack', '?')} B stack, "
              f"{k.get('spill_stores', '?')} / {k.get('spill_loads', '?')} B spill stores / loads")


# ---- the kernel through ctypes ---------------------------------------------------------------------

class CufftdxPlanes:
    """The compiled kernels: roundtrip(x, mask, mean, std) and forward(x) on contiguous fp32 CUDA planes."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        p, i = ctypes.c_void_p, ctypes.c_int
        lib.cufftdx_plane_roundtrip.argtypes = [i, p, p, p, i, i, ctypes.POINTER(ctypes.c_float),
                                                ctypes.POINTER(ctypes.c_float), p]
        lib.cufftdx_plane_forward.argtypes = [i, p, p, i, p]
        for fn in (lib.cufftdx_plane_roundtrip, lib.cufftdx_plane_forward, lib.cufftdx_plane_threads,
                   lib.cufftdx_plane_smem_bytes):
            fn.restype = i
        lib.cufftdx_plane_threads.argtypes = lib.cufftdx_plane_smem_bytes.argtypes = [i]
        lib.cufftdx_plane_error_string.argtypes = [i]
        lib.cufftdx_plane_error_string.restype = ctypes.c_char_p
        self.lib = lib

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"{what}: {self.lib.cufftdx_plane_error_string(code).decode()} (cudaError {code})")

    @staticmethod
    def _planes(x: torch.Tensor) -> torch.Tensor:
        square = x.dim() == 4 and x.shape[-1] == x.shape[-2] and x.shape[-1] in SIDES
        if not (x.is_cuda and x.dtype == torch.float32 and square):
            raise ValueError(f"x: (N, C, S, S) float32 CUDA planes with S in {SIDES}, got {tuple(x.shape)} "
                             f"{x.dtype} on {x.device}")
        return x.contiguous()

    def roundtrip(self, x, mask=None, mean=None, std=None, out=None):
        """(N, C, S, S) -> normalise(clamp(ifft2(fft2(x) [* mask]))) with mean / std per channel (default 0 / 1)."""
        x = self._planes(x)
        n, c, s, _ = x.shape
        mean = (ctypes.c_float * c)(*(mean if mean is not None else [0.0] * c))
        std = (ctypes.c_float * c)(*(std if std is not None else [1.0] * c))
        if mask is not None:
            mask = mask.to(torch.float32).contiguous()
            if tuple(mask.shape) != (n, s, s) or mask.device != x.device:
                raise ValueError(f"mask: ({n}, {s}, {s}) on {x.device}, got {tuple(mask.shape)} on {mask.device}")
        out = torch.empty_like(x) if out is None else out
        code = self.lib.cufftdx_plane_roundtrip(s, x.data_ptr(), mask.data_ptr() if mask is not None else None,
                                                out.data_ptr(), n, c, mean, std,
                                                torch.cuda.current_stream(x.device).cuda_stream)
        self._check(code, "cufftdx_plane_roundtrip")
        return out

    def forward(self, x):
        """(N, C, S, S) -> the unnormalised half spectrum (N, C, S, S // 2 + 1) complex64, as torch.fft.rfft2."""
        x = self._planes(x)
        n, c, s, _ = x.shape
        spec = torch.empty(n, c, s, s // 2 + 1, dtype=torch.complex64, device=x.device)
        code = self.lib.cufftdx_plane_forward(s, x.data_ptr(), spec.data_ptr(), n * c,
                                              torch.cuda.current_stream(x.device).cuda_stream)
        self._check(code, "cufftdx_plane_forward")
        return spec

    def launch_shape(self, side: int) -> tuple[int, int]:
        return self.lib.cufftdx_plane_threads(side), self.lib.cufftdx_plane_smem_bytes(side)


class TorchPlanes:
    """The same maths in torch.fft (a stand-in with CufftdxPlanes' interface: the checks' own test, on any device)."""

    def roundtrip(self, x, mask=None, mean=None, std=None, out=None):
        spec = torch.fft.rfft2(x.double())
        if mask is not None:
            spec = spec * half_mask(mask.double())[:, None]
        return epilogue(torch.fft.irfft2(spec, s=x.shape[-2:]), mean, std).float()

    def forward(self, x):
        return torch.fft.rfft2(x.double()).to(torch.complex64)


def half_mask(mask: torch.Tensor) -> torch.Tensor:
    """(N, S, S) fftshift-ed mask -> its unshifted half (N, S, S // 2 + 1), the layout of rfft2."""
    return torch.fft.ifftshift(mask, dim=(-2, -1))[..., : mask.shape[-1] // 2 + 1]


def epilogue(v: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    c = v.shape[1]
    mean = torch.tensor(mean if mean is not None else [0.0] * c, dtype=v.dtype, device=v.device).view(1, c, 1, 1)
    std = torch.tensor(std if std is not None else [1.0] * c, dtype=v.dtype, device=v.device).view(1, c, 1, 1)
    return (v.clamp(0, 1) - mean) / std


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in float64; inf if actual has a NaN / inf (unwritten output)."""
    a, e = actual.detach().to(torch.complex128 if actual.is_complex() else torch.float64), expected.detach()
    e = e.to(a.dtype)
    if not bool(torch.isfinite(torch.view_as_real(a) if a.is_complex() else a).all()):
        return float("inf")
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-300))


def check_side(impl, side: int, device, n: int = 4, seed: int = 0) -> dict:
    """Errors of impl against torch.fft (fp64) on fresh random planes: {"roundtrip", "forward", "masked"}."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.rand(n, 3, side, side, generator=g, device=device)
    mask = mfm_fast.make_masks(n, side, side, r1=side // 14, p_low=0.5, generator=g, device=device)
    mean, std = list(mfm_fast.IMAGENET_MEAN), list(mfm_fast.IMAGENET_STD)
    poison = torch.full_like(x, float("nan"))
    errs = {"roundtrip": rel_err(impl.roundtrip(x, out=poison.clone()), x.double())}
    errs["forward"] = rel_err(impl.forward(x), torch.fft.rfft2(x.double()))
    want = epilogue(torch.fft.irfft2(torch.fft.rfft2(x.double()) * half_mask(mask.double())[:, None],
                                     s=(side, side)), mean, std)
    errs["masked"] = rel_err(impl.roundtrip(x, mask, mean, std, out=poison.clone()), want)
    return errs


# ---- timing ------------------------------------------------------------------------------------------

def bench_side(impl, side: int, batch: int, rounds: int, reps: int) -> dict:
    from mfm_fast.backends import cuda as cuda_backend

    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.rand(batch, 3, side, side, generator=g, device="cuda")
    ones = torch.ones(batch, side, side, device="cuda")
    mfm = mfm_fast.make_masks(batch, side, side, r1=side // 14, p_low=0.5, generator=g, device="cuda")
    mean, std = list(mfm_fast.IMAGENET_MEAN), list(mfm_fast.IMAGENET_STD)
    out = torch.empty_like(x)
    fns = {"copy": lambda: out.copy_(x),
           "cufftdx": lambda: impl.roundtrip(x, None, mean, std, out=out),
           "cufftdx_mfm": lambda: impl.roundtrip(x, mfm, mean, std, out=out)}
    why_not = mfm_fast.available_backends("cuda", "corrupt")["cuda"]
    if why_not is None:
        fns["cuda"] = lambda: cuda_backend.corrupt(x, ones, mean, std, torch.float32)
        fns["cuda_mfm"] = lambda: cuda_backend.corrupt(x, mfm, mean, std, torch.float32)
        ours = cuda_backend.corrupt(x, ones, [0.0] * 3, [1.0] * 3, torch.float32)
        theirs = impl.roundtrip(x)
        agree = rel_err(ours, theirs.double())
    else:
        agree = None
    per_round = {name: [summary(r)[0] for r in rs] for name, rs in interleaved(fns, "cuda", rounds, reps, 3).items()}
    return {"side": side, "batch": batch, "planes": batch * 3, "rounds": rounds, "reps": reps,
            "cuda_unavailable": why_not, "cuda_vs_cufftdx_roundtrip_err": agree,
            "ms": {k: statistics.median(v) for k, v in per_round.items()},
            "ms_min": {k: min(v) for k, v in per_round.items()}, "ms_max": {k: max(v) for k, v in per_round.items()}}


def print_bench(res: dict) -> None:
    ms, lo, hi = res["ms"], res["ms_min"], res["ms_max"]
    print(f"\n{res['side']} x {res['side']}, B = {res['batch']} (x 3 planes), fp32, median of {res['rounds']} "
          f"interleaved rounds of {res['reps']} reps (min .. max of the round medians):")
    for name in ("copy", "cuda", "cufftdx", "cuda_mfm", "cufftdx_mfm"):
        if name in ms:
            print(f"  {name:12s} {ms[name]:8.4f} ms  ({lo[name]:.4f} .. {hi[name]:.4f})  "
                  f"{ms[name] / ms['copy']:5.1f}x copy")
    if res["cuda_unavailable"]:
        print(f"  cuda: skipped ({res['cuda_unavailable']})")
        return
    print(f"  our round trip vs cuFFTDx's on the same planes: max rel diff {res['cuda_vs_cufftdx_roundtrip_err']:.1e}")
    for ours, theirs in (("cuda", "cufftdx"), ("cuda_mfm", "cufftdx_mfm")):
        ratio = ms[ours] / ms[theirs]
        verdict = (f"ours loses: cuFFTDx is {ratio:.2f}x faster" if ratio > 1 else
                   f"ours wins: {1 / ratio:.2f}x faster than cuFFTDx")
        print(f"  {ours} vs {theirs}: {verdict}")


# ---- main --------------------------------------------------------------------------------------------

def parse_args(argv):
    from mfm_fast.cli import OneLineParser

    p = OneLineParser(description=__doc__.split("\n")[0], epilog=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compile-only", action="store_true", help="build the library (no GPU needed) and stop")
    p.add_argument("--rebuild", action="store_true", help="compile even if the cached library is newer than the .cu")
    p.add_argument("--arch", default="sm_90", help="nvcc -arch (default sm_90; the 224 plane needs Hopper's "
                   "227 KiB of shared memory per block)")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIDES), choices=SIDES)
    p.add_argument("--batch", type=int, default=256, help="images per timed batch (3 planes each; default 256)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    p.add_argument("--reps", type=int, default=20, help="timed reps per provider per round (default 20)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    for flag in ("batch", "rounds", "reps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag}: must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.compile_only and not torch.cuda.is_available():
        print("cufftdx_plane: needs a CUDA device to check and time (torch.cuda.is_available() is False); "
              "--compile-only builds the kernel for sm_90 without one")
        return 0
    try:
        lib, facts = build(args.arch, force=args.rebuild)
    except RuntimeError as exc:
        print(f"cufftdx_plane: cannot build: {exc}")
        return 1
    print_build(facts)
    if args.compile_only:
        return 0
    impl = CufftdxPlanes(lib)
    ok, results = True, {"build": facts, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                         "checks": {}, "bench": []}
    for side in args.sizes:
        threads, smem = impl.launch_shape(side)
        errs = check_side(impl, side, torch.device("cuda"))
        good = all(e <= CHECK_TOL for e in errs.values())
        ok &= good
        results["checks"][side] = errs
        print(f"check {side}: {threads} threads, {smem:,} B shared memory per plane; error vs torch.fft (fp64): "
              + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + f" -> {'PASS' if good else 'FAIL'}")
    for side in args.sizes:
        res = bench_side(impl, side, args.batch, args.rounds, args.reps)
        results["bench"].append(res)
        print_bench(res)
    print("cufftdx_plane " + json.dumps({"checks": results["checks"],
                                         "ms": {r["side"]: r["ms"] for r in results["bench"]}}))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
