"""Drop-in for the released MFM code: mfm_fast.compat.FrequencyLoss, integer / bool masks, the worked example.

Expected values come from numpy transcriptions of the released models/frequency_loss.py and models/mfm.py
(float64, independent of torch.fft), never from mfm_fast itself.
"""

import importlib.util
import itertools
import os
import re

import numpy as np
import pytest
import torch

import mfm_fast
from mfm_fast import compat
from mfm_fast.backends import cuda as cuda_backend
from mfm_fast import _validate as V
from helpers import ROOT, masks_for, max_rel_err, numpy_corrupt, numpy_loss

MEAN = np.array(mfm_fast.IMAGENET_MEAN)[None, :, None, None]
STD = np.array(mfm_fast.IMAGENET_STD)[None, :, None, None]


def numpy_frequency_loss(pred, target, loss_gamma=1.0, matrix_gamma=1.0, patch_factor=1, ave_spectrum=False,
                         with_matrix=False, log_matrix=False, batch_matrix=False, matrix=None):
    """The released FrequencyLoss.forward, line by line in numpy float64: the (N, P, C, h, w) map."""
    _, _, h, w = pred.shape
    ph, pw = h // patch_factor, w // patch_factor

    def tensor2freq(x):
        patches = [x[:, :, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw]
                   for i in range(patch_factor) for j in range(patch_factor)]
        freq = np.fft.fftshift(np.fft.fft2(np.stack(patches, 1), norm="ortho"), axes=(-2, -1))
        return np.stack([freq.real, freq.imag], -1)

    recon, real = tensor2freq(pred), tensor2freq(target)
    if ave_spectrum:
        recon, real = recon.mean(0, keepdims=True), real.mean(0, keepdims=True)
    tmp = (recon - real) ** 2
    loss = np.sqrt(tmp[..., 0] + tmp[..., 1] + 1e-12) ** loss_gamma
    if with_matrix:
        if matrix is not None:
            weight = matrix
        else:
            m = np.sqrt(tmp[..., 0] + tmp[..., 1]) ** matrix_gamma
            if log_matrix:
                m = np.log(m + 1.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                m = m / (m.max() if batch_matrix else m.max(-1).max(-1)[:, :, :, None, None])
            m[np.isnan(m)] = 0.0
            weight = np.clip(m, 0.0, 1.0)
        loss = weight * loss
    return loss


OPTIONS = ("ave_spectrum", "with_matrix", "log_matrix", "batch_matrix")
CASES = [dict(zip(OPTIONS, flags), patch_factor=pf, loss_gamma=lg, matrix_gamma=mg)
         for flags in itertools.product([False, True], repeat=4) for pf in (1, 2) for lg, mg in ((1.0, 1.0), (0.5, 2.0))]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
def test_frequency_loss_equals_the_released_map(case, dtype, tol):
    pred = torch.randn(3, 3, 16, 24, dtype=torch.float64)
    target = torch.randn(3, 3, 16, 24, dtype=torch.float64)
    expected = numpy_frequency_loss(pred.numpy(), target.numpy(), **case)
    got = compat.FrequencyLoss(**case)(pred.to(dtype), target.to(dtype))
    assert got.shape == expected.shape  # (N or 1, P, C, h, w)
    assert got.dtype == dtype
    assert max_rel_err(got, torch.from_numpy(expected)) <= tol


def test_frequency_loss_predefined_matrix_and_gradient():
    pred = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    matrix = torch.rand(2, 4, 3, 8, 8, dtype=torch.float64)
    got = compat.FrequencyLoss(with_matrix=True, patch_factor=2)(pred, target, matrix)
    expected = numpy_frequency_loss(pred.detach().numpy(), target.numpy(), with_matrix=True, patch_factor=2,
                                    matrix=matrix.numpy())
    assert max_rel_err(got, torch.from_numpy(expected)) <= 1e-10
    got.sum().backward()
    # the same map from the reference backend: autograd there is plain torch ops on the full grid
    p = pred.detach().clone().requires_grad_(True)
    compat.FrequencyLoss(with_matrix=True, patch_factor=2, backend="reference")(p, target, matrix).sum().backward()
    assert max_rel_err(pred.grad, p.grad) <= 1e-10


def test_frequency_loss_matrix_values_checked_under_value_checks():
    pred, target = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    loss = compat.FrequencyLoss(with_matrix=True)
    bad = torch.full((1, 1, 3, 8, 8), 2.0)
    loss(pred, target, bad)  # off by default: no host sync
    V.set_value_checks(True)
    try:
        with pytest.raises(ValueError, match=r"^matrix: the spectrum weight matrix must lie in \[0, 1\]"):
            loss(pred, target, bad)
    finally:
        V.set_value_checks(False)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 4, 3, 8, 8), (2, 4, 3, 8, 9), (16, 16)], ids=str)
