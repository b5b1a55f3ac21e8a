"""Triton backend for frequency corruption: the DFT as small GEMMs, mask, real part, clamp, normalise.

For one image plane x (H, W) and the symmetrised keep mask M (real-part recovery), the encoder
input is ``normalise(clamp(y, 0, 1))`` with

    y = c x + Re( Eh^H [ (M - c) * colw / (H W) * (Eh x Ew) ] Ew^H )

where Ew (W x K_w) and Eh (K_h x H) are DFT tables restricted to a set of frequencies
(kx >= 0 half spectrum; column weights colw = 1 at kx = 0 and kx = W/2, else 2) and c is the
mask's value outside those frequencies. Two paths:

* **band path** (``mask_band = R``, a promise that the mask equals ``mask[n, 0, 0]`` outside the
  centred box |ky|, |kx| < R, true for MFM disc masks): frequencies ky in (-R, R), kx in [0, R),
  a (2R - 1) x R complex band, in two launches. Phase 1, one program per (plane, row range; two
  ranges by default, BAND_SPLITS): [U; V] = sum over row blocks of [Ch; Sh] (x Ew), a (2 KP, 2 BKX) fp32 tile
  per program (8 KB at R = 16) in a small workspace; it reads x once. Phase 2, one program per
  (plane, block of rows): gathers [P; iP] from the partial sums (fixed order) and the mask, then
  y = c x + [Ch^T | Sh^T] [P; iP] Ew^H and the epilogue, one streaming pass. Low-pass images
  (c = 0) do not read x again; high-pass images (c = 1, ``x - lowpass`` exactly) do.
* **general path** (any mask): c = 0 and every frequency. Launch 1, one program per (plane,
  block of 16 half-spectrum columns): forward transform, mask, inverse along H, written to a
  (N C, 2, H, W/2+1) fp32 workspace. Launch 2, one program per (plane, block of rows): the
  inverse along W as a GEMM plus the epilogue. When the half spectrum fits one column block
  (W <= 30) launch 1 finishes the job alone.

GEMMs run in fp32 on tensor cores with the 3xTF32 split (``precision="tf32x3"``, the default):
within 1e-5 of the fp64 reference relative to max |output|. The band path splits by hand (three tf32
products summed from zero, the DFT tables pre-split on the host, :func:`_mm_table`), which keeps
its kernels within 128 registers; the general path uses Triton's own "tf32x3". ``precision="ieee"`` uses plain
fp32 FMA (slowest, most exact); ``"tf32"`` and ``"bf16"`` round the GEMM operands to 10 / 7
mantissa bits: faster, with errors near 1e-3 / 1e-2 of max |output| (docs/kernels.md, Triton corruption).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from mfm_fast._common import triton_interpreted
from mfm_fast._options import CorruptOptions, op_kwargs, schema_names

from ._dft import channel_stats, dft_table, next_pow2

BAND_MAX = 32          # widest band of the band path, compiled and checked for sm_90 (tools/aot_sm90.py: each
#                        phase within Hopper's 227 KiB of shared memory at R = 32); wider promises take the general path
GENERAL_MAX_SIDE = 256  # largest side of the general path: larger sides need more than Hopper's 227 KiB of shared
#                         memory (python tools/aot_sm90.py --size S prints it; docs/kernels.md, sm_90 build figures)
# band-path tiles (block_rows, block_cols, num_warps, num_stages), phase 1 and phase 2: <= 128 registers, no
# spills at R = 16 on sm_90 (tools/aot_sm90.py). One stage: no software-pipelined copies, so less shared memory
# and far fewer instructions per plane; the two resident programs per SM hide the load latency instead
# (docs/triton_corruption.md)
BAND_COEF_TILES = (64, 16, 4, 1)
BAND_OUT_TILES = (64, 64, 4, 1)
BAND_OUT_TILES_IEEE = (64, 64, 8, 1)  # precision "ieee": the FMA dots' accumulators need 8 warps for 128 registers
BAND_COEF_TILES_WIDE = (64, 16, 8, 1)  # R > 16 (2 KP = 128 spectrum rows): 8 warps, no spills at R = 32
BAND_SPLITS = 2        # row ranges per plane in band phase 1 (partial sums added in phase 2)
GENERAL_BLOCK_KX = 16  # half-spectrum columns per program on the general path
GENERAL_BLOCK_ROWS = 16  # 32 and 64 exceed Hopper's 227 KB of shared memory at H = 224


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """a @ b with fp32 accumulation at the requested GEMM precision."""
    if PRECISION == "bf16":
        if INTERPRETED:  # the interpreter's bf16 dot is wrong; bf16 products are exact in fp32
            c = tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
        else:
            c = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@triton.jit
def _split_tf32(a):
    """a = hi + lo with hi rounded to nearest tf32 (exact in fp32); the tf32x3 data operand split."""
    hi = ((a.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return hi, a - hi


@triton.jit
def _mm_table_split(a_hi, a_lo, t_ptrs, lo_off, TAB_LEFT: tl.constexpr):
    """T @ a (TAB_LEFT) or a @ T for a = a_hi + a_lo (:func:`_split_tf32`) and the table tile T at t_ptrs,
    its tf32 remainder pre-split at t_ptrs + lo_off: three tf32 products lo*hi + hi*lo + hi*hi summed from
    zero in fp32 (no table operand is split in registers)."""
    t = tl.load(t_ptrs)
    if TAB_LEFT:
        c = tl.dot(t, a_lo, input_precision="tf32")
        c = tl.dot(tl.load(t_ptrs + lo_off), a_hi, c, input_precision="tf32")
        c = tl.dot(t, a_hi, c, input_precision="tf32")
    else:
        c = tl.dot(a_hi, tl.load(t_ptrs + lo_off), input_precision="tf32")
        c = tl.dot(a_lo, t, c, input_precision="tf32")
        c = tl.dot(a_hi, t, c, input_precision="tf32")
    return c


@triton.jit
def _mm_table(a, t_ptrs, lo_off, TAB_LEFT: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """T @ a (TAB_LEFT) or a @ T for the table tile T at t_ptrs (the padded tables hold zeros past the
    plane, so every read is in bounds), summed from zero in fp32. "tf32x3": :func:`_mm_table_split` of
    a split here; other precisions: one product as _mm."""
    if PRECISION == "tf32x3":
        a_hi, a_lo = _split_tf32(a)
        c = _mm_table_split(a_hi, a_lo, t_ptrs, lo_off, TAB_LEFT)
    elif TAB_LEFT:
        c = _mm(tl.load(t_ptrs), a, PRECISION, INTERPRETED)
    else:
        c = _mm(a, tl.load(t_ptrs), PRECISION, INTERPRETED)
    return c


@triton.jit
def _swap_halves(z, HALF: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """[re | im] (M, 2 HALF) -> [im | -re], i.e. -i * z, as a GEMM with a signed permutation."""
    i = tl.arange(0, 2 * HALF)[:, None]
    j = tl.arange(0, 2 * HALF)[None, :]
    perm = tl.where(i == j + HALF, 1.0, tl.where(j == i + HALF, -1.0, 0.0))
    return _mm(z, perm, PRECISION, INTERPRETED)


@triton.jit
def _load_pixels(x_ptr, rows, cols, H, W, s_h, s_w, IS_BYTE: tl.constexpr):
    """fp32 pixels in [0, 1] (uint8 / 255), zero outside the image, at broadcastable 2-D row and column
    indices (rows[:, None], cols[None, :] for a (BM, BK) tile; the transposed pair for its transpose)."""
    ok = (rows < H) & (cols < W)
    v = tl.load(x_ptr + rows * s_h + cols * s_w, mask=ok, other=0).to(tl.float32)
    if IS_BYTE:
        v = v * (1.0 / 255.0)
    return v


@triton.jit
def _normalise_store(out_ptr, y, rows, cols, H, W, mean, inv_std):
    """Store (clamp(y, 0, 1) - mean) * inv_std at broadcastable 2-D row and column indices of a
    contiguous (H, W) plane."""
    ok = (rows < H) & (cols < W)
    y = (tl.minimum(tl.maximum(y, 0.0), 1.0) - mean) * inv_std
    if out_ptr.dtype.element_ty == tl.bfloat16:
        # round to nearest even by hand: the interpreter's fp32 -> bf16 cast truncates
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True)
    tl.store(out_ptr + rows * W + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _band_coefficients_kernel(
        x_ptr, ew_ptr, eh_ptr, uv_ptr, H, W, C, s_xn, s_xc, s_xh, s_xw, ROWS_PER_SPLIT,
        WP: tl.constexpr, HP: tl.constexpr, KP: tl.constexpr, BKX: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
        IS_BYTE: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """Band phase 1, program (plane, row split): the split's share of the band spectrum. Per block
    of BM rows, A = x Ew (BM, 2 BKX) = [Ar | Ai], then [U; V] += [Ch; Sh] A (2 KP, 2 BKX), one
    stacked GEMM; stored to uv (planes, splits, 2 KP, 2 BKX). The band spectrum is X = U + [Vi | -Vr]."""
    plane = tl.program_id(0)
    split = tl.program_id(1)
    x_base = x_ptr + (plane // C) * s_xn + (plane % C) * s_xc
    r = tl.arange(0, 2 * KP)
    q = tl.arange(0, 2 * BKX)
    uv = tl.zeros((2 * KP, 2 * BKX), tl.float32)
    for i in range(0, ROWS_PER_SPLIT, BM):
        rows = split * ROWS_PER_SPLIT + i + tl.arange(0, BM)
        a = tl.zeros((BM, 2 * BKX), tl.float32)
        for w0 in range(0, W, BK):
            cols = w0 + tl.arange(0, BK)
            xt = _load_pixels(x_base, rows[:, None], cols[None, :], H, W, s_xh, s_xw, IS_BYTE)
            a += _mm_table(xt, ew_ptr + cols[:, None] * (2 * BKX) + q[None, :], WP * 2 * BKX, False,
                           PRECISION, INTERPRETED)
        # rows past the plane: zero pixels and zero table columns (rows stay below HP: band_rows_per_split)
        uv += _mm_table(a, eh_ptr + r[:, None] * HP + rows[None, :], 2 * KP * HP, True, PRECISION, INTERPRETED)
    tl.store(uv_ptr + (plane * tl.num_programs(1) + split) * 2 * KP * 2 * BKX + r[:, None] * (2 * BKX) + q[None, :], uv)


@triton.jit
def _band_lowpass_kernel(
        x_ptr, mask_ptr, uv_ptr, ew_ptr, ehts_ptr, stats_ptr, out_ptr,
        C, H, W, s_xn, s_xc, s_xh, s_xw, s_mn, s_mh, s_mw, R, SPLITS,
        WP: tl.constexpr, HP: tl.constexpr, KP: tl.constexpr, BKX: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
        IS_BYTE: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """Band phase 2, program (plane, block of BM rows): y = c x + [Ch^T | Sh^T] [P; iP] Ew^H, then
    the epilogue, per BK columns as y^T = Ew bc^T (Ew = [cos | -sin] (W, 2 BKX), bc = [Ch^T | Sh^T] [P; iP]).
    [P; iP] (2 KP, 2 BKX) is gathered from the phase-1 sums: P = X (M - c) colw / HW
    with the symmetrised mask M, iP = [-Pi | Pr]; ky = r - (R - 1) for r < 2R - 1, kx < R."""
    plane = tl.program_id(0)
    n = plane // C
    ch = plane % C
    x_base = x_ptr + n * s_xn + ch * s_xc
    r = tl.arange(0, 2 * KP)[:, None]
    q = tl.arange(0, 2 * BKX)[None, :]
    jj = r % KP
    kx = q % BKX
    lower = r >= KP                                        # the iP half: the partner column, re negated
    qx = tl.where(lower, (q + BKX) % (2 * BKX), q)         # column of X this entry reads
    x_off = jj * (2 * BKX) + qx
    v_off = KP * 2 * BKX + jj * (2 * BKX) + (qx + BKX) % (2 * BKX)
    v_sign = tl.where(qx < BKX, 1.0, -1.0)
    xs = tl.zeros((2 * KP, 2 * BKX), tl.float32)
    for s in range(0, SPLITS):                             # fixed order: reruns are bit-identical
        base = uv_ptr + (plane * SPLITS + s) * 2 * KP * 2 * BKX
        xs += tl.load(base + x_off) + v_sign * tl.load(base + v_off)

    ky = jj - (R - 1)
    valid = (jj < 2 * R - 1) & (kx < R)
    m_base = mask_ptr + n * s_mn
    # |ky| < R <= H // 2 and 0 <= kx < R <= W // 2: the shifted indices of k and -k lie inside the mask
    m_pos = tl.load(m_base + (ky + H // 2) * s_mh + (kx + W // 2) * s_mw, mask=valid, other=0)
    m_neg = tl.load(m_base + (H // 2 - ky) * s_mh + (W // 2 - kx) * s_mw, mask=valid, other=0)
    c = tl.load(m_base).to(tl.float32)    # the mask's value outside the band: frequency (-H/2, -W/2)
    colw = tl.where((kx == 0) | (2 * kx == W), 1.0, 2.0) / (H * W)
    sign = tl.where(lower & (q < BKX), -1.0, 1.0)
    pp = tl.where(valid, xs * ((0.5 * (m_pos.to(tl.float32) + m_neg.to(tl.float32)) - c) * colw * sign), 0.0)

    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    # rows past the plane (below HP) read the tables' zero rows
    bc = _mm_table(pp, ehts_ptr + rows[:, None] * (2 * KP) + tl.arange(0, 2 * KP)[None, :], HP * 2 * KP, True,
                   PRECISION, INTERPRETED)                                             # (BM, 2 BKX)
    mean = tl.load(stats_ptr + ch)
    inv_std = 1.0 / tl.load(stats_ptr + C + ch)
    out_base = out_ptr + plane * H * W
    # the column chunks transposed, y^T (BK, BM) = Ew[cols] bc^T: both GEMM operands come from shared
    # memory, so the loop converts no register layout
    qc = tl.arange(0, 2 * BKX)
    bct = tl.trans(bc)                                                                 # (2 BKX, BM)
    if PRECISION == "tf32x3":
        bct_hi, bct_lo = _split_tf32(bct)  # once per program, not per column chunk
    for w0 in range(0, W, BK):
        cols = w0 + tl.arange(0, BK)
        t_ptrs = ew_ptr + cols[:, None] * (2 * BKX) + qc[None, :]                      # (BK, 2 BKX)
        if PRECISION == "tf32x3":
            yt = _mm_table_split(bct_hi, bct_lo, t_ptrs, WP * 2 * BKX, True)
        else:
            yt = _mm_table(bct, t_ptrs, WP * 2 * BKX, True, PRECISION, INTERPRETED)
        if c != 0.0:  # high-pass images: + c x (low-pass ones skip the second read of x)
            yt = tl.fma(_load_pixels(x_base, rows[None, :], cols[:, None], H, W, s_xh, s_xw, IS_BYTE), c, yt)
        _normalise_store(out_base, yt, rows[None, :], cols[:, None], H, W, mean, inv_std)


@triton.jit
def _corrupt_spectrum_kernel(
        x_ptr, mask_ptr, ew_ptr, ewt_ptr, eh_ptr, eht_ptr, stats_ptr, out_ptr, ws_ptr,
        C, H, W, s_xn, s_xc, s_xh, s_xw, s_mn, s_mh, s_mw,
        KY0, NUM_KY, NUM_KX,
        WP: tl.constexpr, HP: tl.constexpr, KP: tl.constexpr, BKX: tl.constexpr,
        BM: tl.constexpr, BK: tl.constexpr, FUSED: tl.constexpr,
        IS_BYTE: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """General path, program (plane, kx block). Complex tiles are stored as [re | im] (rows, 2 BKX):
    A = x Ew, X = Ch A + Sh (-i A), P = X * (M - c) colw / HW, B = Ch^T P + Sh^T (i P),
    y = B Ew^H = [Br | Bi] [cos; -sin]; then the epilogue (FUSED) or B to the workspace."""
    plane = tl.program_id(0)
    kxb = tl.program_id(1)
    n = plane // C
    ch = plane % C
    x_base = x_ptr + n * s_xn + ch * s_xc
    j = tl.arange(0, KP)                    # row of the ky tables
    q = tl.arange(0, 2 * BKX)               # column of a [re | im] tile
    ew_blk = ew_ptr + kxb * WP * 2 * BKX    # (WP, 2 BKX) [cos | -sin] of this column block
    ewt_blk = ewt_ptr + kxb * 2 * BKX * WP  # its transpose (2 BKX, WP)

    # ---- forward: A = x Ew per row block, X += Ch A + Sh (-i A) ---------------------------------
    xc = tl.zeros((KP, 2 * BKX), tl.float32)
    for h0 in range(0, H, BM):
        rows = h0 + tl.arange(0, BM)
        a = tl.zeros((BM, 2 * BKX), tl.float32)
        for w0 in range(0, W, BK):
            cols = w0 + tl.arange(0, BK)
            xt = _load_pixels(x_base, rows[:, None], cols[None, :], H, W, s_xh, s_xw, IS_BYTE)
            a += _mm(xt, tl.load(ew_blk + cols[:, None] * (2 * BKX) + q[None, :]), PRECISION, INTERPRETED)
        hc = tl.load(eh_ptr + j[:, None] * HP + rows[None, :])
        hs = tl.load(eh_ptr + KP * HP + j[:, None] * HP + rows[None, :])
        xc += _mm(hc, a, PRECISION, INTERPRETED) + _mm(hs, _swap_halves(a, BKX, PRECISION, INTERPRETED),
                                                      PRECISION, INTERPRETED)

    # ---- mask: symmetrised keep mask (m(k) + m(-k)) / 2, times colw / (H W) --------------------
    ky = KY0 + j
    kx = kxb * BKX + q % BKX                # the half-spectrum column of each [re | im] column
    valid = (j[:, None] < NUM_KY) & (kx[None, :] < NUM_KX)
    row_p = (ky + H // 2 + H) % H
    row_m = (H // 2 - ky + H) % H
    col_p = (kx + W // 2) % W
    col_m = (W // 2 - kx + W) % W
    m_base = mask_ptr + n * s_mn
    m_pos = tl.load(m_base + row_p[:, None] * s_mh + col_p[None, :] * s_mw, mask=valid, other=0).to(tl.float32)
    m_neg = tl.load(m_base + row_m[:, None] * s_mh + col_m[None, :] * s_mw, mask=valid, other=0).to(tl.float32)
    keep = 0.5 * (m_pos + m_neg)
    colw = tl.where((kx == 0) | (2 * kx == W), 1.0, 2.0) / (H * W)
    scale2 = tl.where(valid, keep * colw[None, :], 0.0)                          # (KP, 2 BKX)
    p = xc * scale2
    p_i = -_swap_halves(p, BKX, PRECISION, INTERPRETED)                          # i P = [-Pi | Pr]

    # ---- inverse along H: B = Ch^T P + Sh^T (i P), then along W (FUSED) or to the workspace ----
    mean = tl.load(stats_ptr + ch)
    inv_std = 1.0 / tl.load(stats_ptr + C + ch)
    out_base = out_ptr + plane * H * W
    ws_base = ws_ptr + (plane * tl.num_programs(1) + kxb) * HP * 2 * BKX
    for h0 in range(0, H, BM):
        rows = h0 + tl.arange(0, BM)
        hc = tl.load(eht_ptr + rows[:, None] * KP + j[None, :])
        hs = tl.load(eht_ptr + HP * KP + rows[:, None] * KP + j[None, :])
        bc = _mm(hc, p, PRECISION, INTERPRETED) + _mm(hs, p_i, PRECISION, INTERPRETED)   # (BM, 2 BKX)
        if FUSED:
            for w0 in range(0, W, BK):
                cols = w0 + tl.arange(0, BK)
                y = _mm(bc, tl.load(ewt_blk + q[:, None] * WP + cols[None, :]), PRECISION, INTERPRETED)
                _normalise_store(out_base, y, rows[:, None], cols[None, :], H, W, mean, inv_std)
        else:
            tl.store(ws_base + rows[:, None] * (2 * BKX) + q[None, :], bc)


@triton.jit
def _corrupt_inverse_rows_kernel(
        ws_ptr, ewt_ptr, stats_ptr, out_ptr, C, H, W, NUM_BLOCKS,
        WP: tl.constexpr, HP: tl.constexpr, BKX: tl.constexpr,
        BM: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """Program (plane, row block): y = sum over column blocks of B_b Ew_b^H, then the epilogue."""
    plane = tl.program_id(0)
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    q = tl.arange(0, 2 * BKX)
    ch = plane % C
    mean = tl.load(stats_ptr + ch)
    inv_std = 1.0 / tl.load(stats_ptr + C + ch)
    for w0 in range(0, W, BK):
        cols = w0 + tl.arange(0, BK)
        y = tl.zeros((BM, BK), tl.float32)
        for b in range(0, NUM_BLOCKS):
            bc = tl.load(ws_ptr + ((plane * NUM_BLOCKS + b) * HP + rows[:, None]) * (2 * BKX) + q[None, :])
            et = tl.load(ewt_ptr + (b * 2 * BKX + q[:, None]) * WP + cols[None, :])
            y += _mm(bc, et, PRECISION, INTERPRETED)
        _normalise_store(out_ptr + plane * H * W, y, rows[:, None], cols[None, :], H, W, mean, inv_std)


def band_fits(mask_band: int, height: int, width: int) -> bool:
    """True when the band path can take a mask promised constant outside |ky|, |kx| < mask_band."""
    return 1 <= mask_band <= min(BAND_MAX, height // 2, width // 2)


def general_fits(height: int, width: int) -> bool:
    """True when the general path (any mask) fits shared memory at this image size."""
    return max(height, width) <= GENERAL_MAX_SIDE


@functools.lru_cache(maxsize=32)
def _tables(height: int, width: int, first_ky: int, num_ky: int, num_kx: int, block_kx: int, device: torch.device):
    """DFT tables for the kernels, cached per geometry and device:
    ew (B, WP, 2 BKX) = [cos | -sin] (w, kx) per column block, ewt its transpose (B, 2 BKX, WP),
    eh (2, KP, HP) = cos / sin (ky, h), eht its transpose (2, HP, KP)."""
    wp, hp, kp = next_pow2(width), next_pow2(height), next_pow2(num_ky)
    blocks = triton.cdiv(num_kx, block_kx)
    t = dft_table(width, 0, num_kx, blocks * block_kx, wp, device)           # (2, B * BKX, WP)
    t = t.reshape(2, blocks, block_kx, wp) * torch.tensor([1.0, -1.0], device=device).view(2, 1, 1, 1)
    ewt = t.permute(1, 0, 2, 3).reshape(blocks, 2 * block_kx, wp).contiguous()
    ew = ewt.transpose(1, 2).contiguous()
    eh = dft_table(height, first_ky, num_ky, kp, hp, device)
    return ew, ewt, eh, eh.transpose(1, 2).contiguous()


@functools.lru_cache(maxsize=32)
def _band_tables(height: int, width: int, band: int, precision: str, device: torch.device):
    """Band-path tables: ew (WP, 2 BKX) = [cos | -sin] and ewt (2 BKX, WP) over kx in [0, R),
    eh (2 KP, HP) = [Ch; Sh] over ky in (-R, R), ehts (HP, 2 KP) = [Ch^T | Sh^T]. For "tf32x3" each
    is stacked with its split: (2, ...) = [hi; lo], hi rounded to nearest tf32, lo = table - hi."""
    ew, ewt, eh, eht = _tables(height, width, -(band - 1), 2 * band - 1, band, next_pow2(band), device)
    tables = [ew[0], ewt[0], eh.reshape(-1, eh.shape[-1]), eht.permute(1, 0, 2).reshape(eht.shape[1], -1)]
    if precision == "tf32x3":
        his = [((t.contiguous().view(torch.int32) + 0x1000) & -0x2000).view(torch.float32) for t in tables]
        tables = [torch.stack([hi, t - hi]) for hi, t in zip(his, tables)]
    return [t.contiguous() for t in tables]


def band_tiles(precision: str, band: int) -> tuple:
    """The default (block_rows, block_cols, num_warps, num_stages) of band phases 1 and 2 at this precision
    and band width R."""
    return (BAND_COEF_TILES_WIDE if band > 16 else BAND_COEF_TILES,
            BAND_OUT_TILES_IEEE if precision == "ieee" else BAND_OUT_TILES)


def band_rows_per_split(height: int, block_rows: int, splits: int) -> int:
    """Rows of each band phase-1 program: a power of two times block_rows, so that the splits' rows stay
    inside the tables' HP rows."""
    return block_rows * triton.next_power_of_2(triton.cdiv(height, splits * block_rows))


