// Shared per-plane math of the CUDA extension: a mixed-radix (2^k * 7) complex FFT on one line and the
// 2D real-plane pipeline (row r2c, column FFTs, spectral step, inverse columns, row c2r).
//
// Everything here is __host__ __device__ and free of torch headers: the CUDA kernels run it with one CTA
// per plane (threads split the lines, __syncthreads between passes) and the CPU kernels of the same ops
// run it with one "thread" (tid 0 of 1), which is how CI checks the kernel maths without a GPU.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MFM_HD __host__ __device__ __forceinline__
#else
#define MFM_HD inline
#endif

namespace mfm {

struct cf {
  float x, y;
};
MFM_HD cf cadd(cf a, cf b) { return {a.x + b.x, a.y + b.y}; }
MFM_HD cf csub(cf a, cf b) { return {a.x - b.x, a.y - b.y}; }
MFM_HD cf cmul(cf a, cf b) { return {a.x * b.x - a.y * b.y, a.x * b.y + a.y * b.x}; }
MFM_HD cf cscale(cf a, float s) { return {a.x * s, a.y * s}; }

MFM_HD void block_sync() {
#ifdef __CUDA_ARCH__
  __syncthreads();
#endif
}

// Plane sides with a compile-time instantiation (square planes only).
MFM_HD constexpr bool supported_side(int s) { return s == 224 || s == 112; }

MFM_HD constexpr int ilog2(int v) { return v <= 1 ? 0 : 1 + ilog2(v / 2); }

template <int N>
struct FftShape {
  static constexpr int R = (N % 7 == 0) ? 7 : 1;  // the odd radix
  static constexpr int M = N / R;                 // power-of-two part
  static_assert(M > 0 && (M & (M - 1)) == 0, "FFT length must be 2^k or 7 * 2^k");
  static constexpr int LOG2M = ilog2(M);
};

// tw[j] = exp(-2 pi i j / N), j = 0..N-1, rounded from double. Threads tid, tid + nth, ... fill it.
template <int N>
MFM_HD void make_twiddles(cf* tw, int tid, int nth) {
  for (int j = tid; j < N; j += nth) {
    const double a = -2.0 * 3.14159265358979323846 * j / N;
    tw[j] = {static_cast<float>(cos(a)), static_cast<float>(sin(a))};
  }
}

MFM_HD int bit_reverse(int v, int bits) {
  int r = 0;
  for (int b = 0; b < bits; ++b) r = (r << 1) | ((v >> b) & 1);
  return r;
}

// In-place DFT of a[i * stride], i < N: forward sign -1, inverse sign +1, unnormalised. buf: N scratch.
// Decimation in time: R interleaved sub-sequences get radix-2 FFTs of length M, then one radix-R pass
// X[k] = sum_r W_N^(r k) E_r[k mod M].
template <int N>
MFM_HD void fft_line(cf* a, int stride, const cf* tw, bool inverse, cf* buf) {
  constexpr int R = FftShape<N>::R, M = FftShape<N>::M, LOG2M = FftShape<N>::LOG2M;
  const float sgn = inverse ? -1.f : 1.f;  // conjugates the (forward) twiddles
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) buf[r * M + bit_reverse(m, LOG2M)] = a[(R * m + r) * stride];
  for (int len = 2; len <= M; len <<= 1) {
    const int half = len >> 1, step = N / len;
    for (int r = 0; r < R; ++r) {
      cf* e = buf + r * M;
      for (int base = 0; base < M; base += len)
        for (int j = 0; j < half; ++j) {
          const cf w = {tw[j * step].x, sgn * tw[j * step].y};
          const cf u = e[base + j], v = cmul(e[base + j + half], w);
          e[base + j] = cadd(u, v);
          e[base + j + half] = csub(u, v);
        }
    }
  }
  if (R == 1) {
    for (int k = 0; k < N; ++k) a[k * stride] = buf[k];
    return;
  }
  for (int k = 0; k < N; ++k) {
    const int km = k & (M - 1);
    cf acc = buf[km];
    int idx = 0;
    for (int r = 1; r < R; ++r) {
      idx += k;
      if (idx >= N) idx -= N;  // idx = r k mod N
      const cf w = {tw[idx].x, sgn * tw[idx].y};
      acc = cadd(acc, cmul(w, buf[r * M + km]));
    }
    a[k * stride] = acc;
  }
}

// The 2D pipeline on one S x S real plane with its half spectrum spec[S][S/2 + 1] (unshifted, ky-major):
//   spec = rfft2(load)            row r2c transforms, then column transforms
//   spectral(ky, kx, spec[ky][kx]) for every half-spectrum entry (may modify it, may accumulate)
//   store(y, x, irfft2(spec))     when `inverse` (unnormalised: the spectral step owns the scaling)
// Thread `tid` of `nth` takes every nth line; every thread of the CTA must call it.
template <int S, class Load, class Spectral, class Store>
MFM_HD void plane_pipeline(cf* spec, const cf* tw, int tid, int nth, const Load& load, Spectral& spectral,
                           const Store& store, bool inverse) {
  constexpr int WH = S / 2 + 1;
  cf line[S];
  cf buf[S];
  for (int y = tid; y < S; y += nth) {
    for (int x = 0; x < S; ++x) line[x] = {load(y, x), 0.f};
    fft_line<S>(line, 1, tw, false, buf);
    for (int k = 0; k < WH; ++k) spec[y * WH + k] = line[k];
  }
  block_sync();
  for (int k = tid; k < WH; k += nth) fft_line<S>(spec + k, WH, tw, false, buf);
  block_sync();
  for (int i = tid; i < S * WH; i += nth) spectral(i / WH, i % WH, spec[i]);
  if (!inverse) return;
  block_sync();
  for (int k = tid; k < WH; k += nth) fft_line<S>(spec + k, WH, tw, true, buf);
  block_sync();
  for (int y = tid; y < S; y += nth) {
    for (int k = 0; k < WH; ++k) line[k] = spec[y * WH + k];
    for (int k = WH; k < S; ++k) line[k] = {line[S - k].x, -line[S - k].y};  // Hermitian completion
    fft_line<S>(line, 1, tw, true, buf);
    for (int x = 0; x < S; ++x) store(y, x, line[x].x);  // real part (imag of DC / Nyquist ignored, as irfft)
  }
}

}  // namespace mfm
