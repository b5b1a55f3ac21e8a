"""docs/spec.md §6: FOLK image-adaptive Com / RCom masks (mfm_fast.adaptive_masks) and their picture."""

import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

import mfm_fast
from mfm_fast import dispatch
from mfm_fast.train import visualize
from mfm_fast.adaptive_masks import make_adaptive_masks
from mfm_fast.train.data import load_photos


def photo(size=64, name="astronaut"):
    """A bundled photo, resized to size x size: uint8 (1, 3, S, S)."""
    img = np.asarray(load_photos([name])[0].resize((size, size), Image.BICUBIC), dtype=np.uint8)
    return torch.from_numpy(img.copy()).permute(2, 0, 1)[None]


def oracle(x, keep_ratio, com, magnitude="mean"):
    """Independent numpy fp64 Com / RCom masks: cut at the k-th largest symmetrised |spectrum|."""
    px = x.numpy().astype(np.float64) / (255.0 if x.dtype == torch.uint8 else 1.0)
    n, _, h, w = px.shape
    g = px.mean(1) if magnitude == "mean" else 0.299 * px[:, 0] + 0.587 * px[:, 1] + 0.114 * px[:, 2]
    mag = np.abs(np.fft.fftshift(np.fft.fft2(g), axes=(-2, -1)))
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    mag = (mag + mag[:, (h - i) % h, (w - j) % w]) / 2
    k = min(max(math.ceil(round(keep_ratio * h * w, 9)), 1), h * w)
    thr = -np.sort(-mag.reshape(n, -1), axis=1)[:, k - 1]
    dominant = mag >= thr[:, None, None]
    return np.where(np.asarray(com)[:, None, None], dominant, ~dominant).astype(np.float32), k


def mirror(m):
    """m(-k) in unshifted coordinates: ifftshift, then index (-i mod H, -j mod W), then back."""
    u = np.fft.ifftshift(m.numpy(), axes=(-2, -1))
    h, w = u.shape[-2:]
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return torch.from_numpy(np.fft.fftshift(u[:, (-i) % h, (-j) % w], axes=(-2, -1)).copy())


SELF_CONJUGATE = lambda h, w: [(h // 2, w // 2), (0, w // 2), (h // 2, 0), (0, 0)]  # noqa: E731 (fftshift-ed)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("shape,ratio", [((3, 3, 16, 24), 0.05), ((2, 1, 2, 2), 0.3), ((2, 3, 32, 32), 0.01),
                                         ((2, 3, 64, 64), 0.005), ((1, 3, 10, 6), 0.5)])
def test_com_rcom_match_oracle_are_hermitian_and_partition(backend, shape, ratio):
    x = torch.rand(shape)
    com = make_adaptive_masks(x, "com", ratio, backend=backend)
    rcom = make_adaptive_masks(x, "rcom", ratio, backend=backend)
    expected, k = oracle(x, ratio, [True] * shape[0])
    assert com.shape == shape[:1] + shape[2:] and com.dtype == torch.float32
    np.testing.assert_array_equal(com.numpy(), expected)
    for m in (com, rcom):
        assert torch.equal(m, mirror(m))  # Hermitian
    assert torch.equal(com + rcom, torch.ones_like(com))  # the two partition the spectrum
    # the documented count: k, or k + 1 when the k-th largest is the first of a (k, -k) pair; the kept
    # count minus the kept self-conjugate frequencies is even (the others come in pairs)
    h, w = shape[2:]
    for n in range(shape[0]):
        kept = int(com[n].sum())
        assert kept in (k, k + 1) and (kept - sum(int(com[n][p]) for p in SELF_CONJUGATE(h, w))) % 2 == 0
        assert int(rcom[n].sum()) == h * w - kept


@pytest.mark.parametrize("magnitude", ["mean", "luminance"])
def test_photo_reference_matches_oracle_and_keeps_dc(magnitude):
    x = photo(64)
    for ratio in (0.005, 0.01, 0.05):
        com = make_adaptive_masks(x, "com", ratio, magnitude=magnitude, backend="reference")
        expected, k = oracle(x, ratio, [True], magnitude)
        np.testing.assert_array_equal(com.numpy(), expected)
        assert torch.equal(com, mirror(com)) and int(com.sum()) in (k, k + 1)
        assert com[0, 32, 32] == 1  # DC is the largest frequency of a natural photo: Com keeps it
        assert make_adaptive_masks(x, "rcom", ratio, magnitude=magnitude)[0, 32, 32] == 0


