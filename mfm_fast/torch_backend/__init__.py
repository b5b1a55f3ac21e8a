"""The torch backend: rfft2 half-spectrum ops registered with torch.library (CPU and CUDA)."""

from .corrupt import corrupt
from .masked_freq_loss import masked_freq_loss, masked_freq_loss_map

__all__ = ["corrupt", "masked_freq_loss", "masked_freq_loss_map"]
