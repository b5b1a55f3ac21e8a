"""distance="magnitude_phase" of the masked spectral loss: torch backend against the fp64 reference and numpy."""

import logging
import math

import numpy as np
import pytest
import torch

import mfm_fast
from helpers import loss_and_grad, max_rel_err
from mfm_fast import dispatch

EPS = 1e-12
MP = dict(distance="magnitude_phase")
BACKENDS = ["reference", "torch"]


def _data(shape=(2, 3, 16, 24), dtype=torch.float64, pf=1):
    n, _, h, w = shape
    pred, target = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    mask = mfm_fast.make_masks(n, h // pf, w // pf, r1=2, low=torch.arange(n) % 2 == 0).repeat(1, pf, pf)
    return pred, target, mask



def _numpy_amplitude_loss(pred, target, mask, gamma):
    """phase_weight = 0 from |fft2| in numpy float64: d = ((|P|_e - |T|_e)^2 + eps)^(gamma / 2), masked mean."""
    def mag(z):
        f = np.fft.fftshift(np.fft.fft2(z, norm="ortho"), axes=(-2, -1))
        return np.sqrt(np.abs(f) ** 2 + EPS)

    d = ((mag(pred) - mag(target)) ** 2 + EPS) ** (gamma / 2)
    w = 1.0 - mask[:, None]
    return (w * d).sum() / (pred.shape[1] * w.sum())


# ------------------------------------------------------------ torch backend == fp64 reference

CASES = [
    dict(),
    dict(phase_weight=0.0),
    dict(phase_weight=0.3, loss_gamma=0.5),
    dict(phase_weight=2.0, patch_factor=2),
    dict(phase_weight=0.0, loss_gamma=0.5, patch_factor=2),
    dict(phase_weight=0.3, normalize_target=((0.1, 0.2, 0.3), (0.5, 2.0, 1.5)), loss_weight=0.5),
    dict(phase_weight=0.3, with_matrix=True, alpha=2.0, log_matrix=True),
    dict(phase_weight=2.0, with_matrix=True, batch_matrix=True, loss_gamma=0.5),
    dict(phase_weight=0.3, ave_spectrum=True),
    dict(phase_weight=0.0, ave_spectrum=True, patch_factor=2, with_matrix=True),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("reduction", ["masked", "mean", "sum", "none"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_torch_matches_reference(dtype, reduction, case):
    pred, target, mask = _data(pf=case.get("patch_factor", 1))
    if case.get("normalize_target"):
        target = torch.rand(pred.shape, dtype=torch.float64)
    pred, target = pred.to(dtype).double(), target.to(dtype).double()  # same inputs for both
    kw = dict(MP, reduction=reduction, **case)
    ref = loss_and_grad("reference", pred, target, mask, **kw, target_grad=True)
    out = loss_and_grad("torch", pred.to(dtype), target.to(dtype), mask, **kw, target_grad=True)
    assert out[0].dtype == dtype and out[0].shape == ref[0].shape
    assert out[1].dtype == dtype and out[2].dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert max_rel_err(out[0], ref[0]) <= tol
    if dtype == torch.float32 and case.get("phase_weight") == 0.0 and case.get("loss_gamma", 1.0) < 1:
        # amplitude-only, gamma < 1: d'(amp) ~ |amp|^(gamma - 1) is ill-conditioned where |P| ~ |T|; 1e-7
        # relative noise on the fp64 inputs already moves the reference gradient by ~4e-6 here.
        tol = 5e-5
    for actual, expected in zip(out[1:], ref[1:]):
        assert max_rel_err(actual, expected) <= tol


def test_no_mask_mean_with_ave_spectrum_is_one_map():
    pred, target, _ = _data()
    kw = dict(MP, reduction="none", ave_spectrum=True, phase_weight=0.3)
    ref = mfm_fast.masked_freq_loss(pred, target, None, backend="reference", **kw)
    out = mfm_fast.masked_freq_loss(pred, target, None, backend="torch", **kw)
    assert out.shape == ref.shape == (1, 3, 16, 24) and max_rel_err(out, ref) <= 1e-12
    kw["reduction"] = "mean"
    assert max_rel_err(mfm_fast.masked_freq_loss(pred, target, None, backend="torch", **kw), ref.mean()) <= 1e-12


def test_half_precision_pred_computes_in_fp32():
    pred, target, mask = _data(dtype=torch.float32)
    p = pred.bfloat16().requires_grad_(True)
    loss = mfm_fast.masked_freq_loss(p, target, mask, phase_weight=0.3, **MP)
    loss.backward()
    ref, ref_grad, _ = loss_and_grad("reference", p.detach().double(), target, mask, phase_weight=0.3, **MP, target_grad=True)
    assert loss.dtype == torch.float32 and p.grad.dtype == torch.bfloat16
    assert max_rel_err(loss, ref) <= 1e-5 and max_rel_err(p.grad, ref_grad) <= 1e-2  # grad rounded to bf16


def test_fp32_is_accurate_near_convergence():
    """pred = target + 1e-3 noise with a large DC: the literal formula in fp32 cancels terms of size |P|^2
    (relative error ~1e-4 here); the backend keeps fp32 rounding."""
    target = (torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 + 1).float()
    pred = target + 1e-3 * torch.randn(target.shape)
    for pw in (0.0, 0.3, 1.0):
        kw = dict(MP, reduction="mean", phase_weight=pw)
        ref = mfm_fast.masked_freq_loss(pred.double(), target.double(), None, backend="reference", **kw)
        assert max_rel_err(mfm_fast.masked_freq_loss(pred, target, None, backend="torch", **kw), ref) <= 1e-6


# ------------------------------------------------------------ gradcheck


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [dict(phase_weight=0.3), dict(phase_weight=2.0, loss_gamma=0.5, patch_factor=2),
                                dict(phase_weight=0.0, reduction="none"),
                                dict(phase_weight=1.0, ave_spectrum=True, loss_gamma=0.5)],
                         ids=["pw0.3", "pw2-g0.5-pf2", "pw0-none", "pw1-ave"])
def test_gradcheck(backend, kw):
    pred, target, mask = _data((2, 2, 8, 8), pf=kw.get("patch_factor", 1))
    pred.requires_grad_(True)
    target.requires_grad_(True)
    fn = lambda p, t: mfm_fast.masked_freq_loss(p, t, mask, backend=backend, **MP, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (pred, target), fast_mode=True)


# ------------------------------------------------------------ zero magnitudes


def _zero_spectrum_preds(shape):
    yy, xx = torch.meshgrid(torch.arange(shape[2]), torch.arange(shape[3]), indexing="ij")
    checker = ((yy + xx) % 2).double().expand(shape)  # spectrum zero except at DC and (H/2, W/2)
    return {"zeros": torch.zeros(shape, dtype=torch.float64), "constant": torch.full(shape, 0.7, dtype=torch.float64),
            "checker": checker.clone()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [1.0, 0.5])
@pytest.mark.parametrize("which", ["zeros", "constant", "checker", "equal", "both_zero"])
def test_gradient_is_finite_at_zero_magnitude(backend, gamma, which):
    _, target, mask = _data((2, 3, 16, 16))
    if which == "equal":
        pred = target.clone()
    elif which == "both_zero":
        pred, target = torch.zeros_like(target), torch.zeros_like(target)
    else:
        pred = _zero_spectrum_preds(target.shape)[which]
    for dtype in (torch.float64, torch.float32) if backend == "torch" else (torch.float64,):
        for pw in (0.0, 1.0, 2.0):
            loss, gp, gt = loss_and_grad(backend, pred.to(dtype), target.to(dtype), mask, loss_gamma=gamma,
                                         phase_weight=pw, **MP, target_grad=True)
            assert torch.isfinite(loss).all() and torch.isfinite(gp).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pw", [0.0, 0.3, 1.0])
def test_pred_equal_target(backend, pw):
    """P == T: amplitude term 0, phase term 2 pw (|P|_e^2 - |P|^2) = 2 pw eps, so d = ((1 + 2 pw) eps)^(1/2)."""
    pred, _, mask = _data()
    loss = mfm_fast.masked_freq_loss(pred, pred.clone(), mask, phase_weight=pw, backend=backend, **MP)
    assert loss.item() == pytest.approx(math.sqrt((1 + 2 * pw) * EPS), rel=1e-3)


# ------------------------------------------------------------ limits: complex distance, amplitude loss, phase


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [dict(), dict(loss_gamma=0.5, patch_factor=2), dict(reduction="none"),
                                dict(with_matrix=True, ave_spectrum=True)], ids=["default", "g0.5-pf2", "none", "focal-ave"])
def test_phase_weight_1_is_the_complex_distance(backend, kw):
    """q = |D|^2 + 2 eps: relative difference <= eps / |D|^2 ~ 1e-10 on random data, far inside rtol 1e-6."""
    pred, target, mask = _data(pf=kw.get("patch_factor", 1))
    complex_ = loss_and_grad(backend, pred, target, mask, **kw, target_grad=True)
    mag_phase = loss_and_grad(backend, pred, target, mask, phase_weight=1.0, **MP, **kw, target_grad=True)
    for actual, expected in zip(mag_phase, complex_):
        assert max_rel_err(actual, expected) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_phase_weight_0_is_the_numpy_amplitude_loss(backend, gamma):
    pred, target, mask = _data()
    expected = _numpy_amplitude_loss(pred.numpy(), target.numpy(), mask.double().numpy(), gamma)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        if dtype == torch.float32 and backend == "reference":
            continue
        loss = mfm_fast.masked_freq_loss(pred.to(dtype), target.to(dtype), mask, loss_gamma=gamma, phase_weight=0.0,
                                         backend=backend, **MP)
        assert loss.item() == pytest.approx(expected, rel=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_pure_phase_shift(backend, dtype):
    """A circular shift changes only the phase: ~0 loss (sqrt(eps) floor) at phase_weight 0, > 0 at 1."""
    pred, _, mask = _data((2, 3, 16, 16), dtype=dtype)
    target = torch.roll(pred, shifts=(3, 5), dims=(2, 3))
    kw = dict(MP, backend=backend, reduction="mean")
    amplitude_only = mfm_fast.masked_freq_loss(pred, target, mask, phase_weight=0.0, **kw)
    with_phase = mfm_fast.masked_freq_loss(pred, target, mask, phase_weight=1.0, **kw)
    complex_ = mfm_fast.masked_freq_loss(pred, target, mask, backend=backend, reduction="mean")
    assert amplitude_only.item() < 1e-5
    assert with_phase.item() > 0.5 and with_phase.item() == pytest.approx(complex_.item(), rel=1e-5)


# ------------------------------------------------------------ API: validation, module, fallback, compile


@pytest.mark.parametrize("kw, exc, name", [(dict(distance="foo"), ValueError, "distance"),
                                           (dict(distance=None), ValueError, "distance"),
                                           (dict(phase_weight=-1.0), ValueError, "phase_weight"),
                                           (dict(phase_weight=float("nan")), ValueError, "phase_weight"),
                                           (dict(phase_weight="x"), TypeError, "phase_weight"),
                                           (dict(phase_weight=True), TypeError, "phase_weight")])
def test_bad_options_name_the_argument(kw, exc, name):
    pred, target, mask = _data((1, 3, 8, 8))
    kw = dict(MP, **kw)
    with pytest.raises(exc, match=f"^{name}:"):
        mfm_fast.masked_freq_loss(pred, target, mask, **kw)
    with pytest.raises(exc, match=f"^{name}:"):
        mfm_fast.MaskedFreqLoss(**kw)


def test_module_form():
    pred, target, mask = _data()
    crit = mfm_fast.MaskedFreqLoss(loss_gamma=0.5, distance="magnitude_phase", phase_weight=0.3)
    assert "distance='magnitude_phase'" in repr(crit) and "phase_weight=0.3" in repr(crit)
    assert "distance='complex'" in repr(mfm_fast.MaskedFreqLoss())
    expected = mfm_fast.masked_freq_loss(pred, target, mask, loss_gamma=0.5, phase_weight=0.3, backend="reference",
                                         **MP)
    assert max_rel_err(crit(pred, target, mask), expected) <= 1e-12


_TRITON = mfm_fast.available_backends("cpu", "masked_freq_loss")["triton"]


@pytest.mark.skipif(torch.cuda.is_available() or _TRITON is not None, reason=f"triton on CPU: {_TRITON}")
def test_triton_backend_falls_back_to_torch(caplog):
    pred, target, mask = _data(dtype=torch.float32)
    dispatch._logged.clear()
    with caplog.at_level(logging.INFO, logger="mfm_fast"):
        out = mfm_fast.masked_freq_loss(pred, target, mask, backend="triton", phase_weight=0.3, **MP)
        mfm_fast.masked_freq_loss(pred, target, mask, backend="triton", phase_weight=0.3, **MP)
    assert torch.equal(out, mfm_fast.masked_freq_loss(pred, target, mask, backend="torch", phase_weight=0.3, **MP))
    messages = [r.getMessage() for r in caplog.records if "magnitude_phase" in r.getMessage()]
    assert len(messages) == 1 and "'triton'" in messages[0] and "'torch' backend" in messages[0]


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_compile_fullgraph():
    torch._dynamo.reset()
    pred, target, mask = _data(dtype=torch.float32)
    fn = lambda p, t, m: mfm_fast.masked_freq_loss(p, t, m, phase_weight=0.3, patch_factor=2, **MP)  # noqa: E731
    p0, p1 = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    eager = fn(p0, target, mask)
    eager.backward()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(p1, target, mask)
    compiled.backward()
    assert max_rel_err(compiled, eager) <= 1e-6 and max_rel_err(p1.grad, p0.grad) <= 1e-6
