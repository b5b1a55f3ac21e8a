"""Frequency corruption of the encoder input (MFM_SPEC.md §2): the public functional and module."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from . import _validate as V
from . import reference
from ._common import IMAGENET_MEAN, IMAGENET_STD
from .dispatch import backend_unavailable_reason, check_backend_name, choose_backend, log_fallback_once
from .masks import disc_band, make_masks
from .torch_backend.corrupt import corrupt as _corrupt_torch

def _triton_corrupt_module():
    """kernels.corrupt, imported on first use (it imports triton, and TRITON_INTERPRET must be set first)."""
    import kernels.corrupt
    return kernels.corrupt


def corrupt(x: torch.Tensor, mask: torch.Tensor, *, mean: Sequence[float] = IMAGENET_MEAN,
            std: Sequence[float] = IMAGENET_STD, out_dtype: Optional[torch.dtype] = None,
            backend: str = "auto", mask_band: Optional[int] = None, precision: str = "tf32x3") -> torch.Tensor:
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
        mask_band: optional promise R >= 1 that every mask equals its corner value mask[n, 0, 0]
            outside the centred box |ky|, |kx| < R (true for MFM disc masks with r2 beyond the
            grid's half-diagonal and R = ceil(r1); :class:`FrequencyCorruption` passes it). The
            Triton backend then touches only that band of the spectrum: one launch at the memory
            floor. Other backends are exact for any mask and ignore it. It is not verified (that
            would cost a host sync) unless value checks are on (:func:`mfm_fast.set_value_checks`).
        precision: GEMM precision of the Triton backend: "tf32x3" (default, fp32-accurate: within
            1e-5 of the fp64 reference), "ieee" (fp32 FMA), or the fast modes "tf32" / "bf16"
            (operands rounded to 10 / 7 mantissa bits). Other backends ignore it.

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
    V.check_choice("precision", precision, V.PRECISIONS)
    band = V.check_mask_band(mask_band, mask) or 0
    name = choose_backend(backend, "corrupt", x.device)
    if name == "triton" and x.dtype == torch.float64:
        log_fallback_once("corrupt", "triton", "torch", "float64 images are computed in float64 by the torch backend")
        name = "torch"
    if name == "reference":
        return reference.corrupt(x, mask, mean, std, out_dtype)
    if name == "cuda":
        from . import cuda_backend

        if x.dtype == torch.float64 or out_dtype == torch.float64:
            log_fallback_once("corrupt", "cuda", "torch", "float64 is computed in float64 by the torch backend")
            return _corrupt_torch(x, mask, mean, std, out_dtype)
        why = backend_unavailable_reason("cuda", x.device.type, "corrupt", (channels, height, width))
        if why is not None:
            if backend == "cuda":
                raise RuntimeError(f"backend='cuda' for corrupt on {x.device.type}: {why}")
            log_fallback_once("corrupt", "cuda", "torch", why)
            return _corrupt_torch(x, mask, mean, std, out_dtype)
        return cuda_backend.corrupt(x, mask, mean, std, out_dtype)
    if name == "triton":
        kernels = _triton_corrupt_module()
        band = band if band and kernels.band_fits(band, height, width) else 0
        if band or backend == "triton":
            return kernels.corrupt(x, mask, mean, std, out_dtype, band, precision)
        log_fallback_once("corrupt", "triton", "torch", "masks without a mask_band promise take the general "
                          "DFT-as-GEMM path, which is slower than cuFFT (ask for backend='triton' to force it)")
    return _corrupt_torch(x, mask, mean, std, out_dtype)


class FrequencyCorruption(nn.Module):
    """Draw one MFM mask per image and corrupt the batch: ``inp, mask = FrequencyCorruption()(x)``.

    Args:
        r1, r2: the removed ring is r1^2 <= d^2 < r2^2 around DC (defaults 16 and 999: the disc
            of radius 16 is the low band). See :func:`mfm_fast.make_masks`.
        p_low: probability of a low-pass mask per image (0.5 for ViT, 0.3 for ResNet-50).
        mean, std, out_dtype, backend, precision: as :func:`mfm_fast.corrupt`.
        The ``mask_band`` promise is passed for you when r2 lies beyond the grid's half-diagonal
        (every released config), so the Triton backend runs its one-launch band path.

    forward(x, low=None, generator=None) -> (inp (N, C, H, W), mask (N, H, W) float32, 1 = kept).
    Masks are drawn on x's device, so nothing syncs with the host.
    """

    def __init__(self, r1: float = 16, r2: float = 999, p_low: float = 0.5, *,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 out_dtype: Optional[torch.dtype] = None, backend: str = "auto", precision: str = "tf32x3"):
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
        self.precision = V.check_choice("precision", precision, V.PRECISIONS)

    def forward(self, x: torch.Tensor, low: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        V.check_images("x", x, V.PIXEL_DTYPES)
        n, _, height, width = x.shape
        mask = make_masks(n, height, width, self.r1, self.r2, self.p_low, low=low, generator=generator,
                          device=x.device)
        inp = corrupt(x, mask, mean=self.mean, std=self.std, out_dtype=self.out_dtype, backend=self.backend,
                      mask_band=disc_band(height, width, self.r1, self.r2), precision=self.precision)
        return inp, mask

    def extra_repr(self) -> str:
        return f"r1={self.r1:g}, r2={self.r2:g}, p_low={self.p_low:g}, backend={self.backend!r}"
