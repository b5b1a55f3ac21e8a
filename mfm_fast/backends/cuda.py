"""The CUDA extension backend: ``mfm_fast._C`` (csrc/), loaded lazily, and its Python registrations.

``_C`` registers three ops, each with a CUDA kernel (one CTA per image plane, the plane's FFT on-chip in
shared memory) and a CPU kernel that runs the same per-plane C++ code on the host (slow; it exists so
that CI checks the kernel maths without a GPU):

- ``torch.ops.mfm_fast.corrupt_cuda(x, mask, mean, std, out_dtype)``
- ``torch.ops.mfm_fast.masked_freq_loss_cuda(pred, target, mask, loss_gamma, reduction, loss_weight,
  target_mean, target_std, need_grad, mask_band=None) -> (loss, grad)``: loss and dloss/dpred in one
  pass; backward only scales the gradient by grad_output, in place when the graph is not kept (then the
  returned ``grad`` buffer is what autograd hands on as dloss/dpred). ``mask_band=R`` is the caller's
  promise (not checked) that every mask equals its corner outside the centred box |ky|, |kx| < R: images
  whose corner is 1 then run the band kernel (csrc/loss_band.cu), the rest the full-plane kernel;
- ``torch.ops.mfm_fast.scale_grad_cuda_(grad, scale)``: grad *= scale[0] on the device, a launch that does
  nothing when the scale is 1 (``loss.backward()``), so that case costs no copy and no host sync.

Compiled sizes: square 224 x 224 and 112 x 112 planes, 1 to 8 channels. ``import mfm_fast`` never
imports ``_C``. The first use loads the ahead-of-time ``mfm_fast._C`` that setup.py built, or else the
just-in-time build of the same sources (mfm_fast/backends/_jit_build.py: compiled on first use and cached);
:func:`unavailable_reason` says why neither can be used and :func:`how_built` how the loaded one was built,
as reported by ``python -m mfm_fast.info``.

The backend ``cuda`` of the registry (mfm_fast.backends, which declares its ops): :func:`unavailable_reason`,
:func:`unsupported_reason` and :func:`run` are the backend protocol.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
from typing import Optional

import torch

from . import _jit_build
from .._common import needs_grad
from .._options import op_kwargs
from .torch_backend.masked_freq_loss import register_saved_grad_autograd

SIDES = (224, 112)
SMEM_PER_BLOCK = 232448  # sm_90's opt-in shared memory per block (csrc/fft.cuh, kHopperSmemPerBlock)
MAX_CHANNELS = 8
_INFO_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_build_info.json")
_state: dict = {}


def build_info() -> dict:
    """What setup.py recorded at install (mfm_fast/_build_info.json), or {} if nothing.

    ``status``: "built" (ahead of time, with torch_version / arch_list / nvcc / build_seconds / sources_sha256),
    "skipped" (MFM_FAST_SKIP_CUDA_BUILD=1), "deferred" (left to the just-in-time build on first use, ``reason``
    says why) or "failed" (the compiler failed). ``previous_build``: the earlier ahead-of-time build whose
    library an editable install still holds."""
    try:
        with open(_INFO_PATH, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _ahead_of_time_library() -> Optional[str]:
    spec = importlib.util.find_spec("mfm_fast._C")
    return spec.origin if spec is not None else None


def _ahead_of_time_build(info: dict) -> dict:
    """The record of the build that made the ahead-of-time library ({} when there is none)."""
    return info if info.get("status") == "built" else info.get("previous_build") or {}


def _install_note(info: dict) -> str:
    if not info:
        return "no install record (mfm_fast/_build_info.json)"
    return f"the install recorded {info.get('status')}" + (f": {info['reason']}" if info.get("reason") else "")


def _details(record: dict) -> str:
    return ", ".join(f"{k} {record[k]}" for k in ("arch_list", "nvcc", "torch_version", "build_seconds")
                     if record.get(k) is not None)


def _load(build: bool = True) -> Optional[str]:
    """Load the extension once: the ahead-of-time mfm_fast._C, else the just-in-time build (compiled first when
    `build` and nothing is cached). None on success, else why not. Without `build`, a missing just-in-time
    build is reported but not remembered, so a later call with `build` still compiles it."""
    if "reason" in _state:
        return _state["reason"]
    info = build_info()
    library = _ahead_of_time_library()
    aot = _ahead_of_time_build(info)
    src = _jit_build.sources_dir()
    stale = library is not None and src is not None and aot.get("sources_sha256") not in (
        None, _jit_build.sources_hash(src))
    jit_reason = _jit_build.unavailable_reason()
    if jit_reason is None and info.get("status") == "skipped":
        jit_reason = "the install was pure Python (MFM_FAST_SKIP_CUDA_BUILD=1 at install time; reinstall without it)"
    problems = []
    if library is not None and (not stale or jit_reason is not None):
        try:
            from .. import _C  # noqa: F401  (loading the library registers torch.ops.mfm_fast.*_cuda)
            _register()
            if aot:
                how = f"built ahead of time by setup.py ({aot.get('time_utc')}): {_details(aot)}"
                if info.get("status") != "built":
                    how += f"; the last install did not rebuild it ({_install_note(info)})"
            else:
                how = (f"built ahead of time, a prebuilt {os.path.basename(library)} with no build record of its own "
                       f"({_install_note(info)})")
            if stale:
                how += "; WARNING: from other csrc sources than the installed ones (" + jit_reason + ")"
            _state.update(reason=None, how=how)
            return None
        except Exception as exc:  # ImportError, undefined symbols from another torch build, ...
            why = f"the ahead-of-time {os.path.basename(library)} cannot be loaded"
            if aot.get("torch_version") and aot["torch_version"] != torch.__version__:
                why += f" (built for torch {aot['torch_version']}, running {torch.__version__})"
            problems.append(f"{why} [{type(exc).__name__}: {exc}]")
    elif library is not None:
        problems.append(f"the ahead-of-time {os.path.basename(library)} was built from other csrc sources")
    if jit_reason is None:
        try:
            record = _jit_build.load(build_if_needed=build)
        except _jit_build.NotBuilt as exc:  # a damaged cached build, rebuilt by a later call with `build`
            return f"{exc}; {_install_note(info)}"
        except _jit_build.CacheError as exc:  # the cache folder: its path and the cause first
            _state["reason"] = (f"{exc}; the CUDA extension would be built just in time there "
                                f"({'; '.join(problems) or _install_note(info)})")
            return _state["reason"]
        except Exception as exc:  # a failed compile, a library that does not load
            jit_reason = str(exc)
        else:
            if record is None:
                return ("the CUDA extension is not built yet: it is built just in time on first use of backend='cuda' "
                        f"(1-3 minutes; `python -m mfm_fast.info --require-cuda-ext` builds it now); {_install_note(info)}")
            _register()
            _state.update(reason=None, how=(f"built just in time ({record.get('time_utc')}): {_details(record)}, "
                                            f"cached in {os.path.dirname(record['library'])}"))
            return None
    if not problems:
        problems.append(f"the install did not build it ahead of time ({_install_note(info)})")
    _state["reason"] = (f"the CUDA extension is not available: {'; '.join(problems)}; and it cannot be built just "
                        f"in time: {jit_reason}")
    return _state["reason"]


def how_built(build: bool = False) -> str:
    """One line for `python -m mfm_fast.info`: how the loaded extension was built, or why none is loaded."""
    reason = _load(build)
    return _state["how"] if reason is None else f"not loaded: {reason}"


def unavailable_reason(device_type: Optional[str] = None, size=None, build: bool = True) -> Optional[str]:
    """None if the extension can run on `device_type` tensors (any when None) of planes `size` = (C, H, W) (any
    when None), else why not.

    Tensors and sizes that no build serves are refused first; then the extension is loaded on the first call,
    compiled just in time if needed (unless `build` is False)."""
    if device_type == "cpu":
        return ("the CUDA extension backend runs on CUDA tensors only (its CPU kernels, "
                "torch.ops.mfm_fast.*_cuda on CPU tensors, are a slow host build for tests); use backend='torch'")
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    return (size_reason(size[1], size[2], size[0]) if size is not None else None) or _load(build)


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


def unsupported_reason(op: str, inputs: tuple, options) -> Optional[str]:
    """None if the CUDA kernel of `op` implements these inputs and options, else why not (dispatch then runs
    the torch backend)."""
    if op == "corrupt":
        x, _ = inputs
        if torch.float64 in (x.dtype, options.out_dtype):
            return "float64 is computed in float64 by the torch backend"
        return None
    pred, target, _ = inputs
    if options.distance == "magnitude_phase":
        return "distance='magnitude_phase' is not fused; it runs as plain torch ops (autograd through rfft2)"
    if options.reduction == "none":
        return "reduction='none' (the per-frequency map) is not in the CUDA kernel"
    if options.with_matrix:
        return "with_matrix=True (focal matrix) is not in the CUDA kernel"
    if options.ave_spectrum:
        return "ave_spectrum=True is not in the CUDA kernel"
    if options.patch_factor != 1:
        return "patch_factor > 1 is not in the CUDA kernel"
    if torch.float64 in (pred.dtype, target.dtype):
        return "float64 pred / target are computed in float64, which the CUDA kernel does not do"
    return None


def run(op: str, inputs: tuple, options):
    """Run `op` on validated `inputs` (:func:`unsupported_reason` None for them) with its options object: the
    entry points below, their arguments filled by name."""
    if op == "corrupt":
        x, mask = inputs
        return corrupt(x, mask, **op_kwargs(options, _CORRUPT_ARGS))
    pred, target, mask = inputs
    return masked_freq_loss(pred, target, mask, **op_kwargs(options, _LOSS_ARGS, need_grad=needs_grad(pred, target)))


# ------------------------------------------------------------------ registrations (after _C is loaded)
def _register() -> None:
    torch.library.register_fake("mfm_fast::corrupt_cuda")(_corrupt_fake)
    torch.library.register_fake("mfm_fast::masked_freq_loss_cuda")(_loss_fake)
    torch.library.register_fake("mfm_fast::scale_grad_cuda_")(_scale_grad_fake)
    register_saved_grad_autograd("mfm_fast::masked_freq_loss_cuda", scale_in_place=_scale_grad_in_place)


def _scale_grad_fake(grad, scale):
    return None


def _graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph / create_graph); True when torch cannot say."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep is None else keep()


def _scale_grad_in_place(grad: torch.Tensor, grad_output: torch.Tensor) -> Optional[torch.Tensor]:
    """grad *= grad_output in place (the loss op's saved gradient buffer), decided on the device: no copy
    when grad_output is 1. Returns grad, which autograd then hands on as dloss/dpred. None (the caller
    multiplies out of place) where the buffer is read again or may not be written: a backward that keeps the
    graph (retain_graph=True: a later backward reads the saved gradient, and the buffer may by then be
    pred.grad), or a traced one (torch.compile, AOT autograd: a forward output written in the backward is
    not a graph they take)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if (type(grad) is not torch.Tensor or _get_current_dispatch_mode() is not None or torch.compiler.is_compiling()
            or _graph_is_kept()):
        return None
    torch.ops.mfm_fast.scale_grad_cuda_(grad, grad_output.to(torch.float32))
    return grad


def _corrupt_fake(x, mask, mean, std, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


def _loss_fake(pred, target, mask, loss_gamma, reduction, loss_weight, target_mean, target_std, need_grad,
               mask_band=None):
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
                     need_grad, mask_band=None) -> torch.Tensor:
    """The loss (masked / mean / sum) through the autograd-registered op; returns the scalar loss. mask_band:
    the caller's promise R (see the op above; a mask that breaks it gives a wrong loss, it is not checked)."""
    _ensure_loaded()
    m = mask.to(torch.float32).contiguous() if mask is not None else None
    tm = [float(v) for v in target_mean] if target_mean is not None else None
    ts = [float(v) for v in target_std] if target_std is not None else None
    loss, _ = torch.ops.mfm_fast.masked_freq_loss_cuda(pred.contiguous(), target.contiguous(), m, float(loss_gamma),
                                                       reduction, float(loss_weight), tm, ts, bool(need_grad),
                                                       None if mask_band is None else int(mask_band))
    return loss


_CORRUPT_ARGS = tuple(inspect.signature(corrupt).parameters)[2:]  # after x, mask
_LOSS_ARGS = tuple(inspect.signature(masked_freq_loss).parameters)[3:]  # after pred, target, mask
