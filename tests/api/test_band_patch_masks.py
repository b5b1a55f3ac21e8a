"""Band-pass masks (several rings), radius jitter, patch-level masks and patch-level corruption.

Expected masks come from mfm_fast.backends.reference.masks (the released code's double loop, per tile, in
plain Python); expected corruption from the fp64 reference backend applied to each patch cut out
by slicing."""

import math

import numpy as np
import pytest
import torch

import mfm_fast
from helpers import max_rel_err
from mfm_fast.backends import reference
from mfm_fast.masks import mask_band_for

RINGS = [(0, 1.5), (3, 4.5), (6, 999)]


def literal_draw(seed, n, pf, rings, p_low, delta):
    """make_masks' documented draws, replayed: b per tile, then one offset per radius per tile."""
    g = torch.Generator().manual_seed(seed)
    low = (torch.rand(n * pf * pf, generator=g) < p_low).view(n, pf, pf)
    radii = torch.tensor(rings, dtype=torch.float64).expand(n, pf, pf, len(rings), 2)
    if delta > 0:
        u = torch.rand(n, pf, pf, len(rings), 2, generator=g, dtype=torch.float64)
        radii = (radii + delta * (2 * u - 1)).clamp_min(0)
    return low, radii


def tiles_of(m, pf):
    """(N, H, W) -> list of (N, h, w) tiles, cut out by slicing."""
    h, w = m.shape[-2] // pf, m.shape[-1] // pf
    return [m[..., i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(pf) for j in range(pf)]


def to_tiles(m, pf):
    """Every single (h, w) tile of every image."""
    return [t[i] for t in tiles_of(m, pf) for i in range(m.shape[0])]


def assert_hermitian_per_tile(m, pf):
    for tile in tiles_of(m, pf):  # m(k) == m(-k mod S) in the tile's unshifted coordinates, by explicit indexing
        u = torch.fft.ifftshift(tile, dim=(-2, -1))
        h, w = u.shape[-2:]
        neg = u[..., (-torch.arange(h)) % h, :][..., (-torch.arange(w)) % w]
        assert torch.equal(u, neg)


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("h,w,rings", [(16, 16, RINGS), (12, 20, [(1, 2), (2.5, 3.2)]), (16, 24, [(2, 5)])])
def test_band_masks_match_reference(h, w, rings):
    low = torch.tensor([True, False, True])
    got = mfm_fast.make_masks(3, h, w, bands=rings, low=low)
    radii = torch.tensor(rings, dtype=torch.float64).expand(3, 1, 1, len(rings), 2)
    assert torch.equal(got, reference.masks_from(low.view(3, 1, 1), radii, h, w))
    assert torch.equal(mfm_fast.base_mask(h, w, bands=rings), reference.base_mask(h, w, rings).float())


def test_band_pass_keeps_only_the_ring():
    m = mfm_fast.make_masks(2, 32, 32, bands=[(4, 8)], low=torch.tensor([True, False]))
    d2 = (torch.arange(32) - 16)[:, None] ** 2 + (torch.arange(32) - 16)[None, :] ** 2
    ring = (16 <= d2) & (d2 < 64)
    assert torch.equal(m[0] == 0, ring) and torch.equal(m[1] == 1, ring)  # b = 1: band-stop, b = 0: band-pass


@pytest.mark.parametrize("r1,r2", [(4, 999), (3, 7), (2.5, 5)])
def test_single_band_equals_r1_r2_bit_for_bit(r1, r2):
    a = mfm_fast.make_masks(9, 16, 24, r1=r1, r2=r2, p_low=0.4, generator=torch.Generator().manual_seed(3))
    b = mfm_fast.make_masks(9, 16, 24, p_low=0.4, bands=[(r1, r2)], generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_zero_jitter_and_pf1_leave_the_stream_unchanged():
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    a = mfm_fast.make_masks(16, 16, 16, r1=4, p_low=0.5, generator=g1)
    b = mfm_fast.make_masks(16, 16, 16, r1=4, p_low=0.5, radius_jitter=0.0, patch_factor=1, generator=g2)
    assert torch.equal(a, b) and torch.equal(g1.get_state(), g2.get_state())
    low = torch.rand(16, generator=torch.Generator().manual_seed(11)) < 0.5  # the released draw, literally
    B = reference.base_mask(16, 16, [(4, 999)]).float()
    assert torch.equal(a, torch.where(low[:, None, None], B, 1 - B))


@pytest.mark.parametrize("pf,h,w", [(1, 16, 16), (2, 16, 24), (4, 32, 32)])
@pytest.mark.parametrize("delta", [0.0, 1.7])
def test_random_masks_match_reference(pf, h, w, delta):
    rings = [(1, 2.5), (3, 999)]
    g = torch.Generator().manual_seed(5)
    got = mfm_fast.make_masks(4, h, w, p_low=0.5, bands=rings, radius_jitter=delta, patch_factor=pf, generator=g)
    low, radii = literal_draw(5, 4, pf, rings, 0.5, delta)
    assert torch.equal(got, reference.masks_from(low, radii, h, w, pf))
    assert_hermitian_per_tile(got, pf)
    if delta > 0:  # the jitter really moves radii (tiles with the same b differ)
        assert len({tuple(t.flatten().tolist()) for t in to_tiles(got, pf)}) > 2


def test_jitter_clamps_radii_at_zero():
    # r1 = 0.3 with delta = 2: most inner radii become 0 (DC then removed from these band-stop masks).
    low = torch.ones(32, dtype=torch.bool)
    got = mfm_fast.make_masks(32, 8, 8, bands=[(0.3, 2)], radius_jitter=2.0, low=low,
                              generator=torch.Generator().manual_seed(2))
    u = torch.rand(32, 1, 1, 1, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)  # low forced:
    radii = (torch.tensor([[0.3, 2.0]], dtype=torch.float64) + 2.0 * (2 * u - 1)).clamp_min(0)  # offsets only
    assert (radii == 0).any() and (got[:, 4, 4] == 0).any()
    assert torch.equal(got, reference.masks_from(low.view(32, 1, 1), radii, 8, 8))


def test_patch_masks_with_forced_low():
    per_image = torch.tensor([True, False])
    per_tile = torch.tensor([[[True, False], [False, True]], [[False, False], [True, True]]])
    radii = torch.tensor([(2.0, 999.0)], dtype=torch.float64).expand(2, 2, 2, 1, 2)
    for low, tiles in ((per_image, per_image.view(2, 1, 1).expand(2, 2, 2)), (per_tile, per_tile)):
        got = mfm_fast.make_masks(2, 16, 24, r1=2, patch_factor=2, low=low)
        assert torch.equal(got, reference.masks_from(tiles, radii, 16, 24, 2))
        assert_hermitian_per_tile(got, 2)
    one = mfm_fast.make_masks(2, 8, 12, r1=2, low=per_image)  # each tile is an ordinary mask of the tile size
    assert torch.equal(mfm_fast.make_masks(2, 16, 24, r1=2, patch_factor=2, low=per_image)[:, 8:, :12], one)


def test_patch_low_is_drawn_per_tile():
    n, pf = 500, 2
    m = mfm_fast.make_masks(n, 16, 16, r1=2, p_low=0.3, patch_factor=pf, generator=torch.Generator().manual_seed(1))
    is_low = torch.stack([t[:, 4, 4] == 1 for t in tiles_of(m, pf)], 1)  # DC of each tile kept only by low-pass
    frac = is_low.double().mean().item()
    assert abs(frac - 0.3) < 4 * (0.3 * 0.7 / (n * pf * pf)) ** 0.5
    assert (is_low.any(1) & ~is_low.all(1)).any()  # images mixing low- and high-pass tiles


# ---------------------------------------------------------------------------------------------
# the mask_band promise
# ---------------------------------------------------------------------------------------------

def test_mask_band_for_values():
    assert mask_band_for(224, 224) == 16 == mfm_fast.masks.disc_band(224, 224, 16, 999)
    assert mask_band_for(224, 224, radius_jitter=0.5) == 17
    assert mask_band_for(32, 32, 5, 999, patch_factor=2) == 5
    assert mask_band_for(16, 16, bands=[(1, 2), (4, 12)]) == 4      # 12^2 = 144 > 8^2 + 8^2: reaches the corners
    assert mask_band_for(16, 16, bands=[(4, 12)], radius_jitter=1) is None  # 11^2 < 128
    assert mask_band_for(16, 16, 4, 11) is None                     # a band-pass ring inside the grid
    assert mask_band_for(32, 32, 3, 12) is None and mask_band_for(32, 32, 3, 12, patch_factor=2) == 3  # per tile
    assert mask_band_for(16, 16, bands=[(0.2, 999)]) == 1


@pytest.mark.parametrize("opts", [
    dict(r1=3), dict(r1=2.5, radius_jitter=1.3), dict(bands=[(0, 1), (2, 3), (5, 999)], radius_jitter=0.7),
    dict(bands=[(3, 12)], patch_factor=2, radius_jitter=0.4), dict(r1=1, patch_factor=4, radius_jitter=2.0),
], ids=str)
def test_mask_band_for_is_sound_on_random_masks(opts):
    R = mask_band_for(32, 32, **opts)
    assert R is not None
    pf = opts.get("patch_factor", 1)
    m = mfm_fast.make_masks(64, 32, 32, **opts, generator=torch.Generator().manual_seed(0))
    x = torch.rand(64, 3, 32, 32)
    mfm_fast.set_value_checks(True)
    try:
        mfm_fast.corrupt(x, m, mask_band=R, patch_factor=pf, backend="torch")  # verifies the promise on the data
        if R > 1:  # the check has teeth: one less fails on these masks
            with pytest.raises(ValueError, match="^mask_band: the mask is not constant"):
                mfm_fast.corrupt(x, m, mask_band=R - 1, patch_factor=pf, backend="torch")
    finally:
        mfm_fast.set_value_checks(False)
    # and independently: every tile equals its corner outside the box |ky|, |kx| < R
    for t in tiles_of(m, pf):
        h, w = t.shape[-2:]
        ky, kx = (torch.arange(h) - h // 2).abs()[:, None], (torch.arange(w) - w // 2).abs()[None, :]
        outside = (ky >= R) | (kx >= R)
        assert torch.equal((t == t[:, :1, :1])[:, outside], torch.ones_like(t[:, outside], dtype=torch.bool))


def test_mask_band_for_none_where_rings_stay_inside():
    for opts in (dict(r1=2, r2=9), dict(bands=[(1, 3), (5, 11)]), dict(r1=2, r2=10, radius_jitter=0.7)):
        assert mask_band_for(16, 16, **opts) is None  # half-diagonal^2 = 128
        m = mfm_fast.make_masks(64, 16, 16, **opts, generator=torch.Generator().manual_seed(0))
        # (ky, kx) = (0, -8) lies outside every box |ky|, |kx| < R <= 8, yet differs from the corner
        assert (m[:, 8, 0] != m[:, 0, 0]).any()


# ---------------------------------------------------------------------------------------------
# patch-level corruption
# ---------------------------------------------------------------------------------------------

def per_patch_reference(x, m, pf):
    """Corrupt each patch, cut out by slicing, with the fp64 reference backend, and put it back."""
    out = torch.empty(x.shape, dtype=torch.float64)
    h, w = x.shape[-2] // pf, x.shape[-1] // pf
    for i in range(pf):
        for j in range(pf):
            rows, cols = slice(i * h, (i + 1) * h), slice(j * w, (j + 1) * w)
            out[..., rows, cols] = mfm_fast.corrupt(x[..., rows, cols].double(), m[:, rows, cols], backend="reference")
    return out


@pytest.mark.parametrize("pf,shape", [(2, (2, 3, 16, 24)), (4, (1, 3, 32, 32)), (1, (2, 3, 16, 16))], ids=str)
def test_patch_corruption_equals_per_patch_slicing(pf, shape):
    n, _, h, w = shape
    x = torch.rand(shape, dtype=torch.float64)
    m = mfm_fast.make_masks(n, h, w, bands=[(1, 2), (3, 999)], radius_jitter=0.5, patch_factor=pf,
                            generator=torch.Generator().manual_seed(4))
    ref = mfm_fast.corrupt(x, m, backend="reference", patch_factor=pf)
    assert ref.shape == shape and ref.is_contiguous()
    assert (ref - per_patch_reference(x, m, pf)).abs().max() < 1e-12
    if pf > 1:  # really per patch: the whole-image corruption differs
        assert (ref - mfm_fast.corrupt(x, m, backend="reference")).abs().max() > 1e-3


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.uint8, torch.float64])
def test_patch_corruption_torch_matches_reference(in_dtype):
    pixels = torch.rand(3, 3, 32, 48)
    x = (pixels * 255).round().to(torch.uint8) if in_dtype == torch.uint8 else pixels.to(in_dtype)
    exact = x.double() / 255 if in_dtype == torch.uint8 else x.double()
    m = mfm_fast.make_masks(3, 32, 48, r1=3, patch_factor=4, generator=torch.Generator().manual_seed(1))
    ref = per_patch_reference(exact, m, 4)
    out = mfm_fast.corrupt(x.to(memory_format=torch.channels_last), m, backend="torch", patch_factor=4,
                           mask_band=mask_band_for(32, 48, 3, patch_factor=4))
    assert out.dtype == (torch.float32 if in_dtype == torch.uint8 else in_dtype) and out.is_contiguous()
    assert max_rel_err(out, ref) <= (1e-10 if in_dtype == torch.float64 else 1e-5)


def _triton_reason():
    return mfm_fast.available_backends("cpu", "corrupt")["triton"]


@pytest.mark.skipif(_triton_reason() is not None, reason=f"triton cannot run here: {_triton_reason()}")
@pytest.mark.parametrize("band", [True, False], ids=["band", "general"])
def test_patch_corruption_triton_matches_reference(band):
    x = torch.rand(1, 3, 16, 16)
    m = mfm_fast.make_masks(1, 16, 16, r1=2, patch_factor=2, low=torch.tensor([[[True, False], [False, True]]]))
    R = mask_band_for(16, 16, 2, patch_factor=2) if band else None
    assert R in (2, None)
    out = mfm_fast.corrupt(x, m, backend="triton", patch_factor=2, mask_band=R)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert max_rel_err(out, per_patch_reference(x, m, 2)) <= 1e-5


def test_frequency_corruption_with_bands_jitter_and_patches():
    opts = dict(bands=[(1, 2), (3, 999)], radius_jitter=0.6, patch_factor=2)
    fc = mfm_fast.FrequencyCorruption(p_low=0.4, **opts)
    x = torch.rand(3, 3, 16, 24)
    inp, mask = fc(x, generator=torch.Generator().manual_seed(9))
    expected = mfm_fast.make_masks(3, 16, 24, p_low=0.4, generator=torch.Generator().manual_seed(9), **opts)
    assert torch.equal(mask, expected)
    assert torch.equal(inp, mfm_fast.corrupt(x, mask, patch_factor=2))
    assert max_rel_err(inp, per_patch_reference(x, mask, 2)) <= 1e-5
    forced = torch.zeros(3, 2, 2, dtype=torch.bool)
    _, m2 = fc(x, low=forced, generator=torch.Generator().manual_seed(9))
    assert (m2[:, 4, 6] == 0).all()  # high-pass tiles remove DC (radii jittered but r1 + 0.6 > 0)
    r = repr(fc)
    assert "bands=[(1.0, 2.0), (3.0, 999.0)]" in r and "radius_jitter=0.6" in r and "patch_factor=2" in r
    assert "radius_jitter" not in repr(mfm_fast.FrequencyCorruption(r1=4))


def test_patch_masks_drive_the_patch_loss():
    pf = 2
    pred, target = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    m = mfm_fast.make_masks(2, 16, 16, bands=[(1, 2.5), (4, 999)], radius_jitter=0.5, patch_factor=pf,
                            generator=torch.Generator().manual_seed(0))
    got = mfm_fast.masked_freq_loss(pred, target, m, patch_factor=pf, backend="torch")
    ref = mfm_fast.masked_freq_loss(pred.double(), target.double(), m, patch_factor=pf, backend="reference")
    assert torch.isfinite(got) and abs(float(got) - float(ref)) <= 1e-5 * abs(float(ref))
    # literal check of one number: the loss over removed frequencies of each patch's own ortho spectrum
    d = pred.double() - target.double()
    num, den = 0.0, 0.0
    for dt, mt in zip(tiles_of(d, pf), tiles_of(m.double(), pf)):
        spec = torch.fft.fftshift(torch.fft.fft2(dt, norm="ortho"), dim=(-2, -1))
        num += float(((1 - mt)[:, None] * (spec.abs() ** 2 + 1e-12).sqrt()).sum())
        den += float(3 * (1 - mt).sum())
    assert math.isclose(float(ref), num / den, rel_tol=1e-10)


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------

BAD = [
    ("bands-int", dict(bands=3), TypeError, r"^bands: expected a sequence of \(r1, r2\) pairs"),
    ("bands-string", dict(bands="1,2"), TypeError, r"^bands: expected a sequence"),
    ("bands-empty", dict(bands=[]), ValueError, r"^bands: expected at least one"),
    ("bands-triple", dict(bands=[(1, 2, 3)]), TypeError, r"^bands\[0\]: expected a pair"),
    ("bands-scalar-item", dict(bands=[(1, 2), 5]), TypeError, r"^bands\[1\]: expected a pair"),
    ("bands-r2-le-r1", dict(bands=[(1, 2), (4, 4)]), ValueError, r"^bands\[1\]: r2 must be > r1"),
    ("bands-negative", dict(bands=[(-1, 2)]), ValueError, r"^bands\[0\]\[0\]: must be >= 0"),
    ("bands-nan", dict(bands=[(1, math.nan)]), ValueError, r"^bands\[0\]\[1\]: must be finite"),
    ("bands-and-r1", dict(r1=3, bands=[(1, 2)]), ValueError, r"^bands: given together with r1"),
    ("jitter-negative", dict(radius_jitter=-0.1), ValueError, r"^radius_jitter: must be >= 0"),
    ("jitter-string", dict(radius_jitter="1"), TypeError, r"^radius_jitter: expected a real number"),
    ("patch_factor-zero", dict(patch_factor=0), ValueError, r"^patch_factor: must be >= 1"),
    ("patch_factor-float", dict(patch_factor=2.0), TypeError, r"^patch_factor: expected an int"),
    ("patch_factor-not-dividing", dict(patch_factor=3), ValueError, r"^patch_factor: 3 must divide"),
    ("patch_factor-odd-tiles", dict(patch_factor=8), ValueError, r"^patch_factor: 8 gives 2 x 3 patches"),
]


@pytest.mark.parametrize("kw,exc,msg", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_mask_options(kw, exc, msg):
    h, w = (16, 24) if kw.get("patch_factor") == 8 else (16, 16)
    with pytest.raises(exc, match=msg):
        mfm_fast.make_masks(2, h, w, **kw)
    if "patch_factor" not in kw or kw["patch_factor"] in (0, 2.0):
        with pytest.raises(exc, match=msg):
            mfm_fast.FrequencyCorruption(**kw)
    with pytest.raises(exc, match=msg):
        mask_band_for(h, w, **kw)
    if "patch_factor" in kw:
        with pytest.raises(exc, match=msg):
            mfm_fast.corrupt(torch.rand(2, 3, h, w), torch.ones(2, h, w), **kw)


def test_bad_low_shapes_with_patches():
    with pytest.raises(ValueError, match=r"^low: expected shape \(2,\) or \(2, 2, 2\), got \(2, 4\)"):
        mfm_fast.make_masks(2, 16, 16, patch_factor=2, low=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^low: expected shape \(2,\), got \(2, 1, 1\)"):
        mfm_fast.make_masks(2, 16, 16, low=torch.ones(2, 1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^low: expected shape"):
        mfm_fast.FrequencyCorruption(r1=2, patch_factor=2)(torch.rand(2, 3, 16, 16), low=torch.ones(2, 3, 3) > 0)
    with pytest.raises(ValueError, match=r"^patch_factor: 4 gives 3 x 3 patches"):
        mfm_fast.FrequencyCorruption(r1=2, patch_factor=4)(torch.rand(2, 3, 12, 12))
    with pytest.raises(ValueError, match=r"^mask: expected shape"):  # per-patch tiles must come in image layout
        mfm_fast.corrupt(torch.rand(2, 3, 16, 16), torch.ones(2, 8, 8), patch_factor=2)


def test_picture_reconstruction_is_per_patch_with_patch_masks():
    from mfm_fast.train.visualize import fill_removed, log_spectrum

    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    mask = mfm_fast.make_masks(2, 16, 16, r1=2, patch_factor=2, low=torch.tensor([True, False]))
    got = fill_removed(pred, target, mask, patch_factor=2)
    for py in range(2):
        for px in range(2):
            tile = (slice(None), slice(None), slice(8 * py, 8 * py + 8), slice(8 * px, 8 * px + 8))
            alone = fill_removed(pred[tile], target[tile], mask[:, tile[2], tile[3]])
            torch.testing.assert_close(got[tile], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fill_removed(pred, target, torch.ones(2, 16, 16), 2), target, rtol=1e-5, atol=1e-5)
    spec = log_spectrum(target[0], 2)
    np.testing.assert_allclose(spec[:8, 8:], log_spectrum(target[0, :, :8, 8:]), rtol=1e-12)