def test_frequency_loss_matrix_of_the_wrong_shape_is_named(shape):
    """The map is (N, P, C, H/pf, W/pf) = (2, 4, 3, 8, 8); a matrix that does not broadcast with it is named."""
    pred, target = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    loss = compat.FrequencyLoss(with_matrix=True, patch_factor=2)
    with pytest.raises(ValueError, match=r"^matrix: .*" + re.escape(f"(2, 4, 3, 8, 8), got {shape}")):
        loss(pred, target, torch.rand(shape))


@pytest.mark.parametrize("shape", [(8, 8), (1, 4, 1, 8, 8), (3, 1, 1), (2, 4, 3, 8, 8)], ids=str)
def test_frequency_loss_matrix_broadcasts_like_the_released_code(shape):
    pred = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    target = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    matrix = torch.rand(shape, dtype=torch.float64)
    got = compat.FrequencyLoss(with_matrix=True, patch_factor=2)(pred, target, matrix)
    expected = numpy_frequency_loss(pred.numpy(), target.numpy(), with_matrix=True, patch_factor=2,
                                    matrix=matrix.numpy())
    assert max_rel_err(got, torch.from_numpy(expected)) <= 1e-10


def test_frequency_loss_matrix_on_another_device_is_named():
    pred, target = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"^matrix: is on meta but the images are on cpu"):
        compat.FrequencyLoss(with_matrix=True)(pred, target, torch.rand(1, 1, 3, 8, 8, device="meta"))


@pytest.mark.parametrize("low,high", [(-0.5, 0.5), (0.0, float("nan"))])
def test_frequency_loss_matrix_range_error_says_what_it_got(low, high):
    pred, target = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    matrix = torch.full((1, 1, 3, 8, 8), low)
    matrix[..., 0, 0] = high
    loss = compat.FrequencyLoss(with_matrix=True)
    V.set_value_checks(True)
    try:
        with pytest.raises(ValueError, match=r"^matrix: the spectrum weight matrix must lie in \[0, 1\].*got min"):
            loss(pred, target, matrix)
    finally:
        V.set_value_checks(False)


@pytest.mark.parametrize("pf", [1, 2])
def test_released_reduction_of_the_map_is_masked_freq_loss(pf):
    """MFM.forward's reductions of FrequencyLoss's map give masked_freq_loss (and the numpy transcription)."""
    pred = torch.randn(3, 3, 16, 24, dtype=torch.float64)
    target = torch.randn(3, 3, 16, 24, dtype=torch.float64)
    mask = mfm_fast.make_masks(3, 16 // pf, 24 // pf, r1=2, low=torch.tensor([True, False, True])).to(torch.int64)
    loss_recon = compat.FrequencyLoss(patch_factor=pf)(pred, target)
    w = (1 - mask)[:, None, None].double()  # per patch: (N, 1, 1, h, w)
    masked = (loss_recon * w).sum() / (1 - mask).sum() / 3 / loss_recon.shape[1]
    assert masked.item() == pytest.approx(float(numpy_loss(pred.numpy(), target.numpy(), mask.double().numpy(),
                                                           pf=pf)), rel=1e-10)
    assert masked.item() == pytest.approx(mfm_fast.masked_freq_loss(pred, target, mask, patch_factor=pf).item(),
                                          rel=1e-10)
    normal = loss_recon.mean()
    assert normal.item() == pytest.approx(mfm_fast.masked_freq_loss(pred, target, None, reduction="mean",
                                                                    patch_factor=pf).item(), rel=1e-10)


def test_frequency_loss_bad_arguments():
    with pytest.raises(ValueError, match=r"^loss_gamma: must be > 0"):
        compat.FrequencyLoss(loss_gamma=0)
    with pytest.raises(TypeError, match=r"^patch_factor: expected an int"):
        compat.FrequencyLoss(patch_factor=1.5)
    with pytest.raises(TypeError, match=r"^matrix: expected a torch.Tensor"):
        compat.FrequencyLoss(with_matrix=True)(torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8), [[1.0]])


# ---------------------------------------------------------------- integer and bool masks on every backend
MASK_DTYPES = [torch.int64, torch.int32, torch.uint8, torch.bool]
CPU_BACKENDS = ["reference", "torch", "triton"]


def _runnable(backend, op):
    why = mfm_fast.available_backends("cpu", op)[backend]
    if why is not None:
        pytest.skip(f"{backend} cannot run {op} on CPU tensors here: {why}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", MASK_DTYPES, ids=str)
