"""Torch backend for FOLK Com / RCom masks: one rfft2 of the grey image, the full symmetric |spectrum|
rebuilt from the half, a top-k threshold (the maths: :func:`mfm_fast.make_adaptive_masks`)."""

from __future__ import annotations

from typing import Optional

import torch

from ..._common import compute_dtype
from ..reference.adaptive_masks import grey, keep_count


def make_adaptive_masks(x: torch.Tensor, com: torch.Tensor, keep_ratio: float, magnitude: str,
                        dc: Optional[str]) -> torch.Tensor:
    """(N, H, W) float32 keep masks of x (N, C, H, W): Com where com (bool (N,)), else RCom; float32 math
    (float64 for float64 x)."""
    n, _, height, width = x.shape
    half = torch.fft.rfft2(grey(x, magnitude, compute_dtype(x))).abs()  # (N, H, W/2 + 1), unshifted
    neg = lambda a: torch.roll(torch.flip(a, dims=(-2,)), 1, dims=-2)  # a[(-ky) % H]  # noqa: E731
    sym = lambda a: (a + neg(a)) / 2  # noqa: E731
    c = width // 2  # columns 0 and W/2 hold both k and -k: symmetrise them; the others pair with the missing half
    half = torch.cat([sym(half[..., :1]), half[..., 1:c], sym(half[..., c:])], dim=-1)
    mag = torch.cat([half, neg(half[..., 1:c]).flip(-1)], dim=-1)  # (N, H, W), M(-k) = M(k) bit for bit
    k = keep_count(keep_ratio, height, width)
    thr = torch.topk(mag.reshape(n, -1), k, dim=1, sorted=False).values.amin(1)
    dominant = torch.fft.fftshift((mag >= thr[:, None, None]) & (mag > 0), dim=(-2, -1))
    keep = torch.where(com[:, None, None], dominant, ~dominant)
    if dc is not None:
        keep[:, height // 2, width // 2] = dc == "keep"
    return keep.to(torch.float32)
