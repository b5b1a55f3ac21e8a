"""Torch backend for the masked spectral loss with the magnitude/phase distance (plain torch ops, autograd).

With P = F(pred), T = F(target) the per-patch ortho spectra, |Z|_e = sqrt(|Z|^2 + eps), eps = 1e-12
and pw = phase_weight >= 0:

    q = (|P|_e - |T|_e)^2 + 2 pw max(|P|_e |T|_e - Re(P conj T), 0),    d = (q + eps)^(gamma / 2).

Since |P - T|^2 = (|P| - |T|)^2 + 2 (|P||T| - Re(P conj T)), the first term is the amplitude error and
the second the magnitude-weighted phase error 4 |P||T| sin^2(dphi / 2): pw = 1 is the complex distance
(up to eps), pw = 0 a pure amplitude loss. The phase term's gradient w.r.t. P, |T|_e P / |P|_e - T,
is bounded, so the gradient stays finite where a magnitude is 0.

Computed stably in float32 (float64 for float64 pred): transform S = rfft2(pred + target) and
D = rfft2(pred - target) (one rfft2 of the two stacked, half grid (H, W//2 + 1)); P = (S + D) / 2,
T = (S - D) / 2, and with the exact identities |P|_e^2 - |T|_e^2 = Re(D conj S) and
2 (|P|_e |T|_e - Re(P conj T)) = |D|^2 + 2 eps - (|P|_e - |T|_e)^2:

    amp = Re(D conj S) / (|P|_e + |T|_e),    q = amp^2 + pw max(|D|^2 + 2 eps - amp^2, 0).

This keeps the relative error of q at float32 rounding when pred is close to target (the literal
formula cancels terms of size |P|^2). Each entry is computed on S / c, D / c with
c = max(1, its largest component) and d rescaled by c^gamma, so no square overflows fp32. d is symmetric (d(k) = d(-k)), so the full-grid sum is the
half-grid sum with column weights 1, 2, ..., 2, 1 and the symmetrised weight 1 - mask.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..._common import compute_dtype, from_blocks, to_blocks
from ._halfspec import column_weights, full_from_half, symmetric_half
from .masked_freq_loss import EPS, focal_weights, pow_gamma, pow_half_gamma, reduction_scale, target_in


def _half_distance(pred, target, loss_gamma, phase_weight, with_matrix, alpha, log_matrix, batch_matrix,
                   ave_spectrum, patch_factor, target_mean, target_std):
    """d, times the (detached) focal matrix when with_matrix: (n, C, P, h, w//2 + 1) on the unshifted half grid
    (n = 1 for ave_spectrum, else N), in the compute dtype."""
    cdt = compute_dtype(pred)
    p, t = pred.to(cdt), target_in(target, cdt, target_mean, target_std)
    SD = torch.fft.rfft2(to_blocks(torch.stack((p + t, p - t)), patch_factor), norm="ortho")  # (2, N, C, P, h, w')
    if ave_spectrum:
        SD = SD.mean(dim=1, keepdim=True)
    S, D = SD.unbind(0)
    # Overflow-safe: q is quadratic in the spectra, so compute it on S / c and D / c with c = max(1, the
    # entry's largest component) (detached: the identity holds for any c) and eps / c^2, then
    # d = c^gamma (q / c^2 + eps / c^2)^(gamma / 2). Where c = 1 (every entry of [0, 1]-scale images) this is
    # the unscaled formula.
    c = torch.stack((S.real.abs(), S.imag.abs(), D.real.abs(), D.imag.abs())).amax(0).clamp_min(1.0).detach()
    S, D, eps = S / c, D / c, EPS / c.square()
    P, T = (S + D) * 0.5, (S - D) * 0.5
    mag_p = (P.real.square() + P.imag.square() + eps).sqrt()
    mag_t = (T.real.square() + T.imag.square() + eps).sqrt()
    amp = (D.real * S.real + D.imag * S.imag) / (mag_p + mag_t)  # (|P|_e - |T|_e) / c
    power = D.real.square() + D.imag.square()  # |D|^2 / c^2
    q = amp.square()
    if phase_weight != 0.0:
        q = q + phase_weight * (power + 2 * eps - q).clamp_min(0.0)
    d = pow_half_gamma(q + eps, loss_gamma) * pow_gamma(c, loss_gamma)
    if with_matrix:
        d = focal_weights(D.abs() * c, alpha, log_matrix, batch_matrix) * d
    return d


def magnitude_phase_loss(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor], loss_gamma: float,
                         reduction: str, phase_weight: float, with_matrix: bool, alpha: float, log_matrix: bool,
                         batch_matrix: bool, ave_spectrum: bool, patch_factor: int, loss_weight: float,
                         target_mean: Optional[list], target_std: Optional[list]) -> torch.Tensor:
    """Masked spectral loss with the magnitude/phase distance (module docstring), differentiable by autograd.

    pred, target: (N, C, H, W) (target already validated; normalised here by (target_mean, target_std)
    when given). mask: (N, H, W) fftshift-ed keep mask or None. Reductions as
    :func:`mfm_fast.masked_freq_loss`: "masked" sum(w d) / (C sum w), "mean", "sum" -> scalar, "none" ->
    the map w d (N, C, H, W) on the fftshift-ed grid (batch 1 for ave_spectrum without a mask); w = 1 - mask.
    The result is float32 (float64 for float64 pred); the gradient comes back in the inputs' dtypes.
    """
    n, channels, height, width = pred.shape
    d = _half_distance(pred, target, loss_gamma, phase_weight, with_matrix, alpha, log_matrix, batch_matrix,
                       ave_spectrum, patch_factor, target_mean, target_std)
    if reduction == "none":
        out = from_blocks(full_from_half(d, width // patch_factor), patch_factor)
        if mask is not None:
            out = out * (1.0 - mask.to(out.dtype))[:, None]
        return out * loss_weight
    if mask is not None:
        d = symmetric_half(to_blocks(1.0 - mask.to(d.dtype), patch_factor))[:, None] * d  # (N, C, P, h, w')
    total = (d * column_weights(width // patch_factor, d)).sum()
    return total * reduction_scale(reduction, mask, n, channels, height, width, ave_spectrum, loss_weight, d.dtype)