def band(x, ratio, rel):
    """Frequencies whose fp64 |spectrum| lies within rel * ||M||_2 of the threshold (the float32 FFT's
    error is relative to the whole spectrum's norm, not to each entry)."""
    g = x.double().div(255.0 if x.dtype == torch.uint8 else 1.0).mean(1)
    mag = torch.fft.fftshift(torch.fft.fft2(g), dim=(-2, -1)).abs()
    n, h, w = mag.shape
    k = min(max(math.ceil(round(ratio * h * w, 9)), 1), h * w)
    thr = mag.reshape(n, -1).sort(1, descending=True).values[:, k - 1]
    return (mag - thr[:, None, None]).abs() <= rel * mag.norm(dim=(1, 2))[:, None, None]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_torch_backend_equals_reference_outside_the_rounding_band(dtype):
    """Exact, except that frequencies within the FFT's rounding error of the threshold may land on either side:
    eps * log2(HW) * ||M||_2, eps the unit roundoff of the compute dtype (float32, or float64 for float64 x)."""
    torch.manual_seed(1)
    x = torch.cat([photo(64), photo(64, "chelsea"), photo(64, "coffee"), (torch.rand(5, 3, 64, 64) * 255).byte()])
    x = x if dtype == torch.uint8 else x.to(dtype) / 255
    eps = 2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24
    for ratio in (0.005, 0.01, 0.05, 0.3):
        ref = make_adaptive_masks(x, "com", ratio, backend="reference")
        fast = make_adaptive_masks(x, "com", ratio, backend="torch")
        near = band(x, ratio, eps * 12)
        differ = ref != fast
        assert not (differ & ~near).any()
        assert int(near.sum()) <= 0.001 * near.numel() and int(differ.sum()) <= int(near.sum())
        assert torch.equal(fast, mirror(fast))


def test_mixed_draws_p_com_and_com_forces():
    n, p = 4000, 0.3
    x = torch.rand(n, 3, 8, 8)
    com, rcom = make_adaptive_masks(x, "com", 0.05), make_adaptive_masks(x, "rcom", 0.05)
    mixed = make_adaptive_masks(x, "mixed", 0.05, p_com=p, generator=torch.Generator().manual_seed(3))
    drawn = torch.rand(n, generator=torch.Generator().manual_seed(3)) < p  # the documented draw
    assert torch.equal(mixed, torch.where(drawn[:, None, None], com, rcom))
    frac = float(drawn.float().mean())
    assert abs(frac - p) < 4 * (p * (1 - p) / n) ** 0.5
    again = make_adaptive_masks(x, "mixed", 0.05, p_com=p, generator=torch.Generator().manual_seed(3))
    assert torch.equal(mixed, again)
    force = torch.arange(n) % 3 == 0
    assert torch.equal(make_adaptive_masks(x, "mixed", 0.05, com=force), torch.where(force[:, None, None], com, rcom))
    assert torch.equal(make_adaptive_masks(x, p_com=1.0), make_adaptive_masks(x, "com"))
    assert torch.equal(make_adaptive_masks(x, p_com=0.0), make_adaptive_masks(x, "rcom"))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_uint8_and_float_pixels_give_the_same_masks(backend):
    x = torch.cat([photo(32), (torch.rand(3, 3, 32, 32) * 255).byte()])
    for ratio in (0.01, 0.05):
        assert torch.equal(make_adaptive_masks(x, "com", ratio, backend=backend),
                           make_adaptive_masks(x.float() / 255, "com", ratio, backend=backend))


def test_magnitude_options():
    grey = torch.rand(4, 1, 32, 32).expand(-1, 3, -1, -1)  # any strides
    for ratio in (0.01, 0.05):
        assert torch.equal(make_adaptive_masks(grey, "com", ratio, magnitude="luminance", backend="reference"),
                           make_adaptive_masks(grey, "com", ratio, magnitude="mean", backend="reference"))
    colour = photo(64)
    assert not torch.equal(make_adaptive_masks(colour, "com", 0.05, magnitude="luminance"),
                           make_adaptive_masks(colour, "com", 0.05, magnitude="mean"))


def test_dc_option_forces_dc():
    x = photo(32)
    keep = make_adaptive_masks(x, "rcom", 0.01, dc="keep")
    plain = make_adaptive_masks(x, "rcom", 0.01)
    assert keep[0, 16, 16] == 1 and plain[0, 16, 16] == 0
    keep[0, 16, 16] = 0
    assert torch.equal(keep, plain)  # only DC changes
    assert make_adaptive_masks(x, "com", 0.01, dc="remove", backend="reference")[0, 16, 16] == 0


def test_com_view_of_a_photo_is_closer_than_rcom_view():
    """Measured, not assumed: with DC and the dominant frequencies, Com keeps most of the image's energy."""
    x = photo(64)
    for ratio in (0.005, 0.01, 0.05):
        masks = torch.cat([make_adaptive_masks(x, mode, ratio) for mode in ("com", "rcom")])
        views = visualize.denormalize(mfm_fast.corrupt(torch.cat([x, x]), masks))
        mse = ((views - x.float() / 255) ** 2).mean((1, 2, 3))
        assert mse[0] < mse[1] / 3


