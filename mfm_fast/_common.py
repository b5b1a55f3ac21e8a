"""Small helpers shared by every backend (reference, torch, kernels/, the CUDA extension) and the front-ends.

Low level: imports nothing from mfm_fast.
"""

from __future__ import annotations

import functools
import os

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def triton_interpreted() -> bool:
    """True when Triton kernels run under the interpreter (TRITON_INTERPRET=1, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will want a gradient for any of `tensors` (grad mode on and one requires grad)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@functools.lru_cache(maxsize=8)
def _imagenet_stats(device: torch.device, dtype: torch.dtype):
    """(1, 3, 1, 1) mean and std on the device, cached: no host-to-device copy (and sync) per call."""
    mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device, dtype=dtype).view(1, 3, 1, 1)
    return mean, std


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """(x - ImageNet mean) / std on (N, 3, H, W) pixels in [0, 1], in x's dtype."""
    mean, std = _imagenet_stats(x.device, x.dtype)
    return (x - mean) / std


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other input (fp32 / bf16 / fp16 / uint8) is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def to_unit_float(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Pixels as `dtype`; uint8 pixels (0..255) are mapped to [0, 1]."""
    if x.dtype == torch.uint8:
        return x.to(dtype) / 255.0
    return x.to(dtype)


def channel_view(values, like: torch.Tensor) -> torch.Tensor:
    """A per-channel list as a (1, C, 1, 1) tensor of like's dtype and device."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def to_blocks(z: torch.Tensor, pf: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, P, H/pf, W/pf): the pf x pf patches, row-major, P = pf^2.

    Also works on masks (N, H, W) -> (N, P, H/pf, W/pf)."""
    *lead, h, w = z.shape
    z = z.reshape(*lead, pf, h // pf, pf, w // pf).movedim(-3, -2)
    return z.reshape(*lead, pf * pf, h // pf, w // pf)


def from_blocks(z: torch.Tensor, pf: int) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: (..., P, h, w) -> (..., h * pf, w * pf)."""
    *lead, _, h, w = z.shape
    z = z.reshape(*lead, pf, pf, h, w).movedim(-2, -3)
    return z.reshape(*lead, pf * h, pf * w)
