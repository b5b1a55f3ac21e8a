"""The one place that chooses a backend, before any autograd function or custom op runs.

Backends, in the order ``auto`` prefers them on CUDA tensors: ``cuda`` (the csrc/ extension),
``triton`` (kernels/), ``torch`` (rfft2 half spectrum). On CPU tensors ``auto`` picks ``torch``.
``reference`` (fp64 full-grid oracle) is never picked by ``auto``; ask for it by name.

``MFM_FAST_BACKEND=<name>`` in the environment overrides ``auto`` (not an explicit choice).
An explicit backend that cannot run raises: ``NotImplementedError`` if this version does not
have it, ``RuntimeError`` if it exists but cannot run here (the message says why).
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional, Tuple

import torch

logger = logging.getLogger("mfm_fast")

BACKENDS = ("reference", "torch", "triton", "cuda")
OPS = ("corrupt", "masked_freq_loss", "adaptive_masks")
_AUTO_ORDER_CUDA = ("cuda", "triton", "torch")
_CUDA_UNVALIDATED = ("auto skips it: the CUDA extension kernels are not yet validated on a GPU (only their host "
                     "build is tested); ask for backend='cuda' to use it")
# (backend, op) pairs that work but that ``auto`` does not pick, with the measured reason.
AUTO_SKIPS = {
    ("triton", "masked_freq_loss"): "auto skips it: measured slower than the torch backend on an H200 "
                                    "(fwd+bwd 3.7 ms vs 2.4 ms at B=256, 3x224x224); ask for backend='triton' to use it",
    ("cuda", "corrupt"): _CUDA_UNVALIDATED,
    ("cuda", "masked_freq_loss"): _CUDA_UNVALIDATED,
}

# Which ops each fast backend implements in this version. A backend/op pair missing here is
# "not implemented" (NotImplementedError when asked for by name; auto skips it and says why).
# adaptive_masks (FOLK Com / RCom) is reference and torch only: one FFT of one channel and a top-k.
IMPLEMENTED = {
    "reference": set(OPS),
    "torch": set(OPS),
    "triton": {"corrupt", "masked_freq_loss"},
    "cuda": {"corrupt", "masked_freq_loss"},
}

_logged: set = set()


def _not_implemented(name: str, op: Optional[str]) -> Optional[str]:
    where = {"triton": "the Triton backend (kernels/)", "cuda": "the CUDA extension backend (csrc/)"}.get(name, name)
    if op is not None and op not in IMPLEMENTED[name]:
        return f"{op} is not implemented in {where} in this version of mfm_fast yet"
    if op is None and not IMPLEMENTED[name]:
        return f"{where} is not implemented in this version of mfm_fast yet"
    return None


def triton_interpreted() -> bool:
    """True when Triton kernels run under the interpreter (TRITON_INTERPRET=1, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _triton_reason(device_type: Optional[str]) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    interpreted = triton_interpreted()
    if device_type == "cpu" and not interpreted:
        return "Triton kernels run on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
    if device_type == "cuda" and (interpreted or not torch.cuda.is_available()):
        return "no CUDA device is available" if not interpreted else "TRITON_INTERPRET=1 is set (CPU tensors only)"
    return None


def backend_unavailable_reason(name: str, device_type: Optional[str] = None, op: Optional[str] = None,
                               size: Optional[Tuple[int, int, int]] = None) -> Optional[str]:
    """None if backend `name` can run `op` (any op when None) on `device_type` tensors (any when None), else why not.

    `size`: optional (C, H, W) of the images, for backends compiled for some sizes only (cuda)."""
    if name in ("reference", "torch"):
        return None
    reason = _not_implemented(name, op)
    if reason is not None:
        return reason
    if name == "triton":
        return _triton_reason(device_type)
    from . import cuda_backend  # imports mfm_fast._C on first use only

    reason = cuda_backend.unavailable_reason(device_type)
    if reason is None and size is not None:
        reason = cuda_backend.size_reason(size[1], size[2], size[0])
    return reason


def available_backends(device_type: Optional[str] = None, op: Optional[str] = None) -> Dict[str, Optional[str]]:
    """{backend: None if available, else the reason} for `op` (any when None) on `device_type` tensors
    ("cpu", "cuda", or any when None)."""
    return {name: backend_unavailable_reason(name, device_type, op) for name in BACKENDS}


def check_backend_name(name, what: str = "backend") -> str:
    if not isinstance(name, str) or name not in BACKENDS + ("auto",):
        raise ValueError(f"{what}: expected one of 'auto', {', '.join(map(repr, BACKENDS))}, got {name!r}")
    return name


def choose_backend(requested: str, op: str, device: torch.device) -> str:
    """Resolve `requested` ("auto" or a backend name) for `op` on tensors living on `device`."""
    check_backend_name(requested, "backend")
    if requested == "auto":
        env = os.environ.get("MFM_FAST_BACKEND", "").strip()
        if env and env != "auto":
            requested = check_backend_name(env, "MFM_FAST_BACKEND")
    if requested != "auto":
        reason = backend_unavailable_reason(requested, device.type, op)
        if reason is not None:
            exc = NotImplementedError if _not_implemented(requested, op) is not None else RuntimeError
            raise exc(f"backend={requested!r} for {op} on {device.type}: {reason}")
        return requested
    order = _AUTO_ORDER_CUDA if device.type == "cuda" else ("torch",)
    skipped = []
    for name in order:
        # AUTO_SKIPS first: a skipped backend is not even loaded (the cuda one would be compiled on first use)
        reason = AUTO_SKIPS.get((name, op)) or backend_unavailable_reason(name, device.type, op)
        if reason is None:
            _log_once(op, device.type, name, skipped)
            return name
        skipped.append(f"{name}: {reason}")
    raise RuntimeError(f"no backend can run {op} on {device.type}")  # unreachable: torch always runs


def log_fallback_once(op: str, backend: str, fallback: str, why: str) -> None:
    """Say once (logger "mfm_fast") that `backend` hands `op` to `fallback` for these inputs, and why."""
    key = ("fallback", op, backend, fallback, why)
    if key in _logged or torch.compiler.is_compiling():
        return
    _logged.add(key)
    logger.info("mfm_fast: backend %r runs %s on the %r backend: %s", backend, op, fallback, why)


def _log_once(op: str, device_type: str, name: str, skipped: list) -> None:
    key = (op, device_type, name)
    if key in _logged or torch.compiler.is_compiling():
        return
    _logged.add(key)
    why = ("; skipped " + "; ".join(skipped)) if skipped else ""
    logger.info("mfm_fast: backend='auto' chose %r for %s on %s tensors%s", name, op, device_type, why)
