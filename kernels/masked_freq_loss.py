"""Triton masked spectral loss (docs/spec.md §3): the loss and dloss/dpred in the forward launches.

Same half-spectrum maths as mfm_fast/backends/torch_backend/masked_freq_loss.py, with every DFT a GEMM on
``tl.dot`` (split re/im, tables from kernels/_dft.py). Per image plane (per patch when
patch_factor > 1) of size h x w, x = pred - target (target normalised in registers):

    A = x @ Ew^T                         (h, w/2+1)   Ew[kx, x] = exp(-2 pi i kx x / w)
    D = Eh @ A / sqrt(h w)               (h, w/2+1)   Eh[ky, y] = exp(-2 pi i ky y / h)
    s = sqrt(|D|^2 + 1e-12) (hypot-style), d = s^gamma, c = ((1 - m(k)) + (1 - m(-k))) / 2 (m fftshift-ed)
    loss = scale * sum_k colw c d        colw = 1, 2, ..., 2, 1 over kx; scale = loss_weight / Z
    G = colw c scale gamma s^(gamma - 2) D / sqrt(h w)
    B = Eh^H @ G;  grad = Re(B) @ cos(2 pi kx x / w) - Im(B) @ sin(2 pi kx x / w)   = irfft2_ortho

Launches (all in the forward; backward only scales the saved gradient by grad_output):

- full path: ``_mfl_full_fwd_kernel``, grid (KXP / BKX, planes), one program per BKX half-spectrum
  columns of a plane: D (all rows) accumulates over BY-row blocks (A_blk = x_blk @ Ew^T,
  D += Eh[:, blk] @ A_blk); then c, d, the loss partial and G. G goes through the program's own
  columns of the fp32 gradient buffer, "packed" (row y: [Re_0, Re_w/2, Re_1, Im_1, ..., Im_w/2-1],
  w floats; Im G of columns 0 and w/2 in a small side buffer), so that B = Eh^H G can stream it in
  BKC-row chunks; B (whose columns 0 and w/2 are real) is then written packed over G.
  ``_mfl_full_inv_kernel``, grid (h / BYV, planes): gradient rows = the inverse along W of the
  packed rows, written over them (fp32) or into the low-precision gradient.
- factored full path (lengths 7 x 2^k, 2^k >= 16: 112, 224): Cooley-Tukey 7 x Q, Q-point DFT GEMMs
  (Q = n / 7) and the twiddle-and-7-point step in fp32 on the CUDA cores. ``_mfl_fact_fwd_kernel``
  replaces ``_mfl_full_fwd_kernel`` when h = 7 Q (``FACTOR_H``): rows y = n1 + 7 n2, frequencies
  ky = k1 + Q k2, about 1/7 of the direct MMAs along H, G stays in registers and B goes straight to
  the packed rows; ``_mfl_fact_inv_kernel`` replaces ``_mfl_full_inv_kernel`` when w = 7 Q
  (``FACTOR_W``): a quarter of its MMAs. tf32x3 MMAs per 224 plane, forward W + forward H + inverse
  H + inverse W: 77 + 22 + 22 + 19 = 140 MFLOP instead of 77 + 176 + 176 + 88 = 517.
- band path (``mask_band=R``, a promise that the mask equals its corner m[n, 0, 0] outside the
  centred box |ky|, |kx| < R): planes whose corner is 1 (high-pass MFM images) have weight only
  in the box, so ``_mfl_band_kernel``, grid (planes,), computes D on the (2R-1) x R band and the
  gradient Re(Eh_band^H G Ew_band^H) directly. The choice is per image on the device: full-path
  programs of band planes exit at once and vice versa.
- loss = sum(partials) * scale: per-program partials and a fixed-order torch.sum (deterministic).

Precision: tl.dot inputs are "tf32x3" by default (three tf32 products: a_lo t + a t_lo + a t, the
tables pre-split on the host), ~fp32 accuracy; "ieee", "tf32" and "bf16" are the other modes. The
three products of each tile start from a zero accumulator and are added to the running sum in fp32:
tensor cores round each k-step toward zero, and fed the running sum they bias it over the whole
DFT (the gradient error at gamma = 0.5 measured on the H200: docs/kernels.md, Triton loss;
tests/backends/tensor_core_emulation.py models it).
Extra memory: the gradient, plus an fp32 copy of it for bf16 / fp16 pred, and O(planes) scalars.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from mfm_fast._common import compute_dtype, needs_grad, triton_interpreted
from mfm_fast._options import LossOptions, op_kwargs, schema_names
from mfm_fast.backends.torch_backend.masked_freq_loss import loss_value_of_op_args, register_saved_grad_autograd

from ._dft import channel_stats, dft_table, next_pow2

BAND_MAX = 32  # widest mask_band the band kernel takes (its (2R-1) x R spectrum stays in registers)
MAX_SIDE = 256  # largest plane side (after patch_factor): larger sides need more shared memory in the forward
#                 kernel than Hopper's 227 KiB (python tools/aot_sm90.py --size S; docs/kernels.md, sm_90 build figures)


# ---------------------------------------------------------------- device helpers


@triton.jit
def _plane_offsets(plane, C, PF, h, w, s_n, s_c, s_h, s_w):
    """Offset of plane (n, c, patch row pi, patch col pj) of an (N, C, H, W) tensor with strides s_*."""
    pj = plane % PF
    pi = (plane // PF) % PF
    c = (plane // (PF * PF)) % C
    n = (plane // (PF * PF * C)).to(tl.int64)
    return n * s_n + c * s_c + (pi * h) * s_h + (pj * w) * s_w


@triton.jit
def _load_diff(p_base, t_base, ys, xs, h, w, sp_h, sp_w, st_h, st_w, mean, std,
               NORM: tl.constexpr, T_U8: tl.constexpr):
    """(BY, BX) tile of pred - target in fp32 (target / 255 if uint8, then (t - mean) / std if NORM); 0 outside."""
    ok = (ys[:, None] < h) & (xs[None, :] < w)
    p = tl.load(p_base + ys[:, None] * sp_h + xs[None, :] * sp_w, mask=ok, other=0.0).to(tl.float32)
    t = tl.load(t_base + ys[:, None] * st_h + xs[None, :] * st_w, mask=ok, other=0).to(tl.float32)
    if T_U8:
        t = t / 255.0
    if NORM:
        t = (t - mean) / std
    return tl.where(ok, p - t, 0.0)


@triton.jit
def _target_stats(stat_ptr, plane, C, PF, NORM: tl.constexpr):
    """(mean, std) normalising the target of this plane's channel (stats laid out [mean x C, std x C]) when
    NORM, else (0, 1)."""
    mean = 0.0
    std = 1.0
    if NORM:
        ch = (plane // (PF * PF)) % C
        mean = tl.load(stat_ptr + ch)
        std = tl.load(stat_ptr + C + ch)
    return mean, std


@triton.jit
def _sym_weight(m_base, sm_h, sm_w, ky, kx, valid, h, w):
    """((1 - m(k)) + (1 - m(-k))) / 2 at k = (ky, kx), ky >= -h, read from the fftshift-ed mask; 0 where not valid."""
    r_pos = (ky + h + h // 2) % h
    c_pos = (kx + w // 2) % w
    r_neg = (h - ky + h // 2) % h
    c_neg = (w - kx + w // 2) % w
    m_pos = tl.load(m_base + r_pos * sm_h + c_pos * sm_w, mask=valid, other=1).to(tl.float32)
    m_neg = tl.load(m_base + r_neg * sm_h + c_neg * sm_w, mask=valid, other=1).to(tl.float32)
    return tl.where(valid, ((1.0 - m_pos) + (1.0 - m_neg)) * 0.5, 0.0)


@triton.jit
def _loss_terms(Dr, Di, m_base, sm_h, sm_w, ky, kx, valid, h, w, scale_ptr, part_ptr, gamma, inv_sqrt,
                HAS_MASK: tl.constexpr, GAMMA_MODE: tl.constexpr):
    """Stores this program's loss partial sum(colw c d) at part_ptr and returns coef, G = coef * D:
    d = s2^(gamma/2), c = the symmetrised removed weight (1 without a mask), colw = 1 at kx = 0, w/2 else 2;
    ky, kx, valid broadcast to D's shape."""
    if HAS_MASK:
        c = _sym_weight(m_base, sm_h, sm_w, ky, kx, valid, h, w)
    else:
        c = tl.where(valid, 1.0, 0.0)
    colw = tl.where((kx == 0) | (kx == w // 2), 1.0, 2.0)
    scale = tl.load(scale_ptr)
    # s = sqrt(|D|^2 + 1e-12) hypot-style, scaled by t = max(|Re|, |Im|, 1e-6) before squaring: no overflow
    # when |D|^2 would pass fp32's 3.4e38 (d = s^gamma is right whenever it fits); same pass, a few more flops
    t = tl.maximum(tl.maximum(tl.abs(Dr), tl.abs(Di)), 1e-6)
    inv_t = 1.0 / t
    a, b, e = Dr * inv_t, Di * inv_t, 1e-6 * inv_t
    s = t * tl.sqrt(a * a + b * b + e * e)
    if GAMMA_MODE == 1:
        d = s
        slope = 1.0 / s
    elif GAMMA_MODE == 2:
        d = s * s
        slope = tl.full(s.shape, 1.0, tl.float32)
    else:
        lg = tl.log(s)
        d = tl.exp(gamma * lg)
        slope = tl.exp((gamma - 2.0) * lg)
    tl.store(part_ptr, tl.sum(colw * c * d))
    return (c * (scale * gamma)) * slope * (colw * inv_sqrt)


@triton.jit
def _split(a, PREC: tl.constexpr):
    """For PREC "tf32x3": (hi, lo), a = hi + lo with hi exact in tf32 (round to nearest); else (a, a)."""
    if PREC == "tf32x3":
        hi = ((a.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
        return hi, a - hi
    else:
        return a, a


@triton.jit
def _mm(a_hi, a_lo, t_ptrs, lo_off, acc, TAB_LEFT: tl.constexpr, PREC: tl.constexpr):
    """acc + T @ a (TAB_LEFT) or acc + a @ T, T the table slice at t_ptrs and (a_hi, a_lo) = _split(a).

    PREC "tf32x3": three tf32 products (lo*hi + hi*lo + hi*hi, ~fp32 accuracy) with the table's
    pre-split tf32 remainder at t_ptrs + lo_off, summed from zero and then added to acc in fp32 (so the
    MMA's round-toward-zero never sees the running sum); "bf16": operands rounded to bf16 ("bf16_emulated"
    under the interpreter, whose bf16 dot is wrong: bf16 products are exact in fp32); else one
    tl.dot at that input precision ("tf32", "ieee")."""
    t = tl.load(t_ptrs)
    if PREC == "tf32x3":
        t_lo = tl.load(t_ptrs + lo_off)
        if TAB_LEFT:
            part = tl.dot(t, a_lo, input_precision="tf32")
            part = tl.dot(t_lo, a_hi, part, input_precision="tf32")
            part = tl.dot(t, a_hi, part, input_precision="tf32")
        else:
            part = tl.dot(a_lo, t, input_precision="tf32")
            part = tl.dot(a_hi, t_lo, part, input_precision="tf32")
            part = tl.dot(a_hi, t, part, input_precision="tf32")
        acc += part
    elif PREC == "bf16":
        if TAB_LEFT:
            acc = tl.dot(t.to(tl.bfloat16), a_hi.to(tl.bfloat16), acc)
        else:
            acc = tl.dot(a_hi.to(tl.bfloat16), t.to(tl.bfloat16), acc)
    elif PREC == "bf16_emulated":
        a = a_hi.to(tl.bfloat16).to(tl.float32)
        t = t.to(tl.bfloat16).to(tl.float32)
        if TAB_LEFT:
            acc = tl.dot(t, a, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, t, acc, input_precision="ieee")
    else:
        if TAB_LEFT:
            acc = tl.dot(t, a_hi, acc, input_precision=PREC)
        else:
            acc = tl.dot(a_hi, t, acc, input_precision=PREC)
    return acc


@triton.jit
def _rows_dft(p_base, t_base, ys, kx, ew_ptr, h, w, sp_h, sp_w, st_h, st_w, mean, std,
              NROWS: tl.constexpr, NCOLS: tl.constexpr, BW: tl.constexpr, KXP: tl.constexpr, WP: tl.constexpr,
              NORM: tl.constexpr, T_U8: tl.constexpr, PREC: tl.constexpr):
    """(Ar, As), (NROWS, NCOLS) each: A = Ar - i As = x[ys, :] @ Ew^T[:, kx], x = pred - target (rows ys)."""
    xs0 = tl.arange(0, BW)
    Ar = tl.zeros((NROWS, NCOLS), tl.float32)
    As = tl.zeros((NROWS, NCOLS), tl.float32)
    for x0 in range(0, w, BW):
        xt = _load_diff(p_base, t_base, ys, x0 + xs0, h, w, sp_h, sp_w, st_h, st_w, mean, std, NORM, T_U8)
        ew_t = ew_ptr + kx[None, :] * WP + (x0 + xs0)[:, None]  # (BW, NCOLS) slice of Ew^T
        xh, xl = _split(xt, PREC)
        Ar = _mm(xh, xl, ew_t, 2 * KXP * WP, Ar, False, PREC)
        As = _mm(xh, xl, ew_t + KXP * WP, 2 * KXP * WP, As, False, PREC)
    return Ar, As


@triton.jit
def _cols_dft(Ar, As, e_t, e_stride, Dr, Dq, PREC: tl.constexpr):
    """(Dr, Dq) + E @ A with E = cos - i sin the table slice at e_t (sin at + e_stride, its tf32 remainders
    at + 2 e_stride) and A = Ar - i As; the result is Dr - i Dq."""
    arh, arl = _split(Ar, PREC)
    ash, asl = _split(As, PREC)
    Dr = _mm(arh, arl, e_t, 2 * e_stride, Dr, True, PREC)
    Dr = _mm(-ash, -asl, e_t + e_stride, 2 * e_stride, Dr, True, PREC)
    Dq = _mm(ash, asl, e_t, 2 * e_stride, Dq, True, PREC)
    Dq = _mm(arh, arl, e_t + e_stride, 2 * e_stride, Dq, True, PREC)
    return Dr, Dq


@triton.jit
def _cols_idft(Gr, Gi, e_t, e_stride, Br, Bi, PREC: tl.constexpr):
    """(Br, Bi) + E^H @ G with E as in _cols_dft (E symmetric: the slice at e_t is read as E^T) and G = Gr + i Gi."""
    grh, grl = _split(Gr, PREC)
    gih, gil = _split(Gi, PREC)
    Br = _mm(grh, grl, e_t, 2 * e_stride, Br, True, PREC)
    Br = _mm(-gih, -gil, e_t + e_stride, 2 * e_stride, Br, True, PREC)
    Bi = _mm(grh, grl, e_t + e_stride, 2 * e_stride, Bi, True, PREC)
    Bi = _mm(gih, gil, e_t, 2 * e_stride, Bi, True, PREC)
    return Br, Bi


@triton.jit
def _store_packed(row, ys, kx, w, so_h, Br, Bi, rows_ok):
    """Rows ys, half-spectrum columns kx of a packed buffer (row: [Re_0, Re_w/2, Re_1, Im_1, ...], w floats;
    columns 0 and w/2 are real: their Bi is dropped, as irfft drops it)."""
    pos_r = tl.where(kx == 0, 0, tl.where(kx == w // 2, 1, 2 * kx))
    kx_ok = (kx < w // 2 + 1)[None, :]
    im_ok = ((kx > 0) & (kx < w // 2))[None, :]
    tl.store(row + ys[:, None] * so_h + pos_r[None, :], Br, mask=rows_ok & kx_ok)
    tl.store(row + ys[:, None] * so_h + (2 * kx + 1)[None, :], Bi, mask=rows_ok & im_ok)


@triton.jit
def _is_band_plane(m_base, BAND: tl.constexpr):
    """With the mask_band promise (BAND), whether the plane's mask corner is 1: a plane of _mfl_band_kernel."""
    band_plane = False
    if BAND:
        band_plane = tl.load(m_base).to(tl.float32) == 1.0
    return band_plane


@triton.jit
def _full_path_plane(m_ptr, p_ptr, t_ptr, stat_ptr, plane, C, PF, h, w, sp_n, sp_c, sp_h, sp_w, st_n, st_c, st_h,
                     st_w, sm_n, sm_h, sm_w, NORM: tl.constexpr, BAND: tl.constexpr):
    """(mask, pred and target bases of the plane, target mean and std, band_plane): band_plane when BAND and
    the plane's mask corner is 1 (the band kernel's plane)."""
    m_base = m_ptr + _plane_offsets(plane, C, PF, h, w, sm_n, 0, sm_h, sm_w)
    band_plane = _is_band_plane(m_base, BAND)
    p_base = p_ptr + _plane_offsets(plane, C, PF, h, w, sp_n, sp_c, sp_h, sp_w)
    t_base = t_ptr + _plane_offsets(plane, C, PF, h, w, st_n, st_c, st_h, st_w)
    mean, std = _target_stats(stat_ptr, plane, C, PF, NORM)
    return m_base, p_base, t_base, mean, std, band_plane


@triton.jit
def _load_packed(row, kx, w, rows_ok):
    """(Br, Bi) at half-spectrum columns kx of packed rows (the layout of _store_packed; Bi = 0 at 0, w/2)."""
    pos_r = tl.where(kx == 0, 0, tl.where(kx == w // 2, 1, 2 * kx))
    Br = tl.load(row + pos_r, mask=rows_ok & (kx < w // 2 + 1), other=0.0)
    Bi = tl.load(row + (2 * kx + 1), mask=rows_ok & ((kx > 0) & (kx < w // 2)), other=0.0)
    return Br, Bi


# ---------------------------------------------------------------- kernels


@triton.jit
def _mfl_full_fwd_kernel(
        p_ptr, t_ptr, m_ptr, ws_ptr, side_ptr, part_ptr, scale_ptr, stat_ptr, ew_ptr, eh_ptr,
        C, PF, h, w,
        sp_n, sp_c, sp_h, sp_w, st_n, st_c, st_h, st_w, sm_n, sm_h, sm_w, so_n, so_c, so_h,
        inv_sqrt, gamma,
        HP: tl.constexpr, KXP: tl.constexpr, WP: tl.constexpr, BKX: tl.constexpr, BY: tl.constexpr,
        BW: tl.constexpr, BKC: tl.constexpr, HAS_MASK: tl.constexpr, BAND: tl.constexpr, NORM: tl.constexpr,
        T_U8: tl.constexpr, NEED_GRAD: tl.constexpr, GAMMA_MODE: tl.constexpr, PREC: tl.constexpr):
    """Program (column block kb, plane): D[:, kb*BKX : (kb+1)*BKX], the loss partial, and packed B into ws."""
    kb = tl.program_id(0)
    plane = tl.program_id(1)
    part_ptr += plane * tl.num_programs(0) + kb
    m_base, p_base, t_base, mean, std, band_plane = _full_path_plane(
        m_ptr, p_ptr, t_ptr, stat_ptr, plane, C, PF, h, w, sp_n, sp_c, sp_h, sp_w, st_n, st_c, st_h, st_w, sm_n,
        sm_h, sm_w, NORM, BAND)
    if band_plane:  # _mfl_band_kernel owns it
        tl.store(part_ptr, 0.0)
        return

    kx = kb * BKX + tl.arange(0, BKX)
    ky = tl.arange(0, HP)
    ys0 = tl.arange(0, BY)
    Dr = tl.zeros((HP, BKX), tl.float32)
    Dq = tl.zeros((HP, BKX), tl.float32)  # Dq = -Im D
    for y0 in range(0, h, BY):
        Ar, As = _rows_dft(p_base, t_base, y0 + ys0, kx, ew_ptr, h, w, sp_h, sp_w, st_h, st_w, mean, std,
                           BY, BKX, BW, KXP, WP, NORM, T_U8, PREC)
        eh_t = eh_ptr + ky[:, None] * HP + (y0 + ys0)[None, :]  # (HP, BY) slice of Eh
        Dr, Dq = _cols_dft(Ar, As, eh_t, HP * HP, Dr, Dq, PREC)
    Dr = Dr * inv_sqrt
    Di = Dq * -inv_sqrt

    valid = (ky[:, None] < h) & (kx[None, :] < w // 2 + 1)
    coef = _loss_terms(Dr, Di, m_base, sm_h, sm_w, ky[:, None], kx[None, :], valid, h, w, scale_ptr, part_ptr, gamma,
                       inv_sqrt, HAS_MASK, GAMMA_MODE)
    if NEED_GRAD:
        # G goes through this program's own packed columns of ws (Im G of columns 0 and w/2, which
        # have no packed slot, through `side`), so that the inverse along H can stream it in chunks
        row = ws_ptr + _plane_offsets(plane, C, PF, h, w, so_n, so_c, so_h, 1)
        side = side_ptr + plane * (2 * HP) + tl.where(kx == 0, 0, HP)
        edge = ((kx == 0) | (kx == w // 2))[None, :]
        rows_ok = ky[:, None] < h
        _store_packed(row, ky, kx, w, so_h, coef * Dr, coef * Di, rows_ok)
        tl.store(side[None, :] + ky[:, None], coef * Di, mask=rows_ok & edge)
        tl.debug_barrier()  # G visible to the whole program
        # B[y, kx] for every row y (indexed by `ky`'s range 0..HP), contracted over chunks kc of ky
        Br = tl.zeros((HP, BKX), tl.float32)
        Bi = tl.zeros((HP, BKX), tl.float32)
        for k0 in range(0, h, BKC):  # B = Eh^H G, streamed over chunks of BKC frequencies ky
            kc = k0 + tl.arange(0, BKC)
            ok = (kc < h)[:, None]
            Gr, Gi = _load_packed(row + kc[:, None] * so_h, kx[None, :], w, ok)
            Gi += tl.load(side[None, :] + kc[:, None], mask=ok & edge, other=0.0)
            eh_t = eh_ptr + ky[:, None] * HP + kc[None, :]  # (HP, BKC) slice of Eh^T = Eh (symmetric)
            Br, Bi = _cols_idft(Gr, Gi, eh_t, HP * HP, Br, Bi, PREC)
        tl.debug_barrier()  # every chunk of G read before B overwrites it
        _store_packed(row, ky, kx, w, so_h, Br, Bi, rows_ok)


@triton.jit
def _mfl_fact_fwd_kernel(
        p_ptr, t_ptr, m_ptr, ws_ptr, part_ptr, scale_ptr, stat_ptr, ew_ptr, eq_ptr, tw_ptr,
        C, PF, h, w,
        sp_n, sp_c, sp_h, sp_w, st_n, st_c, st_h, st_w, sm_n, sm_h, sm_w, so_n, so_c, so_h,
        inv_sqrt, gamma,
        P: tl.constexpr, PP: tl.constexpr, Q: tl.constexpr, KXP: tl.constexpr, WP: tl.constexpr,
        BKX: tl.constexpr, BW: tl.constexpr, HAS_MASK: tl.constexpr, BAND: tl.constexpr, NORM: tl.constexpr,
        T_U8: tl.constexpr, NEED_GRAD: tl.constexpr, GAMMA_MODE: tl.constexpr, PREC: tl.constexpr):
    """The full path's forward for h = P Q (P = 7, Q = 2^k >= 16), the transform along H factored:
    rows y = n1 + P n2, frequencies ky = k1 + Q k2 (k2 < P, padded to PP), so
        D[ky] = sum_n1 W_h^(ky n1) C_n1[k1],   C_n1 = Eq @ A[n1 + P n2, :]   (Q-point DFT GEMMs)
        B[n1 + P n2] = Eq^H @ (sum_k2 conj(W_h^(ky n1)) G[ky])
    with the twiddles tw = W_h^(ky n1) (PP x Q per n1, zero for k2 >= P) applied in fp32 on the CUDA cores.
    About a seventh of the direct path's MMAs along H, and G never leaves registers. Same outputs as
    _mfl_full_fwd_kernel: the loss partial and packed B in ws."""
    kb = tl.program_id(0)
    plane = tl.program_id(1)
    part_ptr += plane * tl.num_programs(0) + kb
    m_base, p_base, t_base, mean, std, band_plane = _full_path_plane(
        m_ptr, p_ptr, t_ptr, stat_ptr, plane, C, PF, h, w, sp_n, sp_c, sp_h, sp_w, st_n, st_c, st_h, st_w, sm_n,
        sm_h, sm_w, NORM, BAND)
    if band_plane:  # _mfl_band_kernel owns it
        tl.store(part_ptr, 0.0)
        return

    kx = kb * BKX + tl.arange(0, BKX)
    q = tl.arange(0, Q)    # n2 of a row, k1 of a frequency
    k2 = tl.arange(0, PP)
    eq_t = eq_ptr + q[:, None] * Q + q[None, :]  # the (symmetric) Q-point DFT table
    tw_off = k2[:, None] * Q + q[None, :]        # (PP, Q) twiddles of one n1
    zero = tl.zeros((Q, BKX), tl.float32)
    Dr = tl.zeros((PP, Q, BKX), tl.float32)
    Dq = tl.zeros((PP, Q, BKX), tl.float32)  # Dq = -Im D
    for n1 in range(0, P):
        Ar, As = _rows_dft(p_base, t_base, n1 + P * q, kx, ew_ptr, h, w, sp_h, sp_w, st_h, st_w, mean, std,
                           Q, BKX, BW, KXP, WP, NORM, T_U8, PREC)
        Cr, Cq = _cols_dft(Ar, As, eq_t, Q * Q, zero, zero, PREC)  # C = Cr - i Cq
        wc = tl.load(tw_ptr + n1 * PP * Q + tw_off)[:, :, None]            # W = wc - i ws
        wsn = tl.load(tw_ptr + (P + n1) * PP * Q + tw_off)[:, :, None]
        Dr += wc * Cr[None, :, :] - wsn * Cq[None, :, :]
        Dq += wc * Cq[None, :, :] + wsn * Cr[None, :, :]
    Dr = Dr * inv_sqrt
    Di = Dq * -inv_sqrt

    ky = (q[None, :] + Q * k2[:, None])[:, :, None]
    kx3 = kx[None, None, :]
    valid = (k2 < P)[:, None, None] & (kx3 < w // 2 + 1)
    coef = _loss_terms(Dr, Di, m_base, sm_h, sm_w, ky, kx3, valid, h, w, scale_ptr, part_ptr, gamma, inv_sqrt,
                       HAS_MASK, GAMMA_MODE)
    if NEED_GRAD:
        Gr = coef * Dr
        Gi = coef * Di
        row = ws_ptr + _plane_offsets(plane, C, PF, h, w, so_n, so_c, so_h, 1)
        for n1 in range(0, P):
            wc = tl.load(tw_ptr + n1 * PP * Q + tw_off)[:, :, None]            # conj(W) = wc + i ws
            wsn = tl.load(tw_ptr + (P + n1) * PP * Q + tw_off)[:, :, None]
            Hr = tl.sum(wc * Gr - wsn * Gi, axis=0)
            Hi = tl.sum(wc * Gi + wsn * Gr, axis=0)
            Br, Bi = _cols_idft(Hr, Hi, eq_t, Q * Q, zero, zero, PREC)
            _store_packed(row, n1 + P * q, kx, w, so_h, Br, Bi, (q < Q)[:, None])


@triton.jit
def _mfl_full_inv_kernel(
        ws_ptr, out_ptr, m_ptr, ew_ptr, C, PF, h, w, sm_n, sm_h, sm_w, so_n, so_c, so_h,
        KXP: tl.constexpr, WP: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr, BAND: tl.constexpr,
        PREC: tl.constexpr):
    """Program (row block yb, plane): grad rows = Re(B) @ cos - Im(B) @ sin from the packed rows of ws.

    ws and out may be the same buffer: every packed value of the block is loaded before any store."""
    yb = tl.program_id(0)
    plane = tl.program_id(1)
    if _is_band_plane(m_ptr + _plane_offsets(plane, C, PF, h, w, sm_n, 0, sm_h, sm_w), BAND):
        return
    off = _plane_offsets(plane, C, PF, h, w, so_n, so_c, so_h, 1)
    ys = yb * BY + tl.arange(0, BY)
    kx = tl.arange(0, KXP)
    rows_ok = ys[:, None] < h
    Br, Bi = _load_packed(ws_ptr + off + ys[:, None] * so_h, kx[None, :], w, rows_ok)
    tl.debug_barrier()  # in place: all loads of the block before the first store
    brh, brl = _split(Br, PREC)
    bih, bil = _split(Bi, PREC)
    xs0 = tl.arange(0, BX)
    out_row = out_ptr + off + ys[:, None] * so_h
    for x0 in range(0, w, BX):
        xs = x0 + xs0
        ew = ew_ptr + kx[:, None] * WP + xs[None, :]  # (KXP, BX) slice of Ew
        g = _mm(brh, brl, ew, 2 * KXP * WP, tl.zeros((BY, BX), tl.float32), False, PREC)
        g = _mm(-bih, -bil, ew + KXP * WP, 2 * KXP * WP, g, False, PREC)
        tl.store(out_row + xs[None, :], g.to(out_ptr.dtype.element_ty), mask=rows_ok & (xs < w)[None, :])


@triton.jit
def _mfl_fact_inv_kernel(
        ws_ptr, out_ptr, m_ptr, eq_ptr, tw_ptr, C, PF, h, w, sm_n, sm_h, sm_w, so_n, so_c, so_h,
        P: tl.constexpr, PP: tl.constexpr, Q: tl.constexpr, K2: tl.constexpr, BY: tl.constexpr, BAND: tl.constexpr,
        PREC: tl.constexpr):
    """_mfl_full_inv_kernel with the transform along W factored, w = P Q (P = 7, Q = 2^k >= 16): columns
    x = m1 + P m2, frequencies kx = k1 + Q k2 (k2 < K2 = KXP / Q), so
        grad[m1 + P m2] = Re sum_k1 W_Q^(-k1 m2) T_m1[k1],   T_m1[k1] = sum_k2 W_w^(-kx m1) B[kx]
    with T in fp32 on the CUDA cores (twiddles tw of w) and 7 Q-point GEMMs: a quarter of the direct MMAs."""
    yb = tl.program_id(0)
    plane = tl.program_id(1)
    if _is_band_plane(m_ptr + _plane_offsets(plane, C, PF, h, w, sm_n, 0, sm_h, sm_w), BAND):
        return
    off = _plane_offsets(plane, C, PF, h, w, so_n, so_c, so_h, 1)
    ys = yb * BY + tl.arange(0, BY)
    q = tl.arange(0, Q)    # k1 of a frequency, m2 of a column
    k2 = tl.arange(0, K2)
    rows_ok = ys[:, None] < h
    Br, Bi = _load_packed(ws_ptr + off + ys[:, None, None] * so_h, (q[None, :] + Q * k2[:, None])[None, :, :], w,
                          rows_ok[:, :, None])  # (BY, K2, Q)
    tl.debug_barrier()  # in place: all loads of the block before the first store
    eq_t = eq_ptr + q[:, None] * Q + q[None, :]  # the (symmetric) Q-point DFT table
    tw_off = k2[:, None] * Q + q[None, :]
    out_row = out_ptr + off + ys[:, None] * so_h
    for m1 in range(0, P):
        wc = tl.load(tw_ptr + m1 * PP * Q + tw_off)[None, :, :]  # W_w^(-kx m1) = wc + i ws
        wsn = tl.load(tw_ptr + (P + m1) * PP * Q + tw_off)[None, :, :]
        Tr = tl.sum(Br * wc - Bi * wsn, axis=1)
        Ti = tl.sum(Br * wsn + Bi * wc, axis=1)
        trh, trl = _split(Tr, PREC)
        tih, til = _split(Ti, PREC)
        g = _mm(trh, trl, eq_t, 2 * Q * Q, tl.zeros((BY, Q), tl.float32), False, PREC)
        g = _mm(-tih, -til, eq_t + Q * Q, 2 * Q * Q, g, False, PREC)
        xs = m1 + P * q
        tl.store(out_row + xs[None, :], g.to(out_ptr.dtype.element_ty), mask=rows_ok & (xs < w)[None, :])


@triton.jit
def _mfl_band_kernel(
        p_ptr, t_ptr, m_ptr, out_ptr, part_ptr, scale_ptr, stat_ptr, ew_ptr, eb_ptr,
        C, PF, h, w, R,
        sp_n, sp_c, sp_h, sp_w, st_n, st_c, st_h, st_w, sm_n, sm_h, sm_w, so_n, so_c, so_h,
        inv_sqrt, gamma,
        HP: tl.constexpr, KXP: tl.constexpr, WP: tl.constexpr, RYP: tl.constexpr, RXP: tl.constexpr,
        BY: tl.constexpr, BW: tl.constexpr, NORM: tl.constexpr, T_U8: tl.constexpr, NEED_GRAD: tl.constexpr,
        GAMMA_MODE: tl.constexpr, PREC: tl.constexpr):
    """Program (plane): if the mask corner is 1, D on rows ky = -(R-1)..R-1, columns kx = 0..RXP-1
    (eb = band table of Eh), the loss partial and the whole gradient plane; else nothing."""
    plane = tl.program_id(0)
    part_ptr += plane
    m_base = m_ptr + _plane_offsets(plane, C, PF, h, w, sm_n, 0, sm_h, sm_w)
    if tl.load(m_base).to(tl.float32) != 1.0:  # a full-path plane
        tl.store(part_ptr, 0.0)
        return
    p_base = p_ptr + _plane_offsets(plane, C, PF, h, w, sp_n, sp_c, sp_h, sp_w)
    t_base = t_ptr + _plane_offsets(plane, C, PF, h, w, st_n, st_c, st_h, st_w)
    mean, std = _target_stats(stat_ptr, plane, C, PF, NORM)

    j = tl.arange(0, RYP)  # band row j is frequency ky = j - (R - 1)
    kx = tl.arange(0, RXP)
    ys0 = tl.arange(0, BY)
    xs0 = tl.arange(0, BW)
    Dr = tl.zeros((RYP, RXP), tl.float32)
    Dq = tl.zeros((RYP, RXP), tl.float32)
    for y0 in range(0, h, BY):
        Ar, As = _rows_dft(p_base, t_base, y0 + ys0, kx, ew_ptr, h, w, sp_h, sp_w, st_h, st_w, mean, std,
                           BY, RXP, BW, KXP, WP, NORM, T_U8, PREC)
        eb_t = eb_ptr + j[:, None] * HP + (y0 + ys0)[None, :]  # (RYP, BY) slice of the band rows of Eh
        Dr, Dq = _cols_dft(Ar, As, eb_t, RYP * HP, Dr, Dq, PREC)
    Dr = Dr * inv_sqrt
    Di = Dq * -inv_sqrt

    valid = (j[:, None] < 2 * R - 1) & (kx[None, :] < w // 2 + 1)
    coef = _loss_terms(Dr, Di, m_base, sm_h, sm_w, j[:, None] - (R - 1), kx[None, :], valid, h, w, scale_ptr,
                       part_ptr, gamma, inv_sqrt, True, GAMMA_MODE)
    if NEED_GRAD:
        o_base = out_ptr + _plane_offsets(plane, C, PF, h, w, so_n, so_c, so_h, 1)
        for y0 in range(0, h, BY):
            ys = y0 + ys0
            ebT = eb_ptr + j[None, :] * HP + ys[:, None]  # (BY, RYP) slice of Eh_band^T
            zero = tl.zeros((BY, RXP), tl.float32)
            Br, Bi = _cols_idft(coef * Dr, coef * Di, ebT, RYP * HP, zero, zero, PREC)
            brh, brl = _split(Br, PREC)
            bih, bil = _split(Bi, PREC)
            for x0 in range(0, w, BW):
                xs = x0 + xs0
                ew = ew_ptr + kx[:, None] * WP + xs[None, :]  # (RXP, BW) slice of Ew
                g = _mm(brh, brl, ew, 2 * KXP * WP, tl.zeros((BY, BW), tl.float32), False, PREC)
                g = _mm(-bih, -bil, ew + KXP * WP, 2 * KXP * WP, g, False, PREC)
                tl.store(o_base + ys[:, None] * so_h + xs[None, :], g.to(out_ptr.dtype.element_ty),
                         mask=(ys[:, None] < h) & (xs < w)[None, :])


# ---------------------------------------------------------------- launcher


def unsupported_reason(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor],
                       options: LossOptions) -> Optional[str]:
    """None if the fused Triton loss handles these inputs and options, else why the torch backend is used
    instead."""
    if options.distance == "magnitude_phase":
        return "distance='magnitude_phase' is not fused; it runs as plain torch ops (autograd through rfft2)"
    h, w = pred.shape[-2] // options.patch_factor, pred.shape[-1] // options.patch_factor
    if max(h, w) > MAX_SIDE:
        return (f"planes of {h} x {w} (more than {MAX_SIDE} per side) do not fit the kernels' shared memory "
                f"on sm_90")
    if options.reduction == "none":
        return "reduction='none' (the per-frequency map) is not fused"
    if options.with_matrix:
        return "with_matrix=True (the focal matrix needs a max over each whole spectrum) is not fused"
    if options.ave_spectrum:
        return "ave_spectrum=True (a batch-average spectrum) is not fused"
    if pred.dtype == torch.float64:
        return "float64 pred is computed in float64, which the Triton kernels do not do"
    return None


@functools.lru_cache(maxsize=64)
def _table(precision: str, *args) -> torch.Tensor:
    """dft_table(*args) as the kernels read it: for "tf32x3" (4, F, N) = [cos, sin] rounded to tf32 (as
    _split in the kernels) and the fp32 remainders; bf16 for "bf16"; else the (2, F, N) fp32 table."""
    table = dft_table(*args)
    if precision == "tf32x3":
        hi = ((table.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)
        return torch.cat([hi, table - hi]).contiguous()
    return table.to(torch.bfloat16) if precision == "bf16" else table


FACTOR = 7  # transforms of length 7 * 2^k (2^k >= 16: 112, 224) are factored
FACTOR_H = True  # False: the direct transform along H at every size (tools/tune_loss.py compares the two)
FACTOR_W = True  # the same for the inverse transform along W (the gradient rows)


def _factored(h: int) -> bool:
    q = h // FACTOR
    return h % FACTOR == 0 and q >= 16 and q & (q - 1) == 0


@functools.lru_cache(maxsize=16)
def _twiddles(h: int, device: torch.device) -> torch.Tensor:
    """(2, P, PP, Q) fp32 [cos; sin] of 2 pi ky n1 / h for ky = k1 + Q k2, n1 < P = 7, k2 < PP = 8, k1 < Q = h / 7;
    zero for k2 >= P. Exact integer phases in float64, then cast (cached)."""
    q = h // FACTOR
    n1 = torch.arange(FACTOR, dtype=torch.int64)[:, None, None]
    ky = (torch.arange(q)[None, None, :] + q * torch.arange(8)[None, :, None]).to(torch.int64)
    angle = (ky * n1).remainder(h).to(torch.float64) * (2 * math.pi / h)
    keep = (torch.arange(8) < FACTOR).to(torch.float64)[None, :, None]
    table = torch.stack([torch.cos(angle) * keep, torch.sin(angle) * keep])
    return table.to(device=device, dtype=torch.float32).contiguous()


def _gamma_mode(gamma: float) -> int:
    return 1 if gamma == 1.0 else (2 if gamma == 2.0 else 0)


def _config(h: int, w: int) -> dict:
    """Block sizes for an h x w plane (powers of two >= 16: tl.dot needs every dimension >= 16).

    HP, WP, KXP: padded rows, columns and half-spectrum columns. Forward kernel: BKX half-spectrum
    columns per program, BY x BW input tiles, BKC frequencies per step of the inverse along H;
    inverse kernel: BYV rows per program, BX output columns per step; band kernel: BY x BW tiles.
    Chosen so that every side up to MAX_SIDE fits Hopper's 227 KiB of shared memory with tf32x3 (w > 254 has
    KXP = 256 and halves the inverse's tiles, which would not fit otherwise): `python tools/aot_sm90.py --size S`
    prints each kernel's shared memory (docs/kernels.md, sm_90 build figures); to be tuned on the GPU."""
    HP, WP, KXP = next_pow2(h), next_pow2(w), next_pow2(w // 2 + 1)
    wide = KXP > 128
    return dict(HP=HP, WP=WP, KXP=KXP, BKX=min(32, KXP), BY=min(16, HP), BW=min(32, WP), BKC=min(16, HP),
                BYV=min(16 if wide else 32, HP), BX=min(16 if wide else 32, WP), fwd_warps=8, warps=4,
                num_stages=2)


def _forward(pred, target, mask, loss_gamma, reduction, patch_factor, loss_weight, target_mean, target_std,
             mask_band, precision, need_grad):
    """Launch the kernels; returns (loss, grad or an empty tensor)."""
    n, C, H, W = pred.shape
    pf = patch_factor
    h, w = H // pf, W // pf
    planes = n * C * pf * pf
    dev = pred.device
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    if reduction == "masked":  # the denominator depends only on the mask: known before the kernels run
        removed = n * H * W - mask.sum(dtype=torch.float64)  # sum of 1 - mask, one read, exact counts
        scale = (loss_weight / (C * removed).clamp_min(1e-30)).to(torch.float32)
    else:
        scale = torch.full((), loss_weight / (n * C * H * W) if reduction == "mean" else loss_weight,
                           dtype=torch.float32, device=dev)
    norm = target_mean is not None
    stats = channel_stats(tuple(target_mean), tuple(target_std), dev) if norm else scale
    m = mask if mask is not None else scale
    sm = mask.stride() if mask is not None else (0, 0, 0)
    band = mask is not None and mask_band is not None and mask_band <= BAND_MAX and 2 * mask_band <= min(h, w)

    cfg = _config(h, w)
    HP, WP, KXP, BY = cfg["HP"], cfg["WP"], cfg["KXP"], cfg["BY"]
    stages = cfg["num_stages"]
    if precision == "bf16" and triton_interpreted():
        precision = "bf16_emulated"
    ew = _table(precision, w, 0, w // 2 + 1, KXP, WP, dev)
    factored = FACTOR_H and _factored(h)
    n_kb = KXP // cfg["BKX"]
    partials = torch.empty(planes * (n_kb + int(band)), dtype=torch.float32, device=dev)
    grad = pred.new_empty(pred.shape) if need_grad else pred.new_empty(0)
    # B (the gradient's half spectrum, packed) lives in the gradient itself when it is fp32
    ws = grad if (not need_grad or grad.dtype == torch.float32) else torch.empty(pred.shape, dtype=torch.float32,
                                                                                  device=dev)
    so = (C * H * W, H * W, W)  # grad and ws: contiguous (N, C, H, W)
    common = dict(NORM=norm, T_U8=target.dtype == torch.uint8, NEED_GRAD=need_grad,
                  GAMMA_MODE=_gamma_mode(loss_gamma), PREC=precision)
    strides = (*pred.stride(), *target.stride(), *sm, *so)
    if factored:
        q = h // FACTOR
        _mfl_fact_fwd_kernel[(n_kb, planes)](
            pred, target, m, ws, partials, scale, stats, ew, _table(precision, q, 0, q, q, q, dev), _twiddles(h, dev),
            C, pf, h, w, *strides, 1.0 / (h * w) ** 0.5, float(loss_gamma), P=FACTOR, PP=8, Q=q, KXP=KXP, WP=WP,
            BKX=cfg["BKX"], BW=cfg["BW"], HAS_MASK=mask is not None, BAND=band, **common,
            num_warps=cfg["fwd_warps"], num_stages=stages)
    else:
        side = torch.empty(planes * 2 * HP if need_grad else 0, dtype=torch.float32, device=dev)
        _mfl_full_fwd_kernel[(n_kb, planes)](
            pred, target, m, ws, side, partials, scale, stats, ew, _table(precision, h, 0, h, HP, HP, dev), C, pf, h,
            w, *strides, 1.0 / (h * w) ** 0.5, float(loss_gamma), HP=HP, KXP=KXP, WP=WP, BKX=cfg["BKX"], BY=BY,
            BW=cfg["BW"], BKC=cfg["BKC"], HAS_MASK=mask is not None, BAND=band, **common,
            num_warps=cfg["fwd_warps"], num_stages=stages)
    if need_grad and FACTOR_W and _factored(w):
        q = w // FACTOR
        _mfl_fact_inv_kernel[(triton.cdiv(h, cfg["BYV"]), planes)](
            ws, grad, m, _table(precision, q, 0, q, q, q, dev), _twiddles(w, dev), C, pf, h, w, *sm, *so, P=FACTOR,
            PP=8, Q=q, K2=KXP // q, BY=cfg["BYV"], BAND=band, PREC=precision, num_warps=cfg["warps"],
            num_stages=stages)
    elif need_grad:
        _mfl_full_inv_kernel[(triton.cdiv(h, cfg["BYV"]), planes)](
            ws, grad, m, ew, C, pf, h, w, *sm, *so, KXP=KXP, WP=WP, BY=cfg["BYV"], BX=cfg["BX"], BAND=band,
            PREC=precision, num_warps=cfg["warps"], num_stages=stages)
    if band:
        R = int(mask_band)
        RYP, RXP = next_pow2(2 * R - 1), next_pow2(R)
        eb = _table(precision, h, 1 - R, 2 * R - 1, RYP, HP, dev)
        _mfl_band_kernel[(planes,)](
            pred, target, m, grad, partials[planes * n_kb:], scale, stats, ew, eb, C, pf, h, w, R, *strides,
            1.0 / (h * w) ** 0.5, float(loss_gamma), HP=HP, KXP=KXP, WP=WP, RYP=RYP, RXP=RXP, BY=cfg["BYV"],
            BW=cfg["BW"], **common, num_warps=cfg["warps"], num_stages=stages)
    return partials.sum() * scale, grad


@torch.library.custom_op("mfm_fast::masked_freq_loss_triton", mutates_args=())
def masked_freq_loss(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor], loss_gamma: float,
                     reduction: str, patch_factor: int, loss_weight: float, target_mean: Optional[list[float]],
                     target_std: Optional[list[float]], mask_band: Optional[int], precision: str,
                     need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar loss (reduction masked / mean / sum, fp32) and, when need_grad, dloss/dpred (N, C, H, W) in
    pred's dtype (empty otherwise). pred fp32 / bf16 / fp16, target any float or uint8, any strides.

    mask_band=R promises mask == mask[n, 0, 0] (per patch tile) outside the centred box |ky|, |kx| < R;
    precision is tl.dot's input_precision ("tf32x3" ~ fp32 accuracy, "tf32" fast, "ieee" exact fp32 FMA).
    """
    args = (pred, target, mask, loss_gamma, reduction, patch_factor, loss_weight, target_mean, target_std, mask_band,
            precision, need_grad)
    if pred.is_cuda:
        with torch.cuda.device(pred.device):  # Triton launches on the current device
            return _forward(*args)
    return _forward(*args)


@masked_freq_loss.register_fake
def _(pred, target, mask, loss_gamma, reduction, patch_factor, loss_weight, target_mean, target_std, mask_band,
      precision, need_grad):
    loss = pred.new_empty((), dtype=compute_dtype(pred))
    return loss, (pred.new_empty(pred.shape) if need_grad else pred.new_empty(0))


register_saved_grad_autograd(masked_freq_loss, recompute=loss_value_of_op_args)
_LOSS_ARGS = schema_names(masked_freq_loss)[3:]  # after pred, target, mask


def run(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor], options: LossOptions) -> torch.Tensor:
    """The scalar loss of validated inputs (:func:`unsupported_reason` is None for them) through the
    autograd-registered op."""
    loss, _ = masked_freq_loss(pred, target, mask, **op_kwargs(options, _LOSS_ARGS,
                                                               need_grad=needs_grad(pred, target)))
    return loss
