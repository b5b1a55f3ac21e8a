"""The reference backend: a literal fp64 translation of MFM_SPEC.md, the oracle for every other backend.

It uses the full complex spectrum (fft2 + fftshift) exactly as the released MFM code does and
lets autograd differentiate it. Slow and memory-hungry on purpose: readable first.
"""

from .corrupt import corrupt
from .masked_freq_loss import masked_freq_loss

__all__ = ["corrupt", "masked_freq_loss"]