def launch(x: torch.Tensor, mask: torch.Tensor, stats: torch.Tensor, out: torch.Tensor, mask_band: int,
           precision: str, block_rows: Optional[int] = None, block_cols: Optional[int] = None,
           num_warps: Optional[int] = None,
           num_stages: Optional[int] = None, splits: Optional[int] = None) -> list:
    """Write the corrupted input into `out` (N, C, H, W) contiguous. The tiles (default: band_tiles(precision,
    mask_band) on the band path; given ones apply to both phases) are tunable
    (tools/tune_corrupt.py) and clipped to the padded image; `splits` (band path) is the number of
    row ranges each plane's band spectrum is summed over in phase 1. Returns the compiled kernels,
    whose n_regs / n_spills / metadata.shared the tuning script reports."""
    n, channels, height, width = x.shape
    device = x.device
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    wp, hp = next_pow2(width), next_pow2(height)
    interp = triton_interpreted()
    byte = x.dtype == torch.uint8
    stages = {} if num_stages is None else {"num_stages": num_stages}
    if mask_band > 0:
        r = mask_band
        ew, ewt, eh, ehts = _band_tables(height, width, r, precision, device)
        kp, bkx = eh.shape[-2] // 2, ew.shape[-1] // 2
        (bm1, bk1, w1, st1), (bm2, bk2, w2, st2) = [
            (min(block_rows or rows, hp), min(block_cols or cols, wp), num_warps or warps, num_stages or st)
            for rows, cols, warps, st in band_tiles(precision, r)]
        rows_per_split = band_rows_per_split(height, bm1, splits or BAND_SPLITS)
        num_splits = triton.cdiv(height, rows_per_split)
        uv = torch.empty((n * channels, num_splits, 2, kp, 2 * bkx), dtype=torch.float32, device=device)
        coef = _band_coefficients_kernel[(n * channels, num_splits)](
            x, ew, eh, uv, height, width, channels, *x.stride(), rows_per_split, WP=wp, HP=hp, KP=kp, BKX=bkx,
            BM=bm1, BK=bk1, IS_BYTE=byte, PRECISION=precision, INTERPRETED=interp, num_warps=w1, num_stages=st1)
        low = _band_lowpass_kernel[(n * channels, triton.cdiv(height, bm2))](
            x, mask, uv, ew, ehts, stats, out, channels, height, width, *x.stride(), *mask.stride(), r,
            num_splits, WP=wp, HP=hp, KP=kp, BKX=bkx, BM=bm2, BK=bk2, IS_BYTE=byte, PRECISION=precision,
            INTERPRETED=interp, num_warps=w2, num_stages=st2)
        return [coef, low]
    opts = dict(num_warps=num_warps or 4, **stages)
    bk = min(block_cols or 32, wp)
    # the general path's (H x 2 BKX) tiles need small row blocks to fit shared memory
    bm = min(block_rows or GENERAL_BLOCK_ROWS, GENERAL_BLOCK_ROWS, hp)
    num_kx = width // 2 + 1
    bkx = GENERAL_BLOCK_KX
    ew, ewt, eh, eht = _tables(height, width, 0, height, num_kx, bkx, device)
    blocks = ew.shape[0]
    fused = blocks == 1
    ws = out if fused else torch.empty((n * channels, blocks, hp, 2 * bkx), dtype=torch.float32, device=device)
    spectrum = _corrupt_spectrum_kernel[(n * channels, blocks)](
        x, mask, ew, ewt, eh, eht, stats, out, ws, channels, height, width, *x.stride(), *mask.stride(),
        0, height, num_kx, WP=wp, HP=hp, KP=hp, BKX=bkx, BM=bm, BK=bk, FUSED=fused, IS_BYTE=byte,
        PRECISION=precision, INTERPRETED=interp, **opts)
    if fused:
        return [spectrum]
    rows = _corrupt_inverse_rows_kernel[(n * channels, triton.cdiv(height, bm))](
        ws, ewt, stats, out, channels, height, width, blocks, WP=wp, HP=hp, BKX=bkx, BM=bm, BK=bk,
        PRECISION=precision, INTERPRETED=interp, num_warps=4)
    return [spectrum, rows]


