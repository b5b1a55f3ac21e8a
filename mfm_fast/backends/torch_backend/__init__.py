"""The torch backend: rfft2 half-spectrum ops registered with torch.library (CPU and CUDA).

The backend ``torch`` of the registry (:mod:`mfm_fast.backends`, which declares its ops): the backend
protocol ``unavailable_reason``, ``unsupported_reason`` and ``run``. It runs every op with every option on
any device, so it is also the fallback, where the other backends' unsupported inputs go.
"""

from __future__ import annotations

from typing import Optional

from ..._common import needs_grad
from ..._options import op_kwargs, schema_names
from .adaptive_masks import make_adaptive_masks
from .corrupt import corrupt
from .magnitude_phase_loss import magnitude_phase_loss
from .masked_freq_loss import masked_freq_loss, masked_freq_loss_map

__all__ = ["corrupt", "make_adaptive_masks", "masked_freq_loss", "masked_freq_loss_map", "run", "unavailable_reason",
           "unsupported_reason"]

_CORRUPT_ARGS = schema_names(corrupt)[2:]  # after x, mask
_LOSS_ARGS = schema_names(masked_freq_loss)[3:]  # after pred, target, mask
_MAP_ARGS = schema_names(masked_freq_loss_map)[3:]
_MASK_ARGS = ("keep_ratio", "magnitude", "dc")
_MP_ARGS = ("loss_gamma", "reduction", "phase_weight", "with_matrix", "alpha", "log_matrix", "batch_matrix",
            "ave_spectrum", "patch_factor", "loss_weight", "target_mean", "target_std")


def unavailable_reason(device_type: Optional[str] = None, size=None, build: bool = True) -> Optional[str]:
    """Always None: plain torch ops run on every device and size."""
    return None


def unsupported_reason(op: str, inputs: tuple, options) -> Optional[str]:
    """Always None: every input and option runs here."""
    return None


def run(op: str, inputs: tuple, options):
    """Run `op` on validated `inputs` with its options object (see :mod:`mfm_fast._options`)."""
    if op == "corrupt":
        x, mask = inputs
        return corrupt(x, mask, **op_kwargs(options, _CORRUPT_ARGS))
    if op == "adaptive_masks":
        x, com = inputs
        return make_adaptive_masks(x, com, **op_kwargs(options, _MASK_ARGS))
    if op != "masked_freq_loss":
        raise NotImplementedError(f"the torch backend has no op {op!r}")
    pred, target, mask = inputs
    if options.distance == "magnitude_phase":
        return magnitude_phase_loss(pred, target, mask, **op_kwargs(options, _MP_ARGS))
    if options.reduction == "none":
        return masked_freq_loss_map(pred, target, mask, **op_kwargs(options, _MAP_ARGS))
    loss, _ = masked_freq_loss(pred, target, mask, **op_kwargs(options, _LOSS_ARGS,
                                                              need_grad=needs_grad(pred, target)))
    return loss
