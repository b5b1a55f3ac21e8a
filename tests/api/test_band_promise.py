"""The ``mask_band`` promise (docs/spec.md §1.5) holds for every mask kind the code makes.

``mask_band=R`` tells the band paths (Triton, CUDA) that every mask (every patch tile) equals its corner value
outside the centred box |ky|, |kx| < R; they then skip the rest of the spectrum, and nothing checks the
promise unless value checks are on. So here, for every kind of mask that ``mfm_fast.make_masks``,
``FrequencyCorruption``, ``make_adaptive_masks`` and the trainer's ``Corruptor`` make, at a few sizes and
seeds: the band the code passes is recorded (a spy on ``corrupt``), it is compared with the function the code
calls (``mask_band_for``), and the masks themselves are checked, in numpy, tile by tile, to equal their corner
outside it. Kinds that promise nothing must pass None.

The kinds are enumerated from the code: make_masks' and FrequencyCorruption's options, masks.SHAPE_OPTIONS,
mask_band_for's parameters, make_adaptive_masks' modes, the trainer's --mask and --adaptive-mode choices and
every call site in mfm_fast/ that passes a ``mask_band``. A new option, mode or call site without an entry in
the tables below fails with "no band check for kind X".
"""

from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import mfm_fast
from mfm_fast import adaptive_masks, corruption, masks
from mfm_fast.masks import mask_band_for

SIZES = [(16, 16), (32, 32), (24, 40), (24, 32)]  # (H, W): pf 2 and 4 give even tiles; 24 x 32 has exact corners
SEEDS = [0, 1, 2]
N = 6

# make_masks' parameters that only draw the masks (which image is low-pass, where), not their shape
DRAW_PARAMS = {"n", "height", "width", "p_low", "low", "generator", "device"}
# FrequencyCorruption's parameters that act on the corruption, not on the masks
CORRUPT_PARAMS = {"mean", "std", "out_dtype", "backend", "precision"}


def half_diag(h, w):
    return math.hypot(h / 2, w / 2)


# kind -> (FrequencyCorruption / make_masks keyword options for a tile of side (h, w), promises a band?: True,
# False, or None where float rounding of the corner distance decides; the masks are checked either way).
# A kind covers the options it sets to something other than their default.
KINDS = {
    "disc": (lambda h, w: dict(r1=min(h, w) / 4), True),  # low- and high-pass discs, r2 = 999
    "disc, fractional r1": (lambda h, w: dict(r1=min(h, w) / 4 + 0.5), True),
    "disc, all low-pass": (lambda h, w: dict(r1=min(h, w) / 4, p_low=1.0), True),
    "disc, all high-pass": (lambda h, w: dict(r1=min(h, w) / 4, p_low=0.0), True),
    "ring reaching the corners": (lambda h, w: dict(r1=1.5, r2=half_diag(h, w) + 0.25), True),
    "ring ending at the corner": (lambda h, w: dict(r1=1.5, r2=half_diag(h, w)), None),  # kept iff d^2 == r2^2
    "ring ending before the corner": (lambda h, w: dict(r1=1.5, r2=half_diag(h, w) - 0.25), False),
    "ring inside (band-pass)": (lambda h, w: dict(r1=1, r2=min(h, w) / 4 + 1), False),
    "several rings, the last reaching the corners": (lambda h, w: dict(bands=[(0.5, 1.5), (min(h, w) / 4, 999)]),
                                                     True),
    "several rings inside (band-pass)": (lambda h, w: dict(bands=[(0.5, 1.5), (2, min(h, w) / 4 + 1)]), False),
    "disc, radius jitter": (lambda h, w: dict(r1=min(h, w) / 4, radius_jitter=1.5), True),
    "rings, radius jitter": (lambda h, w: dict(bands=[(1, 2), (min(h, w) / 4, 999)], radius_jitter=0.75), True),
    "ring reaching the corners only without jitter": (
        lambda h, w: dict(r1=1.5, r2=half_diag(h, w) + 0.5, radius_jitter=1.0), False),
    "patches, disc": (lambda h, w: dict(r1=min(h, w) / 4, patch_factor=2), True),
    "patches, 4 x 4, disc": (lambda h, w: dict(r1=1.5, patch_factor=4), True),
    "patches, ring inside": (lambda h, w: dict(r1=1, r2=min(h, w) / 4 + 1, patch_factor=2), False),
    "patches, rings, radius jitter": (
        lambda h, w: dict(bands=[(0.5, 1), (min(h, w) / 4, 999)], radius_jitter=0.5, patch_factor=2), True),
}
PATCH_FACTOR = {kind: make(1, 1).get("patch_factor", 1) for kind, (make, _) in KINDS.items()}

