"""The CUDA extension backend: ``mfm_fast._C`` (csrc/), loaded lazily, and its Python registrations.

``_C`` registers two ops, each with a CUDA kernel (one CTA per image plane, the plane's FFT on-chip in
shared memory) and a CPU kernel that runs the same per-plane C++ code on the host (slow; it exists so
that CI checks the kernel maths without a GPU):

- ``torch.ops.mfm_fast.corrupt_cuda(x, mask, mean, std, out_dtype)``
- ``torch.ops.mfm_fast.masked_freq_loss_cuda(pred, target, mask, loss_gamma, reduction, loss_weight,
  target_mean, target_std, need_grad) -> (loss, grad)``: loss and dloss/dpred in one pass; backward
  only scales the gradient by grad_output.

Compiled sizes: square 224 x 224 and 112 x 112 planes, 1 to 8 channels. ``import mfm_fast`` never
imports ``_C``; :func:`unavailable_reason` says why it cannot be used (not built, failed to build, built
for another torch, ...), as reported by ``python -m mfm_fast.info``.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from .torch_backend.masked_freq_loss import register_saved_grad_autograd

SIDES = (224, 112)
SMEM_PER_BLOCK = 232448  # sm_90's opt-in shared memory per block (csrc/fft.cuh, kHopperSmemPerBlock)
MAX_CHANNELS = 8
_INFO_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")
_state: dict = {}


def build_info() -> dict:
    """What setup.py recorded about the extension build (mfm_fast/_build_info.json), or {} if nothing."""
    try:
        with open(_INFO_PATH, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _load() -> Optional[str]:
    """Import mfm_fast._C once and register the fake / autograd rules; None on success, else why not."""
    if "reason" in _state:
        return _state["reason"]
    reason = None
    try:
        from . import _C  # noqa: F401  (loading the library registers torch.ops.mfm_fast.*_cuda)
        _register()
    except Exception as exc:  # ImportError, undefined symbols from another torch build, ...
        info = build_info()
        if info.get("status") in ("skipped", "failed"):
            reason = f"the CUDA extension was not built ({info.get('status')}: {info.get('reason')})"
        elif not info:
            reason = "the CUDA extension mfm_fast._C is not built (reinstall with `pip install -e .` and nvcc on PATH)"
        else:
            reason = "the CUDA extension mfm_fast._C cannot be loaded"
            if info.get("torch_version") and info["torch_version"] != torch.__version__:
                reason += f" (built for torch {info['torch_version']}, running {torch.__version__}: rebuild it)"
        reason += f" [{type(exc).__name__}: {exc}]"
    _state["reason"] = reason
    return reason


def unavailable_reason(device_type: Optional[str] = None) -> Optional[str]:
    """None if the extension can run on `device_type` tensors (any when None), else why not."""
    reason = _load()
    if reason is not None:
        return reason
    if device_type == "cpu":
        return ("the CUDA extension backend runs on CUDA tensors only (its CPU kernels, "
                "torch.ops.mfm_fast.*_cuda on CPU tensors, are a slow host build for tests); use backend='torch'")
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def size_reason(height: int, width: int, channels: int) -> Optional[str]:
    """None if the compiled kernels take (C, H, W) planes, else why not."""
    if height != width or height not in SIDES:
        reason = (f"{height} x {width} planes: the CUDA kernels are compiled for square "
                  f"{' / '.join(f'{s} x {s}' for s in SIDES)} planes only")
        plane_bytes = 8 * (height * (width // 2 + 1) + max(height, width))  # half spectrum + twiddles, complex fp32
        if plane_bytes > SMEM_PER_BLOCK:
            reason += (f" (this plane's fp32 half spectrum needs {plane_bytes:,} bytes of shared memory, more than "
                       f"the {SMEM_PER_BLOCK:,} a Hopper block can have)")
        return reason
    if channels > MAX_CHANNELS:
        return f"{channels} channels: the CUDA kernels take at most {MAX_CHANNELS}"
    return None


def loss_options_reason(pred: torch.Tensor, target: torch.Tensor, reduction: str, with_matrix: bool, ave_spectrum: bool,
                        patch_factor: int) -> Optional[str]:
    """None if the CUDA loss kernel implements these options, else why not (the caller falls back)."""
    if reduction == "none":
        return "reduction='none' (the per-frequency map) is not in the CUDA kernel"
    if with_matrix:
        return "with_matrix=True (focal matrix) is not in the CUDA kernel"
    if ave_spectrum:
        return "ave_spectrum=True is not in the CUDA kernel"
    if patch_factor != 1:
        return "patch_factor > 1 is not in the CUDA kernel"
    if torch.float64 in (pred.dtype, target.dtype):
        return "float64 pred / target are computed in float64, which the CUDA kernel does not do"
    return None


# ------------------------------------------------------------------ registrations (after _C is loaded)
def _register() -> None:
    torch.library.register_fake("mfm_fast::corrupt_cuda")(_corrupt_fake)
    torch.library.register_fake("mfm_fast::masked_freq_loss_cuda")(_loss_fake)
    register_saved_grad_autograd("mfm_fast::masked_freq_loss_cuda", num_inputs=9, target_std_index=7)


def _corrupt_fake(x, mask, mean, std, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


def _loss_fake(pred, target, mask, loss_gamma, reduction, loss_weight, target_mean, target_std, need_grad):
    return pred.new_empty((), dtype=torch.float32), (pred.new_empty(pred.shape) if need_grad else pred.new_empty(0))


# ------------------------------------------------------------------ entry points used by the public API
def _ensure_loaded() -> None:
    reason = _load()
    if reason is not None:
        raise RuntimeError(reason)


def corrupt(x: torch.Tensor, mask: torch.Tensor, mean, std, out_dtype: torch.dtype) -> torch.Tensor:
    """The corruption op on contiguous inputs (mask as float32); shapes / dtypes already validated."""
    _ensure_loaded()
    return torch.ops.mfm_fast.corrupt_cuda(x.contiguous(), mask.to(torch.float32).contiguous(),
                                           [float(v) for v in mean], [float(v) for v in std], out_dtype)


def masked_freq_loss(pred, target, mask, loss_gamma, reduction, loss_weight, target_mean, target_std,
                     need_grad) -> torch.Tensor:
    """The loss (masked / mean / sum) through the autograd-registered op; returns the scalar loss."""
    _ensure_loaded()
    m = mask.to(torch.float32).contiguous() if mask is not None else None
    tm = [float(v) for v in target_mean] if target_mean is not None else None
    ts = [float(v) for v in target_std] if target_std is not None else None
    loss, _ = torch.ops.mfm_fast.masked_freq_loss_cuda(pred.contiguous(), target.contiguous(), m, float(loss_gamma),
                                                       reduction, float(loss_weight), tm, ts, bool(need_grad))
    return loss
