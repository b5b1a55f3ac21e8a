"""docs/spec.md §2: frequency corruption, every backend against the fp64 reference."""

import numpy as np
import pytest
import torch

import mfm_fast
from helpers import SHAPES, masks_for, max_rel_err, numpy_corrupt

def symmetrised(mask: torch.Tensor) -> torch.Tensor:
    m = torch.fft.ifftshift(mask, dim=(-2, -1))
    m = 0.5 * (m + torch.roll(torch.flip(m, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1)))
    return torch.fft.fftshift(m, dim=(-2, -1))


@pytest.mark.parametrize("shape", SHAPES + [(2, 3, 224, 224)], ids=str)
def test_reference_matches_numpy_literal(shape):
    x = torch.rand(shape, dtype=torch.float64)
    m = masks_for(shape, r1=16 if shape[-1] == 224 else None)
    got = mfm_fast.corrupt(x, m, backend="reference")
    np.testing.assert_allclose(got.numpy(), numpy_corrupt(x.numpy(), m.double().numpy()), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES + [(2, 3, 224, 224)], ids=str)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
def test_torch_matches_reference(shape, dtype, tol):
    x = torch.rand(shape, dtype=dtype)
    m = masks_for(shape, r1=16 if shape[-1] == 224 else None)
    ref = mfm_fast.corrupt(x.double(), m, backend="reference")
    out = mfm_fast.corrupt(x, m, backend="torch")
    assert out.dtype == dtype and out.shape == shape
    assert max_rel_err(out, ref) <= tol


@pytest.mark.parametrize("kind", ["band", "non_hermitian", "soft", "bool"])
def test_any_mask_uses_real_part_recovery(kind):
    shape = (3, 3, 16, 24)
    x = torch.rand(shape)
    g = torch.Generator().manual_seed(3)
    if kind == "band":
        m = mfm_fast.make_masks(3, 16, 24, r1=2, r2=6, generator=g)
    elif kind == "non_hermitian":
        m = (torch.rand(3, 16, 24, generator=g) > 0.5).float()
    elif kind == "soft":
        m = torch.rand(3, 16, 24, generator=g)
    else:
        m = torch.rand(3, 16, 24, generator=g) > 0.3
    ref = mfm_fast.corrupt(x.double(), m, backend="reference")
    np.testing.assert_allclose(ref.numpy(), numpy_corrupt(x.double().numpy(), m.double().numpy()), atol=1e-12)
    # real part of the full inverse == using the symmetrised mask (m(k) + m(-k)) / 2
    via_sym = mfm_fast.corrupt(x.double(), symmetrised(m.double()), backend="reference")
    assert max_rel_err(via_sym, ref) < 1e-12
    assert max_rel_err(mfm_fast.corrupt(x, m, backend="torch"), ref) <= 1e-5


def test_rfft2_half_form_equals_full_grid_form():
    x = torch.rand(2, 3, 16, 24, dtype=torch.float64)
    m = masks_for(x.shape)  # Hermitian
    full = torch.fft.ifft2(torch.fft.ifftshift(torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1)) * m[:, None],
                                               dim=(-2, -1))).real
    half_mask = torch.fft.ifftshift(m.double(), dim=(-2, -1))[..., : 24 // 2 + 1]
    half = torch.fft.irfft2(torch.fft.rfft2(x) * half_mask[:, None], s=(16, 24))
    assert (full - half).abs().max() < 1e-13


def test_high_pass_clamp_zeros_about_half_the_pixels():
    x = torch.rand(4, 3, 64, 64)
    m = mfm_fast.make_masks(4, 64, 64, r1=8, low=torch.zeros(4, dtype=torch.bool))
    out = mfm_fast.corrupt(x, m).double()
    zero_level = torch.tensor([-a / b for a, b in zip(mfm_fast.IMAGENET_MEAN, mfm_fast.IMAGENET_STD)],
                              dtype=torch.float64).view(1, 3, 1, 1)
    frac = ((out - zero_level).abs() < 1e-6).double().mean().item()
    assert 0.3 < frac < 0.7, frac


def test_normalise_after_clamp_and_identity_mask():
    x = torch.rand(2, 3, 16, 16)
    mean = torch.tensor(mfm_fast.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(mfm_fast.IMAGENET_STD).view(1, 3, 1, 1)
    keep_all = torch.ones(2, 16, 16)
    for backend in ("reference", "torch"):
        out = mfm_fast.corrupt(x, keep_all, backend=backend)
        assert torch.allclose(out, (x - mean) / std, atol=1e-5)
        low = mfm_fast.corrupt(x * 3, masks_for(x.shape), backend=backend)  # values far outside [0, 1]
        assert (low >= (0 - mean) / std - 1e-6).all() and (low <= (1 - mean) / std + 1e-6).all()


@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(in_dtype, out_dtype):
    shape = (2, 3, 16, 24)
    pixels = torch.rand(shape)
    x = (pixels * 255).round().to(torch.uint8) if in_dtype == torch.uint8 else pixels.to(in_dtype)
    exact = x.double() / 255 if in_dtype == torch.uint8 else x.double()
    m = masks_for(shape)
    ref = mfm_fast.corrupt(exact, m, backend="reference")
    out = mfm_fast.corrupt(x, m, out_dtype=out_dtype)
    expected_dtype = out_dtype or (torch.float32 if in_dtype == torch.uint8 else in_dtype)
    assert out.dtype == expected_dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[expected_dtype]
    assert max_rel_err(out, ref) <= tol


def test_channels_last_and_batch_one():
    x = torch.rand(1, 3, 32, 32).to(memory_format=torch.channels_last)
    m = masks_for(x.shape)
    out = mfm_fast.corrupt(x, m)
    assert max_rel_err(out, mfm_fast.corrupt(x.contiguous().double(), m, backend="reference")) <= 1e-5


def test_frequency_corruption_module():
    fc = mfm_fast.FrequencyCorruption(r1=4, p_low=0.5)
    x = torch.rand(6, 3, 16, 16)
    inp, mask = fc(x, generator=torch.Generator().manual_seed(5))
    expected_mask = mfm_fast.make_masks(6, 16, 16, r1=4, p_low=0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(mask, expected_mask)
    assert torch.equal(inp, mfm_fast.corrupt(x, mask))
    forced, m2 = fc(x, low=torch.ones(6, dtype=torch.bool))
    assert torch.equal(m2, mfm_fast.make_masks(6, 16, 16, r1=4, low=torch.ones(6, dtype=torch.bool)))
    assert "r1=4" in repr(fc)
