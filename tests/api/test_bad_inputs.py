"""Bad inputs: every public entry point must fail fast with the right exception type and a message
that starts with (or names) the offending argument and says what was expected.

Each case is one test. Tensors are tiny ((2, 3, 8, 8)) so the whole battery runs in about a second.
A ``meta`` tensor stands in for "a tensor on another device" (this suite must run without a GPU):
the checks only look at metadata, so a meta tensor must be rejected by the same device check.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mfm_fast
from mfm_fast import (FrequencyCorruption, MaskedFreqLoss, MFMHead, base_mask, corrupt, make_masks,
                      masked_freq_loss, tokens_to_map)

N, C, H, W = 2, 3, 8, 8
META = torch.device("meta")


# ----------------------------------------------------------------------------------------------
# helpers: fresh tiny inputs for every call
# ----------------------------------------------------------------------------------------------

def img(n=N, c=C, h=H, w=W, dtype=torch.float32, device="cpu"):
    if dtype.is_floating_point:
        return torch.rand(n, c, h, w, dtype=dtype, device=device)
    if dtype == torch.bool:
        return torch.ones(n, c, h, w, dtype=dtype, device=device)
    return torch.randint(0, 255, (n, c, h, w), device=device).to(dtype)


def msk(n=N, h=H, w=W, device="cpu"):
    low = torch.arange(n) % 2 == 0
    return make_masks(n, h, w, r1=2, low=low).to(device)


def loss(pred=None, target=None, mask="default", **kw):
    pred = img() if pred is None else pred
    target = img() if target is None else target
    if isinstance(mask, str) and mask == "default":
        n, _, h, w = pred.shape if isinstance(pred, torch.Tensor) and pred.dim() == 4 else (N, C, H, W)
        mask = msk(n, h, w)
    return masked_freq_loss(pred, target, mask, **kw)


def corr(x=None, mask="default", **kw):
    x = img() if x is None else x
    if isinstance(mask, str) and mask == "default":
        n, _, h, w = x.shape if isinstance(x, torch.Tensor) and x.dim() == 4 else (N, C, H, W)
        mask = msk(n, h, w)
    return corrupt(x, mask, **kw)


def tokens(length, dim=4, n=N):
    return torch.randn(n, length, dim)


# ----------------------------------------------------------------------------------------------
# the battery: (id, call, exception type, regex searched in the message)
# ----------------------------------------------------------------------------------------------

CASES = [
    # --- wrong rank ---------------------------------------------------------------------------
    ("loss-pred-3d", lambda: loss(pred=torch.rand(C, H, W), mask=msk()), ValueError, r"^pred: expected a 4-D tensor"),
    ("loss-target-3d", lambda: loss(target=torch.rand(C, H, W)), ValueError, r"^target: expected a 4-D tensor"),
    ("corrupt-x-5d", lambda: corr(x=torch.rand(N, C, 1, H, W), mask=msk()), ValueError, r"^x: expected a 4-D tensor"),
    ("corrupt-x-3d", lambda: corr(x=torch.rand(C, H, W), mask=msk()), ValueError, r"^x: expected a 4-D tensor"),
    ("corrupt-mask-2d", lambda: corr(mask=torch.ones(H, W)), ValueError, r"^mask: expected shape"),
    ("loss-mask-2d", lambda: loss(mask=torch.ones(H, W)), ValueError, r"^mask: expected shape"),
    ("corrupt-mask-4d-3-channels", lambda: corr(mask=torch.ones(N, 3, H, W)), ValueError, r"^mask: expected shape"),
    ("FrequencyCorruption-x-3d", lambda: FrequencyCorruption(r1=2)(torch.rand(C, H, W)), ValueError,
     r"^x: expected a 4-D tensor"),

    # --- odd / too small sizes ----------------------------------------------------------------
    ("corrupt-x-odd-height", lambda: corr(x=img(h=7), mask=torch.ones(N, 7, W)), ValueError,
     r"^x: image height: must be even"),
    ("corrupt-x-odd-width", lambda: corr(x=img(w=9), mask=torch.ones(N, H, 9)), ValueError,
     r"^x: image width: must be even"),
    ("loss-pred-odd-height", lambda: loss(pred=img(h=7), target=img(h=7), mask=torch.ones(N, 7, W)), ValueError,
     r"^pred: image height: must be even"),
    ("loss-pred-odd-width", lambda: loss(pred=img(w=5), target=img(w=5), mask=torch.ones(N, H, 5)), ValueError,
     r"^pred: image width: must be even"),
    ("FrequencyCorruption-x-odd-width", lambda: FrequencyCorruption(r1=2)(img(w=7)), ValueError,
     r"^x: image width: must be even"),
    ("make_masks-odd-height", lambda: make_masks(N, 7, W), ValueError, r"^height: must be even"),
    ("make_masks-odd-width", lambda: make_masks(N, H, 9), ValueError, r"^width: must be even"),
    ("make_masks-height-0", lambda: make_masks(N, 0, W), ValueError, r"^height: must be even and >= 2"),
    ("make_masks-height-float", lambda: make_masks(N, 8.0, W), TypeError, r"^height: must be an int"),
    ("base_mask-odd-width", lambda: base_mask(H, 3), ValueError, r"^width: must be even"),

    # --- mismatched sizes ---------------------------------------------------------------------
    ("corrupt-mask-shape-vs-x", lambda: corr(mask=torch.ones(N, H, 2 * W)), ValueError, r"^mask: expected shape"),
    ("corrupt-mask-batch-vs-x", lambda: corr(mask=torch.ones(N + 1, H, W)), ValueError, r"^mask: expected shape"),
    ("loss-mask-shape-vs-pred", lambda: loss(mask=torch.ones(N, 2 * H, W)), ValueError, r"^mask: expected shape"),
    ("loss-target-shape-vs-pred", lambda: loss(target=img(h=2 * H)), ValueError,
     r"^target: shape .* does not match pred"),
    ("loss-target-batch-vs-pred", lambda: loss(target=img(n=N + 1)), ValueError,
     r"^target: shape .* does not match pred"),
    ("loss-target-channels-vs-pred", lambda: loss(target=img(c=1)), ValueError,
     r"^target: shape .* does not match pred"),

    # --- dtypes ---------------------------------------------------------------------------------
    ("corrupt-x-int64", lambda: corr(x=img(dtype=torch.int64)), TypeError, r"^x: dtype int64 is not supported"),
    ("corrupt-x-bool", lambda: corr(x=img(dtype=torch.bool)), TypeError, r"^x: dtype bool is not supported"),
    ("loss-pred-int32", lambda: loss(pred=img(dtype=torch.int32)), TypeError, r"^pred: dtype int32 is not supported"),
    ("loss-pred-uint8", lambda: loss(pred=img(dtype=torch.uint8)), TypeError, r"^pred: dtype uint8 is not supported"),
    ("loss-pred-bool", lambda: loss(pred=img(dtype=torch.bool)), TypeError, r"^pred: dtype bool is not supported"),
    ("loss-target-int64", lambda: loss(target=img(dtype=torch.int64)), TypeError,
     r"^target: dtype int64 is not supported"),
    ("loss-target-uint8-without-normalize_target", lambda: loss(target=img(dtype=torch.uint8)), TypeError,
     r"^target: dtype uint8 is not supported"),
    ("loss-target-int64-with-normalize_target", lambda: loss(target=img(dtype=torch.int64), normalize_target=True),
     TypeError, r"^target: dtype int64 is not supported"),
    ("loss-pred-complex64", lambda: loss(pred=torch.randn(N, C, H, W, dtype=torch.complex64)), TypeError,
     r"^pred: .*complex"),
    ("corrupt-mask-complex64", lambda: corr(mask=torch.ones(N, H, W, dtype=torch.complex64)), TypeError,
     r"^mask: dtype complex64 is not supported"),
    ("loss-mask-complex64", lambda: loss(mask=torch.ones(N, H, W, dtype=torch.complex64)), TypeError,
     r"^mask: dtype complex64 is not supported"),
    ("corrupt-mask-complex", lambda: corr(mask=torch.ones(N, H, W, dtype=torch.complex64)), TypeError,
     r"^mask: dtype complex64 is not supported"),
    ("corrupt-out_dtype-int32", lambda: corr(out_dtype=torch.int32), TypeError, r"^out_dtype: expected one of"),
    ("corrupt-out_dtype-uint8", lambda: corr(out_dtype=torch.uint8), TypeError, r"^out_dtype: expected one of"),
    ("corrupt-out_dtype-string", lambda: corr(out_dtype="float32"), TypeError, r"^out_dtype: expected one of"),

    # --- devices (meta emulates "another device") ---------------------------------------------
    ("corrupt-mask-on-other-device", lambda: corr(mask=torch.ones(N, H, W, device=META)), ValueError,
     r"^mask: is on meta but the images are on cpu"),
    ("corrupt-x-on-other-device-than-mask", lambda: corr(x=img(device=META), mask=torch.ones(N, H, W)), ValueError,
     r"^mask: is on cpu but the images are on meta"),
    ("loss-mask-on-other-device", lambda: loss(mask=torch.ones(N, H, W, device=META)), ValueError,
     r"^mask: is on meta but the images are on cpu"),
    ("loss-pred-meta-target-cpu", lambda: loss(pred=img(device=META)), ValueError,
     r"^target: is on cpu but pred is on meta"),
    ("loss-pred-cpu-target-meta", lambda: loss(target=img(device=META)), ValueError,
     r"^target: is on meta but pred is on cpu"),
    ("make_masks-low-on-other-device", lambda: make_masks(N, H, W, low=torch.ones(N, dtype=torch.bool, device=META),
                                                          device="cpu"), ValueError, r"^low: is on meta"),
    ("make_masks-generator-on-other-device", lambda: make_masks(N, H, W, generator=torch.Generator(), device=META),
     ValueError, r"^generator: is on cpu"),

    # --- empty batch / no channels ------------------------------------------------------------
    ("corrupt-empty-batch", lambda: corr(x=img(n=0), mask=torch.ones(0, H, W)), ValueError,
     r"^x: empty batch \(N = 0\)"),
    ("loss-empty-batch", lambda: loss(pred=img(n=0), target=img(n=0), mask=torch.ones(0, H, W)), ValueError,
     r"^pred: empty batch \(N = 0\)"),
    ("loss-empty-batch-mean-reduction", lambda: loss(pred=img(n=0), target=img(n=0), mask=None, reduction="mean"),
     ValueError, r"^pred: empty batch"),
    ("FrequencyCorruption-empty-batch", lambda: FrequencyCorruption(r1=2)(img(n=0)), ValueError, r"^x: empty batch"),
    ("loss-no-channels", lambda: loss(pred=img(c=0), target=img(c=0)), ValueError, r"^pred: no channels"),

    # --- non-tensor inputs --------------------------------------------------------------------
    ("corrupt-x-list", lambda: corr(x=img().tolist(), mask=msk()), TypeError,
     r"^x: expected a torch.Tensor .*got list"),
    ("corrupt-mask-numpy", lambda: corr(mask=msk().numpy()), TypeError,
     r"^mask: expected a torch.Tensor .*got ndarray"),
    ("loss-pred-numpy", lambda: loss(pred=img().numpy(), mask=msk()), TypeError,
     r"^pred: expected a torch.Tensor .*got ndarray"),
    ("loss-target-list", lambda: loss(target=img().tolist()), TypeError,
     r"^target: expected a torch.Tensor .*got list"),
    ("loss-mask-numpy", lambda: loss(mask=msk().numpy()), TypeError,
     r"^mask: expected a torch.Tensor .*got ndarray"),
    ("FrequencyCorruption-x-numpy", lambda: FrequencyCorruption(r1=2)(img().numpy()), TypeError,
     r"^x: expected a torch.Tensor"),
    ("tokens_to_map-tokens-list", lambda: tokens_to_map(tokens(17).tolist()), TypeError, r"^tokens: .*torch.Tensor"),

    # --- reduction / backend ------------------------------------------------------------------
    ("loss-reduction-unknown", lambda: loss(reduction="avg"), ValueError, r"^reduction: expected one of"),
    ("loss-reduction-None", lambda: loss(reduction=None), ValueError, r"^reduction: expected one of"),
    ("MaskedFreqLoss-reduction-unknown", lambda: MaskedFreqLoss(reduction="avg"), ValueError,
     r"^reduction: expected one of"),
    ("loss-reduction-masked-without-mask", lambda: loss(mask=None), ValueError,
     r"^mask: reduction='masked' needs"),
    ("MaskedFreqLoss-reduction-masked-without-mask", lambda: MaskedFreqLoss()(img(), img()), ValueError,
     r"^mask: reduction='masked' needs"),
    ("loss-backend-unknown", lambda: loss(backend="numpy"), ValueError, r"^backend: expected one of"),
    ("corrupt-backend-unknown", lambda: corr(backend="numpy"), ValueError, r"^backend: expected one of"),
    ("MaskedFreqLoss-backend-unknown", lambda: MaskedFreqLoss(backend="numpy"), ValueError,
     r"^backend: expected one of"),
    ("FrequencyCorruption-backend-unknown", lambda: FrequencyCorruption(backend="numpy"), ValueError,
     r"^backend: expected one of"),
    ("loss-backend-cuda", lambda: loss(backend="cuda"), RuntimeError, r"^backend='cuda' for \w+ on cpu: the CUDA ext"),
    ("corrupt-backend-cuda", lambda: corr(backend="cuda"), RuntimeError, r"^backend='cuda' for \w+ on cpu: the CUDA ext"),
    ("FrequencyCorruption-backend-cuda-forward", lambda: FrequencyCorruption(r1=2, backend="cuda")(img()),
     RuntimeError, r"^backend='cuda' for \w+ on cpu: the CUDA ext"),

    # --- radii / p_low / n / low --------------------------------------------------------------
    ("make_masks-r1-negative", lambda: make_masks(N, H, W, r1=-1), ValueError, r"^r1: must be >= 0"),
    ("make_masks-r1-nan", lambda: make_masks(N, H, W, r1=math.nan), ValueError, r"^r1: must be finite"),
    ("make_masks-r1-string", lambda: make_masks(N, H, W, r1="16"), TypeError, r"^r1: expected a real number"),
    ("make_masks-r1-equals-r2", lambda: make_masks(N, H, W, r1=3, r2=3), ValueError, r"^r2: must be > r1"),
    ("make_masks-r1-above-r2", lambda: make_masks(N, H, W, r1=4, r2=2), ValueError, r"^r2: must be > r1"),
    ("base_mask-r1-negative", lambda: base_mask(H, W, r1=-0.5), ValueError, r"^r1: must be >= 0"),
    ("FrequencyCorruption-r1-negative", lambda: FrequencyCorruption(r1=-1), ValueError, r"^r1: must be >= 0"),
    ("FrequencyCorruption-r1-above-r2", lambda: FrequencyCorruption(r1=5, r2=4), ValueError, r"^r2: must be > r1"),
    ("make_masks-p_low-above-1", lambda: make_masks(N, H, W, p_low=1.5), ValueError, r"^p_low: must be <= 1"),
    ("make_masks-p_low-negative", lambda: make_masks(N, H, W, p_low=-0.1), ValueError, r"^p_low: must be >= 0"),
    ("make_masks-p_low-nan", lambda: make_masks(N, H, W, p_low=math.nan), ValueError, r"^p_low: must be finite"),
    ("FrequencyCorruption-p_low-above-1", lambda: FrequencyCorruption(p_low=1.01), ValueError,
     r"^p_low: must be <= 1"),
    ("FrequencyCorruption-p_low-negative", lambda: FrequencyCorruption(p_low=-1), ValueError,
     r"^p_low: must be >= 0"),
    ("make_masks-n-negative", lambda: make_masks(-1, H, W), ValueError, r"^n: must be >= 0"),
    ("make_masks-n-float", lambda: make_masks(2.0, H, W), TypeError, r"^n: expected an int"),
    ("make_masks-low-int64", lambda: make_masks(N, H, W, low=torch.ones(N, dtype=torch.int64)), TypeError,
     r"^low: expected a bool tensor"),
    ("make_masks-low-list", lambda: make_masks(N, H, W, low=[True, False]), TypeError,
     r"^low: expected a bool tensor"),
    ("make_masks-low-wrong-shape", lambda: make_masks(N, H, W, low=torch.ones(N + 1, dtype=torch.bool)), ValueError,
     r"^low: expected shape \(2,\)"),
    ("make_masks-low-2d", lambda: make_masks(N, H, W, low=torch.ones(N, 1, dtype=torch.bool)), ValueError,
     r"^low: expected shape"),
    ("FrequencyCorruption-low-wrong-shape", lambda: FrequencyCorruption(r1=2)(img(), low=torch.ones(3, dtype=torch.bool)),
     ValueError, r"^low: expected shape"),
    ("make_masks-generator-not-generator", lambda: make_masks(N, H, W, generator=0), TypeError,
     r"^generator: expected a torch.Generator"),

    # --- loss options -------------------------------------------------------------------------
    ("loss-loss_gamma-zero", lambda: loss(loss_gamma=0), ValueError, r"^loss_gamma: must be > 0"),
    ("loss-loss_gamma-negative", lambda: loss(loss_gamma=-1.0), ValueError, r"^loss_gamma: must be > 0"),
    ("loss-loss_gamma-nan", lambda: loss(loss_gamma=math.nan), ValueError, r"^loss_gamma: must be finite"),
    ("loss-loss_gamma-string", lambda: loss(loss_gamma="1"), TypeError, r"^loss_gamma: expected a real number"),
    ("MaskedFreqLoss-loss_gamma-zero", lambda: MaskedFreqLoss(loss_gamma=0.0), ValueError,
     r"^loss_gamma: must be > 0"),
    ("loss-alpha-zero", lambda: loss(alpha=0.0, with_matrix=True), ValueError, r"^alpha: must be > 0"),
    ("loss-alpha-negative", lambda: loss(alpha=-2.0), ValueError, r"^alpha: must be > 0"),
    ("MaskedFreqLoss-alpha-zero", lambda: MaskedFreqLoss(alpha=0), ValueError, r"^alpha: must be > 0"),
    ("loss-patch_factor-zero", lambda: loss(patch_factor=0), ValueError, r"^patch_factor: must be >= 1"),
    ("loss-patch_factor-float", lambda: loss(patch_factor=2.0), TypeError, r"^patch_factor: expected an int"),
    ("loss-patch_factor-not-dividing-H", lambda: loss(patch_factor=3), ValueError, r"^patch_factor: 3 must divide"),
    ("loss-patch_factor-odd-patch-side", lambda: loss(pred=img(h=12, w=12), target=img(h=12, w=12),
                                                      mask=torch.ones(N, 12, 12), patch_factor=4),
     ValueError, r"^patch_factor: 4 gives 3 x 3 patches; patch sides must be even"),
    ("MaskedFreqLoss-patch_factor-zero", lambda: MaskedFreqLoss(patch_factor=0), ValueError,
     r"^patch_factor: must be >= 1"),
    ("loss-loss_weight-inf", lambda: loss(loss_weight=math.inf), ValueError, r"^loss_weight: must be finite"),
    ("loss-loss_weight-nan", lambda: loss(loss_weight=math.nan), ValueError, r"^loss_weight: must be finite"),
    ("MaskedFreqLoss-loss_weight-inf", lambda: MaskedFreqLoss(loss_weight=float("inf")), ValueError,
     r"^loss_weight: must be finite"),
    ("loss-mask-per-patch-wrong-patch-shape", lambda: loss(mask=torch.ones(N, 3, 3), patch_factor=2), ValueError,
     r"^mask: expected shape"),
    ("loss-mask-per-patch-without-patch_factor", lambda: loss(mask=torch.ones(N, H // 2, W // 2)), ValueError,
     r"^mask: expected shape"),

    # --- normalize_target ---------------------------------------------------------------------
    ("loss-normalize_target-length-1", lambda: loss(normalize_target=((0.5, 0.5, 0.5),)), ValueError,
     r"^normalize_target: expected None, True .* or a pair"),
    ("loss-normalize_target-length-3", lambda: loss(normalize_target=(0.5, 0.2, 0.1)), ValueError,
     r"^normalize_target: expected None, True .* or a pair"),
    ("loss-normalize_target-string", lambda: loss(normalize_target="imagenet"), ValueError,
     r"^normalize_target: expected"),
    ("loss-normalize_target-mean-wrong-length", lambda: loss(normalize_target=((0.5, 0.5), (0.2, 0.2, 0.2))),
     ValueError, r"^normalize_target mean: expected 1 or C = 3 values, got 2"),
    ("loss-normalize_target-std-wrong-length", lambda: loss(normalize_target=((0.5,) * 3, (0.2,) * 4)),
     ValueError, r"^normalize_target std: expected 1 or C = 3 values, got 4"),
    ("loss-normalize_target-std-zero", lambda: loss(normalize_target=((0.5,) * 3, (0.2, 0.0, 0.2))), ValueError,
     r"^normalize_target std\[1\]: must be > 0"),
    ("loss-normalize_target-std-nan", lambda: loss(normalize_target=((0.5,) * 3, (0.2, math.nan, 0.2))),
     ValueError, r"^normalize_target std\[1\]: must be finite"),
    ("MaskedFreqLoss-normalize_target-std-negative",
     lambda: MaskedFreqLoss(normalize_target=((0.5,) * 3, (-0.2,) * 3))(img(), img(), msk()), ValueError,
     r"^normalize_target std\[0\]: must be > 0"),

    # --- corrupt mean / std / x.requires_grad -------------------------------------------------
    ("corrupt-mean-wrong-length", lambda: corr(mean=(0.5, 0.5)), ValueError, r"^mean: expected 1 or C = 3 values, got 2"),
    ("corrupt-std-wrong-length", lambda: corr(std=(0.2,) * 4), ValueError, r"^std: expected 1 or C = 3 values, got 4"),
    ("corrupt-std-zero", lambda: corr(std=(0.2, 0.2, 0.0)), ValueError, r"^std\[2\]: must be > 0"),
    ("corrupt-std-negative-scalar", lambda: corr(std=-1.0), ValueError, r"^std\[0\]: must be > 0"),
    ("corrupt-mean-None", lambda: corr(mean=None), TypeError, r"^mean: expected a sequence of floats"),
    ("corrupt-mean-nan", lambda: corr(mean=(0.5, math.nan, 0.5)), ValueError, r"^mean\[1\]: must be finite"),
    ("corrupt-mean-strings", lambda: corr(mean=("a", "b", "c")), TypeError, r"^mean\[0\]: expected a real number"),
    ("FrequencyCorruption-mean-wrong-length-forward", lambda: FrequencyCorruption(r1=2, mean=(0.5, 0.5))(img()),
     ValueError, r"^mean: expected 1 or C = 3 values"),
    ("FrequencyCorruption-out_dtype-int-forward", lambda: FrequencyCorruption(r1=2, out_dtype=torch.int64)(img()),
     TypeError, r"^out_dtype: expected one of"),
    ("corrupt-x-requires-grad", lambda: corr(x=img().requires_grad_()), ValueError,
     r"^x: corrupt is not differentiable"),

    # --- head ---------------------------------------------------------------------------------
    ("MFMHead-in_features-zero", lambda: MFMHead(0, 16), ValueError, r"^in_features: expected a positive int"),
    ("MFMHead-stride-zero", lambda: MFMHead(8, 0), ValueError, r"^stride: expected a positive int"),
    ("MFMHead-out_chans-negative", lambda: MFMHead(8, 2, out_chans=-3), ValueError,
     r"^out_chans: expected a positive int"),
    ("MFMHead-num_prefix_tokens-negative", lambda: MFMHead(4, 2, num_prefix_tokens=-1), ValueError,
     r"^num_prefix_tokens: "),
    ("MFMHead-grid_size-one-element", lambda: MFMHead(4, 2, grid_size=(3,)), ValueError, r"^grid_size: "),
    ("MFMHead-tokens-not-square", lambda: MFMHead(4, 2)(tokens(1 + 15)), ValueError,
     r"^tokens: 15 patch tokens do not form a square grid"),
    ("MFMHead-tokens-wrong-dim", lambda: MFMHead(8, 2)(tokens(1 + 16, dim=4)), ValueError,
     r"^features: expected \(N, 8, h, w\)"),
    ("MFMHead-features-wrong-channels", lambda: MFMHead(8, 2)(torch.randn(N, 4, 3, 3)), ValueError,
     r"^features: expected \(N, 8, h, w\)"),
    ("MFMHead-features-2d", lambda: MFMHead(8, 2)(torch.randn(N, 8)), ValueError, r"^features: expected"),
    ("MFMHead-grid_size-mismatch", lambda: MFMHead(4, 2, grid_size=(3, 5))(tokens(1 + 16)), ValueError,
     r"^grid_size: 3 x 5 = 15 does not match the 16 patch tokens"),
    ("tokens_to_map-tokens-4d", lambda: tokens_to_map(torch.randn(N, 2, 2, 4)), ValueError,
     r"^tokens: expected \(N, L, D\)"),
    ("tokens_to_map-tokens-not-square", lambda: tokens_to_map(tokens(1 + 8)), ValueError,
     r"^tokens: 8 patch tokens do not form a square grid"),
    ("tokens_to_map-num_prefix_tokens-negative", lambda: tokens_to_map(tokens(5), num_prefix_tokens=-1), ValueError,
     r"^num_prefix_tokens: "),
    ("tokens_to_map-num_prefix_tokens-exceeds-length", lambda: tokens_to_map(tokens(5), num_prefix_tokens=9),
     ValueError, r"^(num_prefix_tokens|tokens): "),
]

_ids = [c[0] for c in CASES]
assert len(set(_ids)) == len(_ids), "duplicate case ids"


@pytest.mark.parametrize("call, exc, pattern", [c[1:] for c in CASES], ids=_ids)
def test_bad_input(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


# ----------------------------------------------------------------------------------------------
# MFM_FAST_BACKEND environment variable (overrides "auto" only)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["masked_freq_loss", "corrupt", "MaskedFreqLoss", "FrequencyCorruption"])
def test_env_backend_unknown(monkeypatch, op):
    monkeypatch.setenv("MFM_FAST_BACKEND", "numpy")
    call = {
        "masked_freq_loss": lambda: loss(),
        "corrupt": lambda: corr(),
        "MaskedFreqLoss": lambda: MaskedFreqLoss()(img(), img(), msk()),
        "FrequencyCorruption": lambda: FrequencyCorruption(r1=2)(img()),
    }[op]
    with pytest.raises(ValueError, match=r"^MFM_FAST_BACKEND: expected one of .*got 'numpy'"):
        call()


# ----------------------------------------------------------------------------------------------
# NaN / inf and mask values
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def value_checks():
    mfm_fast.set_value_checks(True)
    try:
        yield
    finally:
        mfm_fast.set_value_checks(False)


def _with_nan(t, value=math.nan):
    t = t.clone()
    t[0, 0, 1, 2] = value
    return t


@pytest.mark.parametrize("reduction", ["masked", "mean", "sum"])
def test_nan_in_pred_propagates_by_default(reduction):
    mask = msk() if reduction == "masked" else None
    out = masked_freq_loss(_with_nan(img()), img(), mask, reduction=reduction)
    assert torch.isnan(out)


def test_nan_in_x_propagates_by_default_in_corrupt():
    out = corrupt(_with_nan(img()), msk())
    assert torch.isnan(out).any()


VALUE_CASES = [
    ("loss-pred-nan", lambda: loss(pred=_with_nan(img())), r"^pred: holds NaN or inf"),
    ("loss-pred-inf", lambda: loss(pred=_with_nan(img(), -math.inf)), r"^pred: holds NaN or inf"),
    ("loss-target-inf", lambda: loss(target=_with_nan(img(), math.inf)), r"^target: holds NaN or inf"),
    ("loss-target-nan-normalize_target", lambda: loss(target=_with_nan(img()), normalize_target=True),
     r"^target: holds NaN or inf"),
    ("corrupt-x-nan", lambda: corr(x=_with_nan(img())), r"^x: holds NaN or inf"),
    ("corrupt-x-inf-float16", lambda: corr(x=_with_nan(img(dtype=torch.float16), math.inf)),
     r"^x: holds NaN or inf"),
    ("corrupt-mask-value-2", lambda: corr(mask=torch.full((N, H, W), 2.0)), r"^mask: values must lie in \[0, 1\]"),
    ("corrupt-mask-negative", lambda: corr(mask=-msk()), r"^mask: values must lie in \[0, 1\]"),
    ("loss-mask-value-2", lambda: loss(mask=torch.full((N, H, W), 2.0)), r"^mask: values must lie in \[0, 1\]"),
    ("loss-mask-nan", lambda: loss(mask=torch.full((N, H, W), math.nan)), r"^mask: values must lie in \[0, 1\]"),
]


@pytest.mark.parametrize("call, pattern", [c[1:] for c in VALUE_CASES], ids=[c[0] for c in VALUE_CASES])
def test_value_checks_raise(value_checks, call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_value_checks_restored_after_fixture():
    # runs after the value-check cases in file order: the fixture must have switched checks off again
    out = masked_freq_loss(_with_nan(img()), img(), msk())
    assert torch.isnan(out)


# ----------------------------------------------------------------------------------------------
# controls: the limits above are limits, not bans
# ----------------------------------------------------------------------------------------------

def test_control_uint8_target_allowed_with_normalize_target():
    out = masked_freq_loss(img(), img(dtype=torch.uint8), msk(), normalize_target=True)
    assert torch.isfinite(out)


def test_control_valid_inputs_pass():
    x = img()
    m = msk()
    assert corrupt(x, m).shape == x.shape
    assert corrupt(x, m[:, None]).shape == x.shape            # (N, 1, H, W) mask is accepted
    assert corrupt(x, m.bool()).shape == x.shape              # bool mask is accepted
    assert make_masks(0, H, W).shape == (0, H, W)             # n = 0 is fine for make_masks
    assert torch.isfinite(masked_freq_loss(img(), img(), m[:, :H // 2, :W // 2], patch_factor=2))  # per-patch mask
    assert MFMHead(4, 2)(tokens(1 + 16)).shape == (N, 3, 8, 8)
