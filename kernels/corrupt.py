"""Triton backend for frequency corruption: the DFT as small GEMMs, mask, real part, clamp, normalise.

For one image plane x (H, W) and the symmetrised keep mask M (real-part recovery), the encoder
input is ``normalise(clamp(y, 0, 1))`` with

    y = c x + Re( Eh^H [ (M - c) * colw / (H W) * (Eh x Ew) ] Ew^H )

where Ew (W x K_w) and Eh (K_h x H) are DFT tables restricted to a set of frequencies
(kx >= 0 half spectrum; column weights colw = 1 at kx = 0 and kx = W/2, else 2) and c is the
mask's value outside those frequencies. Two paths share one kernel:

* **band path** (``mask_band = R``, a promise that the mask equals ``mask[n, 0, 0]`` outside the
  centred box |ky|, |kx| < R, true for MFM disc masks): frequencies ky in (-R, R), kx in [0, R).
  The whole spectrum work is a (2R - 1) x R complex tile held in registers, so the op is one
  launch, one program per plane, reading x twice (the second read hits L2) and writing the
  output once: a streaming pass at the memory floor. Low-pass images get c = 0, high-pass
  images c = 1, i.e. ``x - lowpass``, exactly.
* **general path** (any mask): c = 0 and every frequency. Launch 1, one program per (plane,
  block of 16 half-spectrum columns): forward transform, mask, inverse along H, written to a
  (N C, 2, H, W/2+1) fp32 workspace. Launch 2, one program per (plane, block of rows): the
  inverse along W as a GEMM plus the epilogue. When the half spectrum fits one column block
  (W <= 30) launch 1 finishes the job alone.

GEMMs run in fp32 on tensor cores with the 3xTF32 split (``precision="tf32x3"``, the default):
within 1e-5 of the fp64 reference relative to max |output|. ``precision="ieee"`` uses plain
fp32 FMA (slowest, most exact); ``"tf32"`` and ``"bf16"`` round the GEMM operands to 10 / 7
mantissa bits: faster, with errors near 1e-3 / 1e-2 of max |output| (measured in the docs).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from mfm_fast.dispatch import triton_interpreted

from ._dft import channel_stats, dft_table, next_pow2

BAND_MAX = 32          # widest band of the one-launch path: R = 33..64 needs 296-336 KiB of shared memory
#                        on sm_90 whatever the row tiles (bench/aot_sm90.py), more than Hopper's 227 KiB
GENERAL_MAX_SIDE = 256  # largest side of the general path: at 257..512 it needs 416 KiB of shared memory
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
def _swap_halves(z, HALF: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """[re | im] (M, 2 HALF) -> [im | -re], i.e. -i * z, as a GEMM with a signed permutation."""
    i = tl.arange(0, 2 * HALF)[:, None]
    j = tl.arange(0, 2 * HALF)[None, :]
    perm = tl.where(i == j + HALF, 1.0, tl.where(j == i + HALF, -1.0, 0.0))
    return _mm(z, perm, PRECISION, INTERPRETED)


@triton.jit
def _load_pixels(x_ptr, rows, cols, H, W, s_h, s_w, IS_BYTE: tl.constexpr):
    """(BM, BK) fp32 pixels in [0, 1] (uint8 / 255), zero outside the image."""
    ok = (rows[:, None] < H) & (cols[None, :] < W)
    v = tl.load(x_ptr + rows[:, None] * s_h + cols[None, :] * s_w, mask=ok, other=0).to(tl.float32)
    if IS_BYTE:
        v = v * (1.0 / 255.0)
    return v


@triton.jit
def _normalise_store(out_ptr, y, rows, cols, H, W, mean, inv_std):
    ok = (rows[:, None] < H) & (cols[None, :] < W)
    y = (tl.minimum(tl.maximum(y, 0.0), 1.0) - mean) * inv_std
    if out_ptr.dtype.element_ty == tl.bfloat16:
        # round to nearest even by hand: the interpreter's fp32 -> bf16 cast truncates
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True)
    tl.store(out_ptr + rows[:, None] * W + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _corrupt_spectrum_kernel(
        x_ptr, mask_ptr, ew_ptr, ewt_ptr, eh_ptr, eht_ptr, stats_ptr, out_ptr, ws_ptr,
        C, H, W, s_xn, s_xc, s_xh, s_xw, s_mn, s_mh, s_mw,
        KY0, NUM_KY, NUM_KX,
        WP: tl.constexpr, HP: tl.constexpr, KP: tl.constexpr, BKX: tl.constexpr,
        BM: tl.constexpr, BK: tl.constexpr, BAND: tl.constexpr, FUSED: tl.constexpr,
        IS_BYTE: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """Program (plane, kx block). Complex tiles are stored as [re | im] (rows, 2 BKX):
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
            xt = _load_pixels(x_base, rows, cols, H, W, s_xh, s_xw, IS_BYTE)
            a += _mm(xt, tl.load(ew_blk + cols[:, None] * (2 * BKX) + q[None, :]), PRECISION, INTERPRETED)
        hc = tl.load(eh_ptr + j[:, None] * HP + rows[None, :])
        hs = tl.load(eh_ptr + KP * HP + j[:, None] * HP + rows[None, :])
        xc += _mm(hc, a, PRECISION, INTERPRETED) + _mm(hs, _swap_halves(a, BKX, PRECISION, INTERPRETED),
                                                      PRECISION, INTERPRETED)

    # ---- mask: symmetrised keep mask (m(k) + m(-k)) / 2, minus c, times colw / (H W) ----------
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
    c = 0.0
    if BAND:
        c = tl.load(m_base).to(tl.float32)   # the mask's value outside the band: frequency (-H/2, -W/2)
    colw = tl.where((kx == 0) | (2 * kx == W), 1.0, 2.0) / (H * W)
    scale2 = tl.where(valid, (keep - c) * colw[None, :], 0.0)                    # (KP, 2 BKX)
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
                if BAND:
                    if c != 0.0:  # high-pass images: + c x (low-pass ones skip the second read of x)
                        y += c * _load_pixels(x_base, rows, cols, H, W, s_xh, s_xw, IS_BYTE)
                _normalise_store(out_base, y, rows, cols, H, W, mean, inv_std)
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
        _normalise_store(out_ptr + plane * H * W, y, rows, cols, H, W, mean, inv_std)


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


