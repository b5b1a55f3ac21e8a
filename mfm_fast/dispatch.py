"""The one place that chooses a backend: a registry of backends and one decision, before any op runs.

Backends, in the order ``auto`` prefers them on CUDA tensors: ``cuda`` (the csrc/ extension,
mfm_fast.backends.cuda), ``triton`` (kernels/, mfm_fast.kernels), ``torch`` (rfft2 half spectrum,
mfm_fast.backends.torch_backend). On CPU tensors ``auto`` picks ``torch``. ``reference`` (fp64 full-grid oracle,
mfm_fast.backends.reference) is never picked by ``auto``; ask for it by name.

Each backend is a module that declares itself (imported on first use: the triton one imports triton, the
cuda one loads or compiles the extension):

- ``OPS``: the ops it implements;
- ``unavailable_reason(device_type, size=..., build=...)``: None if it runs on these tensors here (the
  install, the device, the compiled sizes (C, H, W)), else why not;
- ``unsupported_reason(op, inputs, options)``: None if it runs these inputs and options, else why not;
- ``run(op, inputs, options)``: the op on validated inputs with its options object (mfm_fast._options).

:func:`run` decides. An explicit backend (argument, or ``MFM_FAST_BACKEND=<name>`` in the environment,
which overrides ``auto`` but not an explicit choice) raises when it cannot run here:
``NotImplementedError`` if it does not have the op, ``RuntimeError`` if it has it but cannot run here
(the message says why); for inputs or options it does not support, it hands the op to the torch backend
and says so once (logger "mfm_fast"). ``auto`` takes the first backend of its order that is available,
supports the inputs and is not skipped by the measured policy (``AUTO_SKIPS``, and the Triton corruption
only with a ``mask_band`` promise its band path takes), and logs once what it chose and why it skipped
the others.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional, Tuple

import torch

from .backends import reference, torch_backend  # registers the torch ops (torch.ops.mfm_fast.*_torch) at import
from ._common import triton_interpreted  # noqa: F401  (re-exported: where tests and bench/ ask for it)

logger = logging.getLogger("mfm_fast")

BACKENDS = ("reference", "torch", "triton", "cuda")
OPS = ("corrupt", "masked_freq_loss", "adaptive_masks")
_AUTO_ORDER_CUDA = ("cuda", "triton", "torch")
_WHERE = {"triton": "the Triton backend (kernels/)", "cuda": "the CUDA extension backend (csrc/)"}
_CUDA_UNVALIDATED = ("auto skips it: the CUDA extension kernels are not validated on a GPU (only their host "
                     "build is tested); ask for backend='cuda' to use it")
# (backend, op) pairs that work but that ``auto`` does not pick, with the measured reason.
AUTO_SKIPS = {
    ("triton", "masked_freq_loss"): "auto skips it: measured slower than the torch backend on an H200 "
                                    "(fwd+bwd 3.43 ms vs 2.33 ms at B=256, 3x224x224, bench/fft_mask.py); ask for backend='triton' to use it",
    ("cuda", "corrupt"): _CUDA_UNVALIDATED,
    ("cuda", "masked_freq_loss"): _CUDA_UNVALIDATED,
}
_TRITON_GENERAL_CORRUPT = ("masks without a mask_band promise take the general DFT-as-GEMM path, which is slower "
                           "than cuFFT (ask for backend='triton' to force it)")

# Which ops each backend implements (its OPS, written here too so that nothing is imported to answer).
# A backend/op pair missing here is "not implemented" (NotImplementedError when asked for by name; auto
# skips it and says why). adaptive_masks (FOLK Com / RCom) is reference and torch only.
IMPLEMENTED = {
    "reference": set(OPS),
    "torch": set(OPS),
    "triton": {"corrupt", "masked_freq_loss"},
    "cuda": {"corrupt", "masked_freq_loss"},
}

_logged: set = set()
_modules: dict = {"reference": reference, "torch": torch_backend}


def backend_module(name: str):
    """The module that declares backend `name` (imported on first use)."""
    module = _modules.get(name)
    if module is None:
        if name == "triton":
            from . import kernels as module
        else:
            from .backends import cuda as module
        _modules[name] = module
    return module


def _not_implemented(name: str, op: Optional[str]) -> Optional[str]:
    where = _WHERE.get(name, name)
    if op is not None and op not in IMPLEMENTED[name]:
        return f"{op} is not implemented in {where}"
    if op is None and not IMPLEMENTED[name]:
        return f"{where} is not implemented"
    return None


def backend_unavailable_reason(name: str, device_type: Optional[str] = None, op: Optional[str] = None,
                               size: Optional[Tuple[int, int, int]] = None, build: bool = True) -> Optional[str]:
    """None if backend `name` can run `op` (any op when None) on `device_type` tensors (any when None), else why not.

    `size`: optional (C, H, W) of the images, for backends compiled for some sizes only (cuda); `build`: False
    reports a CUDA extension that is not built yet without compiling it."""
    reason = _not_implemented(name, op)
    if reason is not None:
        return reason
    if name == "triton":
        try:
            module = backend_module(name)
        except ImportError as exc:  # an install without kernels/
            return f"the Triton kernels (mfm_fast.kernels) cannot be imported ({exc})"
    else:
        module = backend_module(name)
    return module.unavailable_reason(device_type, size=size, build=build)


def available_backends(device_type: Optional[str] = None, op: Optional[str] = None) -> Dict[str, Optional[str]]:
    """{backend: None if available, else the reason} for `op` (any when None) on `device_type` tensors
    ("cpu", "cuda", or any when None)."""
    return {name: backend_unavailable_reason(name, device_type, op) for name in BACKENDS}


def check_backend_name(name, what: str = "backend") -> str:
    if not isinstance(name, str) or name not in BACKENDS + ("auto",):
        raise ValueError(f"{what}: expected one of 'auto', {', '.join(map(repr, BACKENDS))}, got {name!r}")
    return name


def _auto_policy_reason(name: str, op: str, inputs: Optional[tuple], options) -> Optional[str]:
    """Why ``auto`` does not pick a backend that could run these inputs (measured slower), or None."""
    if name == "triton" and op == "corrupt" and inputs is not None:
        from .kernels.corrupt import band_fits

        return None if band_fits(options.mask_band, *inputs[0].shape[-2:]) else _TRITON_GENERAL_CORRUPT
    return None


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
            exc = NotImplementedError if _not_implemented(requested, op) is not None else RuntimeError
            raise exc(f"backend={requested!r} for {op} on {device.type}: {reason}")
        why = None if inputs is None else backend_module(requested).unsupported_reason(op, inputs, options)
        if why is not None:
            log_fallback_once(op, requested, "torch", why)
            return "torch"
        return requested
    order = _AUTO_ORDER_CUDA if device.type == "cuda" else ("torch",)
    skipped = []
    for name in order:
        # AUTO_SKIPS first: a skipped backend is not even loaded (the cuda one would be compiled on first use)
        reason = AUTO_SKIPS.get((name, op)) or backend_unavailable_reason(name, device.type, op, size)
        if reason is None and inputs is not None:
            reason = backend_module(name).unsupported_reason(op, inputs, options) or \
                _auto_policy_reason(name, op, inputs, options)
        if reason is None:
            _log_once(op, device.type, name, skipped)
            return name
        skipped.append(f"{name}: {reason}")
    raise RuntimeError(f"no backend can run {op} on {device.type}")  # unreachable: torch always runs


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
