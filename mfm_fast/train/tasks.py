"""The pre-training task on a batch, on the device: ``--task mfm`` masks frequencies (disc or FOLK's adaptive
masks) and scores the removed ones; sr / deblur / denoise degrade the image (the restoration baselines) and
score the whole spectrum. Corruptor turns a uint8 batch into (encoder input, loss target,
mask) and owns the loss."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import backends
from .._common import imagenet_normalize
from ..adaptive_masks import make_adaptive_masks
from ..corruption import FrequencyCorruption, corrupt
from ..loss import MaskedFreqLoss
from ..masks import disc_band, make_masks


def degrade(x: torch.Tensor, args, gen: torch.Generator) -> torch.Tensor:
    """Restoration input from clean x (N, 3, H, W) in [0, 1] (docs/spec.md §5; not normalised).

    sr: bicubic to (H/f, W/f), clamp, bicubic back, clamp. deblur: per image an isotropic Gaussian
    (sigma, kernel size drawn from --blur-sizes) with reflect-101 borders (cv2.filter2D's). denoise:
    x + N(0, (sigma / 255)^2) per pixel and channel, no clamp."""
    n, c, h, w = x.shape
    if args.task == "sr":
        f = args.sr_factor
        down = F.interpolate(x, size=(h // f, w // f), mode="bicubic", align_corners=False).clamp(0, 1)
        return F.interpolate(down, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    if args.task == "denoise":
        return x + torch.randn(x.shape, generator=gen, device=x.device) * (args.noise_sigma / 255.0)
    sizes = torch.tensor(args.blur_sizes, device=x.device)
    half = sizes[torch.randint(len(args.blur_sizes), (n,), generator=gen, device=x.device)] // 2  # (N,)
    k = max(args.blur_sizes) // 2
    r = torch.arange(-k, k + 1, device=x.device, dtype=x.dtype)
    gauss = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * args.blur_sigma ** 2))
    inside = (r.abs()[None, :, None] <= half[:, None, None]) & (r.abs()[None, None, :] <= half[:, None, None])
    kernel = gauss * inside
    kernel = (kernel / kernel.sum((1, 2), keepdim=True)).repeat_interleave(c, 0)[:, None]  # (N*C, 1, K, K)
    padded = F.pad(x.reshape(1, n * c, h, w), (k, k, k, k), mode="reflect")
    return F.conv2d(padded, kernel, groups=n * c).reshape(n, c, h, w)


class Corruptor:
    """uint8 batch (N, 3, S, S) on the device -> (encoder input, loss target, keep mask or None).

    Masks / blur sizes / noise come from a private generator on the device (seed), saved in checkpoints.
    mfm_fast pipeline: FrequencyCorruption straight from uint8 and the uint8 target normalised inside
    MaskedFreqLoss. official: the released code's op sequence (mfm_fast._official) on float pixels."""

    def __init__(self, args, device: torch.device, seed: int):
        self.args, self.device = args, device
        self.gen = torch.Generator(device).manual_seed(seed)
        self.official = args.pipeline == "official"
        self.adaptive = getattr(args, "mask", "disc") == "adaptive"  # (older checkpoints lack the new options)
        # the corruption's backend draws the adaptive masks where it implements them, else "auto" does
        asked = args.corrupt_backend
        self.mask_backend = asked if asked != "auto" and "adaptive_masks" in backends.get(asked).ops else "auto"
        self.pf, self.bands = getattr(args, "mask_patch_factor", 1), getattr(args, "bands", None)
        radii = {"bands": self.bands} if self.bands is not None else {"r1": args.r1, "r2": args.r2}
        self.corruption = FrequencyCorruption(p_low=args.p_low if args.p_low is not None else 0.5,
                                              radius_jitter=getattr(args, "radius_jitter", 0.0),
                                              patch_factor=self.pf, backend=args.corrupt_backend, **radii)
        mfm = args.task == "mfm"
        distance = getattr(args, "distance", "complex")
        loss_options = {"distance": distance, "phase_weight": args.phase_weight} if distance != "complex" else {}
        self.criterion = MaskedFreqLoss(loss_gamma=args.loss_gamma, reduction="masked" if mfm else "mean",
                                        normalize_target=True, backend=args.loss_backend, patch_factor=self.pf,
                                        **loss_options)

    def __call__(self, x: torch.Tensor, low: Optional[torch.Tensor] = None):
        """x uint8 (N, 3, S, S) -> (encoder input, loss target, keep mask or None). For the masks, ``low`` (bool
        (N,)) forces low-pass (disc) or Com (adaptive) per image."""
        a = self.args
        if a.task == "mfm":
            n, _, h, w = x.shape
            if self.adaptive:
                com = low if a.adaptive_mode == "mixed" else None  # com / rcom modes fix the choice
                mask = make_adaptive_masks(x, a.adaptive_mode, a.keep_ratio, p_com=a.p_com, com=com,
                                           generator=self.gen, backend=self.mask_backend)
                return corrupt(x, mask, backend=a.corrupt_backend), x, mask
            if not self.official:
                inp, mask = self.corruption(x, low=low, generator=self.gen)
                return inp, x, mask
            mask = make_masks(n, h, w, a.r1, a.r2, self.corruption.p_low, low=low, generator=self.gen,
                              device=x.device)
            from .. import _official  # the released code's op sequence, only for --pipeline official

            x01 = x.float() / 255
            return _official.corrupt(x01, mask), x01, mask
        x01 = x.float() / 255
        return imagenet_normalize(degrade(x01, a, self.gen)), (x01 if self.official else x), None

    def labels(self, low: torch.Tensor) -> Optional[list]:
        """Picture row names for masks forced by ``low`` (bool (N,)); None: the picture's own low/high-pass guess."""
        a = self.args
        if a.task != "mfm":
            return None
        if self.adaptive:
            names = {"com": ["Com"], "rcom": ["RCom"]}.get(a.adaptive_mode) or ["Com", "RCom"]
            kinds = [names[0] if (len(names) == 1 or bool(b)) else names[1] for b in low.tolist()]
            return [f"{k}, keep_ratio {a.keep_ratio:g}" for k in kinds]
        if self.bands is None and self.pf == 1 and disc_band(a.img_size, a.img_size, a.r1, a.r2) is not None:
            return None  # MFM discs (the ring reaches the corners): low-pass keeps DC, high-pass removes it
        where = f" ({self.pf}x{self.pf} patches)" if self.pf > 1 else ""
        return [("rings removed" if bool(b) else "rings kept") + where for b in low.tolist()]

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.official:
            from .. import _official

            return _official.loss(pred, target, mask, self.args.loss_gamma)
        return self.criterion(pred, target, mask)

