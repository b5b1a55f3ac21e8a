// The masked spectral loss of one high-pass plane on its low-frequency band only (the band path of the
// CUDA loss; csrc/loss_band.cu runs it on the GPU, csrc/ops.cpp on the host). __host__ __device__.
//
// The promise mask_band = R (every mask equals its corner m[n, 0, 0] outside the centred box |ky|, |kx| < R)
// with a corner of 1 makes the weight w = 1 - sym_mask zero outside the box, so the loss and its gradient
// need only the band B = {(ky, kx): |ky| < RB, 0 <= kx < RB} of the half spectrum (RB >= R, compiled:
// 16 or 32). With S = 7 M and x = pred - normalise(target) (S x S, real), y = n1 + M j, x = n1 + M j
// (n1 < M, j < 7), W_S = exp(-2 pi i / S):
//   rows     A[y][kx]  = sum_x x[y][x] W_S^(kx x)     = sum_n1 W_S^(kx n1) U_n1[kx mod 7],
//                        U_n1 = DFT7_j(x[y][n1 + M j])  (real input: U[7 - q] = conj U[q])
//   columns  D'[ky][kx] = sum_y A[y][kx] W_S^(ky y)   = sum_n1 W_S^(ky n1) V_n1[ky mod 7],
//                        V_n1 = DFT7_j(A[n1 + M j][kx]) (in place over A)
//   spectral the full path's LossSpectral on every entry of B (D = D' / S, colw w d, gradient entry G)
//   gradient (adjoint, kGrad) Bc[y][kx] = sum_ky G[ky][kx] W_S^(-ky y) (7 partial sums by ky mod 7, then an
//            inverse DFT7 along j), grad[y][x] = sum_kx colw(kx) Re(Bc[y][kx] W_S^(-kx x)) (the irfft's
//            Hermitian sum; 7 partial sums by kx mod 7, then the real part of an inverse DFT7 along j).
// The row passes give one row to a thread (2 columns n1 per global access, 7 accesses j per step), the
// column passes one (kx, n1) or (kx, ky) item to a thread; all twiddles W_S^(k n1) come from one
// shared-memory table tw[ky + RB - 1][n1] (broadcast reads), filled in double per CTA. No runtime division.
#pragma once

#include "planes.cuh"

