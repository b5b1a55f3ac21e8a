"""Index maps between the fftshift-ed full grid and the unshifted rfft2 half spectrum.

Masks and per-frequency maps arrive fftshift-ed on the full (H, W) grid; rfft2 works on the
unshifted half grid (H, W//2 + 1). Instead of fftshift copies we gather with cached index
tensors, one per (H, W, device).

Real-part recovery: for real images, real(ifft2(X * M)) = ifft2(X * (M(k) + M(-k)) / 2), so a
weight that is not Hermitian acts through its symmetrised version; :func:`symmetric_half`
returns exactly that on the half grid.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=64)
def _half_indices(height: int, width: int, device: torch.device):
    ky = torch.arange(height)[:, None]
    kx = torch.arange(width // 2 + 1)[None, :]
    cy, cx = height // 2, width // 2
    pos = ((ky + cy) % height) * width + (kx + cx) % width
    neg = ((-ky + cy) % height) * width + (-kx + cx) % width
    return pos.reshape(-1).to(device), neg.reshape(-1).to(device)


@functools.lru_cache(maxsize=64)
def _full_from_half_index(height: int, width: int, device: torch.device):
    half = width // 2 + 1
    ky = (torch.arange(height)[:, None] - height // 2) % height
    kx = (torch.arange(width)[None, :] - width // 2) % width
    mirror = kx > width // 2
    row = torch.where(mirror, (-ky) % height, ky)
    col = torch.where(mirror, width - kx, kx)
    return (row * half + col).reshape(-1).to(device)


def symmetric_half(m: torch.Tensor) -> torch.Tensor:
    """(..., H, W) fftshift-ed real map -> (..., H, W//2 + 1) unshifted half of (m(k) + m(-k)) / 2."""
    *lead, h, w = m.shape
    pos, neg = _half_indices(h, w, m.device)
    flat = m.reshape(*lead, h * w)
    return ((flat.index_select(-1, pos) + flat.index_select(-1, neg)) * 0.5).reshape(*lead, h, w // 2 + 1)


def full_from_half(s: torch.Tensor, width: int) -> torch.Tensor:
    """(..., H, W//2 + 1) unshifted half of a symmetric map (s(k) = s(-k)) -> (..., H, W) fftshift-ed full map."""
    *lead, h, half = s.shape
    idx = _full_from_half_index(h, width, s.device)
    return s.reshape(*lead, h * half).index_select(-1, idx).reshape(*lead, h, width)


@functools.lru_cache(maxsize=64)
def _column_weights_cached(width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    cw = torch.full((width // 2 + 1,), 2.0, dtype=dtype)
    cw[0] = 1.0
    cw[-1] = 1.0
    return cw.to(device)


def column_weights(width: int, like: torch.Tensor) -> torch.Tensor:
    """(W//2 + 1,) weights 1, 2, ..., 2, 1: how often each half-spectrum column stands in the full grid."""
    return _column_weights_cached(width, like.dtype, like.device)
