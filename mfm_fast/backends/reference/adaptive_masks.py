"""Reference FOLK image-adaptive masks (docs/spec.md §6), computed in float64 on the full spectrum."""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..._common import to_unit_float

LUMINANCE = (0.299, 0.587, 0.114)  # Rec.601 weights of R, G, B


def keep_count(keep_ratio: float, height: int, width: int) -> int:
    """k = ceil(keep_ratio * H * W) clamped to [1, H * W] (float noise under 1e-6 forgiven: 0.07 * 100 gives 7)."""
    return min(max(math.ceil(keep_ratio * height * width - 1e-6), 1), height * width)


def grey(x: torch.Tensor, magnitude: str, dtype: torch.dtype) -> torch.Tensor:
    """(N, C, H, W) pixels -> (N, H, W) single channel: the channel mean, or the Rec.601 luminance (C = 3)."""
    x = to_unit_float(x, dtype)
    if magnitude == "luminance":
        return LUMINANCE[0] * x[:, 0] + LUMINANCE[1] * x[:, 1] + LUMINANCE[2] * x[:, 2]
    return x.mean(1)


def make_adaptive_masks(x: torch.Tensor, com: torch.Tensor, keep_ratio: float, magnitude: str = "mean",
                        dc: Optional[str] = None) -> torch.Tensor:
    """Com / RCom keep masks (N, H, W) float32, fftshift-ed, 1 = kept.

    M = |fftshift(fft2(g))| of the grey image g, made exactly symmetric: M_sym(i, j) =
    (M(i, j) + M((H - i) % H, (W - j) % W)) / 2 (fftshift-ed indices). thr = the k-th largest value
    of M_sym (k = keep_count), read off a full descending sort; dominant = M_sym >= thr and M_sym > 0.
    com[n] True: keep = dominant (Com); False: keep = not dominant (RCom). dc "keep" / "remove"
    then forces the DC entry (H // 2, W // 2) to 1 / 0.
    """
    n, _, height, width = x.shape
    g = grey(x, magnitude, torch.float64)
    mag = torch.fft.fftshift(torch.fft.fft2(g), dim=(-2, -1)).abs()
    rows = (height - torch.arange(height)) % height
    cols = (width - torch.arange(width)) % width
    mag_sym = (mag + mag[:, rows][:, :, cols]) / 2
    k = keep_count(keep_ratio, height, width)
    thr = mag_sym.reshape(n, -1).sort(dim=1, descending=True).values[:, k - 1]
    dominant = (mag_sym >= thr[:, None, None]) & (mag_sym > 0)  # a zero magnitude is never dominant
    keep = torch.where(com.to(dominant.device)[:, None, None], dominant, ~dominant)
    if dc is not None:
        keep[:, height // 2, width // 2] = dc == "keep"
    return keep.to(torch.float32)
