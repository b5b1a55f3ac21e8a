"""API cases where a wrong result would be silent: double backward, a mask that requires grad,
fp32 inputs of large magnitude, radii that remove everything or nothing, adaptive masks of NaN or
constant images. Every expected value comes from the fp64 reference (autograd through fft2) or
from counting by hand, never from the backend under test.
"""

import math

import pytest
import torch

import mfm_fast
from mfm_fast import FrequencyCorruption, make_adaptive_masks, make_masks, masked_freq_loss
from mfm_fast.backends.torch_backend.masked_freq_loss import DoubleBackwardError, register_saved_grad_autograd

N, C, H, W = 2, 3, 8, 8


def _masks(n=N, h=H, w=W, r1=2):
    return make_masks(n, h, w, r1=r1, low=torch.arange(n) % 2 == 0)


# ---- double backward --------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("reduction,gamma,normalize", [("masked", 1.0, None), ("masked", 0.5, True),
                                                       ("mean", 1.5, None), ("sum", 1.0, None),
                                                       ("none", 0.7, None)])
def test_gradgradcheck_fp64(backend, reduction, gamma, normalize):
    torch.manual_seed(0)  # (2, 1, 4, 4): gradgradcheck differentiates numerically per input entry
    pred = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    target = torch.rand(2, 1, 4, 4, dtype=torch.float64, requires_grad=normalize is None)
    normalize = ((0.5,), (0.25,)) if normalize else None
    mask = _masks(h=4, w=4, r1=1).double() if reduction != "mean" else None

    def f(p, t):
        return masked_freq_loss(p, t, mask, reduction=reduction, loss_gamma=gamma, normalize_target=normalize,
                                backend=backend)
    assert torch.autograd.gradcheck(f, (pred, target))
    assert torch.autograd.gradgradcheck(f, (pred, target))


def _hvp(backend, pred, target, mask, v, **kw):
    loss = masked_freq_loss(pred, target, mask, backend=backend, **kw)
    (g,) = torch.autograd.grad(loss, pred, create_graph=True)
    (h,) = torch.autograd.grad((g * v).sum(), pred)
    return g.detach(), h


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hessian_vector_product_matches_the_reference_fp32(backend):
    torch.manual_seed(1)
    pred, target = torch.randn(N, C, 16, 16), torch.rand(N, C, 16, 16)
    mask, v = _masks(h=16, w=16, r1=3), torch.randn(N, C, 16, 16)
    kw = dict(loss_gamma=0.5, normalize_target=True)
    g_ref, h_ref = _hvp("reference", pred.double().requires_grad_(), target.double(), mask, v.double(), **kw)
    g, h = _hvp(backend, pred.clone().requires_grad_(), target, mask, v, **kw)
    assert h.abs().max() > 0  # the second derivative is not a silent zero
    assert (g.double() - g_ref).norm() / g_ref.norm() < 1e-5
    assert (h.double() - h_ref).norm() / h_ref.norm() < 1e-5