namespace mfm {

// Compiled band widths: the smallest RB >= mask_band, 0 when the promise is not usable (no mask, R > 32,
// or 2 RB > S: the full path then runs every plane).
MFM_HDC int band_width(int mask_band, int side, bool has_mask) {
  const int rb = mask_band <= 0 || !has_mask ? 0 : (mask_band <= 16 ? 16 : (mask_band <= 32 ? 32 : 0));
  return 2 * rb <= side ? rb : 0;
}

template <int S>
MFM_HDC int band_threads() { return S >= 224 ? 224 : 128; }  // one row per thread (S rounded up to warps)

// Whether plane n's image takes the band path: the promise is on (band > 0) and the mask corner is 1.
template <int S>
MFM_HD bool is_band_image(const LossArgs& a, int n) {
  return a.band > 0 && a.mask[static_cast<int64_t>(n) * S * S] == 1.f;
}

// Shared memory of one band plane: a[S][RB + 1] (the rows' band A, then V in place, then Bc; pitch RB + 1
// keeps the row passes' per-thread rows on distinct banks), g[2 RB - 1][RB] (D', then G in place),
// tw[2 RB - 1][M] (tw[(ky + RB - 1) M + n1] = W_S^(ky n1)), then `extra` bytes (the CTA's reduction).
template <int S, int RB>
struct BandSmem {
  static constexpr int M = FftShape<S>::M, KY = 2 * RB - 1, AP = RB + 1;
  static constexpr int kA = S * AP, kG = KY * RB, kTw = KY * M;
  static constexpr int kComplex = kA + kG + kTw;
  static_assert(kComplex % 2 == 0, "16-byte alignment of what follows");
  static constexpr size_t bytes(size_t extra) { return sizeof(cf) * kComplex + extra; }
};

// Real input DFT7: u[q] = sum_j x[j] W_7^(q j), q = 0..3 (u[7 - q] = conj u[q]).
MFM_HD void rdft7(const float (&x)[7], cf (&u)[4]) {
  constexpr float c1 = static_cast<float>(cos_2pi(1, 7)), c2 = static_cast<float>(cos_2pi(2, 7)),
                  c3 = static_cast<float>(cos_2pi(3, 7));
  constexpr float s1 = static_cast<float>(sin_2pi(1, 7)), s2 = static_cast<float>(sin_2pi(2, 7)),
                  s3 = static_cast<float>(sin_2pi(3, 7));
  const float a1 = x[1] + x[6], a2 = x[2] + x[5], a3 = x[3] + x[4];
  const float b1 = x[1] - x[6], b2 = x[2] - x[5], b3 = x[3] - x[4];
  u[0] = {x[0] + a1 + a2 + a3, 0.f};
  u[1] = {x[0] + c1 * a1 + c2 * a2 + c3 * a3, -(s1 * b1 + s2 * b2 + s3 * b3)};
  u[2] = {x[0] + c2 * a1 + c3 * a2 + c1 * a3, -(s2 * b1 - s3 * b2 - s1 * b3)};
  u[3] = {x[0] + c3 * a1 + c1 * a2 + c2 * a3, -(s3 * b1 - s1 * b2 + s2 * b3)};
}

// Real part of the inverse DFT7: x[j] = Re(sum_q t[q] W_7^(-q j)), j = 0..6.
MFM_HD void irdft7_re(const cf (&t)[7], float (&x)[7]) {
  constexpr float c1 = static_cast<float>(cos_2pi(1, 7)), c2 = static_cast<float>(cos_2pi(2, 7)),
                  c3 = static_cast<float>(cos_2pi(3, 7));
  constexpr float s1 = static_cast<float>(sin_2pi(1, 7)), s2 = static_cast<float>(sin_2pi(2, 7)),
                  s3 = static_cast<float>(sin_2pi(3, 7));
  // Re(t W^(-qj)) = t.x cos(2 pi q j / 7) - t.y sin(2 pi q j / 7); pair q with 7 - q
  const float a1 = t[1].x + t[6].x, a2 = t[2].x + t[5].x, a3 = t[3].x + t[4].x;
  const float b1 = t[1].y - t[6].y, b2 = t[2].y - t[5].y, b3 = t[3].y - t[4].y;
  const float t0 = t[0].x;
  x[0] = t0 + a1 + a2 + a3;
  const float r1 = t0 + c1 * a1 + c2 * a2 + c3 * a3, i1 = s1 * b1 + s2 * b2 + s3 * b3;
  const float r2 = t0 + c2 * a1 + c3 * a2 + c1 * a3, i2 = s2 * b1 - s3 * b2 - s1 * b3;
  const float r3 = t0 + c3 * a1 + c1 * a2 + c2 * a3, i3 = s3 * b1 - s1 * b2 + s2 * b3;
  x[1] = r1 - i1, x[6] = r1 + i1;
  x[2] = r2 - i2, x[5] = r2 + i2;
  x[3] = r3 - i3, x[4] = r3 + i3;
}

MFM_HD void cmac(cf& acc, cf a, cf b) {  // acc += a b
  acc.x = fmaf(a.x, b.x, fmaf(-a.y, b.y, acc.x));
  acc.y = fmaf(a.x, b.y, fmaf(a.y, b.x, acc.y));
}
MFM_HD void cmacc(cf& acc, cf a, cf b) {  // acc += a conj(b)
  acc.x = fmaf(a.x, b.x, fmaf(a.y, b.y, acc.x));
  acc.y = fmaf(a.y, b.x, fmaf(-a.x, b.y, acc.y));
}

// tw[(ky + RB - 1) M + n1] = W_S^(ky n1), rounded from double (k = ky n1 mod S exact on the integers; the
// device's sincospi and the host's sin / cos may differ in the last bit of a double, not of the float).
template <int S, int RB>
MFM_HD void make_band_twiddles(cf* tw, int tid, int nth) {
  using B = BandSmem<S, RB>;
  for_items<B::M, B::KY>(tid, nth, [&](int n1, int jy) {
    int k = (jy - (RB - 1)) * n1;
    k = k < 0 ? k + S * RB : k;  // |ky n1| < RB S
    k -= S * (k / S);            // a constant divisor: a multiply-high
    double sn, cs;  // of pi * 2k / S (exact reduction in units of pi: no local-memory Payne-Hanek path)
#ifdef __CUDA_ARCH__
    sincospi(2.0 * k / S, &sn, &cs);
#else
    sn = std::sin(kPi * (2.0 * k / S)), cs = std::cos(kPi * (2.0 * k / S));
#endif
    tw[jy * B::M + n1] = {static_cast<float>(cs), static_cast<float>(-sn)};
  });
}

constexpr int kRowCols = 2;  // columns n1 per global access of the row passes (4 spill under the 3-CTA budget)

// x[j][i] = pred - normalise(target) at row y, columns x0 + i + M j (i < kRowCols, j < 7): 7 accesses of
// kRowCols elements per tensor; the element types and the vector choice picked by with_dtype / with_bool.
// out[0..2) = p[0..2) as float: one 8 / 4-byte access (float32 / 16-bit) when kVec, else 2 scalar ones.
template <class T, bool kVec>
MFM_HD void load2(const T* p, float (&out)[2]) {
  T v[2];
  if constexpr (kVec && sizeof(T) >= 2) {
    const RawWords<2 * sizeof(T)> r = load_raw<2 * sizeof(T)>(p);
    memcpy(v, r.w, sizeof(v));
  } else {
    v[0] = p[0], v[1] = p[1];
  }
  out[0] = to_float(v[0]), out[1] = to_float(v[1]);
}

// p[0..2) = in[0..2) rounded to T: one 8 / 4-byte store (float32 / 16-bit) when kVec, else 2 scalar ones.
template <class T, bool kVec>
MFM_HD void store2(T* p, const float (&in)[2]) {
  const T v[2] = {static_cast<T>(in[0]), static_cast<T>(in[1])};
  if constexpr (kVec) {
    RawWords<2 * sizeof(T)> r;
    if constexpr (std::is_same_v<T, float>) r.w[0] = float_bits(in[0]), r.w[1] = float_bits(in[1]);
    else r.w[0] = uint32_t{v[0].x} | (uint32_t{v[1].x} << 16);
    store_raw<2 * sizeof(T)>(p, r);
  } else {
    p[0] = v[0], p[1] = v[1];
  }
}

template <int S>
MFM_HD void load_band_chunk(const LossArgs& a, int64_t off, int y, int x0, float mean, float sdev, float inv_std,
                            float (&x)[7][kRowCols]) {
  constexpr int M = FftShape<S>::M;
  with_dtype<false>(a.pred_dt, [&](auto ptag) {
    with_dtype<true>(a.target_dt, [&](auto ttag) {
      with_bool(a.vec, [&](auto kvec) {
        using TP = typename decltype(ptag)::type;
        using TT = typename decltype(ttag)::type;
        const TP* p = static_cast<const TP*>(a.pred) + off + y * S + x0;
        const TT* t = static_cast<const TT*>(a.target) + off + y * S + x0;
#pragma unroll
        for (int j = 0; j < 7; ++j) {
          float tv[kRowCols];
          load2<TP, decltype(kvec)::value>(p + M * j, x[j]);
          load2<TT, decltype(kvec)::value>(t + M * j, tv);
#pragma unroll
          for (int i = 0; i < kRowCols; ++i) x[j][i] -= div_by(tv[i] - mean, sdev, inv_std);  // (0, 1, 1): exact t
        }
      });
    });
  });
}

template <int S>
MFM_HD void store_band_chunk(const LossArgs& a, int64_t off, int y, int x0, const float (&g)[7][kRowCols]) {
  constexpr int M = FftShape<S>::M;
  with_dtype<false>(a.grad_dt, [&](auto tag) {
    with_bool(a.vec, [&](auto kvec) {
      using T = typename decltype(tag)::type;
      T* dst = static_cast<T*>(a.grad) + off + y * S + x0;
#pragma unroll
      for (int j = 0; j < 7; ++j) store2<T, decltype(kvec)::value>(dst + M * j, g[j]);
    });
  });
}

// Plane (image n, channel c). On the GPU the ids are re-read from blockIdx (x: image, y: channel, the band
// kernel's grid) where they are used instead of being held in registers through the plane.
struct BandPlane {
  int n, c;
  MFM_HD int image() const {
#ifdef __CUDA_ARCH__
    return static_cast<int>(blockIdx.x);
#else
    return n;
#endif
  }
  MFM_HD int channel() const {
#ifdef __CUDA_ARCH__
    return static_cast<int>(blockIdx.y);
#else
    return c;
#endif
  }
  template <int S>
  MFM_HD int64_t offset(const LossArgs& a) const {
    return (static_cast<int64_t>(image()) * a.channels + channel()) * S * S;
  }
};

// One band plane (image n, channel c) of the loss: returns this thread's share of sum(colw w d) (unscaled,
// as loss_plane) and, when kGrad, writes the plane's gradient scale * dL/dpred (a.grad, pred's dtype).
// smem: BandSmem<S, RB>. The caller has checked is_band_image (a mask corner of 1 and the promise).
template <int S, int RB, bool kGrad, class Sched>
MFM_HD double loss_band_plane(const LossArgs& a, BandPlane id, float scale, cf* smem, const Sched& sched) {
  const int n = id.image(), c = id.channel();
  using B = BandSmem<S, RB>;
  constexpr int M = B::M, KY = B::KY, AP = B::AP;
  cf* abuf = smem;
  cf* gbuf = smem + B::kA;
  cf* tw = gbuf + B::kG;
  // without normalisation (0, 1, 1): div_by(t - 0, 1, 1) is t exactly
  const bool norm = a.normalize_target;
  const float mean = norm ? pick(a.stats.mean, c) : 0.f, sdev = norm ? pick(a.stats.std, c) : 1.f,
              inv_std = norm ? 1.f / sdev : 1.f;
  sched.run([=](int tid, int nth) { make_band_twiddles<S, RB>(tw, tid, nth); });

  // rows: A[y][kx] = sum_n1 W_S^(kx n1) U_n1[kx mod 7], kRowCols columns n1 per step
  sched.run([=, &a](int tid, int nth) {
    for (int y = tid; y < S; y += nth) {
      cf acc[RB];
#pragma unroll
      for (int k = 0; k < RB; ++k) acc[k] = {0.f, 0.f};
#pragma unroll 1
      for (int n0 = 0; n0 < M; n0 += kRowCols) {
        float x[7][kRowCols];
        load_band_chunk<S>(a, id.offset<S>(a), y, n0, mean, sdev, inv_std, x);
#pragma unroll
        for (int i = 0; i < kRowCols; ++i) {
          const float col[7] = {x[0][i], x[1][i], x[2][i], x[3][i], x[4][i], x[5][i], x[6][i]};
          cf u[4];
          rdft7(col, u);
          const cf* w = tw + (RB - 1) * M + n0 + i;  // W_S^(kx n1) at w[kx M]
#pragma unroll
          for (int k = 0; k < RB; ++k) {
            const int q = k % 7;
            const cf uq = q <= 3 ? u[q] : cconj(u[7 - q]);
            cmac(acc[k], w[k * M], uq);
          }
        }
      }
      cf* row = abuf + y * AP;
#pragma unroll
      for (int k = 0; k < RB; ++k) row[k] = acc[k];
    }
  });

  // columns, step 1: V_n1 = DFT7_j(A[n1 + M j][kx]), in place
  sched.run([=](int tid, int nth) {
    for_items<RB, M>(tid, nth, [&](int kx, int n1) {
      cf u[7];
#pragma unroll
      for (int j = 0; j < 7; ++j) u[j] = abuf[(n1 + M * j) * AP + kx];
      dft7<false>(u);
#pragma unroll
      for (int j = 0; j < 7; ++j) abuf[(n1 + M * j) * AP + kx] = u[j];
    });
  });

  // columns, step 2 and the spectral step: D'[ky][kx] = sum_n1 W_S^(ky n1) V_n1[ky mod 7], then the loss
  // entry (its colw w d summed, G written over D' when kGrad)
  LossSpectral<S> spectral{a.mask + static_cast<int64_t>(n) * S * S, a.gamma, kGrad ? scale * a.gamma / S : 0.f,
                           kGrad};
  spectral.visit([&](auto& sp) {
    sched.run([=, &sp](int tid, int nth) {
      for_items<RB, KY>(tid, nth, [&](int kx, int jy) {
        const int ky = jy - (RB - 1);
        int q = ky + 7 * ((RB + 6) / 7);  // >= 0
        q -= 7 * (q / 7);                 // ky mod 7 (a constant divisor)
        const cf* v = abuf + q * M * AP + kx;
        const cf* w = tw + jy * M;
        cf d = {0.f, 0.f};
#pragma unroll 8
        for (int n1 = 0; n1 < M; ++n1) cmac(d, w[n1], v[n1 * AP]);
        const int kyu = ky < 0 ? ky + S : ky;
        sp(kyu, kx, sp.weight(kyu, kx), d);
        sp.end_item();
        if (kGrad) gbuf[jy * RB + kx] = d;
      });
    });
  });
  if constexpr (kGrad) {
    // gradient, columns: T[q] = sum_(ky = q mod 7) G[ky][kx] W_S^(-ky n1), Bc[n1 + M j][kx] = IDFT7(T)[j]
    sched.run([=](int tid, int nth) {
      for_items<RB, M>(tid, nth, [&](int kx, int n1) {
        cf t[7];
#pragma unroll
        for (int q = 0; q < 7; ++q) t[q] = {0.f, 0.f};
#pragma unroll
        for (int jy = 0; jy < KY; ++jy) {
          constexpr int kBase = 7 * ((RB + 6) / 7) - (RB - 1);
          cmacc(t[(jy + kBase) % 7], gbuf[jy * RB + kx], tw[jy * M + n1]);
        }
        dft7<true>(t);
#pragma unroll
        for (int j = 0; j < 7; ++j) abuf[(n1 + M * j) * AP + kx] = t[j];
      });
    });
    // gradient, rows: grad[y][n1 + M j] = Re IDFT7_j(T), T[q] = sum_(kx = q mod 7) colw Bc[y][kx] W_S^(-kx n1)
    sched.run([=, &a](int tid, int nth) {
      for (int y = tid; y < S; y += nth) {
        cf b[RB];
        const cf* row = abuf + y * AP;
#pragma unroll
        for (int k = 0; k < RB; ++k) b[k] = k == 0 ? row[0] : cscale(row[k], 2.f);
#pragma unroll 1
        for (int n0 = 0; n0 < M; n0 += kRowCols) {
          float g[7][kRowCols];
#pragma unroll
          for (int i = 0; i < kRowCols; ++i) {
            cf t[7];
#pragma unroll
            for (int q = 0; q < 7; ++q) t[q] = {0.f, 0.f};
            const cf* w = tw + (RB - 1) * M + n0 + i;
#pragma unroll
            for (int k = 0; k < RB; ++k) cmacc(t[k % 7], b[k], w[k * M]);
            float out[7];
            irdft7_re(t, out);
#pragma unroll
            for (int j = 0; j < 7; ++j) g[j][i] = out[j];
          }
          store_band_chunk<S>(a, id.offset<S>(a), y, n0, g);
        }
      }
    });
  }
  return spectral.acc;
}

}  // namespace mfm