@torch.library.custom_op("mfm_fast::corrupt_triton", mutates_args=())
def corrupt(x: torch.Tensor, mask: torch.Tensor, mean: list[float], std: list[float], out_dtype: torch.dtype,
            mask_band: int, precision: str) -> torch.Tensor:
    """x (N, C, H, W) pixels (fp32 / fp16 / bf16 / uint8, any strides), mask (N, H, W) fftshift-ed keep mask
    -> (N, C, H, W) normalised corrupted input in out_dtype, contiguous.

    mask_band > 0 takes the band path (see the module docstring; the caller promises the
    mask is constant outside the band and that :func:`band_fits`); 0 takes the general path.
    """
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    launch(x, mask, channel_stats(tuple(mean), tuple(std), x.device), out, mask_band, precision)
    return out


@corrupt.register_fake
def _(x, mask, mean, std, out_dtype, mask_band, precision):
    return x.new_empty(x.shape, dtype=out_dtype)



_CORRUPT_ARGS = schema_names(corrupt)[2:]  # after x, mask


def unsupported_reason(x: torch.Tensor, mask: torch.Tensor, options: CorruptOptions) -> Optional[str]:
    """None if these kernels run these images with these options (the band path when the mask_band promise
    fits, else the general path), else why not (dispatch then runs the torch backend)."""
    height, width = x.shape[-2:]
    if x.dtype == torch.float64:
        return "float64 images are computed in float64 by the torch backend"
    if not band_fits(options.mask_band, height, width) and not general_fits(height, width):
        return (f"{height} x {width} images without a mask_band <= {BAND_MAX} need the general path, whose tiles "
                f"do not fit shared memory above {GENERAL_MAX_SIDE} per side")
    return None


def run(x: torch.Tensor, mask: torch.Tensor, options: CorruptOptions) -> torch.Tensor:
    """The op on validated inputs: the band path when options.mask_band fits (:func:`band_fits`), else the
    general path."""
    band = options.mask_band if band_fits(options.mask_band, *x.shape[-2:]) else 0
    return corrupt(x, mask, **op_kwargs(options, _CORRUPT_ARGS, mask_band=band))
