"""FOLK image-adaptive masks (docs/spec.md §6): Com keeps each image's dominant frequencies, RCom removes them.

Same convention as :mod:`mfm_fast.masks`: an fftshift-ed **keep** mask (N, H, W) float32, 1 = kept,
DC at (H // 2, W // 2), one mask per image shared by its channels.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _validate as V
from . import dispatch
from ._options import AdaptiveMaskOptions

MODES = ("mixed", "com", "rcom")
MAGNITUDES = ("mean", "luminance")


def make_adaptive_masks(x: torch.Tensor, mode: str = "mixed", keep_ratio: float = 0.01, *, p_com: float = 0.5,
                        com: Optional[torch.Tensor] = None, magnitude: str = "mean", dc: Optional[str] = None,
                        generator: Optional[torch.Generator] = None, backend: str = "auto") -> torch.Tensor:
    """FOLK Com / RCom keep masks chosen from each image's own spectrum: (N, H, W) float32, 1 = kept.

    Per image: g = the channel mean (magnitude="mean") or the Rec.601 luminance 0.299 R + 0.587 G +
    0.114 B (magnitude="luminance", C = 3); M = |fftshift(fft2(g))|, symmetrised bit-exactly as
    M_sym(k) = (M(k) + M(-k)) / 2; k = ceil(keep_ratio * H * W) in [1, H W] (float noise under 1e-6
    forgiven: 0.07 * 100 gives 7); thr = the k-th largest
    M_sym (a selection: torch.topk, radix select on CUDA, no full sort); dominant = M_sym >= thr
    (a cut-off, never an index list, so the set is Hermitian: dominant(k) = dominant(-k)).

    - "com": keep = dominant. It keeps k frequencies plus ties at thr: M_sym comes in equal pairs
      (k, -k) except at the 4 self-conjugate frequencies (DC, (0, W/2), (H/2, 0), (H/2, W/2)), so when
      no other values tie (generic images) it keeps k, or k + 1 when the k-th largest is the first of
      its pair (its partner ranks k + 1). Exactly equal magnitudes at thr are all kept. A magnitude of
      exactly 0 is never dominant, so an image with fewer than k nonzero magnitudes keeps only those: a
      constant image (only DC is nonzero) gives Com = DC alone and RCom = every frequency but DC.
    - "rcom": keep = not dominant (H W minus Com's count). Com + RCom = 1 everywhere for one image.
    - "mixed": per image Com with probability p_com, else RCom, drawn with torch.rand on x's device
      (``generator`` optional, on that device); ``com`` (bool tensor (N,)) forces the choice.

    keep_ratio in (0, 1) is Com's kept fraction: the FOLK paper's thresholds 0.005, 0.01, 0.05 read
    this way. DC is an ordinary frequency: for natural photos it is the largest, so Com keeps it and
    RCom removes it (RCom's input loses its mean before the clamp of :func:`mfm_fast.corrupt`).
    ``dc="keep"`` / ``"remove"`` forces DC into / out of every mask (then Com + RCom = 1 except at DC).

    Apply with ``inp = mfm_fast.corrupt(x, make_adaptive_masks(x, "mixed", 0.01))``.

    Args:
        x: (N, C, H, W) pixels in [0, 1] (float) or uint8 (0..255), any strides; H, W even.
        backend: "auto" | "reference" (float64, full sort) | "torch" (float32, float64 for float64 x;
            one rfft2 of g). "triton" / "cuda" do not implement this op (NotImplementedError).
    No host sync: the draw and the threshold stay on x's device (NaN / inf in x raise only with
    :func:`mfm_fast.set_value_checks` on, which syncs).
    """
    V.check_images("x", x, V.PIXEL_DTYPES)
    V.check_finite("x", x)
    n, channels, height, width = x.shape
    V.check_choice("mode", mode, MODES)
    keep_ratio = V.check_number("keep_ratio", keep_ratio, low=0.0, high=1.0, low_open=True, high_open=True)
    p_com = V.check_number("p_com", p_com, low=0.0, high=1.0)
    V.check_choice("magnitude", magnitude, MAGNITUDES)
    if magnitude == "luminance" and channels != 3:
        raise ValueError(f"magnitude: 'luminance' needs C = 3 channels (R, G, B), got C = {channels}; use 'mean'")
    if dc is not None:
        V.check_choice("dc", dc, ("keep", "remove"))
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != x.device.type:
            raise ValueError(f"generator: is on {generator.device} but the images are on {x.device}")
    if com is not None:
        if mode != "mixed":
            raise ValueError(f"com: forces the Com / RCom choice of mode='mixed'; mode={mode!r} already fixes it")
        if not isinstance(com, torch.Tensor) or com.dtype != torch.bool:
            got = com.dtype if isinstance(com, torch.Tensor) else type(com).__name__
            raise TypeError(f"com: expected a bool tensor of shape ({n},), got {got}")
        if tuple(com.shape) != (n,):
            raise ValueError(f"com: expected shape ({n},), got {tuple(com.shape)}")
        if com.device != x.device:
            raise ValueError(f"com: is on {com.device} but the images are on {x.device}")
    name = dispatch.choose_backend(backend, "adaptive_masks", x.device)  # before the draw: no input decides it
    if mode != "mixed":
        com = torch.full((n,), mode == "com", dtype=torch.bool, device=x.device)
    elif com is None:
        com = torch.rand(n, generator=generator, device=x.device) < p_com
    options = AdaptiveMaskOptions(keep_ratio=keep_ratio, magnitude=magnitude, dc=dc)
    return dispatch.backend_module(name).run("adaptive_masks", (x, com), options)
