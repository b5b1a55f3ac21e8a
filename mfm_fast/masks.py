"""MFM frequency masks (MFM_SPEC.md §1).

Convention used everywhere in mfm_fast: a mask is an fftshift-ed **keep** mask of shape
(N, H, W), float32, 1 = frequency kept (visible to the encoder), 0 = removed (to be predicted).
DC sits at (H // 2, W // 2). One mask per image, shared by its channels.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from . import _validate as V


@functools.lru_cache(maxsize=64)
def _base_mask_cached(height: int, width: int, r1: float, r2: float, device: torch.device) -> torch.Tensor:
    y = torch.arange(height, dtype=torch.float64) - height // 2
    x = torch.arange(width, dtype=torch.float64) - width // 2
    dist2 = y[:, None] ** 2 + x[None, :] ** 2
    ring = (r1 * r1 <= dist2) & (dist2 < r2 * r2)
    return (~ring).to(torch.float32).to(device)


def base_mask(height: int, width: int, r1: float = 16, r2: float = 999, device=None) -> torch.Tensor:
    """The low-pass keep mask B (H, W), float32: 0 where r1^2 <= (y-H//2)^2 + (x-W//2)^2 < r2^2, else 1.

    With the default r2 = 999 (no outer ring), B is 1 strictly inside the disc of radius r1.
    A finite r2 gives a band mask (the ring r1 <= d < r2 removed). The returned tensor is cached:
    do not modify it in place.
    """
    V.check_even_size(None, height, width)
    r1 = V.check_number("r1", r1, low=0)
    r2 = V.check_number("r2", r2)
    if r2 <= r1:
        raise ValueError(f"r2: must be > r1 = {r1}, got {r2}")
    return _base_mask_cached(height, width, r1, r2, torch.device(device) if device is not None else torch.device("cpu"))


def make_masks(n: int, height: int, width: int, r1: float = 16, r2: float = 999, p_low: float = 0.5, *,
               low: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
               device=None) -> torch.Tensor:
    """Draw one MFM keep mask per image: (N, H, W) float32, fftshift-ed, 1 = kept.

    Per image b ~ Bernoulli(p_low): b = 1 gives the low-pass mask m = B (keep the disc of
    radius r1, remove the rest), b = 0 the high-pass mask m = 1 - B (remove the disc, DC
    included). B is :func:`base_mask`. ``low`` (bool tensor (N,)) forces the choice instead of
    drawing it. The draw uses ``torch.rand`` on the mask's device (with ``generator`` if given,
    which must live on that device), so nothing syncs with the host.

    At 224 x 224 with r1 = 16 the disc holds 793 frequencies: a low-pass mask removes 49,383 of
    50,176, a high-pass mask removes 793. Every such mask is Hermitian (m(k) = m(-k)).
    """
    n = V.check_int("n", n, low=0)
    p_low = V.check_number("p_low", p_low, low=0.0, high=1.0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    if device is None:
        device = low.device if isinstance(low, torch.Tensor) else (generator.device if generator is not None else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    B = base_mask(height, width, r1, r2, device=device)
    if low is None:
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"generator: is on {generator.device} but the masks are drawn on {device}")
        low = torch.rand(n, generator=generator, device=device) < p_low
    else:
        if not isinstance(low, torch.Tensor) or low.dtype != torch.bool:
            raise TypeError(f"low: expected a bool tensor of shape ({n},), got "
                            f"{type(low).__name__ if not isinstance(low, torch.Tensor) else low.dtype}")
        if tuple(low.shape) != (n,):
            raise ValueError(f"low: expected shape ({n},), got {tuple(low.shape)}")
        if low.device != device:
            raise ValueError(f"low: is on {low.device} but device is {device}")
    return torch.where(low[:, None, None], B, 1.0 - B)


def disc_band(height: int, width: int, r1: float, r2: float) -> Optional[int]:
    """The ``mask_band`` promise for MFM masks of these radii, or None when there is none.

    When r2^2 exceeds the largest squared distance on the grid, (H/2)^2 + (W/2)^2, the ring
    r1^2 <= d^2 < r2^2 reaches every corner, so low- and high-pass masks differ from their corner
    value only inside the disc d^2 < r1^2, i.e. within |ky|, |kx| <= ceil(r1) - 1: the band
    R = max(1, ceil(r1)). A finite r2 inside the grid (band-pass) has no such band.
    """
    if r2 * r2 <= (height // 2) ** 2 + (width // 2) ** 2:
        return None
    return max(1, math.ceil(r1))
