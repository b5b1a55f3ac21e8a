"""Argument checks shared by every public entry point.

Every check here looks only at Python values and tensor metadata (shape, dtype, device),
never at tensor values, so none of them syncs with the GPU. Each error starts with the name
of the offending argument and says what was expected.

Value checks (NaN / inf, mask range) need a host sync and are opt-in: see
:func:`set_value_checks` and the ``MFM_FAST_CHECK_VALUES=1`` environment variable.
"""

from __future__ import annotations

import math
import os
from numbers import Real
from typing import Optional, Sequence

import torch

PRED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PIXEL_DTYPES = (torch.uint8,) + PRED_DTYPES
OUT_DTYPES = PRED_DTYPES

_value_checks = os.environ.get("MFM_FAST_CHECK_VALUES", "0") not in ("", "0", "false", "False")


def set_value_checks(enabled: bool) -> None:
    """Turn on (or off) the value checks that need a host sync.

    When on, :func:`mfm_fast.corrupt` and :func:`mfm_fast.masked_freq_loss` raise
    ``ValueError`` naming the argument if an input holds NaN or inf, or if a mask holds a value
    outside [0, 1]. When off (the default), NaN / inf propagate: one NaN pixel spreads over its
    whole image plane through the Fourier transform, so the loss becomes NaN. Also set by the
    environment variable ``MFM_FAST_CHECK_VALUES=1``. Skipped inside ``torch.compile``.
    """
    global _value_checks
    _value_checks = bool(enabled)


def value_checks_enabled() -> bool:
    return _value_checks and not torch.compiler.is_compiling()


def check_finite(name: str, t: torch.Tensor) -> None:
    if value_checks_enabled() and t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: holds NaN or inf values (value checks are on)")


def check_mask_values(name: str, mask: torch.Tensor) -> None:
    if value_checks_enabled() and mask.dtype != torch.bool:
        ok = torch.isfinite(mask).all() & (mask >= 0).all() & (mask <= 1).all()
        if not bool(ok):
            raise ValueError(f"{name}: values must lie in [0, 1] (1 = kept frequency)")


def check_tensor(name: str, t, ndim: int, dtypes: Sequence[torch.dtype], layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: dtype {str(t.dtype).replace('torch.', '')} is not supported; expected one of {names}")


def check_images(name: str, t, dtypes: Sequence[torch.dtype]) -> None:
    """A batch of images (N, C, H, W) with N >= 1 and even H, W >= 2."""
    check_tensor(name, t, 4, dtypes, "(N, C, H, W)")
    n, c, h, w = t.shape
    if n == 0:
        raise ValueError(f"{name}: empty batch (N = 0); expected at least one image")
    if c == 0:
        raise ValueError(f"{name}: no channels (C = 0)")
    check_even_size(f"{name}: image", h, w)


def check_even_size(what: str, height, width) -> None:
    """`what` = None names the arguments `height` / `width` themselves."""
    for axis, v in (("height", height), ("width", width)):
        name = axis if what is None else f"{what} {axis}"
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}: must be an int, got {type(v).__name__}")
        if v < 2 or v % 2:
            raise ValueError(f"{name}: must be even and >= 2, got {v} "
                             "(the fftshift-ed mask convention puts DC at H//2, W//2 and needs even sizes)")


def check_mask(mask, n: int, height: int, width: int, device: torch.device, name: str = "mask",
               also: str = "") -> torch.Tensor:
    """Return the mask as (N, H, W); accepts (N, H, W) or (N, 1, H, W), float, integer or bool. A float mask is a
    weight in [0, 1] per frequency (checked under value checks); an integer mask means nonzero = kept and comes back
    as the bool mask ``mask != 0`` (no host sync).

    `also` names another accepted shape in the error message."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor (N, H, W), got {type(mask).__name__}")
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() != 3:
        raise ValueError(f"{name}: expected shape (N, H, W) = ({n}, {height}, {width}) (or (N, 1, H, W)), "
                         f"got {tuple(mask.shape)}")
    if mask.is_complex():
        raise TypeError(f"{name}: dtype {str(mask.dtype).replace('torch.', '')} is not supported; "
                        "expected a real keep mask (1 = kept): floating-point, integer (nonzero = kept) or bool")
    if tuple(mask.shape) != (n, height, width):
        raise ValueError(f"{name}: expected shape (N, H, W) = ({n}, {height}, {width}){also}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name}: is on {mask.device} but the images are on {device}; move it with .to(device)")
    if mask.is_floating_point():
        check_mask_values(name, mask)
    elif mask.dtype != torch.bool:
        mask = mask != 0  # integer masks: nonzero = kept (0 / 1 as the released data loader's, 0 / 255 as images')
    return mask


def check_number(name: str, v, *, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, Real):
        raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name}: must be finite, got {v}")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name}: must be {'>' if low_open else '>='} {low}, got {v}")
    if high is not None and (v >= high if high_open else v > high):
        raise ValueError(f"{name}: must be {'<' if high_open else '<='} {high}, got {v}")
    return v


def check_int(name: str, v, *, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < low:
        raise ValueError(f"{name}: must be >= {low}, got {v}")
    return v


def check_choice(name: str, v, choices: Sequence[str]) -> str:
    if not isinstance(v, str) or v not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {v!r}")
    return v


def channel_stats(name: str, values, channels: Optional[int]) -> list:
    """Per-channel mean or std as a list of `channels` floats (a single value is broadcast; None: any count)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().reshape(-1).tolist()
    if isinstance(values, Real) and not isinstance(values, bool):
        values = [values]
    try:
        values = [check_number(f"{name}[{i}]", v) for i, v in enumerate(values)]
    except TypeError as e:
        if "expected a real number" in str(e):
            raise
        raise TypeError(f"{name}: expected a sequence of floats, got {type(values).__name__}") from None
    if channels is None:  # construction time: the channel count is not known yet
        return values
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"{name}: expected 1 or C = {channels} values, got {len(values)}")
    return values


def check_std(name: str, std: list) -> list:
    for i, s in enumerate(std):
        if s <= 0:
            raise ValueError(f"{name}[{i}]: must be > 0, got {s}")
    return std


def check_out_dtype(out_dtype) -> None:
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype: expected one of float32, float16, bfloat16, float64, got {out_dtype}")


PRECISIONS = ("tf32x3", "ieee", "tf32", "bf16")  # GEMM precisions of the DFT-as-GEMM (Triton) kernels


def check_mask_band(mask_band, mask: Optional[torch.Tensor], patch_factor: int = 1) -> Optional[int]:
    """Validate the ``mask_band`` promise R (None = no promise): every mask (each patch tile) equals its
    corner value outside the centred box |ky|, |kx| < R. Verified on the data only when value checks
    are on (a host sync)."""
    if mask_band is None:
        return None
    band = check_int("mask_band", mask_band, low=1)
    if mask is not None and value_checks_enabled():
        n, height, width = mask.shape
        h, w = height // patch_factor, width // patch_factor
        ky = (torch.arange(h, device=mask.device) - h // 2).abs()[:, None]
        kx = (torch.arange(w, device=mask.device) - w // 2).abs()[None, :]
        outside = ((ky >= band) | (kx >= band))[None, None, :, None, :]
        tiles = mask.reshape(n, patch_factor, h, patch_factor, w).to(torch.float32)
        if bool(((tiles != tiles[:, :, :1, :, :1]) & outside).any()):
            raise ValueError(f"mask_band: the mask is not constant outside the centred box |ky|, |kx| < {band}; "
                             "pass mask_band=None for arbitrary masks")
    return band