def test_a_backend_without_recomputation_raises_on_double_backward():
    @torch.library.custom_op("mfm_fast_test::saved_grad_square", mutates_args=())
    def square(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (pred - target).square().sum(), 2 * (pred - target)

    register_saved_grad_autograd(square)  # no target_std argument: the target gradient is -grad
    pred = torch.randn(4, requires_grad=True)
    loss, _ = square(pred, torch.zeros(4), torch.zeros(4))
    (g,) = torch.autograd.grad(loss, pred)  # first order still works
    assert torch.allclose(g, 2 * pred.detach())
    loss, _ = square(pred, torch.zeros(4), torch.zeros(4))
    with pytest.raises(DoubleBackwardError, match="double backward .*create_graph=True.* not supported"):
        torch.autograd.grad(loss, pred, create_graph=True)


# ---- a mask that requires grad ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_mask_requiring_grad_raises(backend):
    mask = _masks().requires_grad_()
    with pytest.raises(ValueError, match=r"^mask: requires grad.*mask.detach\(\)"):
        masked_freq_loss(torch.randn(N, C, H, W), torch.rand(N, C, H, W), mask, backend=backend)
    with torch.no_grad():  # no graph, nothing to ignore: allowed
        assert torch.isfinite(masked_freq_loss(torch.randn(N, C, H, W), torch.rand(N, C, H, W), mask))


# ---- large magnitudes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_large_magnitude_fp32_matches_the_fp64_reference(backend, gamma):
    torch.manual_seed(2)
    pred = torch.randn(N, C, 16, 16) * 1e19  # |D|^2 ~ 1e38 and more: past fp32's 3.4e38 if squared
    target, mask = torch.rand(N, C, 16, 16), _masks(h=16, w=16, r1=3)
    p64 = pred.double().requires_grad_()
    ref = masked_freq_loss(p64, target.double(), mask, loss_gamma=gamma, backend="reference")
    ref.backward()
    p32 = pred.clone().requires_grad_()
    out = masked_freq_loss(p32, target, mask, loss_gamma=gamma, backend=backend)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(p32.grad).all()
    assert abs(float(out.detach()) - float(ref.detach())) / float(ref.detach()) < 1e-5
    assert (p32.grad.double() - p64.grad).norm() / p64.grad.norm() < 1e-5


def test_large_magnitude_with_the_focal_matrix_and_map_torch():
    torch.manual_seed(3)
    pred, target, mask = torch.randn(N, C, H, W) * 1e19, torch.rand(N, C, H, W), _masks()
    for kw in (dict(with_matrix=True), dict(reduction="none")):
        ref = masked_freq_loss(pred.double(), target.double(), mask, backend="reference", **kw)
        out = masked_freq_loss(pred, target, mask, backend="torch", **kw)
        assert torch.isfinite(out).all()
        assert ((out.double() - ref).norm() / ref.norm()) < 1e-5



@pytest.mark.parametrize("gamma", [1.0, 0.5])
@pytest.mark.parametrize("with_matrix", [False, True])
def test_large_magnitude_magnitude_phase_distance_matches_the_fp64_reference(gamma, with_matrix):
    torch.manual_seed(4)
    pred, target, mask = torch.randn(N, C, H, W) * 1e19, torch.rand(N, C, H, W) * 1e19, _masks()
    kw = dict(distance="magnitude_phase", phase_weight=0.5, loss_gamma=gamma, with_matrix=with_matrix)
    p64 = pred.double().requires_grad_()
    ref = masked_freq_loss(p64, target.double(), mask, backend="reference", **kw)
    ref.backward()
    p32 = pred.clone().requires_grad_()
    out = masked_freq_loss(p32, target, mask, backend="torch", **kw)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(p32.grad).all()
    assert abs(float(out.detach()) - float(ref.detach())) / float(ref.detach()) < 1e-5
    assert (p32.grad.double() - p64.grad).norm() / p64.grad.norm() < 1e-5

# ---- radii that remove everything or nothing ------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda: make_masks(2, 32, 32, r1=40),                      # the disc covers the grid: nothing removed
    lambda: make_masks(2, 32, 32, r1=0),                       # the ring is the whole grid
    lambda: make_masks(2, 32, 32, r1=23),                      # just past the corner distance sqrt(512) = 22.6
    lambda: make_masks(2, 64, 64, r1=30, patch_factor=2),      # radii in patch units: 32 x 32 tiles
    lambda: FrequencyCorruption(r1=50)(torch.rand(2, 3, 32, 32)),
], ids=["r1-past-grid", "r1-zero", "r1-just-past-corner", "patch-tiles", "FrequencyCorruption"])
def test_degenerate_r1_raises_naming_r1(call):
    with pytest.raises(ValueError, match=r"^r1: .*removes (no|every) frequency of the 32 x 32 spectrum"):
        call()


def test_degenerate_bands_raise_naming_bands_and_limits_are_limits():
    with pytest.raises(ValueError, match=r"^bands: \(30, 40\) removes no frequency"):
        make_masks(2, 32, 32, bands=[(30, 40)])
    m = make_masks(2, 32, 32, r1=22.5, low=torch.tensor([True, False]))  # d^2 >= 506.25: the corner (0, 0) alone
    assert (1 - m[0]).sum() == 1 and m[1].sum() == 1  # (d^2 = 16^2 + 16^2 = 512, the largest)
    assert make_masks(2, 32, 32, r1=0, r2=5).shape == (2, 32, 32)  # a band around DC is fine


# ---- adaptive masks ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_adaptive_masks_honour_value_checks(backend):
    x = torch.rand(2, 3, 16, 16)
    x[1, 0, 3, 4] = math.nan
    make_adaptive_masks(x, "com", 0.05, backend=backend)  # off by default: no sync, no error
    mfm_fast.set_value_checks(True)
    try:
        with pytest.raises(ValueError, match=r"^x: holds NaN or inf"):
            make_adaptive_masks(x, "com", 0.05, backend=backend)
    finally:
        mfm_fast.set_value_checks(False)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_constant_image_com_keeps_dc_alone(backend, dtype):
    x = torch.full((2, 3, 16, 16), 0.4 * (255 if dtype == torch.uint8 else 1)).to(dtype)
    com = make_adaptive_masks(x, "com", 0.05, backend=backend)
    rcom = make_adaptive_masks(x, "rcom", 0.05, backend=backend)
    dc = torch.zeros(16, 16)
    dc[8, 8] = 1  # the only nonzero magnitude of a constant image
    assert torch.equal(com, dc.expand(2, -1, -1)) and torch.equal(rcom, 1 - dc.expand(2, -1, -1))
    black = make_adaptive_masks(torch.zeros(1, 3, 16, 16), "com", 0.05, backend=backend)
    assert black.sum() == 0  # all magnitudes 0: nothing is dominant
