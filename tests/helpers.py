"""What the tests share (imported as ``from helpers import ...``; pytest.ini puts tests/ on the path).

- ROOT, BENCH_DIR, TOOLS_DIR: the checkout, its user benchmarks (bench/) and the team's kernel tools (tools/);
- SHAPES, masks_for: small (N, C, H, W) batches and their deterministic MFM masks;
- max_rel_err: the error measure every backend is held to against the fp64 reference;
- loss_and_grad, reference_loss_and_grad: the masked spectral loss and its gradients through the public API;
- numpy_corrupt, numpy_loss: the released code's corruption and loss transcribed to numpy float64;
- load_bench / load_tool: a bench/ or tools/ script imported as a module, once per session;
- one_line_error: a command-line entry point stops with status 2 and one line naming the flag;
- nvcc: the CUDA compiler, if this machine has one;
- logged_steps, kill_after: a trainer's log.jsonl steps, and SIGKILL of a trainer process after a given step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mfm_fast
from mfm_fast import IMAGENET_MEAN, IMAGENET_STD

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "bench"
TOOLS_DIR = ROOT / "tools"
# The environment of a subprocess that runs a command of the checkout (python -m mfm_fast.pretrain, a bench script).
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

SHAPES = [(1, 3, 16, 16), (2, 3, 16, 24), (4, 3, 32, 32)]


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (in float64)."""
    a, e = actual.detach().double(), expected.detach().double().to(actual.device)
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-300))


def masks_for(shape, r1=None):
    """Deterministic MFM masks for a (N, C, H, W) batch: low-pass for even n, high-pass for odd n."""
    n, _, h, w = shape
    r1 = r1 if r1 is not None else max(1, min(h, w) // 6)
    return mfm_fast.make_masks(n, h, w, r1=r1, low=torch.arange(n) % 2 == 0)


def loss_and_grad(backend, pred, target, mask, target_grad=False, **kw):
    """``mfm_fast.masked_freq_loss(pred, target, mask, backend=backend, **kw)`` and its gradients.

    Returns (loss, dL/dpred), or (loss, dL/dpred, dL/dtarget) with `target_grad`; L is the loss, or for a
    per-element map (reduction="none") its sum weighted by fixed random weights, so that every entry counts."""
    p = pred.detach().clone().requires_grad_(True)
    t = target.detach().clone().requires_grad_(True) if target_grad else target
    loss = mfm_fast.masked_freq_loss(p, t, mask, backend=backend, **kw)
    total = loss
    if loss.dim():
        weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        total = (loss * weights.to(loss)).sum()
    total.backward()
    return (loss.detach(), p.grad, t.grad) if target_grad else (loss.detach(), p.grad)


def reference_loss_and_grad(pred, target, mask, **kw):
    """The fp64 reference's loss and dL/dpred on the inputs' device, for comparing a fast path's (uint8 pixels stay
    uint8); the options only the fast paths take (mask_band, precision) are dropped."""
    kw = {k: v for k, v in kw.items() if k not in ("mask_band", "precision")}
    target = target if target.dtype == torch.uint8 else target.double()
    return loss_and_grad("reference", pred.double(), target, mask, **kw)


def numpy_corrupt(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The released code's op sequence, in numpy float64 (independent of torch.fft)."""
    mean = np.array(IMAGENET_MEAN)[None, :, None, None]
    std = np.array(IMAGENET_STD)[None, :, None, None]
    spec = np.fft.fftshift(np.fft.fft2(x), axes=(-2, -1)) * mask[:, None]
    out = np.fft.ifft2(np.fft.ifftshift(spec, axes=(-2, -1))).real
    return (np.clip(out, 0, 1) - mean) / std


def numpy_loss(pred, target, mask, gamma=1.0, reduction="masked", pf=1, with_matrix=False, alpha=1.0,
               log_matrix=False, batch_matrix=False, ave_spectrum=False):
    """The released FrequencyLoss + MFM reduction, transcribed to numpy float64 (independent of torch.fft)."""
    n, c, h, w = pred.shape
    ph, pw = h // pf, w // pf

    def freq(z):
        patches = [z[:, :, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw] for i in range(pf) for j in range(pf)]
        return np.fft.fftshift(np.fft.fft2(np.stack(patches, 1), norm="ortho"), axes=(-2, -1))  # N P C h w

    fp, ft = freq(pred), freq(target)
    if ave_spectrum:
        fp, ft = fp.mean(0, keepdims=True), ft.mean(0, keepdims=True)
    diff2 = (fp.real - ft.real) ** 2 + (fp.imag - ft.imag) ** 2
    loss = np.sqrt(diff2 + 1e-12) ** gamma
    if with_matrix:
        a = np.sqrt(diff2) ** alpha
        if log_matrix:
            a = np.log(a + 1.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            a = a / (a.max() if batch_matrix else a.max(axis=(-2, -1), keepdims=True))
        a[np.isnan(a)] = 0.0
        loss = np.clip(a, 0, 1) * loss
    if reduction == "mean":
        return loss.mean()
    w_ = 1 - mask  # (N, h, w) per patch
    return (loss * w_[:, None, None]).sum() / w_.sum() / c / loss.shape[1]


def _load_script(path: Path):
    name = f"{path.parent.name}_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def load_bench(stem: str):
    """bench/<stem>.py as a module, one instance per session (the bench tests share its compile caches)."""
    return _load_script(BENCH_DIR / f"{stem}.py")


def load_tool(stem: str):
    """tools/<stem>.py as a module, one instance per session."""
    return _load_script(TOOLS_DIR / f"{stem}.py")


def one_line_error(call, capsys, prog=None, flag=None) -> str:
    """call() exits with status 2 and writes exactly one line to stderr (no traceback, no usage dump), which starts
    with "prog: error: " and names `flag` when they are given; returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        call()
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert prog is None or lines[0].startswith(f"{prog}: error: "), err
    assert flag is None or flag in lines[0], err
    return lines[0]


def nvcc():
    """The path of nvcc ($CUDA_HOME/bin, /usr/local/cuda/bin or the PATH), or None."""
    path = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    return path if os.path.exists(path) else shutil.which("nvcc")


def logged_steps(out_dir) -> list:
    """The "step" of every complete record of <out_dir>/log.jsonl (a line being written is skipped)."""
    path = Path(out_dir) / "log.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line).get("step"))
        except ValueError:  # a line being written
            pass
    return [s for s in steps if s]


def kill_after(cmd, out_dir, step, delay) -> int:
    """Start the trainer `cmd`, SIGKILL it `delay` s after log.jsonl shows `step`; returns its exit status."""
    proc = subprocess.Popen(cmd, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if step in logged_steps(out_dir):
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.communicate(timeout=60)
    return proc.returncode
