"""Triton corruption (kernels/corrupt.py) against the fp64 reference.

On CPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py), so shapes stay small; the
GPU-marked tests at 224 x 224 run the compiled kernels."""

import logging

import pytest
import torch

import mfm_fast
from helpers import masks_for, max_rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(mfm_fast.available_backends(DEVICE, "corrupt")["triton"] is not None,
                                reason=f"triton cannot run here: {mfm_fast.available_backends(DEVICE, 'corrupt')['triton']}")
TOL = 1e-5


def _pixels(shape, dtype=torch.float32, device=DEVICE):
    x = torch.rand(shape, device=device)
    if dtype == torch.uint8:
        return (x * 255).round().to(torch.uint8)
    return x.to(dtype)


def _reference(x, mask, **kw):
    x64 = x.cpu().double() / 255.0 if x.dtype == torch.uint8 else x.cpu().double()
    return mfm_fast.corrupt(x64, mask.cpu(), backend="reference", **kw)


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (2, 3, 16, 24), (1, 3, 32, 48)], ids=str)
@pytest.mark.parametrize("r1", [1, 4, 7])
@pytest.mark.parametrize("band", [True, False], ids=["band", "general"])
def test_disc_masks_match_reference(shape, r1, band):
    n, _, h, w = shape
    x = _pixels(shape)
    mask = mfm_fast.make_masks(n, h, w, r1=r1, low=torch.arange(n) % 2 == 0, device=DEVICE)  # low and high
    out = mfm_fast.corrupt(x, mask, backend="triton", mask_band=r1 if band else None)
    assert out.shape == x.shape and out.dtype == torch.float32 and out.is_contiguous()
    assert max_rel_err(out.cpu(), _reference(x, mask)) <= TOL


@pytest.mark.parametrize("splits, block_rows", [(1, 16), (2, 16), (3, 16), (4, 32)])
def test_band_path_row_splits_and_tiles(splits, block_rows):
    """Phase 1 summed over several row ranges (phase 2 adds the partial spectra in a fixed order),
    on an image whose rows are not a multiple of the row block."""
    import mfm_fast.kernels.corrupt as kc
    x = _pixels((2, 3, 40, 48))
    mask = mfm_fast.make_masks(2, 40, 48, r1=5, low=torch.tensor([True, False]), device=DEVICE)
    out = torch.empty_like(x)
    stats = kc.channel_stats(tuple(mfm_fast.IMAGENET_MEAN), tuple(mfm_fast.IMAGENET_STD), x.device)
    kc.launch(x, mask, stats, out, 5, "tf32x3", block_rows=block_rows, block_cols=16, splits=splits)
    assert max_rel_err(out.cpu(), _reference(x, mask)) <= TOL


@pytest.mark.parametrize("low", [True, False], ids=["all-low", "all-high"])
def test_uniform_batches(low):
    x = _pixels((3, 3, 16, 16))
    mask = mfm_fast.make_masks(3, 16, 16, r1=4, low=torch.full((3,), low), device=DEVICE)
    out = mfm_fast.corrupt(x, mask, backend="triton", mask_band=4)
    assert max_rel_err(out.cpu(), _reference(x, mask)) <= TOL


def test_band_pass_and_random_non_hermitian_masks():
    x = _pixels((2, 3, 16, 24))
    ring = mfm_fast.make_masks(2, 16, 24, r1=3, r2=6, low=torch.tensor([True, False]), device=DEVICE)
    noise = torch.rand(2, 16, 24, device=DEVICE)          # not Hermitian, not binary
    binary = torch.rand(2, 16, 24, device=DEVICE) > 0.5   # bool mask
    for mask in (ring, noise, binary):
        out = mfm_fast.corrupt(x, mask, backend="triton")
        assert max_rel_err(out.cpu(), _reference(x, mask)) <= TOL


