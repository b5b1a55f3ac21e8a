"""Frequency corruption of the encoder input (MFM_SPEC.md §2): the public functional and module."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from . import _validate as V
from . import reference
from ._common import IMAGENET_MEAN, IMAGENET_STD
from .dispatch import check_backend_name, choose_backend
from .masks import make_masks
from .torch_backend.corrupt import corrupt as _corrupt_torch


def corrupt(x: torch.Tensor, mask: torch.Tensor, *, mean: Sequence[float] = IMAGENET_MEAN,
            std: Sequence[float] = IMAGENET_STD, out_dtype: Optional[torch.dtype] = None,
            backend: str = "auto") -> torch.Tensor:
    """The encoder input: normalise(clamp(real(ifft2(ifftshift(fftshift(fft2(x)) * mask))), 0, 1)).

    Args:
        x: (N, C, H, W) clean pixels in [0, 1]: float32 / float16 / bfloat16 / float64, or uint8
            (0..255, divided by 255). H and W even. Any strides (channels_last is fine).
        mask: (N, H, W) (or (N, 1, H, W)) fftshift-ed **keep** mask, 1 = kept, DC at
            (H // 2, W // 2), shared by the channels; float or bool. A mask that is not
            Hermitian acts through its symmetrised version (m(k) + m(-k)) / 2 ("real-part
            recovery"), exactly as taking the real part of the full inverse transform does.
        mean, std: per-channel normalisation applied after the clamp (ImageNet by default).
        out_dtype: dtype of the result; default x's dtype (float32 for uint8 x).
        backend: "auto" | "reference" | "torch" | "triton" | "cuda" (see mfm_fast.dispatch).

    Returns (N, C, H, W), contiguous. Not differentiable: the images are data (pass x.detach()).
    Math runs in float32 (float64 for float64 x on the torch backend; always float64 on the
    reference backend).
    """
    V.check_images("x", x, V.PIXEL_DTYPES)
    n, channels, height, width = x.shape
    mask = V.check_mask(mask, n, height, width, x.device)
    if out_dtype is None:
        out_dtype = x.dtype if x.is_floating_point() else torch.float32
    V.check_out_dtype(out_dtype)
    mean = V.channel_stats("mean", mean, channels)
    std = V.check_std("std", V.channel_stats("std", std, channels))
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError("x: corrupt is not differentiable with respect to the images; pass x.detach()")
    V.check_finite("x", x)
    name = choose_backend(backend, "corrupt", x.device)
    if name == "reference":
        return reference.corrupt(x, mask, mean, std, out_dtype)
    return _corrupt_torch(x, mask, mean, std, out_dtype)


class FrequencyCorruption(nn.Module):
    """Draw one MFM mask per image and corrupt the batch: ``inp, mask = FrequencyCorruption()(x)``.

    Args:
        r1, r2: the removed ring is r1^2 <= d^2 < r2^2 around DC (defaults 16 and 999: the disc
            of radius 16 is the low band). See :func:`mfm_fast.make_masks`.
        p_low: probability of a low-pass mask per image (0.5 for ViT, 0.3 for ResNet-50).
        mean, std, out_dtype, backend: as :func:`mfm_fast.corrupt`.

    forward(x, low=None, generator=None) -> (inp (N, C, H, W), mask (N, H, W) float32, 1 = kept).
    Masks are drawn on x's device, so nothing syncs with the host.
    """

    def __init__(self, r1: float = 16, r2: float = 999, p_low: float = 0.5, *,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 out_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
        super().__init__()
        self.r1 = V.check_number("r1", r1, low=0)
        self.r2 = V.check_number("r2", r2)
        if self.r2 <= self.r1:
            raise ValueError(f"r2: must be > r1 = {self.r1}, got {self.r2}")
        self.p_low = V.check_number("p_low", p_low, low=0.0, high=1.0)
        self.mean = tuple(V.channel_stats("mean", mean, None))
        self.std = tuple(V.check_std("std", V.channel_stats("std", std, None)))
        if out_dtype is not None:
            V.check_out_dtype(out_dtype)
        self.out_dtype = out_dtype
        self.backend = check_backend_name(backend)

    def forward(self, x: torch.Tensor, low: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        V.check_images("x", x, V.PIXEL_DTYPES)
        n, _, height, width = x.shape
        mask = make_masks(n, height, width, self.r1, self.r2, self.p_low, low=low, generator=generator,
                          device=x.device)
        inp = corrupt(x, mask, mean=self.mean, std=self.std, out_dtype=self.out_dtype, backend=self.backend)
        return inp, mask

    def extra_repr(self) -> str:
        return f"r1={self.r1:g}, r2={self.r2:g}, p_low={self.p_low:g}, backend={self.backend!r}"
