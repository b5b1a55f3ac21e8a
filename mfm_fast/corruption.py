"""Frequency corruption of the encoder input (docs/spec.md §2): the public functional and module."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from . import _validate as V
from . import dispatch
from ._common import IMAGENET_MEAN, IMAGENET_STD, from_blocks, to_blocks
from ._options import CorruptOptions
from .dispatch import check_backend_name
from .masks import SHAPE_OPTIONS, check_patch_factor, check_rings, make_masks, mask_band_for


def corrupt(x: torch.Tensor, mask: torch.Tensor, *, mean: Sequence[float] = IMAGENET_MEAN,
            std: Sequence[float] = IMAGENET_STD, out_dtype: Optional[torch.dtype] = None,
            backend: str = "auto", mask_band: Optional[int] = None, precision: str = "tf32x3",
            patch_factor: int = 1) -> torch.Tensor:
    """The encoder input: normalise(clamp(real(ifft2(ifftshift(fftshift(fft2(x)) * mask))), 0, 1)).

    With patch_factor pf > 1 this is applied to each patch of the pf x pf grid on its own
    (fft2 of the (H/pf, W/pf) patch, times that patch's mask tile, real part of the inverse,
    clamp, normalise) and the patches are put back in place.

    Args:
        x: (N, C, H, W) clean pixels in [0, 1]: float32 / float16 / bfloat16 / float64, or uint8
            (0..255, divided by 255). H and W even. Any strides (channels_last is fine).
        mask: (N, H, W) (or (N, 1, H, W)) fftshift-ed **keep** mask, 1 = kept, DC at
            (H // 2, W // 2), shared by the channels; float (a weight in [0, 1]), integer (nonzero =
            kept: 0 / 1 and 0 / 255 alike) or bool. With patch_factor pf it is a
            pf x pf grid of (H/pf, W/pf) tiles, one per patch, DC at each tile's centre. A mask
            that is not Hermitian acts through its symmetrised version (m(k) + m(-k)) / 2
            ("real-part recovery"), exactly as taking the real part of the full inverse does.
        mean, std: per-channel normalisation applied after the clamp (ImageNet by default).
        out_dtype: dtype of the result; default x's dtype (float32 for uint8 x).
        backend: "auto" | "reference" | "torch" | "triton" | "cuda" (see mfm_fast.dispatch).
        mask_band: optional promise R >= 1 that every mask (every tile with patch_factor) equals its
            corner value outside the centred box |ky|, |kx| < R (true for MFM disc masks with r2
            beyond the grid's half-diagonal and R = ceil(r1): see :func:`mfm_fast.masks.mask_band_for`;
            :class:`FrequencyCorruption` passes it). The Triton backend then touches only that band
            of the spectrum (band coefficients per plane, then one streaming pass). Other backends are exact for any mask
            and ignore it. It is not verified (that would cost a host sync) unless value checks are
            on (:func:`mfm_fast.set_value_checks`).
        precision: GEMM precision of the Triton backend: "tf32x3" (default, fp32-accurate: within
            1e-5 of the fp64 reference), "ieee" (fp32 FMA), or the fast modes "tf32" / "bf16"
            (operands rounded to 10 / 7 mantissa bits). Other backends ignore it.
        patch_factor: pf >= 1 dividing H and W into even patch sides; every backend runs the
            N * pf^2 patches as a batch of (H/pf, W/pf) images.

    Returns (N, C, H, W), contiguous. Not differentiable: the images are data (pass x.detach()).
    Math runs in float32 (float64 for float64 x on the torch backend; always float64 on the
    reference backend).
    """
    V.check_images("x", x, V.PIXEL_DTYPES)
    n, channels, height, width = x.shape
    pf = check_patch_factor(patch_factor, height, width)
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
    options = CorruptOptions(mean=tuple(mean), std=tuple(std), out_dtype=out_dtype,
                             mask_band=V.check_mask_band(mask_band, mask, pf) or 0, precision=precision)
    if pf == 1:
        return dispatch.run("corrupt", backend, (x, mask), options)
    h, w = height // pf, width // pf
    patches = to_blocks(x, pf).movedim(2, 1).reshape(n * pf * pf, channels, h, w)  # (N P, C, h, w)
    out = dispatch.run("corrupt", backend, (patches, to_blocks(mask, pf).reshape(n * pf * pf, h, w)), options)
    return from_blocks(out.reshape(n, pf * pf, channels, h, w).movedim(1, 2), pf).contiguous()


class FrequencyCorruption(nn.Module):
    """Draw one MFM mask per image and corrupt the batch: ``inp, mask = FrequencyCorruption()(x)``.

    Args:
        r1, r2: the removed ring is r1^2 <= d^2 < r2^2 around DC (defaults 16 and 999: the disc
            of radius 16 is the low band). See :func:`mfm_fast.make_masks`.
        p_low: probability of a low-pass mask (m = B) per image or patch (0.5 for ViT, 0.3 for ResNet-50).
        bands: optional rings [(r1, r2), ...] replacing (r1, r2) (leave those at their defaults).
        radius_jitter: delta >= 0, every radius of every mask shifted by its own U(-delta, delta).
        patch_factor: pf >= 1, one mask tile and one corruption per patch of a pf x pf grid.
        mean, std, out_dtype, backend, precision: as :func:`mfm_fast.corrupt`.
        The ``mask_band`` promise (:meth:`mask_band`, i.e. :func:`mfm_fast.masks.mask_band_for` of the
        options the masks are drawn with) is passed for you when some ring reaches beyond the tile's
        half-diagonal (every released config), so the Triton backend runs its band path.

    forward(x, low=None, generator=None) -> (inp (N, C, H, W), mask (N, H, W) float32, 1 = kept).
    ``low``: (N,) or, with patch_factor, (N, pf, pf) bool. Masks are drawn on x's device, so nothing
    syncs with the host.
    """

    def __init__(self, r1: float = 16, r2: float = 999, p_low: float = 0.5, *,
                 bands: Optional[Sequence[Tuple[float, float]]] = None, radius_jitter: float = 0.0,
                 patch_factor: int = 1, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 out_dtype: Optional[torch.dtype] = None, backend: str = "auto", precision: str = "tf32x3"):
        super().__init__()
        rings = check_rings(r1, r2, bands)
        self.r1, self.r2 = (float(r1), float(r2)) if bands is not None else rings[0]
        self.bands = rings if bands is not None else None
        self.radius_jitter = V.check_number("radius_jitter", radius_jitter, low=0.0)
        self.patch_factor = V.check_int("patch_factor", patch_factor, low=1)
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
        mask = make_masks(n, height, width, p_low=self.p_low, low=low, generator=generator, device=x.device,
                          **self.mask_options())
        inp = corrupt(x, mask, mean=self.mean, std=self.std, out_dtype=self.out_dtype, backend=self.backend,
                      mask_band=self.mask_band(height, width), precision=self.precision,
                      patch_factor=self.patch_factor)
        return inp, mask

    def mask_options(self) -> dict:
        """The options of :func:`mfm_fast.make_masks` that shape this module's masks: one dict, for the draw
        and for its ``mask_band`` promise."""
        return dict(r1=self.r1, r2=self.r2, bands=self.bands, radius_jitter=self.radius_jitter,
                    patch_factor=self.patch_factor)

    def mask_band(self, height: int, width: int) -> Optional[int]:
        """The ``mask_band`` promise of this module's masks on (H, W) images: :func:`mfm_fast.masks.mask_band_for`
        of the very options they are drawn with, or None (no promise). An option that mask_band_for does not
        account for (not in masks.SHAPE_OPTIONS) also gives None: no promise rather than a guess."""
        options = self.mask_options()
        if not set(options) <= set(SHAPE_OPTIONS):
            return None
        return mask_band_for(height, width, **options)

    def extra_repr(self) -> str:
        rings = f"bands={list(self.bands)}" if self.bands is not None else f"r1={self.r1:g}, r2={self.r2:g}"
        extra = (f", radius_jitter={self.radius_jitter:g}" if self.radius_jitter else "") + \
                (f", patch_factor={self.patch_factor}" if self.patch_factor != 1 else "")
        return f"{rings}, p_low={self.p_low:g}{extra}, backend={self.backend!r}"
