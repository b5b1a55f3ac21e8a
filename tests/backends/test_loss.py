"""docs/spec.md §3: the masked spectral loss, every backend against the fp64 reference."""


import pytest
import torch

import mfm_fast
from helpers import SHAPES, loss_and_grad, masks_for, max_rel_err, numpy_loss

BACKENDS = ["reference", "torch"]



# ---------------------------------------------------------------- spec facts


@pytest.mark.parametrize("backend", BACKENDS)
def test_pred_equal_target_gives_1e6(backend):
    t = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    m = masks_for(t.shape)
    loss64 = mfm_fast.masked_freq_loss(t, t, m, backend=backend)
    assert loss64.dtype == torch.float64 and abs(loss64.item() - 1e-6) < 1e-18
    loss32 = mfm_fast.masked_freq_loss(t.float(), t.float(), m, backend=backend)
    assert loss32.dtype == torch.float32 and abs(loss32.item() - 1e-6) < 1e-11


@pytest.mark.parametrize("backend", BACKENDS)
def test_dc_entry_is_sqrt_hw_times_channel_mean(backend):
    p = torch.rand(2, 3, 16, 24, dtype=torch.float64) + 0.5
    loss_map = mfm_fast.masked_freq_loss(p, torch.zeros_like(p), None, reduction="none", backend=backend)
    assert loss_map.shape == p.shape
    dc = loss_map[:, :, 8, 12]
    expected = ((16 * 24) ** 0.5 * p.mean(dim=(2, 3))) ** 2 + 1e-12
    assert torch.allclose(dc, expected.sqrt(), rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_reduction_is_one_mean_over_the_batch(backend):
    pred = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    target = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    m = mfm_fast.make_masks(2, 224, 224, r1=16, low=torch.tensor([True, False]))
    w = 1 - m.double()
    assert w[0].sum() / w[1].sum() == pytest.approx(49383 / 793)  # a low-pass image brings 62x more terms
    loss_map = mfm_fast.masked_freq_loss(pred, target, m, reduction="none", backend=backend)
    per_image_sum = loss_map.sum(dim=(1, 2, 3))
    batch_level = per_image_sum.sum() / (3 * w.sum())
    mean_of_means = (per_image_sum / (3 * w.sum(dim=(1, 2)))).mean()
    loss = mfm_fast.masked_freq_loss(pred, target, m, backend=backend)
    assert loss.item() == pytest.approx(batch_level.item(), rel=1e-12)
    assert abs(loss.item() - mean_of_means.item()) > 1e-3 * loss.item()
    # the per-image recipe of the docstring
    for i in range(2):
        single = mfm_fast.masked_freq_loss(pred[i:i + 1], target[i:i + 1], m[i:i + 1], backend=backend)
        assert single.item() == pytest.approx((per_image_sum[i] / (3 * w[i].sum())).item(), rel=1e-12)


OPTION_CASES = [
    dict(),
    dict(gamma=2.0),
    dict(gamma=0.5),
    dict(reduction="mean"),
    dict(pf=2),
    dict(with_matrix=True),
    dict(with_matrix=True, alpha=2.0, log_matrix=True),
    dict(with_matrix=True, batch_matrix=True),
    dict(ave_spectrum=True),
    dict(ave_spectrum=True, with_matrix=True, pf=2, gamma=2.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", OPTION_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_matches_numpy_transcription_of_released_code(backend, case):
    pred = torch.randn(3, 3, 16, 24, dtype=torch.float64)
    target = torch.randn(3, 3, 16, 24, dtype=torch.float64)
    pf = case.get("pf", 1)
    m = mfm_fast.make_masks(3, 16 // pf, 24 // pf, r1=2, low=torch.tensor([True, False, True]))
    expected = numpy_loss(pred.numpy(), target.numpy(), m.double().numpy(), **case)
    kw = dict(loss_gamma=case.get("gamma", 1.0), reduction=case.get("reduction", "masked"), patch_factor=pf,
              with_matrix=case.get("with_matrix", False), alpha=case.get("alpha", 1.0),
              log_matrix=case.get("log_matrix", False), batch_matrix=case.get("batch_matrix", False),
              ave_spectrum=case.get("ave_spectrum", False))
    mask = None if kw["reduction"] == "mean" else m
    got = mfm_fast.masked_freq_loss(pred, target, mask, backend=backend, **kw)
    assert got.item() == pytest.approx(float(expected), rel=1e-10)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction,gamma", [("masked", 1.0), ("masked", 2.0), ("masked", 0.5), ("mean", 1.0),
                                             ("sum", 1.5), ("none", 1.0), ("none", 0.5)])
def test_gradcheck_fp64(backend, reduction, gamma):
    pred = torch.randn(2, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 2, 4, 6, dtype=torch.float64)
    m = (torch.rand(2, 4, 6) > 0.5).double()  # non-Hermitian on purpose
    f = lambda p: mfm_fast.masked_freq_loss(p, target, m, loss_gamma=gamma, reduction=reduction, backend=backend)
    assert torch.autograd.gradcheck(f, (pred,), eps=1e-6, atol=1e-7)


# (with_matrix is left out: the focal matrix is detached by design, so finite differences disagree)
@pytest.mark.parametrize("kw", [dict(loss_gamma=2.0, reduction="sum"), dict(ave_spectrum=True), dict(patch_factor=2),
                                dict(normalize_target=((0.1, 0.2), (0.5, 2.0)))], ids=str)
def test_gradcheck_fp64_options_torch_backend(kw):
    pred = torch.randn(3, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    target = torch.rand(3, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    m = masks_for(pred.shape if "patch_factor" not in kw else (3, 2, 4, 4), r1=1)
    f = lambda p, t: mfm_fast.masked_freq_loss(p, t, m, backend="torch", **kw)
    assert torch.autograd.gradcheck(f, (pred, target), eps=1e-6, atol=1e-7)


PARITY = [
    dict(),
    dict(loss_gamma=2.0),
    dict(loss_gamma=0.5),
    dict(reduction="mean"),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(normalize_target=True),
    dict(with_matrix=True),
    dict(with_matrix=True, log_matrix=True, batch_matrix=True, alpha=0.5),
    dict(ave_spectrum=True),
    dict(ave_spectrum=True, reduction="none"),
    dict(patch_factor=2),
    dict(patch_factor=2, reduction="none", loss_gamma=2.0),
    dict(loss_weight=0.25),
]


def _kw_id(kw):
    return ",".join(f"{a}={b}" for a, b in kw.items()) or "default"


# every option at the small shapes; the default loss and the "none" map also at 224 x 224 (fp32: CPU time)
PARITY_CASES = [(shape, kw, dt) for shape in SHAPES for kw in PARITY for dt in ("fp32", "fp64")] + \
    [((2, 3, 224, 224), kw, "fp32") for kw in (PARITY[0], PARITY[5])]


@pytest.mark.parametrize("shape,kw,dtype_name", PARITY_CASES,
                         ids=[f"{s}-{_kw_id(k)}-{d}" for s, k, d in PARITY_CASES])
def test_torch_matches_reference_forward_and_backward(shape, kw, dtype_name):
    dtype, tol = {"fp32": (torch.float32, 1e-5), "fp64": (torch.float64, 1e-10)}[dtype_name]
    pred = torch.randn(shape, dtype=dtype)
    target = torch.rand(shape, dtype=dtype) if kw.get("normalize_target") else torch.randn(shape, dtype=dtype)
    m = masks_for(shape, r1=16 if shape[-1] == 224 else None)
    ref_loss, ref_grad = loss_and_grad("reference", pred.double(), target.double(), m, **kw)
    loss, grad = loss_and_grad("torch", pred, target, m, **kw)
    assert loss.dtype == dtype and grad.dtype == dtype and grad.shape == shape
    assert max_rel_err(loss, ref_loss) <= tol
    assert max_rel_err(grad, ref_grad) <= tol


@pytest.mark.parametrize("low", ["all_low", "all_high"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_low_and_all_high_batches(low, backend):
    shape = (4, 3, 32, 32)
    flags = torch.full((4,), low == "all_low")
    m = mfm_fast.make_masks(4, 32, 32, r1=5, low=flags)
    pred, target = torch.randn(shape), torch.randn(shape)
    ref_loss, ref_grad = loss_and_grad("reference", pred.double(), target.double(), m)
    loss, grad = loss_and_grad(backend, pred, target, m)
    assert max_rel_err(loss, ref_loss) <= 1e-5 and max_rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("dtype,eps", [(torch.bfloat16, 2 ** -8), (torch.float16, 2 ** -11)], ids=["bf16", "fp16"])
def test_low_precision_pred(dtype, eps):
    shape = (2, 3, 16, 24)
    pred = torch.randn(shape).to(dtype)
    x = torch.rand(shape)
    m = masks_for(shape)
    ref_loss, ref_grad = loss_and_grad("reference", pred.double(), x.double(), m, normalize_target=True)
    loss, grad = loss_and_grad("torch", pred, x, m, normalize_target=True)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert max_rel_err(loss, ref_loss) <= 1e-5  # computed in fp32 from the same low-precision values
    # the gradient is exact up to one rounding to the low-precision type
    assert ((grad.double() - ref_grad).abs() <= eps * ref_grad.abs() + 1e-5 * ref_grad.abs().max()).all()


def test_autocast_bf16_prediction():
    conv = torch.nn.Conv2d(3, 3, 1)
    x = torch.rand(2, 3, 16, 16)
    m = masks_for(x.shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = conv(x)
        assert pred.dtype == torch.bfloat16
        loss = mfm_fast.MaskedFreqLoss(normalize_target=True)(pred, x, m)
    assert loss.dtype == torch.float32
    loss.backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_pred_and_grad_output_variants(backend):
    shape = (2, 3, 16, 16)
    pred0 = torch.randn(shape)
    target = torch.randn(shape)
    m = masks_for(shape)
    _, ref_grad = loss_and_grad("reference", pred0.double(), target.double(), m)

    pred = pred0.clone().to(memory_format=torch.channels_last).requires_grad_(True)
    (mfm_fast.masked_freq_loss(pred, target, m, backend=backend) * 3).backward()
    assert max_rel_err(pred.grad, 3 * ref_grad) <= 1e-5

    pred = pred0.clone().requires_grad_(True)
    mfm_fast.masked_freq_loss(pred, target, m, backend=backend).expand(4).sum().backward()  # expanded grad_output
    assert max_rel_err(pred.grad, 4 * ref_grad) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_none_reduction_with_non_contiguous_grad_map(backend):
    shape = (2, 3, 16, 24)
    pred0, target = torch.randn(shape), torch.randn(shape)
    m = (torch.rand(2, 16, 24) > 0.5).float()
    g = torch.randn(2, 3, 24, 16).transpose(-1, -2)  # non-contiguous grad_output
    assert not g.is_contiguous()
    p_ref = pred0.double().requires_grad_(True)
    mfm_fast.masked_freq_loss(p_ref, target.double(), m, reduction="none", backend="reference").backward(g.double())
    p = pred0.clone().requires_grad_(True)
    mfm_fast.masked_freq_loss(p, target, m, reduction="none", backend=backend).backward(g)
    assert max_rel_err(p.grad, p_ref.grad) <= 1e-5


@pytest.mark.parametrize("reduction", ["masked", "none"])
def test_target_gradient(reduction):
    shape = (2, 3, 16, 16)
    pred, x = torch.randn(shape), torch.rand(shape)
    m = masks_for(shape)
    grads = {}
    for backend in BACKENDS:
        dt = torch.float64 if backend == "reference" else torch.float32
        p = pred.to(dt).requires_grad_(True)
        t = x.to(dt).requires_grad_(True)
        out = mfm_fast.masked_freq_loss(p, t, m, reduction=reduction, normalize_target=True, backend=backend)
        out.sum().backward()
        grads[backend] = (p.grad, t.grad)
    assert max_rel_err(grads["torch"][1], grads["reference"][1]) <= 1e-5
    std = torch.tensor(mfm_fast.IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    assert max_rel_err(grads["reference"][1], -grads["reference"][0] / std) <= 1e-12


def test_deterministic_bitwise():
    shape = (4, 3, 32, 32)
    pred, target = torch.randn(shape), torch.randn(shape)
    m = masks_for(shape)
    l1, g1 = loss_and_grad("torch", pred, target, m)
    l2, g2 = loss_and_grad("torch", pred, target, m)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


def test_no_grad_and_module_equal_functional():
    shape = (2, 3, 16, 16)
    pred, target = torch.randn(shape), torch.randn(shape)
    m = masks_for(shape)
    crit = mfm_fast.MaskedFreqLoss(loss_gamma=2.0, with_matrix=True)
    with torch.no_grad():
        a = crit(pred, target, m)
    b = mfm_fast.masked_freq_loss(pred, target, m, loss_gamma=2.0, with_matrix=True)
    assert torch.equal(a, b) and not a.requires_grad
    assert "reduction='masked'" in repr(crit)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_mask_given_per_patch_equals_tiled(backend):
    shape = (2, 3, 16, 16)
    pred, target = torch.randn(shape), torch.randn(shape)
    per_patch = mfm_fast.make_masks(2, 8, 8, r1=2, low=torch.tensor([True, False]))
    a = mfm_fast.masked_freq_loss(pred, target, per_patch, patch_factor=2, backend=backend)
    b = mfm_fast.masked_freq_loss(pred, target, per_patch.repeat(1, 2, 2), patch_factor=2, backend=backend)
    assert torch.allclose(a, b, rtol=1e-6)


def test_all_kept_batch_gives_zero_not_nan():
    pred = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = mfm_fast.masked_freq_loss(pred, torch.randn(2, 3, 8, 8), torch.ones(2, 8, 8))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred))


def test_nan_propagates_by_default():
    pred = torch.randn(2, 3, 8, 8)
    pred[0, 0, 0, 0] = float("nan")
    loss = mfm_fast.masked_freq_loss(pred, torch.randn(2, 3, 8, 8), masks_for(pred.shape))
    assert torch.isnan(loss)
