"""Reference masked spectral loss (docs/spec.md §3), computed in float64, differentiated by autograd."""

from __future__ import annotations

from typing import Optional

import torch

from ..._common import channel_view, from_blocks, to_blocks, to_unit_float

EPS = 1e-12


def spectrum(z: torch.Tensor, patch_factor: int) -> torch.Tensor:
    """fftshift(fft2(patch, norm="ortho")) of every pf x pf patch: (N, C, H, W) -> (N, C, P, h, w) complex."""
    return torch.fft.fftshift(torch.fft.fft2(to_blocks(z, patch_factor), norm="ortho"), dim=(-2, -1))


def focal_matrix(D: torch.Tensor, alpha: float, log_matrix: bool, batch_matrix: bool) -> torch.Tensor:
    """Focal-frequency weights a = |D|^alpha (optionally log(1 + a)) / max, NaN -> 0, clamped to [0, 1], detached.

    The max is per (image, patch, channel) over the frequencies, or over the whole batch."""
    a = D.detach().abs() ** alpha
    if log_matrix:
        a = torch.log(a + 1.0)
    a = a / (a.amax() if batch_matrix else a.amax(dim=(-2, -1), keepdim=True))
    a = torch.where(torch.isnan(a), torch.zeros_like(a), a)
    return a.clamp(0.0, 1.0)


def masked_freq_loss(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor], *,
                     loss_gamma: float = 1.0, reduction: str = "masked", with_matrix: bool = False,
                     alpha: float = 1.0, log_matrix: bool = False, batch_matrix: bool = False,
                     ave_spectrum: bool = False, patch_factor: int = 1, loss_weight: float = 1.0,
                     target_mean: Optional[list] = None, target_std: Optional[list] = None,
                     distance: str = "complex", phase_weight: float = 1.0) -> torch.Tensor:
    """The loss of docs/spec.md §3 on the full fftshift-ed grid, in float64.

    pred, target: (N, C, H, W); target is normalised by (target_mean, target_std) first when
    given. mask: (N, H, W) keep mask (1 = kept) or None (every frequency weighted 1).
    D = F(pred) - F(target) with F the per-patch ortho fft2 + fftshift (two transforms, as the
    released code); d = (|D|^2 + 1e-12)^(gamma / 2), times the focal matrix when with_matrix;
    distance "magnitude_phase" (P = F(pred), T = F(target), |.|_e = sqrt(|.|^2 + 1e-12),
    pw = phase_weight) uses instead d = (q + 1e-12)^(gamma / 2) with
    q = (|P|_e - |T|_e)^2 + 2 pw max(|P|_e |T|_e - Re(P conj T), 0), the focal matrix still from D
    (literal, so q carries a rounding error ~1e-16 |P|^2: relative ~1e-16 |P|^2 / |D|^2 when pred ~ target);
    w = 1 - mask. Reductions: "masked" sum(w d) / (C sum_{n,h,w} w), "mean" mean(w d),
    "sum" sum(w d), "none" the map w d laid out as (N, C, H, W) (each patch's spectrum in its
    patch's place). All times loss_weight. The result is float64 for float64 pred, else float32.
    """
    out_dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    p = pred.to(torch.float64)
    t = to_unit_float(target, torch.float64)
    if target_mean is not None:
        t = (t - channel_view(target_mean, t)) / channel_view(target_std, t)

    if distance == "magnitude_phase":
        P, T = spectrum(p, patch_factor), spectrum(t, patch_factor)  # (N, C, P, h, w)
        if ave_spectrum:
            P, T = P.mean(dim=0, keepdim=True), T.mean(dim=0, keepdim=True)
        D = P - T
        mag_p = (P.real ** 2 + P.imag ** 2 + EPS).sqrt()
        mag_t = (T.real ** 2 + T.imag ** 2 + EPS).sqrt()
        cross = P.real * T.real + P.imag * T.imag  # Re(P conj T)
        q = (mag_p - mag_t) ** 2 + 2 * phase_weight * (mag_p * mag_t - cross).clamp_min(0.0)
        d = (q + EPS) ** (loss_gamma / 2)
    else:
        D = spectrum(p, patch_factor) - spectrum(t, patch_factor)  # (N, C, P, h, w)
        if ave_spectrum:
            D = D.mean(dim=0, keepdim=True)
        d = (D.real ** 2 + D.imag ** 2 + EPS) ** (loss_gamma / 2)
    if with_matrix:
        d = focal_matrix(D, alpha, log_matrix, batch_matrix) * d
    loss_map = from_blocks(d, patch_factor)  # (N or 1, C, H, W)

    if mask is not None:
        w = 1.0 - mask.to(torch.float64)[:, None]  # (N, 1, H, W)
        loss_map = w * loss_map
    if reduction == "masked":
        channels = pred.shape[1]
        out = loss_map.sum() / (channels * w.sum()).clamp_min(1e-30)
    elif reduction == "mean":
        out = loss_map.mean()
    elif reduction == "sum":
        out = loss_map.sum()
    else:
        out = loss_map
    return (out * loss_weight).to(out_dtype)