def test_dispatch_reference_and_torch_only(caplog):
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(NotImplementedError, match="^backend='triton' for adaptive_masks on cpu: adaptive_masks is "
                                                  "not implemented in the Triton backend"):
        make_adaptive_masks(x, backend="triton")
    with pytest.raises(NotImplementedError, match="adaptive_masks is not implemented in the CUDA extension"):
        make_adaptive_masks(x, backend="cuda")
    dispatch._logged.clear()
    with caplog.at_level(logging.INFO, logger="mfm_fast"):
        assert dispatch.choose_backend("auto", "adaptive_masks", torch.device("cuda")) == "torch"
        assert dispatch.choose_backend("auto", "adaptive_masks", torch.device("cuda")) == "torch"
        assert dispatch.choose_backend("auto", "adaptive_masks", torch.device("cpu")) == "torch"
    msgs = [r.getMessage() for r in caplog.records if "adaptive_masks on cuda" in r.getMessage()]
    assert len(msgs) == 1 and "skipped cuda: adaptive_masks is not implemented" in msgs[0]


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(keep_ratio=0), ValueError, "^keep_ratio: must be > 0"),
    (dict(keep_ratio=1.5), ValueError, "^keep_ratio: must be < 1"),
    (dict(keep_ratio=1), ValueError, "^keep_ratio: must be < 1"),
    (dict(keep_ratio="a"), TypeError, "^keep_ratio: expected a real number"),
    (dict(mode="x"), ValueError, "^mode: expected one of 'mixed', 'com', 'rcom'"),
    (dict(magnitude="max"), ValueError, "^magnitude: expected one of"),
    (dict(p_com=2), ValueError, "^p_com: must be <= 1"),
    (dict(dc="on"), ValueError, "^dc: expected one of 'keep', 'remove'"),
    (dict(com=torch.ones(3, dtype=torch.bool)), ValueError, r"^com: expected shape \(2,\)"),
    (dict(com=torch.ones(2)), TypeError, "^com: expected a bool tensor"),
    (dict(com=torch.ones(2, dtype=torch.bool), mode="com"), ValueError, "^com: forces the Com / RCom choice"),
    (dict(generator=1), TypeError, "^generator: expected a torch.Generator"),
    (dict(backend="gpu"), ValueError, "^backend: expected one of"),
])
def test_bad_arguments_name_themselves(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        make_adaptive_masks(torch.rand(2, 3, 8, 8), **kwargs)


def test_bad_images_and_devices_name_the_argument():
    with pytest.raises(ValueError, match="^magnitude: 'luminance' needs C = 3"):
        make_adaptive_masks(torch.rand(2, 1, 8, 8), magnitude="luminance")
    with pytest.raises(ValueError, match="^x: image width: must be even"):
        make_adaptive_masks(torch.rand(2, 3, 8, 7))
    with pytest.raises(TypeError, match="^x: dtype int32"):
        make_adaptive_masks(torch.zeros(2, 3, 8, 8, dtype=torch.int32))
    meta = torch.empty(2, 3, 8, 8, device="meta")  # stands in for a GPU batch: checks read only metadata
    with pytest.raises(ValueError, match="^generator: is on cpu but the images are on meta"):
        make_adaptive_masks(meta, generator=torch.Generator())
    with pytest.raises(ValueError, match="^com: is on cpu but the images are on meta"):
        make_adaptive_masks(meta, com=torch.ones(2, dtype=torch.bool))


def test_views_cli_writes_a_png(tmp_path):
    import matplotlib.image
    out = visualize.main(["--views", "folk", "--output", str(tmp_path / "views.png"), "--size", "64",
                          "--keep-ratio", "0.01", "0.05", "--image", "coffee"])
    img = matplotlib.image.imread(out)
    assert img.shape[1] > 2 * img.shape[0] and img[..., :3].std() > 0.05  # 2 rows x 7 columns, not blank


@pytest.mark.parametrize("argv,flag", [
    ([], "--checkpoint"),
    (["--views", "folk", "--keep-ratio", "1.5"], "--keep-ratio"),
    (["--views", "folk", "--size", "63"], "--size"),
    (["--views", "folk", "--image", "nope"], "--image"),
    (["--views", "folk", "--checkpoint", "c.pth"], "--checkpoint"),
    (["--views", "dino"], "argument --views"),
])
def test_views_cli_names_bad_flags(capsys, argv, flag):
    with pytest.raises(SystemExit) as exc:
        visualize.main(argv)
    assert exc.value.code == 2 and f"error: {flag}" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_reference_without_host_sync():
    x = torch.cat([photo(64), (torch.rand(7, 3, 64, 64) * 255).byte()]).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fast = make_adaptive_masks(x, "mixed", 0.01, generator=gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    com = fast.sum((1, 2)) < 64 * 64 / 2
    ref = make_adaptive_masks(x.cpu(), "mixed", 0.01, com=com.cpu(), backend="reference")
    differ = fast.cpu() != ref
    assert not (differ & ~band(x.cpu(), 0.01, 2.0 ** -24 * 12)).any()


def test_compiles_fullgraph_with_the_corruption():
    x = torch.rand(4, 3, 32, 32)
    com = torch.tensor([True, False, True, False])

    def folk_input(x, com):
        return mfm_fast.corrupt(x, mfm_fast.make_adaptive_masks(x, "mixed", 0.05, com=com))

    compiled = torch.compile(folk_input, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, com), folk_input(x, com), rtol=0, atol=0)
