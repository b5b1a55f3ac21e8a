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
from typing import Dict, Optional

import torch

logger = logging.getLogger("mfm_fast")

BACKENDS = ("reference", "torch", "triton", "cuda")
OPS = ("corrupt", "masked_freq_loss")
_AUTO_ORDER_CUDA = ("cuda", "triton", "torch")

_NOT_IMPLEMENTED = {
    "triton": "the Triton backend (kernels/) is not implemented in this version of mfm_fast yet",
    "cuda": "the CUDA extension backend (csrc/) is not implemented in this version of mfm_fast yet",
}

_logged: set = set()


def backend_unavailable_reason(name: str, device_type: Optional[str] = None) -> Optional[str]:
    """None if backend `name` can run on tensors of `device_type` (any device when None), else why not."""
    if name in ("reference", "torch"):
        return None
    return _NOT_IMPLEMENTED[name]


def available_backends(device_type: Optional[str] = None) -> Dict[str, Optional[str]]:
    """{backend: None if available, else the reason} for tensors on `device_type` ("cpu", "cuda", or any when None)."""
    return {name: backend_unavailable_reason(name, device_type) for name in BACKENDS}


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
        reason = backend_unavailable_reason(requested, device.type)
        if reason is not None:
            exc = NotImplementedError if requested in _NOT_IMPLEMENTED and reason == _NOT_IMPLEMENTED[requested] \
                else RuntimeError
            raise exc(f"backend={requested!r} for {op} on {device.type}: {reason}")
        return requested
    order = _AUTO_ORDER_CUDA if device.type == "cuda" else ("torch",)
    skipped = []
    for name in order:
        reason = backend_unavailable_reason(name, device.type)
        if reason is None:
            _log_once(op, device.type, name, skipped)
            return name
        skipped.append(f"{name}: {reason}")
    raise RuntimeError(f"no backend can run {op} on {device.type}")  # unreachable: torch always runs


def _log_once(op: str, device_type: str, name: str, skipped: list) -> None:
    key = (op, device_type, name)
    if key in _logged or torch.compiler.is_compiling():
        return
    _logged.add(key)
    why = ("; skipped " + "; ".join(skipped)) if skipped else ""
    logger.info("mfm_fast: backend='auto' chose %r for %s on %s tensors%s", name, op, device_type, why)
