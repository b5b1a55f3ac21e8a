"""The MFM prediction head (docs/spec.md §4): 1x1 conv to stride^2 * C channels, then PixelShuffle."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn


def _check_prefix_and_grid(num_prefix_tokens, grid_size) -> None:
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int):
        raise TypeError(f"num_prefix_tokens: expected an int, got {type(num_prefix_tokens).__name__}")
    if num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens: must be >= 0, got {num_prefix_tokens}")
    if grid_size is not None:
        if not isinstance(grid_size, (tuple, list)) or len(grid_size) != 2 or \
                not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in grid_size):
            raise ValueError(f"grid_size: expected a pair of positive ints (h, w), got {grid_size!r}")


def timm_stride(model: nn.Module) -> int:
    """Pixels per feature-map cell of a timm model: its patch size (ViTs), its last feature reduction (CNNs),
    else 32."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None:
        patch = patch_embed.patch_size
        return patch[0] if isinstance(patch, (tuple, list)) else int(patch)
    return model.feature_info[-1]["reduction"] if hasattr(model, "feature_info") else 32


def tokens_to_map(tokens: torch.Tensor, num_prefix_tokens: int = 1,
                  grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """ViT tokens (N, L, D) -> feature map (N, D, h, w), dropping the first `num_prefix_tokens` (CLS, registers).

    grid_size defaults to a square grid (L - prefix must then be a perfect square)."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens: expected a torch.Tensor (N, L, D), got {type(tokens).__name__}")
    if tokens.dim() != 3:
        raise ValueError(f"tokens: expected (N, L, D), got shape {tuple(tokens.shape)}")
    _check_prefix_and_grid(num_prefix_tokens, grid_size)
    if num_prefix_tokens >= tokens.shape[1]:
        raise ValueError(f"num_prefix_tokens: {num_prefix_tokens} leaves no patch tokens out of L = {tokens.shape[1]}")
    patches = tokens[:, num_prefix_tokens:]
    n, length, dim = patches.shape
    if grid_size is None:
        side = math.isqrt(length)
        if side * side != length:
            raise ValueError(f"tokens: {length} patch tokens do not form a square grid; pass grid_size=(h, w)")
        grid_size = (side, side)
    h, w = grid_size
    if h * w != length:
        raise ValueError(f"grid_size: {h} x {w} = {h * w} does not match the {length} patch tokens")
    return patches.transpose(1, 2).reshape(n, dim, h, w)


class MFMHead(nn.Module):
    """Linear pixel head: Conv2d(in_features -> stride^2 * out_chans, 1x1) + PixelShuffle(stride).

    forward(features) takes a CNN map (N, D, h, w) or ViT tokens (N, L, D) (prefix tokens are
    dropped, see ``num_prefix_tokens`` / ``grid_size``) and returns (N, out_chans, h*stride, w*stride).
    Use stride 16 for ViT-*/16 and 32 for ResNet-50.
    """

    def __init__(self, in_features: int, stride: int, out_chans: int = 3, num_prefix_tokens: int = 1,
                 grid_size: Optional[Tuple[int, int]] = None):
        super().__init__()
        for name, v in (("in_features", in_features), ("stride", stride), ("out_chans", out_chans)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name}: expected a positive int, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        _check_prefix_and_grid(num_prefix_tokens, grid_size)
        grid_size = tuple(grid_size) if grid_size is not None else None
        self.in_features, self.stride, self.out_chans = in_features, stride, out_chans
        self.num_prefix_tokens, self.grid_size = num_prefix_tokens, grid_size
        self.proj = nn.Conv2d(in_features, stride * stride * out_chans, kernel_size=1)
        self.shuffle = nn.PixelShuffle(stride)

    @classmethod
    def for_timm_model(cls, model: nn.Module, out_chans: int = 3) -> "MFMHead":
        """Build the head for a timm model: stride = patch size for ViTs, the feature reduction for CNNs."""
        stride = timm_stride(model)
        patch_embed = getattr(model, "patch_embed", None)
        if patch_embed is not None:
            return cls(model.num_features, stride, out_chans, getattr(model, "num_prefix_tokens", 1),
                       tuple(patch_embed.grid_size))
        return cls(model.num_features, stride, out_chans)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() == 3:
            features = tokens_to_map(features, self.num_prefix_tokens, self.grid_size)
        if features.dim() != 4 or features.shape[1] != self.in_features:
            raise ValueError(f"features: expected (N, {self.in_features}, h, w) or tokens (N, L, {self.in_features}), "
                             f"got shape {tuple(features.shape)}")
        return self.shuffle(self.proj(features))


def predict_image(model: nn.Module, head: MFMHead, inp: torch.Tensor) -> torch.Tensor:
    """model.forward_features(inp) -> head -> predicted image (N, out_chans, H, W)."""
    return head(model.forward_features(inp))