def launch(x: torch.Tensor, mask: torch.Tensor, stats: torch.Tensor, out: torch.Tensor, mask_band: int,
           precision: str, block_rows: int = 64, block_cols: int = 32, num_warps: Optional[int] = None,
           num_stages: Optional[int] = None) -> None:
    """Write the corrupted input into `out` (N, C, H, W) contiguous; the tile sizes are tunable
    (bench/tune_corrupt.py) and are clipped to the padded image. Returns the (first) compiled kernel,
    whose n_regs / n_spills / metadata.shared the tuning script reports."""
    n, channels, height, width = x.shape
    device = x.device
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    wp, hp = next_pow2(width), next_pow2(height)
    interp = triton_interpreted()
    if mask_band == 0:  # the general path's (H x 2 BKX) tiles need small row blocks to fit shared memory
        block_rows = min(block_rows, GENERAL_BLOCK_ROWS)
    bm, bk = min(block_rows, hp), min(block_cols, wp)
    common = dict(WP=wp, HP=hp, BM=bm, BK=bk, IS_BYTE=x.dtype == torch.uint8, PRECISION=precision,
                  INTERPRETED=interp, **({} if num_stages is None else {"num_stages": num_stages}))
    if mask_band > 0:
        r = mask_band
        ew, ewt, eh, eht = _tables(height, width, -(r - 1), 2 * r - 1, r, next_pow2(r), device)
        return _corrupt_spectrum_kernel[(n * channels, 1)](
            x, mask, ew, ewt, eh, eht, stats, out, out, channels, height, width, *x.stride(), *mask.stride(),
            -(r - 1), 2 * r - 1, r, KP=eh.shape[1], BKX=next_pow2(r), BAND=True, FUSED=True,
            num_warps=num_warps or 4, **common)
    num_kx = width // 2 + 1
    bkx = GENERAL_BLOCK_KX
    ew, ewt, eh, eht = _tables(height, width, 0, height, num_kx, bkx, device)
    blocks = ew.shape[0]
    fused = blocks == 1
    ws = out if fused else torch.empty((n * channels, blocks, hp, 2 * bkx), dtype=torch.float32, device=device)
    compiled = _corrupt_spectrum_kernel[(n * channels, blocks)](
        x, mask, ew, ewt, eh, eht, stats, out, ws, channels, height, width, *x.stride(), *mask.stride(),
        0, height, num_kx, KP=hp, BKX=bkx, BAND=False, FUSED=fused, num_warps=num_warps or 4, **common)
    if not fused:
        _corrupt_inverse_rows_kernel[(n * channels, triton.cdiv(height, bm))](
            ws, ewt, stats, out, channels, height, width, blocks, WP=wp, HP=hp, BKX=bkx, BM=bm, BK=bk,
            PRECISION=precision, INTERPRETED=interp, num_warps=4)
    return compiled


@torch.library.custom_op("mfm_fast::corrupt_triton", mutates_args=())
def corrupt(x: torch.Tensor, mask: torch.Tensor, mean: list[float], std: list[float], out_dtype: torch.dtype,
            mask_band: int, precision: str) -> torch.Tensor:
    """x (N, C, H, W) pixels (fp32 / fp16 / bf16 / uint8, any strides), mask (N, H, W) fftshift-ed keep mask
    -> (N, C, H, W) normalised corrupted input in out_dtype, contiguous.

    mask_band > 0 takes the one-launch band path (see the module docstring; the caller promises the
    mask is constant outside the band and that :func:`band_fits`); 0 takes the general path.
    """
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    launch(x, mask, channel_stats(tuple(mean), tuple(std), x.device), out, mask_band, precision)
    return out


@corrupt.register_fake
def _(x, mask, mean, std, out_dtype, mask_band, precision):
    return x.new_empty(x.shape, dtype=out_dtype)

