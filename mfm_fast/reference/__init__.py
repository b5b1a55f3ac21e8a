"""The reference backend: a literal fp64 translation of MFM_SPEC.md, the oracle for every other backend.

It uses the full complex spectrum (fft2 + fftshift) exactly as the released MFM code does and
lets autograd differentiate it. Slow and memory-hungry on purpose: readable first.
"""

from .adaptive_masks import make_adaptive_masks
from .corrupt import corrupt
from .masked_freq_loss import masked_freq_loss
from .masks import base_mask, masks_from

__all__ = ["base_mask", "corrupt", "make_adaptive_masks", "masked_freq_loss", "masks_from"]
