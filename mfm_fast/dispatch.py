"""The one place that chooses a backend: one decision, before any op runs, from the registry.

The backends and everything this module knows about them (their ops, ``auto``'s order, the fallback, the
measured policy) are declared in the registry, :mod:`mfm_fast.backends`; each backend's module (imported
on first use) says whether it runs here and on these inputs through the protocol described there. This
module names no backend.

:func:`run` decides. An explicit backend (argument, or ``MFM_FAST_BACKEND=<name>`` in the environment,
which overrides ``auto`` but not an explicit choice) raises when it cannot run here:
``NotImplementedError`` if it does not have the op, ``RuntimeError`` if it has it but cannot run here
(the message says why); for inputs or options it does not support, it hands the op to the fallback
backend and says so once (logger "mfm_fast"). ``auto`` takes the first backend of its order for the
device (:func:`mfm_fast.backends.auto_order`) that is available, supports the inputs and is not skipped by
the measured policy (the declarations' ``auto_skips``, and the modules' input-dependent ``auto_reason``),
and logs once what it chose and why it skipped the others.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional, Tuple

import torch

from . import backends
from ._common import triton_interpreted  # noqa: F401  (re-exported: where tests and bench/ ask for it)

logger = logging.getLogger("mfm_fast")

_logged: set = set()

# The fallback's module now: it registers torch.library ops (torch.ops.mfm_fast.*) that a compiled graph
# may reference before any op has run.
backends.module(backends.fallback())


def backend_module(name: str):
    """The module of backend `name` (imported on first use)."""
    return backends.module(name)


def auto_skip_reason(name: str, op: str) -> Optional[str]:
    """Why ``auto`` does not pick backend `name` for `op` on CUDA tensors whatever the inputs (its declared,
    measured reason), or None."""
    reason = backends.get(name).auto_skips.get(op)
    return None if reason is None else f"auto skips it: {reason}; ask for backend={name!r} to use it"


def not_implemented_reason(name: str, op: Optional[str]) -> Optional[str]:
    """Why backend `name` does not have `op` (any op when None), or None: its declaration, nothing imported."""
    backend = backends.get(name)
    if op is not None and op not in backend.ops:
        return f"{op} is not implemented in {backend.where}"
    if op is None and not backend.ops:
        return f"{backend.where} is not implemented"
    return None


def backend_unavailable_reason(name: str, device_type: Optional[str] = None, op: Optional[str] = None,
                               size: Optional[Tuple[int, int, int]] = None, build: bool = True) -> Optional[str]:
    """None if backend `name` can run `op` (any op when None) on `device_type` tensors (any when None), else why not.

    `size`: optional (C, H, W) of the images, for backends compiled for some sizes only; `build`: False
    reports a backend that would compile on first use without compiling it."""
    reason = not_implemented_reason(name, op)
    if reason is not None:
        return reason
    try:
        module = backend_module(name)
    except ImportError as exc:  # an install without it (kernels/ left out, ...)
        return f"{backends.get(name).where} cannot be imported ({backends.get(name).module}: {exc})"
    return module.unavailable_reason(device_type, size, build)


def available_backends(device_type: Optional[str] = None, op: Optional[str] = None) -> Dict[str, Optional[str]]:
    """{backend: None if available, else the reason} for `op` (any when None) on `device_type` tensors
    (a torch device type, any when None)."""
    return {name: backend_unavailable_reason(name, device_type, op) for name in backends.names()}


def check_backend_name(name, what: str = "backend") -> str:
    names = backends.names()
    if not isinstance(name, str) or name not in names + ("auto",):
        raise ValueError(f"{what}: expected one of 'auto', {', '.join(map(repr, names))}, got {name!r}")
    return name


def _auto_reason(module, op: str, inputs: tuple, options) -> Optional[str]:
    auto_reason = getattr(module, "auto_reason", None)
    return None if auto_reason is None else auto_reason(op, inputs, options)


def choose_backend(requested: str, op: str, device: torch.device, inputs: Optional[tuple] = None,
                   options=None) -> str:
    """The backend that runs `op`: `requested` ("auto" or a backend name) resolved for tensors on `device`.

    With `inputs` (the op's validated tensors, the first one (N, C, H, W)) and its `options`, the backends'
    size and input checks and the input-dependent auto policy apply too (see the module docstring); without
    them, only what does not depend on the inputs."""
    check_backend_name(requested, "backend")
    if requested == "auto":
        env = os.environ.get("MFM_FAST_BACKEND", "").strip()
        if env and env != "auto":
            requested = check_backend_name(env, "MFM_FAST_BACKEND")
    size = tuple(inputs[0].shape[1:]) if inputs is not None else None
    if requested != "auto":
        reason = backend_unavailable_reason(requested, device.type, op, size)
        if reason is not None:
            exc = NotImplementedError if not_implemented_reason(requested, op) is not None else RuntimeError
            raise exc(f"backend={requested!r} for {op} on {device.type}: {reason}")
        why = None if inputs is None else backend_module(requested).unsupported_reason(op, inputs, options)
        if why is not None:
            fallback = backends.fallback()
            log_fallback_once(op, requested, fallback, why)
            return fallback
        return requested
    skipped = []
    for name in backends.auto_order(device.type):
        # the declared skips first: a skipped backend is not even loaded (one may compile on first use)
        reason = auto_skip_reason(name, op) or backend_unavailable_reason(name, device.type, op, size)
        if reason is None and inputs is not None:
            module = backend_module(name)
            reason = module.unsupported_reason(op, inputs, options) or _auto_reason(module, op, inputs, options)
        if reason is None:
            _log_once(op, device.type, name, skipped)
            return name
        skipped.append(f"{name}: {reason}")
    raise RuntimeError(f"no backend can run {op} on {device.type}" + (": " + "; ".join(skipped) if skipped else ""))


LAST_CHOICE: Dict[str, str] = {}  # {op: the backend its latest run() chose}, for reports such as pretrain's header


def run(op: str, requested: str, inputs: tuple, options):
    """Choose the backend for `op` on validated `inputs` (tensors, the first one (N, C, H, W)) with its
    options object, and run it there."""
    name = choose_backend(requested, op, inputs[0].device, inputs, options)
    LAST_CHOICE[op] = name
    return backend_module(name).run(op, inputs, options)


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
