"""MFM frequency masks (docs/spec.md §1), with band-pass rings, radius jitter and per-patch tiles.

Convention used everywhere in mfm_fast: a mask is an fftshift-ed **keep** mask of shape
(N, H, W), float32, 1 = frequency kept (visible to the encoder), 0 = removed (to be predicted).
DC sits at (H // 2, W // 2). One mask per image, shared by its channels. With ``patch_factor``
pf > 1 the (N, H, W) mask is a pf x pf grid of tiles of size (H/pf, W/pf), each tile the keep
mask of one patch's own spectrum, DC at the tile's centre (the layout masked_freq_loss and
corrupt take with the same patch_factor).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence as _Sequence
from typing import Optional, Sequence, Tuple

import torch

from . import _validate as V
from ._common import from_blocks

Rings = Tuple[Tuple[float, float], ...]


def check_rings(r1, r2, bands) -> Rings:
    """The rings ((r1, r2), ...) to remove: `bands` when given (r1, r2 must keep their defaults), else ((r1, r2),)."""
    if bands is None:
        r1 = V.check_number("r1", r1, low=0)
        r2 = V.check_number("r2", r2)
        if r2 <= r1:
            raise ValueError(f"r2: must be > r1 = {r1}, got {r2}")
        return ((r1, r2),)
    if (r1, r2) != (16, 999):
        raise ValueError(f"bands: given together with r1 = {r1}, r2 = {r2}; the rings in bands replace (r1, r2), "
                         "so leave r1 and r2 at their defaults (or put that ring in bands)")
    if isinstance(bands, (str, bytes)) or not isinstance(bands, _Sequence):
        raise TypeError(f"bands: expected a sequence of (r1, r2) pairs, got {type(bands).__name__}")
    if len(bands) == 0:
        raise ValueError("bands: expected at least one (r1, r2) ring, got an empty sequence")
    rings = []
    for i, ring in enumerate(bands):
        if isinstance(ring, (str, bytes)) or not isinstance(ring, _Sequence) or len(ring) != 2:
            raise TypeError(f"bands[{i}]: expected a pair (r1, r2), got {ring!r}")
        lo = V.check_number(f"bands[{i}][0]", ring[0], low=0)
        hi = V.check_number(f"bands[{i}][1]", ring[1])
        if hi <= lo:
            raise ValueError(f"bands[{i}]: r2 must be > r1, got ({lo:g}, {hi:g})")
        rings.append((lo, hi))
    return tuple(rings)


def check_patch_factor(patch_factor, height: int, width: int) -> int:
    """pf >= 1 dividing H and W into even tile sides (the fftshift convention needs even sides)."""
    pf = V.check_int("patch_factor", patch_factor, low=1)
    if height % pf or width % pf:
        raise ValueError(f"patch_factor: {pf} must divide the image height {height} and width {width}")
    if (height // pf) % 2 or (width // pf) % 2:
        raise ValueError(f"patch_factor: {pf} gives {height // pf} x {width // pf} patches; patch sides must be even")
    return pf


def _dist2(height: int, width: int, device) -> torch.Tensor:
    """(H, W) float64 squared distance to (H // 2, W // 2) (exact integers)."""
    y = torch.arange(height, dtype=torch.float64, device=device) - height // 2
    x = torch.arange(width, dtype=torch.float64, device=device) - width // 2
    return y[:, None] ** 2 + x[None, :] ** 2


def _removed(dist2: torch.Tensor, rings: Rings) -> torch.Tensor:
    """(H, W) bool: True where some ring (r1, r2) holds the frequency, r1^2 <= dist2 < r2^2."""
    removed = torch.zeros(dist2.shape, dtype=torch.bool)
    for r1, r2 in rings:
        removed |= (r1 * r1 <= dist2) & (dist2 < r2 * r2)
    return removed


@functools.lru_cache(maxsize=256)
def check_rings_on_grid(rings: Rings, height: int, width: int, banded: bool = False) -> None:
    """ValueError naming r1 (``bands`` when banded) when the rings remove every frequency of an (H, W) spectrum
    or none: low- and high-pass masks would then keep everything or nothing (nothing to predict, or nothing
    to see). Pure host arithmetic on the grid's squared distances (cached; no tensor values read)."""
    dist2 = _dist2(height, width, None)
    n_removed = int(_removed(dist2, rings).sum())
    if 0 < n_removed < height * width:
        return
    name = "bands" if banded else "r1"
    what = ", ".join(f"({a:g}, {b:g})" for a, b in rings) if banded else f"{rings[0][0]:g} (r2 = {rings[0][1]:g})"
    far = math.sqrt(float(dist2.max()))
    if n_removed == 0:
        raise ValueError(f"{name}: {what} removes no frequency of the {height} x {width} spectrum (the largest "
                         f"distance to DC is {far:.4g}), so low-pass masks keep everything and high-pass masks "
                         f"nothing (expected an inner radius below {far:.4g})")
    raise ValueError(f"{name}: {what} removes every frequency of the {height} x {width} spectrum, so low-pass "
                     "masks keep nothing and high-pass masks everything (expected an inner radius > 0 or an outer "
                     f"radius <= {far:.4g})")


def _base_mask_uncached(height: int, width: int, rings: Rings, device: torch.device) -> torch.Tensor:
    return (~_removed(_dist2(height, width, None), rings)).to(torch.float32).to(device)


_base_mask_cached = functools.lru_cache(maxsize=64)(_base_mask_uncached)


def base_mask(height: int, width: int, r1: float = 16, r2: float = 999, device=None, *,
              bands: Optional[Sequence[Tuple[float, float]]] = None) -> torch.Tensor:
    """The low-pass keep mask B (H, W), float32: 0 where r1^2 <= (y-H//2)^2 + (x-W//2)^2 < r2^2, else 1.

    With the default r2 = 999 (no outer ring), B is 1 strictly inside the disc of radius r1.
    A finite r2 gives a band mask (the ring r1 <= d < r2 removed). ``bands=[(a1, b1), (a2, b2), ...]``
    replaces (r1, r2): B = 0 on the union of the rings a_i^2 <= d^2 < b_i^2. The returned tensor is
    cached: do not modify it in place.
    """
    V.check_even_size(None, height, width)
    rings = check_rings(r1, r2, bands)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if torch.compiler.is_compiling():  # dynamo traces through caches anyway (and warns): build it in the graph
        return _base_mask_uncached(height, width, rings, device)
    return _base_mask_cached(height, width, rings, device)


def _check_low(low, n: int, pf: int, device: torch.device) -> torch.Tensor:
    """`low` as an (N, pf, pf) bool tensor; accepts (N,) (shared by an image's tiles) or, with pf > 1, (N, pf, pf)."""
    if not isinstance(low, torch.Tensor) or low.dtype != torch.bool:
        raise TypeError(f"low: expected a bool tensor of shape ({n},), got "
                        f"{type(low).__name__ if not isinstance(low, torch.Tensor) else low.dtype}")
    shapes = [(n,)] + ([(n, pf, pf)] if pf > 1 else [])
    if tuple(low.shape) not in shapes:
        raise ValueError(f"low: expected shape {' or '.join(map(str, shapes))}, "
                         f"got {tuple(low.shape)}")
    if low.device != device:
        raise ValueError(f"low: is on {low.device} but device is {device}")
    return low.reshape(n, 1, 1).expand(n, pf, pf) if low.dim() == 1 else low


def make_masks(n: int, height: int, width: int, r1: float = 16, r2: float = 999, p_low: float = 0.5, *,
               bands: Optional[Sequence[Tuple[float, float]]] = None, radius_jitter: float = 0.0,
               patch_factor: int = 1, low: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """Draw one MFM keep mask per image (per patch tile): (N, H, W) float32, fftshift-ed, 1 = kept.

    B is :func:`base_mask`: 0 on the removed rings r1^2 <= d^2 < r2^2 (d from (h//2, w//2)), 1
    elsewhere. Per image b ~ Bernoulli(p_low): b = 1 gives m = B, b = 0 gives m = 1 - B.
    With the default r2 = 999, b = 1 is the low-pass mask (keep the disc of radius r1, remove the
    rest) and b = 0 the high-pass mask (remove the disc, DC included). With rings from ``bands``
    (which replace r1, r2; leave those at their defaults), b = 1 removes the rings (band-stop) and
    b = 0 keeps only the rings (band-pass): e.g. bands=[(4, 8)] with b = 0 keeps exactly 16 <= d^2 < 64.

    radius_jitter = delta >= 0: every radius of every tile gets its own offset u ~ U(-delta, delta),
    r -> max(r + u, 0) (delta = 0 draws nothing, so seeded streams are unchanged).
    patch_factor = pf: the mask is a pf x pf grid of (H/pf, W/pf) tiles (H/pf, W/pf even), each an
    fftshift-ed keep mask with DC at its centre, radii in the tile's frequency units, b drawn per tile.
    ``low`` (bool (N,), or (N, pf, pf) per tile) forces b instead of drawing it.

    Draws (torch.rand on the mask's device with ``generator``, which must live there; no host sync):
    b = torch.rand(N * pf * pf) < p_low unless ``low`` is given, then if delta > 0
    u = delta * (2 * torch.rand(N, pf, pf, K, 2, dtype=float64) - 1) for K rings ((r1, r2) pairs).

    Rings that remove every frequency of the (tile's) spectrum or none (r1 = 0 with r2 beyond the grid, or r1
    past the largest distance to DC, e.g. r1 = 40 on 32 x 32) raise a ValueError naming r1 (``bands``): one of
    the two mask kinds would keep everything, the other nothing. radius_jitter may still make single masks so.

    At 224 x 224 with r1 = 16 the disc holds 793 frequencies: a low-pass mask removes 49,383 of
    50,176, a high-pass mask removes 793. Every such mask is Hermitian (m(k) = m(-k)) per tile.
    """
    n = V.check_int("n", n, low=0)
    p_low = V.check_number("p_low", p_low, low=0.0, high=1.0)
    V.check_even_size(None, height, width)
    rings = check_rings(r1, r2, bands)
    delta = V.check_number("radius_jitter", radius_jitter, low=0.0)
    pf = check_patch_factor(patch_factor, height, width)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    if device is None:
        device = low.device if isinstance(low, torch.Tensor) else (generator.device if generator is not None else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if (low is None or delta > 0) and generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator: is on {generator.device} but the masks are drawn on {device}")
    h, w = height // pf, width // pf
    if low is not None:
        low = _check_low(low, n, pf, device)
    if n > 0 and not torch.compiler.is_compiling():  # host arithmetic on the options only; dynamo need not trace it
        check_rings_on_grid(rings, h, w, bands is not None)
    if low is None:
        low = (torch.rand(n * pf * pf, generator=generator, device=device) < p_low).view(n, pf, pf)
    if delta == 0:
        B = base_mask(h, w, device=device, bands=rings)
        if pf == 1:
            return torch.where(low[:, 0, 0, None, None], B, 1.0 - B)
    else:
        u = torch.rand(n, pf, pf, len(rings), 2, generator=generator, device=device, dtype=torch.float64)
        offsets = delta * (2 * u - 1)  # one per radius per tile
        dist2 = _dist2(h, w, device)
        removed = torch.zeros(n, pf, pf, h, w, dtype=torch.bool, device=device)
        for k, (r1k, r2k) in enumerate(rings):
            lo = (r1k + offsets[:, :, :, k, 0, None, None]).clamp_min(0)
            hi = (r2k + offsets[:, :, :, k, 1, None, None]).clamp_min(0)
            removed |= (lo * lo <= dist2) & (dist2 < hi * hi)
        B = (~removed).to(torch.float32)
    tiles = torch.where(low[..., None, None], B, 1.0 - B)  # (N, pf, pf, h, w)
    return from_blocks(tiles.reshape(n, pf * pf, h, w), pf).contiguous()


# The options of make_masks that shape a mask (n, the size, p_low, low, generator and device only draw it).
# mask_band_for takes exactly these and accounts for each in its rule; FrequencyCorruption draws its masks and
# computes their promise from one dict of them (a shaping option mask_band_for does not know gives no promise).
# tests/api/test_band_promise.py checks that this list is make_masks' and the promise on the masks themselves.
SHAPE_OPTIONS = ("r1", "r2", "bands", "radius_jitter", "patch_factor")


def mask_band_for(height: int, width: int, r1: float = 16, r2: float = 999, *,
                  bands: Optional[Sequence[Tuple[float, float]]] = None, radius_jitter: float = 0.0,
                  patch_factor: int = 1) -> Optional[int]:
    """The ``mask_band`` promise R for :func:`make_masks` with these options, or None when there is none.

    Every mask tile (side h = H/pf, w = W/pf) then equals its corner value outside the centred box
    |ky|, |kx| < R. Rule: if a ring's smallest possible outer radius r2 - delta exceeds the tile's
    half-diagonal ((h/2)^2 + (w/2)^2 < (r2 - delta)^2), every frequency at distance >= r1 + delta
    (its largest possible inner radius) is removed in every mask, corner included, so
    R = max(1, ceil(r1 + delta)) for the smallest such r1. Rings inside the tile (band-pass
    without a ring reaching the corners) give None.
    """
    V.check_even_size(None, height, width)
    rings = check_rings(r1, r2, bands)
    delta = V.check_number("radius_jitter", radius_jitter, low=0.0)
    pf = check_patch_factor(patch_factor, height, width)
    reach2 = (height // pf / 2) ** 2 + (width // pf / 2) ** 2
    inner = [lo for lo, hi in rings if hi - delta > 0 and reach2 < (hi - delta) ** 2]
    return max(1, math.ceil(min(inner) + delta)) if inner else None


def disc_band(height: int, width: int, r1: float, r2: float) -> Optional[int]:
    """The ``mask_band`` promise for MFM disc masks of these radii: ``mask_band_for(height, width, r1, r2)``.

    When r2^2 exceeds the largest squared distance on the grid, (H/2)^2 + (W/2)^2, the ring reaches
    every corner, so low- and high-pass masks differ from their corner value only inside the disc
    d^2 < r1^2: the band R = max(1, ceil(r1)). A finite r2 inside the grid (band-pass) has none.
    """
    return mask_band_for(height, width, r1, r2)
