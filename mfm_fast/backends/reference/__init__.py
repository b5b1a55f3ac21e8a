"""The reference backend: a literal fp64 translation of the contract, the oracle for every other backend.

It uses the full complex spectrum (fft2 + fftshift) exactly as the released MFM code does and
lets autograd differentiate it. Slow and memory-hungry on purpose: readable first.

The backend ``reference`` of the registry (:mod:`mfm_fast.backends`, which declares its ops): the backend
protocol ``unavailable_reason``, ``unsupported_reason`` and ``run`` (every op, every option, any device;
``auto`` never picks it).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from .adaptive_masks import make_adaptive_masks
from .corrupt import corrupt
from .masked_freq_loss import masked_freq_loss
from .masks import base_mask, masks_from

__all__ = ["base_mask", "corrupt", "make_adaptive_masks", "masked_freq_loss", "masks_from", "run",
           "unavailable_reason", "unsupported_reason"]

_IGNORED = ("mask_band", "precision")  # promises and GEMM modes of the fast backends: exact maths needs neither


def unavailable_reason(device_type: Optional[str] = None, size=None, build: bool = True) -> Optional[str]:
    """Always None: plain torch ops in float64 run on every device and size."""
    return None


def unsupported_reason(op: str, inputs: tuple, options) -> Optional[str]:
    """Always None: every input and option runs here."""
    return None


def run(op: str, inputs: tuple, options):
    """Run `op` on validated `inputs` with its options object (see :mod:`mfm_fast._options`)."""
    kwargs = {f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.name not in _IGNORED}
    if op == "corrupt":
        return corrupt(*inputs, **kwargs)
    if op == "masked_freq_loss":
        return masked_freq_loss(*inputs, **kwargs)
    if op == "adaptive_masks":
        return make_adaptive_masks(*inputs, **kwargs)
    raise NotImplementedError(f"the reference backend has no op {op!r}")
