"""Drop-in replacements for the released MFM code (Jiahao000/MFM), computed by mfm_fast's backends.

``FrequencyLoss`` takes the constructor arguments and the call of the released ``models/frequency_loss.py``
``FrequencyLoss`` and returns the same per-frequency map, so ``MFM.forward`` can keep its own reduction.
For new code, :func:`mfm_fast.masked_freq_loss` does the reduction too (docs/compat.md maps one to the other).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import _validate as V
from ._common import to_blocks
from .loss import masked_freq_loss


class FrequencyLoss(nn.Module):
    """The released ``FrequencyLoss``: the unreduced frequency distance map of pred against target.

    With F(z) = fftshift(fft2(patch, norm="ortho")) for each of the P = patch_factor^2 patches (row-major)
    and D = F(pred) - F(target) (batch means of the spectra first if ave_spectrum):
    map = (|D|^2 + 1e-12)^(loss_gamma / 2), times the focal weight w when with_matrix, where
    w = |D|^matrix_gamma (log(1 + .) if log_matrix) / its max per (image, patch, channel) (over the whole
    batch if batch_matrix), NaN -> 0, clamped to [0, 1], detached; or w = ``matrix.detach()`` when a
    matrix is passed.

    forward(pred, target, matrix=None, **kwargs): pred, target (N, C, H, W) (any float dtype) ->
    (N, P, C, H/pf, W/pf), N = 1 with ave_spectrum. Like the released code the map is float32 for
    float16 / bfloat16 / float32 inputs; float64 inputs give a float64 map (the released code rounds
    them to float32). ``backend``, not in the released code, picks mfm_fast's backend ("auto" by default;
    the map runs on the torch backend, or the reference one if asked). ``matrix`` must be on the map's
    device with a shape that broadcasts with the map's (else ValueError "matrix: ..."); its values are
    checked to lie in [0, 1] only when value checks are on (:func:`mfm_fast.set_value_checks`): the
    released assert is a host sync.
    """

    def __init__(self, loss_gamma: float = 1.0, matrix_gamma: float = 1.0, patch_factor: int = 1,
                 ave_spectrum: bool = False, with_matrix: bool = False, log_matrix: bool = False,
                 batch_matrix: bool = False, backend: str = "auto"):
        super().__init__()
        self.loss_gamma = V.check_number("loss_gamma", loss_gamma, low=0.0, low_open=True)
        self.matrix_gamma = V.check_number("matrix_gamma", matrix_gamma, low=0.0, low_open=True)
        self.patch_factor = V.check_int("patch_factor", patch_factor, low=1)
        self.ave_spectrum, self.with_matrix = bool(ave_spectrum), bool(with_matrix)
        self.log_matrix, self.batch_matrix = bool(log_matrix), bool(batch_matrix)
        self.backend = backend

    def forward(self, pred: torch.Tensor, target: torch.Tensor, matrix: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        online_matrix = self.with_matrix and matrix is None
        loss_map = masked_freq_loss(
            pred, target, None, loss_gamma=self.loss_gamma, reduction="none", with_matrix=online_matrix,
            alpha=self.matrix_gamma, log_matrix=self.log_matrix, batch_matrix=self.batch_matrix,
            ave_spectrum=self.ave_spectrum, patch_factor=self.patch_factor, backend=self.backend)
        loss_map = to_blocks(loss_map, self.patch_factor).movedim(2, 1)  # (N, C, P, h, w) -> (N, P, C, h, w)
        if self.with_matrix and matrix is not None:
            _check_matrix(matrix, loss_map)
            loss_map = matrix.detach() * loss_map
        return loss_map

    def extra_repr(self) -> str:
        return (f"loss_gamma={self.loss_gamma:g}, matrix_gamma={self.matrix_gamma:g}, patch_factor={self.patch_factor}, "
                f"ave_spectrum={self.ave_spectrum}, with_matrix={self.with_matrix}, log_matrix={self.log_matrix}, "
                f"batch_matrix={self.batch_matrix}")


def _check_matrix(matrix, loss_map: torch.Tensor) -> None:
    """`matrix` must be a tensor on the map's device whose shape broadcasts with the map's (metadata only); its
    values must lie in [0, 1], as the released code asserts, checked only when value checks are on (a host sync)."""
    if not isinstance(matrix, torch.Tensor):
        raise TypeError(f"matrix: expected a torch.Tensor or None, got {type(matrix).__name__}")
    try:
        torch.broadcast_shapes(matrix.shape, loss_map.shape)
    except RuntimeError:
        raise ValueError(f"matrix: expected a shape that broadcasts with the loss map's (N, P, C, H/pf, W/pf) = "
                         f"{tuple(loss_map.shape)}, got {tuple(matrix.shape)}") from None
    if matrix.dim() and matrix.device != loss_map.device:
        raise ValueError(f"matrix: is on {matrix.device} but the images are on {loss_map.device}; "
                         "move it with .to(device)")
    if V.value_checks_enabled() and not bool(((matrix >= 0) & (matrix <= 1)).all()):
        lo, hi = matrix.min().item(), matrix.max().item()
        raise ValueError(f"matrix: the spectrum weight matrix must lie in [0, 1] (value checks are on), "
                         f"got min {lo:g}, max {hi:g}")
