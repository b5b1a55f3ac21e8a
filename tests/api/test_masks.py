"""docs/spec.md §1: the masks."""

import numpy as np
import pytest
import torch

import mfm_fast


def test_disc_holds_793_of_50176_at_224_r16():
    low = mfm_fast.make_masks(1, 224, 224, r1=16, low=torch.tensor([True]))[0]
    high = mfm_fast.make_masks(1, 224, 224, r1=16, low=torch.tensor([False]))[0]
    assert low.shape == (224, 224) and low.dtype == torch.float32
    assert int(low.sum()) == 793
    assert int((low == 0).sum()) == 49383  # low-pass removes everything outside the disc
    assert int((high == 0).sum()) == 793  # high-pass removes the disc, DC included
    assert high[112, 112] == 0 and low[112, 112] == 1


def test_base_mask_is_a_literal_loop_translation():
    # The released code's double loop, written independently with numpy.
    for (h, w, r1, r2) in [(16, 16, 4, 999), (16, 24, 3, 7), (10, 14, 2.5, 5)]:
        expected = np.ones((h, w), dtype=np.float32)
        for y in range(h):
            for x in range(w):
                if r1 ** 2 <= (x - w // 2) ** 2 + (y - h // 2) ** 2 < r2 ** 2:
                    expected[y, x] = 0
        got = mfm_fast.base_mask(h, w, r1, r2).numpy()
        np.testing.assert_array_equal(got, expected)


def test_strict_less_than_on_squared_distance():
    # r1 = 5: the point at distance exactly 5 (3-4-5 triangle) is removed from the disc (r1^2 <= d^2).
    b = mfm_fast.base_mask(32, 32, r1=5)
    assert b[16 + 3, 16 + 4] == 0 and b[16 + 5, 16] == 0
    assert b[16 + 4, 16 + 2] == 1  # d^2 = 20 < 25
    # band mask r2 = 8: d = 8 is kept again (d^2 < r2^2 is strict)
    band = mfm_fast.base_mask(32, 32, r1=5, r2=8)
    assert band[16 + 8, 16] == 1 and band[16 + 7, 16] == 0


@pytest.mark.parametrize("h,w,r1,r2", [(224, 224, 16, 999), (16, 24, 4, 999), (32, 32, 5, 9), (12, 20, 3, 5)])
def test_masks_are_hermitian(h, w, r1, r2):
    m = mfm_fast.make_masks(4, h, w, r1=r1, r2=r2, low=torch.tensor([True, False, True, False]))
    unshifted = torch.fft.ifftshift(m, dim=(-2, -1))
    mirrored = torch.roll(torch.flip(unshifted, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))  # M(-k mod S)
    assert torch.equal(unshifted, mirrored)


def test_low_flag_and_bernoulli_draw():
    n = 4000
    g = torch.Generator().manual_seed(1)
    m = mfm_fast.make_masks(n, 16, 16, r1=4, p_low=0.3, generator=g)
    is_low = m[:, 8, 8] == 1  # DC kept only by low-pass masks
    frac = is_low.float().mean().item()
    assert abs(frac - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5
    b = mfm_fast.base_mask(16, 16, 4)
    assert torch.equal(m[is_low], b.expand(int(is_low.sum()), -1, -1))
    assert torch.equal(m[~is_low], (1 - b).expand(int((~is_low).sum()), -1, -1))
    assert mfm_fast.make_masks(8, 16, 16, r1=4, p_low=1.0)[:, 8, 8].eq(1).all()
    assert mfm_fast.make_masks(8, 16, 16, r1=4, p_low=0.0)[:, 8, 8].eq(0).all()


def test_generator_makes_draws_reproducible():
    a = mfm_fast.make_masks(64, 16, 16, r1=4, generator=torch.Generator().manual_seed(7))
    b = mfm_fast.make_masks(64, 16, 16, r1=4, generator=torch.Generator().manual_seed(7))
    c = mfm_fast.make_masks(64, 16, 16, r1=4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_non_square_centre():
    m = mfm_fast.make_masks(1, 16, 24, r1=1, low=torch.tensor([True]))[0]
    assert int(m.sum()) == 1 and m[8, 12] == 1  # the disc of radius 1 is DC alone, at (H//2, W//2)