def test_four_dim_mask_and_batch_one():
    x = _pixels((1, 3, 16, 16))
    mask = masks_for(x.shape).to(DEVICE)
    out = mfm_fast.corrupt(x, mask[:, None], backend="triton", mask_band=None)
    assert max_rel_err(out.cpu(), _reference(x, mask)) <= TOL


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8],
                         ids=["fp32", "fp16", "bf16", "uint8"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_every_dtype_pair(in_dtype, out_dtype):
    x = _pixels((2, 3, 16, 16), in_dtype)
    mask = masks_for(x.shape, r1=4).to(DEVICE)
    ref = _reference(x, mask)
    out = mfm_fast.corrupt(x, mask, out_dtype=out_dtype, backend="triton", mask_band=4)
    assert out.dtype == out_dtype
    if out_dtype == torch.float32:
        assert max_rel_err(out.cpu(), ref) <= TOL
    else:  # flash-attn rule: at most twice the torch backend's error at the same output dtype
        torch_out = mfm_fast.corrupt(x, mask, out_dtype=out_dtype, backend="torch")
        assert max_rel_err(out.cpu(), ref) <= 2 * max_rel_err(torch_out.cpu(), ref) + 1e-6


def test_channels_last_and_strided_input():
    x = _pixels((2, 3, 16, 24))
    mask = masks_for(x.shape, r1=4).to(DEVICE)
    ref = _reference(x, mask)
    for xin in (x.to(memory_format=torch.channels_last), _pixels((2, 3, 16, 48))[..., ::2].copy_(x)):
        assert not xin.is_contiguous()
        for band in (4, None):
            out = mfm_fast.corrupt(xin, mask, backend="triton", mask_band=band)
            assert max_rel_err(out.cpu(), ref) <= TOL


def test_module_takes_band_path_and_matches_torch():
    x = _pixels((2, 3, 32, 32))
    fc_triton = mfm_fast.FrequencyCorruption(r1=5, backend="triton")
    fc_torch = mfm_fast.FrequencyCorruption(r1=5, backend="torch")
    low = torch.tensor([True, False])
    inp, mask = fc_triton(x, low=low)
    assert mfm_fast.masks.disc_band(32, 32, 5, 999) == 5
    inp_torch, mask_torch = fc_torch(x, low=low)
    assert torch.equal(mask, mask_torch)
    assert max_rel_err(inp.cpu(), _reference(x, mask)) <= TOL
    assert max_rel_err(inp.cpu(), inp_torch.cpu()) <= 2 * TOL


def test_band_wider_than_half_image_uses_general_path():
    x = _pixels((1, 3, 16, 16))
    mask = mfm_fast.make_masks(1, 16, 16, r1=11, low=torch.tensor([True]), device=DEVICE)
    out = mfm_fast.corrupt(x, mask, backend="triton", mask_band=12)  # 12 > 16 // 2: general path
    assert max_rel_err(out.cpu(), _reference(x, mask)) <= TOL


def test_band_wider_than_band_max_uses_general_path():
    import mfm_fast.kernels.corrupt as kc
    r1 = kc.BAND_MAX + 2  # would need more shared memory than sm_90 has on the band path
    x = _pixels((1, 3, 2 * r1 + 4, 2 * r1 + 4))
    mask = masks_for(x.shape, r1=r1).to(DEVICE)
    assert not kc.band_fits(r1, *x.shape[2:]) and kc.general_fits(*x.shape[2:])
    out = mfm_fast.corrupt(x, mask, backend="triton", mask_band=r1)
    assert max_rel_err(out.cpu(), _reference(x, mask)) <= TOL


def test_large_images_without_band_fall_back_to_torch_and_say_why(caplog):
    x = _pixels((1, 3, 264, 8))
    mask = masks_for(x.shape, r1=2).to(DEVICE)
    with caplog.at_level(logging.INFO, logger="mfm_fast"):
        out = mfm_fast.corrupt(x, mask, backend="triton")
    assert torch.equal(out, mfm_fast.corrupt(x, mask, backend="torch"))
    assert any("264 x 8 images" in r.getMessage() and "above 256" in r.getMessage() for r in caplog.records)


def test_broken_band_promise_is_caught_by_value_checks():
    x = _pixels((1, 3, 16, 16))
    mask = torch.rand(1, 16, 16, device=DEVICE)
    mfm_fast.set_value_checks(True)
    try:
        with pytest.raises(ValueError, match="^mask_band: the mask is not constant"):
            mfm_fast.corrupt(x, mask, backend="triton", mask_band=4)
        mfm_fast.corrupt(x, masks_for(x.shape, r1=4).to(DEVICE), backend="triton", mask_band=4)  # a kept promise
    finally:
        mfm_fast.set_value_checks(False)


@pytest.mark.parametrize("bad, err, msg", [(0, ValueError, "^mask_band: must be >= 1"),
                                           (2.5, TypeError, "^mask_band: expected an int")])
def test_bad_mask_band(bad, err, msg):
    x = _pixels((1, 3, 16, 16))
    with pytest.raises(err, match=msg):
        mfm_fast.corrupt(x, masks_for(x.shape).to(DEVICE), backend="triton", mask_band=bad)


def test_bad_precision():
    x = _pixels((1, 3, 16, 16))
    with pytest.raises(ValueError, match="^precision: expected one of"):
        mfm_fast.corrupt(x, masks_for(x.shape).to(DEVICE), backend="triton", precision="fp8")


@pytest.mark.parametrize("precision, tol", [("ieee", TOL), ("tf32", 1e-2), ("bf16", 5e-2)])
def test_precision_modes(precision, tol):
    x = _pixels((2, 3, 16, 16))
    mask = masks_for(x.shape, r1=4).to(DEVICE)
    for band in (4, None):
        out = mfm_fast.corrupt(x, mask, backend="triton", mask_band=band, precision=precision)
        assert max_rel_err(out.cpu(), _reference(x, mask)) <= tol


def test_float64_falls_back_to_torch(caplog):
    x = _pixels((1, 3, 16, 16)).double()
    mask = masks_for(x.shape).to(DEVICE)
    with caplog.at_level(logging.INFO, logger="mfm_fast"):
        out = mfm_fast.corrupt(x, mask, backend="triton")
    assert out.dtype == torch.float64 and max_rel_err(out.cpu(), _reference(x, mask)) <= 1e-10


def test_deterministic_reruns():
    x = _pixels((2, 3, 16, 24))
    mask = masks_for(x.shape, r1=4).to(DEVICE)
    for band in (4, None):
        a = mfm_fast.corrupt(x, mask, backend="triton", mask_band=band)
        b = mfm_fast.corrupt(x, mask, backend="triton", mask_band=band)
        assert torch.equal(a, b)


def test_opcheck():
    import mfm_fast.kernels.corrupt  # noqa: F401  (registers torch.ops.mfm_fast.corrupt_triton)
    x = _pixels((1, 3, 16, 16))
    mask = masks_for(x.shape, r1=4).to(DEVICE)
    for band in (4, 0):
        torch.library.opcheck(torch.ops.mfm_fast.corrupt_triton.default,
                              (x, mask, [0.5, 0.4, 0.3], [0.2, 0.2, 0.2], torch.float32, band, "tf32x3"),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.filterwarnings("error:Dynamo detected a call to a `functools.lru_cache`")
def test_compile_fullgraph():
    """Compiles with no dynamo warning (a base-mask cache traced through would warn)."""
    x = _pixels((2, 3, 16, 16))
    fc = mfm_fast.FrequencyCorruption(r1=4, backend="triton")
    low = torch.tensor([True, False], device=DEVICE)
    eager, mask = fc(x, low=low)
    compiled = torch.compile(fc, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    out, mask2 = compiled(x, low=low)
    assert torch.equal(mask, mask2) and torch.allclose(out, eager, atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("band", [True, False], ids=["band", "general"])
@pytest.mark.parametrize("in_dtype, out_dtype", [(torch.float32, torch.float32), (torch.uint8, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32)], ids=["fp32", "u8-bf16", "bf16-fp32"])
def test_gpu_parity_224(band, in_dtype, out_dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = _pixels((64, 3, 224, 224), in_dtype)
    mask = mfm_fast.make_masks(64, 224, 224, r1=16, generator=g, device="cuda")
    ref = _reference(x, mask)
    out = mfm_fast.corrupt(x, mask, out_dtype=out_dtype, backend="triton", mask_band=16 if band else None)
    if out_dtype == torch.float32:
        assert max_rel_err(out.cpu(), ref) <= TOL
    else:
        torch_out = mfm_fast.corrupt(x, mask, out_dtype=out_dtype, backend="torch")
        assert max_rel_err(out.cpu(), ref) <= 2 * max_rel_err(torch_out.cpu(), ref) + 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_auto_uses_band_path_or_falls_back_to_torch(caplog):
    from mfm_fast import dispatch
    dispatch._logged.clear()
    x = _pixels((4, 3, 64, 64))
    mask = mfm_fast.make_masks(4, 64, 64, r1=8, device="cuda")
    with caplog.at_level(logging.INFO, logger="mfm_fast"):
        band = mfm_fast.corrupt(x, mask, mask_band=8)
        general = mfm_fast.corrupt(x, mask)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "chose 'triton'" in messages and "general DFT-as-GEMM path" in messages
    ref = _reference(x, mask)
    assert max_rel_err(band.cpu(), ref) <= TOL and max_rel_err(general.cpu(), ref) <= TOL
