"""Triton kernels for mfm_fast (the ``triton`` backend), one op per file.

- corrupt.py: frequency corruption; one launch for MFM disc masks (the ``mask_band`` promise),
  two for any other mask. ``torch.ops.mfm_fast.corrupt_triton``.
- masked_freq_loss.py: the masked spectral loss with its gradient computed in the forward
  launches. ``torch.ops.mfm_fast.masked_freq_loss_triton``.
- _dft.py: the cached DFT tables both use (DFT-as-GEMM on ``tl.dot``).

Installed as the subpackage ``mfm_fast.kernels`` (never a bare top-level ``kernels``, which is PyPI's kernel hub
loader). This file is the backend ``triton`` of the registry (mfm_fast.backends, which declares its ops): the
backend protocol (``unavailable_reason``, ``unsupported_reason``, ``run``, ``auto_reason``); it imports no kernel
module at import (they import triton, on first use). On CPU tensors the kernels run only under
TRITON_INTERPRET=1. Imports point down: mfm_fast._common, _options and the torch backend's autograd helper,
never the front-ends.
"""

from __future__ import annotations

from typing import Optional

from mfm_fast._common import triton_interpreted

_GENERAL_CORRUPT = ("masks without a mask_band promise take the general DFT-as-GEMM path, which is slower "
                    "than cuFFT (ask for backend='triton' to force it)")


def unavailable_reason(device_type: Optional[str] = None, size=None, build: bool = True) -> Optional[str]:
    """None if triton imports and runs on `device_type` tensors (any when None), else why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    interpreted = triton_interpreted()
    if device_type == "cpu" and not interpreted:
        return "Triton kernels run on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
    if device_type == "cuda":
        import torch

        if interpreted or not torch.cuda.is_available():
            return "no CUDA device is available" if not interpreted else "TRITON_INTERPRET=1 is set (CPU tensors only)"
    return None


def _op_module(op: str):
    if op == "corrupt":
        from . import corrupt as module
    elif op == "masked_freq_loss":
        from . import masked_freq_loss as module
    else:
        raise NotImplementedError(f"the Triton backend has no op {op!r}")
    return module


def unsupported_reason(op: str, inputs: tuple, options) -> Optional[str]:
    """None if the kernels of `op` run these inputs and options, else why not."""
    return _op_module(op).unsupported_reason(*inputs, options)


def run(op: str, inputs: tuple, options):
    """Run `op` on validated `inputs` with its options object (see mfm_fast._options)."""
    return _op_module(op).run(*inputs, options)


def auto_reason(op: str, inputs: tuple, options) -> Optional[str]:
    """Why ``auto`` should not pick these kernels for these inputs although they run them, or None: the
    corruption only with a ``mask_band`` promise its band path takes (the general path is slower than cuFFT)."""
    if op == "corrupt":
        from .corrupt import band_fits

        return None if band_fits(options.mask_band, *inputs[0].shape[-2:]) else _GENERAL_CORRUPT
    return None