def test_integer_and_bool_masks_give_the_float_mask_result(backend, dtype):
    _runnable(backend, "corrupt")
    shape = (2, 3, 16, 16)
    x = torch.rand(shape)
    m = masks_for(shape)  # float32 0 / 1
    mask = m.bool() if dtype == torch.bool else m.to(dtype)
    assert torch.equal(mfm_fast.corrupt(x, mask, backend=backend), mfm_fast.corrupt(x, m, backend=backend))
    pred = torch.randn(shape, requires_grad=True)
    target = torch.randn(shape)
    got = mfm_fast.MaskedFreqLoss(backend=backend)(pred, target, mask)
    (g_got,) = torch.autograd.grad(got, pred)
    want = mfm_fast.MaskedFreqLoss(backend=backend)(pred, target, m)
    (g_want,) = torch.autograd.grad(want, pred)
    assert torch.equal(got, want) and torch.equal(g_got, g_want)


@pytest.mark.parametrize("dtype", MASK_DTYPES, ids=str)
def test_integer_and_bool_masks_on_the_cuda_extension_host_kernels(dtype):
    """The cuda backend takes CUDA tensors; its CPU (host) kernels get the mask as check_mask hands it over."""
    why = cuda_backend.unavailable_reason()
    if why is not None:
        pytest.skip(f"the CUDA extension is not loaded: {why}")
    x = torch.rand(1, 3, 112, 112)
    m = masks_for(x.shape, r1=8)
    mask = V.check_mask(m.bool() if dtype == torch.bool else m.to(dtype), 1, 112, 112, x.device)
    mean, std = list(mfm_fast.IMAGENET_MEAN), list(mfm_fast.IMAGENET_STD)
    assert torch.equal(cuda_backend.corrupt(x, mask, mean, std, torch.float32),
                       cuda_backend.corrupt(x, m, mean, std, torch.float32))
    pred = torch.randn(1, 3, 112, 112)
    assert torch.equal(cuda_backend.masked_freq_loss(pred, x, mask, 1.0, "masked", 1.0, mean, std, False),
                       cuda_backend.masked_freq_loss(pred, x, m, 1.0, "masked", 1.0, mean, std, False))


def test_integer_masks_are_nonzero_kept_with_or_without_value_checks():
    """An integer 2 means kept (not a weight of 2), so value checks, which hold float masks to [0, 1], pass it."""
    x = torch.rand(1, 3, 8, 8)
    twos, ones = torch.full((1, 8, 8), 2, dtype=torch.int64), torch.ones(1, 8, 8)
    assert torch.equal(mfm_fast.corrupt(x, twos), mfm_fast.corrupt(x, ones))
    V.set_value_checks(True)
    try:
        assert torch.equal(mfm_fast.corrupt(x, twos), mfm_fast.corrupt(x, ones))
        assert torch.equal(mfm_fast.masked_freq_loss(x, x, twos, reduction="sum"),
                           mfm_fast.masked_freq_loss(x, x, ones, reduction="sum"))
        with pytest.raises(ValueError, match=r"^mask: values must lie in \[0, 1\]"):
            mfm_fast.corrupt(x, twos.float())
    finally:
        V.set_value_checks(False)


# ---------------------------------------------------------------- the worked example (examples/released_mfm_forward.py)
def _example():
    spec = importlib.util.spec_from_file_location("released_mfm_forward",
                                                  os.path.join(ROOT, "examples", "released_mfm_forward.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
def test_worked_example_equals_the_released_forward(dtype, tol):
    ex = _example()
    torch.manual_seed(1)
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    mask = ex.released_style_masks(4, 32, r1=5, low=torch.tensor([True, False, True, False]))
    assert mask.dtype == torch.int64
    encoder, decoder = ex.ToyEncoder(dtype), torch.nn.Conv2d(8, 3, 1, dtype=dtype)
    got = ex.mfm_forward(encoder, decoder, x.to(dtype), mask)

    # the released forward in numpy: frequency_transform + normalize_img, then the masked reduction of the map
    x_np, m_np = x.numpy(), mask.numpy().astype(np.float64)
    x_corrupted = numpy_corrupt(x_np, m_np)
    with torch.no_grad():
        x_rec = decoder(encoder(None, torch.from_numpy(x_corrupted).to(dtype))).double().numpy()
    loss_recon = numpy_frequency_loss(x_rec, (x_np - MEAN) / STD)
    w = (1 - m_np)[:, None, None]
    expected = (loss_recon * w).sum() / (1 - m_np).sum() / 3 / loss_recon.shape[1]
    assert got.item() == pytest.approx(expected, rel=tol)
    got.backward()  # the example trains: gradients reach the decoder
    assert decoder.weight.grad is not None and torch.isfinite(decoder.weight.grad).all()
