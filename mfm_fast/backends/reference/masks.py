"""Reference MFM masks (docs/spec.md §1): the released code's double loop, per patch tile, in plain Python."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch


def base_mask(h: int, w: int, rings: Sequence[Tuple[float, float]]) -> torch.Tensor:
    """(h, w) float64 low-pass keep mask: 0 where r1^2 <= (y - h//2)^2 + (x - w//2)^2 < r2^2 for
    some ring (r1, r2) in `rings`, else 1."""
    rows = []
    for y in range(h):
        row = []
        for x in range(w):
            d2 = (y - h // 2) ** 2 + (x - w // 2) ** 2
            removed = any(r1 * r1 <= d2 < r2 * r2 for r1, r2 in rings)
            row.append(0.0 if removed else 1.0)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def masks_from(low: torch.Tensor, radii: torch.Tensor, height: int, width: int, patch_factor: int = 1) -> torch.Tensor:
    """(N, H, W) float32 keep masks from per-tile choices.

    low: (N, pf, pf) bool, True = the low-pass tile B, False = 1 - B; radii: (N, pf, pf, K, 2) ring
    radii (r1, r2) of each tile. Tile (i, j) of image n fills rows i*h..(i+1)*h-1 and columns
    j*w..(j+1)*w-1 (h = H/pf, w = W/pf), its DC at the tile's centre (i*h + h//2, j*w + w//2).
    """
    pf = patch_factor
    n = low.shape[0]
    h, w = height // pf, width // pf
    out = torch.empty(n, height, width, dtype=torch.float64)
    for b in range(n):
        for i in range(pf):
            for j in range(pf):
                rings = [(float(r1), float(r2)) for r1, r2 in radii[b, i, j].tolist()]
                tile = base_mask(h, w, rings)
                out[b, i * h:(i + 1) * h, j * w:(j + 1) * w] = tile if bool(low[b, i, j]) else 1 - tile
    return out.to(torch.float32)
