"""Eager replica of the released MFM code's corruption and loss (the "official" pipeline).

The same op sequence as ``models/mfm.py`` / ``models/frequency_loss.py`` of Jiahao000/MFM: full
complex fft2 + fftshift, complex64, two ortho spectra stacked as (re, im). It is the baseline
that ``python -m mfm_fast.pretrain --pipeline official`` and ``bench/`` time against mfm_fast; it is also a
second, independent reading of docs/spec.md §2-3 (tests compare it with mfm_fast).
"""

from __future__ import annotations

import torch

from ._common import imagenet_normalize as normalize  # (x - ImageNet mean) / std, as the released code


def corrupt(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """normalise(clamp(real(ifft2(ifftshift(fftshift(fft2(x)) * mask))), 0, 1)); x (N, 3, H, W) in [0, 1]."""
    freq = torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1)) * mask[:, None]
    img = torch.fft.ifft2(torch.fft.ifftshift(freq, dim=(-2, -1))).real
    return normalize(img.clamp(0, 1))


def _spectrum(z: torch.Tensor) -> torch.Tensor:
    freq = torch.fft.fftshift(torch.fft.fft2(z.float(), norm="ortho"), dim=(-2, -1))
    return torch.stack([freq.real, freq.imag], -1)


def loss(pred: torch.Tensor, x: torch.Tensor, mask=None, gamma: float = 1.0) -> torch.Tensor:
    """Masked spectral loss of pred (normalised space) against normalise(x), x in [0, 1].

    mask (N, H, W) keep mask: sum((1 - m) d) / sum(1 - m) / C ("masked"); mask None: mean of d ("normal")."""
    d = (_spectrum(pred) - _spectrum(normalize(x.float()))) ** 2
    d = torch.sqrt(d.sum(-1) + 1e-12) ** gamma
    if mask is None:
        return d.mean()
    return (d * (1 - mask)[:, None]).sum() / (1 - mask).sum() / pred.shape[1]