# FOLK's image-adaptive masks: a per-image selection of frequencies, no band (mode -> make_adaptive_masks options)
ADAPTIVE_KINDS = {
    "com": dict(mode="com"),
    "rcom": dict(mode="rcom"),
    "mixed": dict(mode="mixed"),
}
ADAPTIVE_VARIANTS = [dict(), dict(dc="keep"), dict(dc="remove"), dict(magnitude="luminance"), dict(keep_ratio=0.2)]

# the trainer's --mask choices -> the kinds above that the trainer's Corruptor makes for them
TRAINER_MASKS = {"disc": "disc", "adaptive": "mixed"}

# call sites in mfm_fast/ that pass mask_band= to corrupt / masked_freq_loss / MaskedFreqLoss, and what checks them
BAND_SITES = {
    ("corruption.py", "FrequencyCorruption.forward"): "KINDS: the band of FrequencyCorruption.mask_band, checked "
                                                      "on its masks below",
    ("loss.py", "MaskedFreqLoss.forward"): "passes on the caller's own promise (MaskedFreqLoss(mask_band=...))",
}


def params(fn):
    return list(inspect.signature(fn).parameters)


def kind_options(kind, height, width):
    """(FrequencyCorruption options, p_low) of `kind` for (H, W) images (radii in the tile's units)."""
    make, _ = KINDS[kind]
    pf = PATCH_FACTOR[kind]
    opts = make(height // pf, width // pf)
    return {k: v for k, v in opts.items() if k != "p_low"}, opts.get("p_low", 0.5)


def assert_constant_outside(m: torch.Tensor, band: int, pf: int, what: str) -> None:
    """Every (h, w) tile of every mask equals its corner m[0, 0] outside the box |ky|, |kx| < band (numpy)."""
    m = m.detach().cpu().numpy()
    n, height, width = m.shape
    h, w = height // pf, width // pf
    ky = np.abs(np.arange(h) - h // 2)[:, None]
    kx = np.abs(np.arange(w) - w // 2)[None, :]
    outside = (ky >= band) | (kx >= band)
    for i in range(n):
        for ty in range(pf):
            for tx in range(pf):
                tile = m[i, ty * h:(ty + 1) * h, tx * w:(tx + 1) * w]
                bad = np.argwhere(outside & (tile != tile[0, 0]))
                assert len(bad) == 0, (f"{what}: mask {i}, tile ({ty}, {tx}) differs from its corner {tile[0, 0]} at "
                                       f"(ky, kx) = {tuple(int(v) for v in bad[0] - [h // 2, w // 2])}, outside the "
                                       f"promised band {band}")


@pytest.fixture
def spy(monkeypatch):
    """Records (mask, mask_band) of every mfm_fast.corrupt call made by FrequencyCorruption and the trainer."""
    from mfm_fast.train import tasks

    calls = []

    def wrap(real):
        def corrupt(x, mask, **kw):
            calls.append((mask.detach().clone(), kw.get("mask_band")))
            return real(x, mask, **kw)
        return corrupt

    monkeypatch.setattr(corruption, "corrupt", wrap(corruption.corrupt))
    monkeypatch.setattr(tasks, "corrupt", wrap(tasks.corrupt))
    return calls


# ---------------------------------------------------------------------------------------------
# every kind has a band check (enumerated from the code)
# ---------------------------------------------------------------------------------------------

def covered_options():
    """{option: kinds that set it to something else than make_masks' default}."""
    defaults = {k: p.default for k, p in inspect.signature(mfm_fast.make_masks).parameters.items()}
    out = {}
    for kind, (make, _) in KINDS.items():
        for k, v in make(16, 16).items():
            if k not in defaults or v != defaults[k]:
                out.setdefault(k, []).append(kind)
    return out


def test_every_option_of_make_masks_has_a_band_check():
    shaping = [p for p in params(mfm_fast.make_masks) if p not in DRAW_PARAMS]
    covered = covered_options()
    for option in shaping:
        assert option in covered, f"no band check for kind {option!r} (a make_masks option): add a kind to KINDS"
    assert set(shaping) == set(masks.SHAPE_OPTIONS), \
        "masks.SHAPE_OPTIONS must list make_masks' shaping options (FrequencyCorruption's promise relies on it)"
    assert params(mask_band_for)[:2] == ["height", "width"]
    assert set(params(mask_band_for)[2:]) == set(masks.SHAPE_OPTIONS), \
        "mask_band_for must take exactly the shaping options and account for each in its rule"


def test_every_option_of_frequency_corruption_has_a_band_check():
    covered = covered_options()
    for option in params(mfm_fast.FrequencyCorruption.__init__)[1:]:
        if option not in CORRUPT_PARAMS:
            assert option in covered, f"no band check for kind {option!r} (a FrequencyCorruption option)"
    module = mfm_fast.FrequencyCorruption(r1=3, radius_jitter=0.5, patch_factor=2)
    assert set(module.mask_options()) == set(masks.SHAPE_OPTIONS)


def test_frequency_corruption_makes_no_promise_for_an_option_the_rule_does_not_know(monkeypatch):
    """Safe by construction: a shaping option that mask_band_for does not account for gives mask_band None."""
    module = mfm_fast.FrequencyCorruption(r1=3)
    assert module.mask_band(32, 32) == 3
    options = module.mask_options()
    monkeypatch.setattr(module, "mask_options", lambda: dict(options, sector=0.25))
    assert module.mask_band(32, 32) is None


def test_every_adaptive_mode_and_trainer_mask_has_a_band_check():
    from mfm_fast.train import pretrain_args

    for mode in adaptive_masks.MODES:
        assert mode in ADAPTIVE_KINDS, f"no band check for kind {mode!r} (a make_adaptive_masks mode)"
    for mode in pretrain_args.ADAPTIVE_MODES:
        assert mode in ADAPTIVE_KINDS, f"no band check for kind {mode!r} (a --adaptive-mode choice)"
    for mask in pretrain_args.MASKS:
        assert mask in TRAINER_MASKS, f"no band check for kind {mask!r} (a --mask choice)"


def band_call_sites():
    """(file, Class.function) of every call in mfm_fast/ (the backends' plumbing aside) that passes mask_band=
    to corrupt / masked_freq_loss / MaskedFreqLoss."""
    root = Path(mfm_fast.__file__).parent
    sites = set()
    for path in sorted(root.rglob("*.py")):
        if "backends" in path.relative_to(root).parts:
            continue
        tree = ast.parse(path.read_text())

        def visit(node, scope):
            for child in ast.iter_child_nodes(node):
                inner = scope + [child.name] if isinstance(child, (ast.FunctionDef, ast.ClassDef)) else scope
                if isinstance(child, ast.Call) and any(k.arg == "mask_band" for k in child.keywords):
                    f = child.func
                    name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                    if name in ("corrupt", "masked_freq_loss", "MaskedFreqLoss"):
                        sites.add((str(path.relative_to(root)), ".".join(scope)))
                visit(child, inner)
        visit(tree, [])
    return sites


def test_every_call_site_that_passes_a_band_is_checked():
    sites = band_call_sites()
    for site in sorted(sites):
        assert site in BAND_SITES, f"no band check for kind {site[0]}:{site[1]} (it passes mask_band=)"
    assert ("corruption.py", "FrequencyCorruption.forward") in sites


# ---------------------------------------------------------------------------------------------
# the promise on the masks
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_frequency_corruption_band_holds_on_its_masks(kind, height, width, spy):
    opts, p_low = kind_options(kind, height, width)
    promised = KINDS[kind][1]
    pf = PATCH_FACTOR[kind]
    band = mask_band_for(height, width, **opts)  # the function the code calls
    assert promised is None or (band is not None) == promised, f"{kind}: mask_band_for gives {band}"
    module = mfm_fast.FrequencyCorruption(p_low=p_low, backend="torch", **opts)
    assert module.mask_band(height, width) == band
    x = torch.rand(N, 3, height, width, generator=torch.Generator().manual_seed(123))
    lows = [None] * len(SEEDS) + [torch.ones(N, dtype=torch.bool), torch.zeros(N, dtype=torch.bool)]
    if pf > 1:
        lows.append(torch.rand(N, pf, pf, generator=torch.Generator().manual_seed(7)) < 0.5)
    seeds = SEEDS + [0] * (len(lows) - len(SEEDS))
    for seed, low in zip(seeds, lows):
        spy.clear()
        _, mask = module(x, low=low, generator=torch.Generator().manual_seed(seed))
        assert len(spy) == 1 and torch.equal(spy[0][0], mask)
        passed = spy[0][1]
        assert passed == band, f"{kind}: FrequencyCorruption passed mask_band={passed}, mask_band_for gives {band}"
        if passed is not None:
            assert_constant_outside(mask, passed, pf, f"{kind}, {height} x {width}, seed {seed}, low {low}")
    if band is not None:  # and make_masks itself, with the same options, at other seeds
        for seed in range(5):
            m = mfm_fast.make_masks(4 * N, height, width, p_low=p_low,
                                    generator=torch.Generator().manual_seed(seed), **opts)
            assert_constant_outside(m, band, pf, f"{kind}, make_masks, {height} x {width}, seed {seed}")


@pytest.mark.parametrize("height,width", SIZES)
def test_disc_band_is_the_disc_kind_promise(height, width):
    """bench/fft_mask.py and the trainer's labels use disc_band for r2 = 999 discs: the same promise."""
    for r1 in (1, 2.5, min(height, width) / 4, min(height, width) / 2 - 1):
        band = masks.disc_band(height, width, r1, 999)
        assert band == mask_band_for(height, width, r1, 999) == max(1, math.ceil(r1))
        m = mfm_fast.make_masks(3 * N, height, width, r1=r1, generator=torch.Generator().manual_seed(int(r1 * 10)))
        assert_constant_outside(m, band, 1, f"disc r1 = {r1}, {height} x {width}")


def test_the_check_catches_a_band_one_too_small():
    """The numeric check can fail: every banded kind's masks leave a band one smaller somewhere (the promise is
    tight for these draws), so a rule that gave R - 1 would be caught."""
    for kind, (make, promised) in KINDS.items():
        if not promised or "jitter" in kind:  # jittered radii need not reach the largest possible inner radius
            continue
        opts, p_low = kind_options(kind, 32, 32)
        band = mask_band_for(32, 32, **opts)
        if band == 1:
            continue
        low = torch.tensor([True, False] * (N // 2))
        m = mfm_fast.make_masks(N, 32, 32, p_low=p_low, low=low if p_low not in (0.0, 1.0) else None,
                                generator=torch.Generator().manual_seed(0), **opts)
        with pytest.raises(AssertionError, match="outside the promised band"):
            assert_constant_outside(m, band - 1, PATCH_FACTOR[kind], kind)


# ---------------------------------------------------------------------------------------------
# adaptive (FOLK) masks promise nothing: the code passes None
# ---------------------------------------------------------------------------------------------

def tightest_band(m: torch.Tensor) -> int:
    """The smallest R for which every mask of m (N, H, W) equals its corner outside |ky|, |kx| < R (numpy)."""
    m = m.detach().cpu().numpy()
    h, w = m.shape[-2:]
    k = np.maximum(np.abs(np.arange(h) - h // 2)[:, None], np.abs(np.arange(w) - w // 2)[None, :])
    differs = m != m[:, :1, :1]
    return int(k[differs.any(0)].max()) + 1 if differs.any() else 0


@pytest.mark.parametrize("kind", list(ADAPTIVE_KINDS))
def test_adaptive_masks_promise_no_band(kind):
    """Com / RCom keep a per-image set of frequencies anywhere in the spectrum: over a few images no band much
    smaller than the half side holds (so a promise would be a guess), and no code path passes one (the trainer
    test below; band_call_sites for the rest)."""
    for height, width in SIZES:
        need = 0
        for seed in SEEDS:
            g = torch.Generator().manual_seed(seed)
            x = torch.rand(N, 3, height, width, generator=g)
            for variant in ADAPTIVE_VARIANTS:
                m = mfm_fast.make_adaptive_masks(x, **ADAPTIVE_KINDS[kind], **variant, generator=g, backend="torch")
                assert m.shape == (N, height, width)
                need = max(need, tightest_band(m))
        assert need > min(height, width) // 4, f"{kind}, {height} x {width}: every mask fits the band {need}"


def trainer_args(*argv):
    from mfm_fast.train.pretrain import get_args_parser
    from mfm_fast.train.pretrain_args import resolve_args

    return resolve_args(get_args_parser().parse_args(["--img-size", "32", "--device", "cpu", *argv]))


@pytest.mark.parametrize("mask", ["disc", "adaptive"])
def test_trainer_passes_the_promise_of_its_masks(mask, spy):
    """The trainer's Corruptor (--pipeline mfm_fast): disc masks go through FrequencyCorruption with their band
    (checked on the masks), adaptive masks (every --adaptive-mode) are corrupted with mask_band None."""
    from mfm_fast.train.pretrain_args import ADAPTIVE_MODES
    from mfm_fast.train.tasks import Corruptor

    assert mask in TRAINER_MASKS
    runs = ([["--mask", "disc"], ["--mask", "disc", "--bands", "1,2", "4,999", "--radius-jitter", "0.5"],
             ["--mask", "disc", "--mask-patch-factor", "2", "--r1", "3"], ["--mask", "disc", "--r1", "2", "--r2", "5"]]
            if mask == "disc" else [["--mask", "adaptive", "--adaptive-mode", m] for m in ADAPTIVE_MODES])
    x = torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    for argv in runs:
        args = trainer_args(*argv, "--corrupt-backend", "torch", "--loss-backend", "torch")
        corruptor = Corruptor(args, torch.device("cpu"), seed=0)
        for _ in SEEDS:
            spy.clear()
            _, _, m = corruptor(x)
            assert len(spy) == 1, argv
            passed = spy[0][1]
            if mask == "adaptive":
                assert passed is None, f"{argv}: adaptive masks corrupted with mask_band={passed}"
                continue
            bands = {"bands": args.bands} if args.bands is not None else {"r1": args.r1, "r2": args.r2}
            want = mask_band_for(32, 32, radius_jitter=args.radius_jitter, patch_factor=args.mask_patch_factor,
                                 **bands)
            assert passed == want, f"{argv}: passed mask_band={passed}, mask_band_for gives {want}"
            if passed is not None:
                assert_constant_outside(m, passed, args.mask_patch_factor, " ".join(argv))
