"""Cached device constants for the DFT-as-GEMM Triton kernels: DFT tables, built once per (size,
frequencies, device), and the per-channel normalisation statistics.

A length-n DFT restricted to a set of frequencies k is a GEMM with the table
``E[k, m] = exp(-2 pi i k m / n) = cos(2 pi k m / n) - i sin(2 pi k m / n)``; its inverse uses the
conjugate. We store cos and sin (the + sign) split into real tables, zero-padded to power-of-two
shapes so kernels can load them unmasked and feed them to ``tl.dot``: padded frequencies and
padded sample positions contribute exactly 0.

The angles are computed in float64 from the exact integer product ``k * m mod n`` and then cast,
so every table entry is the correctly rounded value of its float32 (or other dtype) cos/sin.
"""

from __future__ import annotations

import functools
import math

import torch


def next_pow2(v: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(v, minimum) (tl.dot needs every dimension >= 16)."""
    return max(minimum, 1 << max(0, int(v) - 1).bit_length())


@functools.lru_cache(maxsize=64)
def dft_table(n: int, first_freq: int, num_freqs: int, freq_pad: int, n_pad: int,
              device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(2, freq_pad, n_pad) table: [0, j, m] = cos(2 pi k_j m / n), [1, j, m] = sin(2 pi k_j m / n),
    k_j = first_freq + j for j < num_freqs, m < n; zero where j >= num_freqs or m >= n.

    Negative first_freq is fine (a band of frequencies around 0). Cached: do not modify the result.
    """
    if num_freqs > freq_pad or n > n_pad:
        raise ValueError(f"dft_table: {num_freqs} frequencies / {n} samples do not fit ({freq_pad}, {n_pad})")
    k = torch.arange(first_freq, first_freq + num_freqs, dtype=torch.int64)[:, None]
    m = torch.arange(n, dtype=torch.int64)[None, :]
    angle = (k * m).remainder(n).to(torch.float64) * (2.0 * math.pi / n)
    table = torch.zeros(2, freq_pad, n_pad, dtype=torch.float64)
    table[0, :num_freqs, :n] = torch.cos(angle)
    table[1, :num_freqs, :n] = torch.sin(angle)
    return table.to(device=device, dtype=dtype).contiguous()


@functools.lru_cache(maxsize=32)
def channel_stats(mean: tuple, std: tuple, device: torch.device) -> torch.Tensor:
    """(2, C) float32 [mean; std] on the device, cached so no host-to-device copy per call."""
    return torch.tensor([mean, std], dtype=torch.float32, device=device)
