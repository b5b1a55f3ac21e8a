"""Reference frequency corruption (docs/spec.md §2), computed in float64."""

from __future__ import annotations

import torch

from ..._common import channel_view, to_unit_float


def corrupt(x: torch.Tensor, mask: torch.Tensor, mean: list, std: list, out_dtype: torch.dtype) -> torch.Tensor:
    """normalise(clamp(real(ifft2(ifftshift(fftshift(fft2(x)) * mask))), 0, 1)).

    x: (N, C, H, W) pixels in [0, 1] (uint8 pixels are divided by 255); mask: (N, H, W)
    fftshift-ed keep mask (1 = kept), shared by the channels; mean, std: C floats.
    Returns (N, C, H, W) in out_dtype. Taking the real part is what makes a non-Hermitian mask
    act like its symmetrised version (m(k) + m(-k)) / 2.
    """
    x64 = to_unit_float(x, torch.float64)
    spectrum = torch.fft.fftshift(torch.fft.fft2(x64), dim=(-2, -1))
    masked = spectrum * mask.to(torch.float64)[:, None]
    corrupted = torch.fft.ifft2(torch.fft.ifftshift(masked, dim=(-2, -1))).real
    corrupted = corrupted.clamp(0.0, 1.0)
    return ((corrupted - channel_view(mean, corrupted)) / channel_view(std, corrupted)).to(out_dtype)
