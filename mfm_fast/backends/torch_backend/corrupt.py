"""Torch backend for frequency corruption: rfft2 -> symmetrised half mask -> irfft2 -> clamp -> normalise.

Registered as the custom op ``torch.ops.mfm_fast.corrupt_torch`` so torch.compile traces it
as one node. Three passes over the data (rfft2, irfft2, epilogue); the fused backends do it in one.
"""

from __future__ import annotations

import torch

from ..._common import channel_view, compute_dtype, to_unit_float
from ._halfspec import symmetric_half


@torch.library.custom_op("mfm_fast::corrupt_torch", mutates_args=())
def corrupt(x: torch.Tensor, mask: torch.Tensor, mean: list[float], std: list[float],
            out_dtype: torch.dtype) -> torch.Tensor:
    """x (N, C, H, W) pixels, mask (N, H, W) fftshift-ed keep mask -> (N, C, H, W) normalised corrupted input.

    Computes irfft2(rfft2(x) * (m(k) + m(-k)) / 2), exact for every real mask because taking
    the real part of the full-grid result equals using the symmetrised mask. Float32 math
    (float64 for float64 x); uint8 pixels are divided by 255.
    """
    cdt = compute_dtype(x)
    pixels = to_unit_float(x, cdt)
    keep = symmetric_half(mask.to(cdt))[:, None]  # (N, 1, H, W//2 + 1)
    out = torch.fft.irfft2(torch.fft.rfft2(pixels) * keep, s=x.shape[-2:])
    out = out.clamp_(0.0, 1.0).sub_(channel_view(mean, out)).div_(channel_view(std, out))
    return out.to(out_dtype)


@corrupt.register_fake
def _(x, mask, mean, std, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)
