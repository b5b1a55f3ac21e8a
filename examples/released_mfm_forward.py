"""The released ``MFM.forward`` (models/mfm.py of Jiahao000/MFM) with its corruption and loss lines done by mfm_fast.

    python examples/released_mfm_forward.py      # a toy encoder / decoder on random pixels, both ways

The released lines, for FILTER_TYPE "mfm" and RECOVER_TARGET_TYPE "masked" (x: (N, 3, H, W) pixels in [0, 1],
mask: the data loader's (N, H, W) int64 0 / 1 keep mask)::

    mask = mask.unsqueeze(1)
    x_corrupted = self.frequency_transform(x, mask)
    x_corrupted = self.normalize_img(x_corrupted)
    x = self.normalize_img(x)
    z = self.encoder(x, x_corrupted)
    x_rec = self.decoder(z)
    loss_recon = self.criterion(x_rec, x)
    loss = (loss_recon * (1 - mask.unsqueeze(1))).sum() / (1 - mask).sum() / self.in_chans / loss_recon.shape[1]

become (:func:`mfm_forward` below)::

    x_corrupted = mfm_fast.corrupt(x, mask)            # fft2, mask, ifft2, clamp to [0, 1], ImageNet-normalise
    z = self.encoder(self.normalize_img(x), x_corrupted)
    x_rec = self.decoder(z)
    loss = mfm_fast.masked_freq_loss(x_rec, x, mask, normalize_target=True)   # the target: the raw pixels x

RECOVER_TARGET_TYPE "normal" (the restoration tasks): ``mfm_fast.masked_freq_loss(x_rec, x, None,
reduction="mean", normalize_target=True)``. To keep ``loss_recon`` and the released reduction instead, swap
only the criterion: ``self.criterion = mfm_fast.compat.FrequencyLoss(...)`` (same arguments, same map).
"""

import torch
from torch import nn

import mfm_fast
from mfm_fast import IMAGENET_MEAN, IMAGENET_STD


def normalize_img(x: torch.Tensor) -> torch.Tensor:
    """torchvision's T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), as the released MFM uses."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def mfm_forward(encoder, decoder, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MFM.forward for FILTER_TYPE "mfm", RECOVER_TARGET_TYPE "masked", with mfm_fast's corruption and loss."""
    x_corrupted = mfm_fast.corrupt(x, mask)
    z = encoder(normalize_img(x), x_corrupted)
    x_rec = decoder(z)
    return mfm_fast.masked_freq_loss(x_rec, x, mask, normalize_target=True)


class ToyEncoder(nn.Module):
    """Stands in for the released ViT / ResNet encoder: encoder(x, x_corrupted) sees the corrupted image."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, dtype=dtype)

    def forward(self, x, x_corrupted):
        return torch.tanh(self.conv(x_corrupted))


def released_style_masks(n: int, side: int, r1: float = 16, r2: float = 999, low=None) -> torch.Tensor:
    """(n, side, side) int64 keep masks as the released FreqMaskGenerator makes them: low-pass (the base mask,
    1 off the ring r1 <= d < r2) with probability SAMPLE_RATIO = 0.5, else high-pass (1 - base)."""
    mask = mfm_fast.base_mask(side, side, r1, r2).to(torch.int64)
    low = torch.rand(n) < 0.5 if low is None else low
    return torch.where(low[:, None, None], mask, 1 - mask)


if __name__ == "__main__":
    torch.manual_seed(0)
    x = torch.rand(4, 3, 64, 64)
    mask = released_style_masks(4, 64, r1=8)
    encoder, decoder = ToyEncoder(), nn.Conv2d(8, 3, 1)
    loss = mfm_forward(encoder, decoder, x, mask)
    loss.backward()
    print(f"loss {loss.item():.6f} (int64 masks {tuple(mask.shape)}), grad norm {decoder.weight.grad.norm():.4f}")
