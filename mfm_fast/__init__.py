"""mfm_fast: fast, exact Masked Frequency Modeling (MFM, ICLR 2023) and FOLK (ICLR 2025) for PyTorch.

Mask convention everywhere: an fftshift-ed **keep** mask (N, H, W), 1 = kept, DC at (H//2, W//2).
"""

from ._checkout import provide_kernels_package

provide_kernels_package()

from ._common import IMAGENET_MEAN, IMAGENET_STD
from ._validate import set_value_checks
from .adaptive_masks import make_adaptive_masks
from .corruption import FrequencyCorruption, corrupt
from .dispatch import available_backends
from .head import MFMHead, predict_image, tokens_to_map
from .loss import MaskedFreqLoss, masked_freq_loss
from .masks import base_mask, make_masks
from ._version import __version__

__all__ = [
    "BACKENDS", "FrequencyCorruption", "IMAGENET_MEAN", "IMAGENET_STD", "MFMHead", "MaskedFreqLoss",
    "available_backends", "base_mask", "corrupt", "make_adaptive_masks", "make_masks", "masked_freq_loss",
    "predict_image", "set_value_checks", "tokens_to_map", "__version__",
]


def __getattr__(name: str):
    """BACKENDS: the registered backends' names (mfm_fast.backends.names()), read when asked."""
    if name == "BACKENDS":
        from . import backends

        return backends.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
