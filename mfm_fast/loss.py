"""The masked spectral loss (docs/spec.md §3): the public functional and nn.Module."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from . import _validate as V
from . import dispatch
from ._common import IMAGENET_MEAN, IMAGENET_STD
from ._options import LossOptions
from .dispatch import check_backend_name

REDUCTIONS = ("masked", "mean", "sum", "none")
DISTANCES = ("complex", "magnitude_phase")


def _check_normalize_target(normalize_target, channels: int):
    if normalize_target is None or normalize_target is False:
        return None, None
    if normalize_target is True:
        normalize_target = (IMAGENET_MEAN, IMAGENET_STD)
    if not isinstance(normalize_target, (tuple, list)) or len(normalize_target) != 2:
        raise ValueError("normalize_target: expected None, True (ImageNet statistics) or a pair (mean, std), "
                         f"got {normalize_target!r}")
    mean = V.channel_stats("normalize_target mean", normalize_target[0], channels)
    std = V.check_std("normalize_target std", V.channel_stats("normalize_target std", normalize_target[1], channels))
    return mean, std


def _check_options(loss_gamma, reduction, alpha, patch_factor, loss_weight):
    loss_gamma = V.check_number("loss_gamma", loss_gamma, low=0.0, low_open=True)
    V.check_choice("reduction", reduction, REDUCTIONS)
    alpha = V.check_number("alpha", alpha, low=0.0, low_open=True)
    patch_factor = V.check_int("patch_factor", patch_factor, low=1)
    loss_weight = V.check_number("loss_weight", loss_weight)
    return loss_gamma, alpha, patch_factor, loss_weight


def _check_distance(distance, phase_weight) -> float:
    V.check_choice("distance", distance, DISTANCES)
    return V.check_number("phase_weight", phase_weight, low=0.0)


def _check_kernel_options(mask_band, precision):
    """precision (the triton backend's) and the mask_band promise (the triton and cuda band paths)."""
    V.check_choice("precision", precision, V.PRECISIONS)
    return V.check_mask_band(mask_band, None)


def masked_freq_loss(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                     loss_gamma: float = 1.0, reduction: str = "masked", with_matrix: bool = False,
                     alpha: float = 1.0, log_matrix: bool = False, batch_matrix: bool = False,
                     ave_spectrum: bool = False, patch_factor: int = 1, loss_weight: float = 1.0,
                     normalize_target=None, backend: str = "auto", mask_band: Optional[int] = None,
                     precision: str = "tf32x3", distance: str = "complex",
                     phase_weight: float = 1.0) -> torch.Tensor:
    """Masked spectral loss between pred and target.

    With F(z) = fftshift(fft2(z, norm="ortho")) per patch and D = F(pred) - F(target):
    d = (|D|^2 + 1e-12)^(loss_gamma / 2) (times the focal matrix if with_matrix), w = 1 - mask.

    Args:
        pred: (N, C, H, W) prediction in normalised-pixel space; float32, bfloat16, float16 or
            float64; any strides. Math runs in float32 (float64 for float64 pred); the loss is
            float32 (float64) and the gradient comes back in pred's dtype.
        target: (N, C, H, W) the normalised clean image, or raw [0, 1] pixels when
            ``normalize_target`` is set (then uint8 0..255 is accepted too). Treated as data,
            but it gets a gradient if it requires one.
        mask: (N, H, W) fftshift-ed **keep** mask, 1 = kept (visible), so the weight is 1 at
            the removed frequencies; float (a weight in [0, 1]), integer (nonzero = kept: 0 / 1 and
            0 / 255 alike) or bool. Required for reduction "masked"; optional otherwise (no
            mask = every frequency weighted 1). With patch_factor pf > 1 give it either in image
            layout (N, H, W), one tile per patch, or per patch (N, H/pf, W/pf), shared by all
            patches.
        loss_gamma: the exponent gamma of the distance (1 = modulus of the complex error).
        reduction: "masked" (default): sum(w d) / (C * sum_{n,h,w} w), ONE mean over every
            removed frequency of the whole batch (not a mean of per-image means); a batch
            whose masks remove nothing gives 0. "mean": mean of w d over all N C H W entries
            (MFM's "normal" reduction for the restoration tasks, with mask=None). "sum": sum
            of w d. "none": the map w d as (N, C, H, W) on the fftshift-ed grid (each patch's
            spectrum in its patch's place; batch 1 for ave_spectrum without a mask). Per-image
            masked loss from it: ``m.sum((1, 2, 3)) / (C * (1 - mask).sum((1, 2)))``.
        with_matrix, alpha, log_matrix, batch_matrix: focal-frequency weighting (off in every
            released MFM config): a = |D|^alpha, log(1 + a) if log_matrix, divided by its max
            per (image, patch, channel) (or over the batch if batch_matrix), NaN -> 0, clamped
            to [0, 1], detached, multiplied into d.
        ave_spectrum: compare the batch-average spectra instead of per-image spectra.
        patch_factor: compute spectra per patch of a pf x pf grid (H and W divisible by pf,
            patch sides even).
        loss_weight: multiplies the result.
        normalize_target: None / False (off), True (ImageNet mean/std) or (mean, std): target is raw pixels,
            normalised inside the op as (target - mean) / std.
        backend: "auto" | "reference" | "torch" | "triton" | "cuda" (see mfm_fast.dispatch). The triton
            backend fuses reductions masked / mean / sum with any gamma, normalize_target and patch_factor
            for fp32 / bf16 / fp16 pred; other options (reduction "none", with_matrix, ave_spectrum, fp64
            pred) run on the torch backend, logged once (logger "mfm_fast"). The cuda backend (CUDA tensors, square
            224 / 112 planes; other sizes raise) fuses masked / mean / sum with any gamma and normalize_target for
            patch_factor 1; other options fall back to torch, logged once.
        mask_band: optional promise R >= 1 that every mask (each patch tile with patch_factor) equals its
            corner value mask[n, 0, 0] outside the centred box |ky|, |kx| < R around DC (MFM disc masks:
            R = :func:`mfm_fast.masks.disc_band`, 16 for r1 = 16). The triton and cuda backends then compute
            images whose corner is 1 (high-pass MFM images) on the (2R - 1) x R band of the spectrum only (when
            R <= 32 and 2R <= the patch side; else they ignore the promise; cuda: a band of 16 or 32). Other
            backends ignore it. Not verified (a host sync) unless value checks are on: a mask that breaks the
            promise is the caller's error and gives a wrong loss.
        precision: GEMM precision of the triton backend's DFTs: "tf32x3" (default, fp32-accurate: within
            1e-5 of the fp64 reference), "ieee" (fp32 FMA, slow), or the fast modes "tf32" / "bf16"
            (operands rounded to 10 / 7 mantissa bits). Other backends ignore it.
        distance: "complex" (default, the released loss: d from |D| as above) or "magnitude_phase":
            with P = F(pred), T = F(target), |Z|_e = sqrt(|Z|^2 + 1e-12),
            q = (|P|_e - |T|_e)^2 + 2 phase_weight max(|P|_e |T|_e - Re(P conj T), 0) and
            d = (q + 1e-12)^(loss_gamma / 2): amplitude error plus magnitude-weighted phase error
            4 |P||T| sin^2(dphi / 2) (as |D|^2 = (|P| - |T|)^2 + 2 (|P||T| - Re(P conj T))). Everything else
            (mask weight, reductions, patches, focal matrix from D, ave_spectrum averaging P and T) is
            unchanged. The gradient stays finite where a magnitude is 0. Not fused: the triton / cuda
            backends run it on the torch backend (logged once).
        phase_weight: float >= 0, weight of the phase term (magnitude_phase only): 1 = the complex
            distance up to the 1e-12 smoothing, 0 = a pure amplitude loss.

    Edge facts: pred == target gives exactly 1e-6 (gamma = 1), not 0. NaN / inf in pred or
    target propagate (see :func:`mfm_fast.set_value_checks` for an opt-in error). The fp32 distance is
    computed hypot-style (no |D|^2 overflow): any finite input whose loss fits in fp32 gives it. A mask
    that requires grad raises (the loss is not differentiable with respect to it). Double backward
    (create_graph=True) is exact on the reference, torch and triton backends (the latter two recompute
    the loss as differentiable torch ops in backward); the cuda backend raises
    ``DoubleBackwardError`` for it.
    """
    V.check_images("pred", pred, V.PRED_DTYPES)
    V.check_tensor("target", target, 4, V.PIXEL_DTYPES if normalize_target not in (None, False) else V.PRED_DTYPES,
                   "(N, C, H, W)")
    if target.shape != pred.shape:
        raise ValueError(f"target: shape {tuple(target.shape)} does not match pred's {tuple(pred.shape)}")
    if target.device != pred.device:
        raise ValueError(f"target: is on {target.device} but pred is on {pred.device}")
    n, channels, height, width = pred.shape
    loss_gamma, alpha, patch_factor, loss_weight = _check_options(loss_gamma, reduction, alpha, patch_factor,
                                                                  loss_weight)
    if height % patch_factor or width % patch_factor:
        raise ValueError(f"patch_factor: {patch_factor} must divide the image height {height} and width {width}")
    if (height // patch_factor) % 2 or (width // patch_factor) % 2:
        raise ValueError(f"patch_factor: {patch_factor} gives {height // patch_factor} x {width // patch_factor} "
                         "patches; patch sides must be even")
    target_mean, target_std = _check_normalize_target(normalize_target, channels)
    mask_band = _check_kernel_options(mask_band, precision)
    phase_weight = _check_distance(distance, phase_weight)
    if mask is None:
        if reduction == "masked":
            raise ValueError("mask: reduction='masked' needs the (N, H, W) keep mask; pass mask=... "
                             "or use reduction='mean' for an unmasked loss")
    else:
        if patch_factor > 1 and isinstance(mask, torch.Tensor) and mask.dim() == 3 and \
                tuple(mask.shape[1:]) == (height // patch_factor, width // patch_factor):
            mask = mask.repeat(1, patch_factor, patch_factor)
        also = f" or per patch (N, H/pf, W/pf) = ({n}, {height // patch_factor}, {width // patch_factor})" \
            if patch_factor > 1 else ""
        if isinstance(mask, torch.Tensor) and mask.requires_grad and torch.is_grad_enabled():
            raise ValueError("mask: requires grad, but the loss is not differentiable with respect to the mask (it "
                             "is the corruption's fixed choice of frequencies); pass mask.detach()")
        mask = V.check_mask(mask, n, height, width, pred.device, also=also)
        V.check_mask_band(mask_band, mask, patch_factor)
    V.check_finite("pred", pred)
    V.check_finite("target", target)

    options = LossOptions(
        loss_gamma=loss_gamma, reduction=reduction, with_matrix=bool(with_matrix), alpha=alpha,
        log_matrix=bool(log_matrix), batch_matrix=bool(batch_matrix), ave_spectrum=bool(ave_spectrum),
        patch_factor=patch_factor, loss_weight=loss_weight, target_mean=_as_tuple(target_mean),
        target_std=_as_tuple(target_std), mask_band=mask_band, precision=precision, distance=distance,
        phase_weight=phase_weight)
    return dispatch.run("masked_freq_loss", backend, (pred, target, mask), options)


def _as_tuple(values: Optional[Sequence[float]]) -> Optional[Tuple[float, ...]]:
    return None if values is None else tuple(values)


class MaskedFreqLoss(nn.Module):
    """Masked spectral loss as an nn.Module, shaped like focal-frequency-loss's FocalFrequencyLoss.

    ``MaskedFreqLoss()(pred, target, mask)``: pred (N, C, H, W) in normalised-pixel space,
    target the normalised clean image (or raw pixels with ``normalize_target``), mask the
    (N, H, W) fftshift-ed keep mask (1 = kept) that corrupted the input. Defaults reproduce the
    released MFM loss: gamma 1, one masked mean over the batch. Every argument is documented
    in :func:`mfm_fast.masked_freq_loss`.
    """

    def __init__(self, loss_gamma: float = 1.0, reduction: str = "masked", with_matrix: bool = False,
                 alpha: float = 1.0, log_matrix: bool = False, batch_matrix: bool = False,
                 ave_spectrum: bool = False, patch_factor: int = 1, loss_weight: float = 1.0,
                 normalize_target: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
                 backend: str = "auto", mask_band: Optional[int] = None, precision: str = "tf32x3",
                 distance: str = "complex", phase_weight: float = 1.0):
        super().__init__()
        self.loss_gamma, self.alpha, self.patch_factor, self.loss_weight = _check_options(
            loss_gamma, reduction, alpha, patch_factor, loss_weight)
        self.reduction = reduction
        self.with_matrix, self.log_matrix, self.batch_matrix = bool(with_matrix), bool(log_matrix), bool(batch_matrix)
        self.ave_spectrum = bool(ave_spectrum)
        _check_normalize_target(normalize_target, None)  # fail at construction, not at the first step
        self.normalize_target = normalize_target
        self.backend = check_backend_name(backend)
        self.mask_band = _check_kernel_options(mask_band, precision)
        self.precision = precision
        self.phase_weight = _check_distance(distance, phase_weight)
        self.distance = distance

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return masked_freq_loss(pred, target, mask, loss_gamma=self.loss_gamma, reduction=self.reduction,
                                with_matrix=self.with_matrix, alpha=self.alpha, log_matrix=self.log_matrix,
                                batch_matrix=self.batch_matrix, ave_spectrum=self.ave_spectrum,
                                patch_factor=self.patch_factor, loss_weight=self.loss_weight,
                                normalize_target=self.normalize_target, backend=self.backend,
                                mask_band=self.mask_band, precision=self.precision, distance=self.distance,
                                phase_weight=self.phase_weight)

    def extra_repr(self) -> str:
        distance = f"distance={self.distance!r}"
        if self.distance == "magnitude_phase":
            distance += f", phase_weight={self.phase_weight:g}"
        return (f"loss_gamma={self.loss_gamma:g}, reduction={self.reduction!r}, {distance}, "
                f"with_matrix={self.with_matrix}, patch_factor={self.patch_factor}, backend={self.backend!r}")
