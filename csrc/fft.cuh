// Shared per-plane math of the CUDA extension: the 2D real-plane FFT pipeline (row r2c, column FFTs,
// spectral step, inverse columns, row c2r) as a sequence of cooperative phases over one plane in
// shared memory.
//
// Every phase splits its work into independent items (butterflies, elements) that touch disjoint data;
// item i goes to thread i mod nth. A scheduler runs the phases: on the GPU (CtaSched) every thread of
// the CTA runs its items, then __syncthreads; on the host (HostSched) virtual threads 0..nth-1 run one
// after the other, forwards or backwards. The CPU kernels of the ops use the host scheduler, which is
// how CI checks the kernel maths without a GPU, and running a plane with several virtual threads in
// both orders and getting the same bits checks that no phase has two threads touching the same data.
//
// Line FFTs of length N = R * M (R = 7 or 1, M = 2^L), in place, no permutation pass:
//   forward = decimation in frequency: one radix-R pass (span M, twiddles W_N^(j q)), then radix-2
//             passes of span M/2 .. 1 inside each of the R blocks; X[k] lands at pos(k) =
//             M (k mod R) + bitrev_L(k div R) ("digit-reversed");
//   inverse = decimation in time, the exact reverse: radix-2 passes of span 1 .. M/2 with conjugate
//             twiddles, then the radix-R pass: digit-reversed input, natural output, unnormalised.
// Rows are real: two rows y = 2p, 2p+1 travel as one complex line z = a + i b (pair packing), unpacked
// after the transform with A[k] = (Z[k] + conj Z[-k]) / 2, B[k] = (Z[k] - conj Z[-k]) / 2i. Columns
// stay digit-reversed in ky between the forward and the inverse transform; the spectral step is told
// the true (ky, kx) of every entry.
//
// Everything here is __host__ __device__ and free of torch headers.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

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
MFM_HD cf cmulc(cf a, cf b) { return {a.x * b.x + a.y * b.y, a.y * b.x - a.x * b.y}; }  // a * conj(b)
MFM_HD cf cconj(cf a) { return {a.x, -a.y}; }
MFM_HD cf cscale(cf a, float s) { return {a.x * s, a.y * s}; }

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

constexpr size_t kHopperSmemPerBlock = 232448;  // 227 KiB: the most dynamic shared memory a block may opt in to on sm_90

// Shared-memory layout of one S x S plane: its half spectrum spec[S][S/2 + 1] (row pitch WH), then the
// twiddles tw[S]: 204,288 bytes at 224, plus `extra` bytes (the loss kernel's reduction buffer).
template <int S>
struct PlaneSmem {
  static constexpr int WH = S / 2 + 1;
  static constexpr int kPairs = S / 2;
  static constexpr int kComplex = S * WH + S;
  static constexpr size_t bytes(size_t extra) { return sizeof(cf) * kComplex + extra; }
  MFM_HD static cf* spec(cf* base) { return base; }
  MFM_HD static cf* twiddles(cf* base) { return base + S * WH; }
};

MFM_HD int bit_reverse(int v, int bits) {
  int r = 0;
  for (int b = 0; b < bits; ++b) r = (r << 1) | ((v >> b) & 1);
  return r;
}

// Position of frequency k in a forward-transformed line, and the frequency at position p.
template <int N>
MFM_HD int freq_pos(int k) {
  using F = FftShape<N>;
  return F::M * (k % F::R) + bit_reverse(k / F::R, F::LOG2M);
}
template <int N>
MFM_HD int pos_freq(int p) {
  using F = FftShape<N>;
  return p / F::M + F::R * bit_reverse(p % F::M, F::LOG2M);
}

// tw[j] = exp(-2 pi i j / N), j = 0..N-1, rounded from double.
template <int N>
MFM_HD void make_twiddles(cf* tw, int tid, int nth) {
  for (int j = tid; j < N; j += nth) {
    const double a = -2.0 * 3.14159265358979323846 * j / N;
    tw[j] = {static_cast<float>(cos(a)), static_cast<float>(sin(a))};
  }
}

// ---------------------------------------------------------------- schedulers

MFM_HD void block_sync() {
#ifdef __CUDA_ARCH__
  __syncthreads();
#endif
}

// run(phase): phase(tid, nth) for every thread, then a barrier.
// run_two<State>(read, write): read(tid, nth, state) for every thread into its own State (registers on
// the GPU), a barrier, write(tid, nth, state), a barrier: for phases whose writes land where other
// threads read.
struct CtaSched {  // the calling GPU thread's share of each phase, then a CTA barrier
  static constexpr int kEntryCap = 6;  // per_pair_entry values per thread and round (registers; 7 and 8 spill at 224)
  int tid, nth;
  template <class Phase>
  MFM_HD void run(const Phase& phase) const {
    phase(tid, nth);
    block_sync();
  }
  template <class State, class Read, class Write>
  MFM_HD void run_two(const Read& read, const Write& write) const {
    State state;
    read(tid, nth, state);
    block_sync();
    write(tid, nth, state);
    block_sync();
  }
};

struct HostSched {  // virtual threads one after the other (reverse: nth-1 first)
  static constexpr int kEntryCap = 1024;  // >= kPairGroup (S / 2 + 1): one virtual thread holds a group of pairs
  int nth;
  bool reverse;
  template <class Phase>
  void run(const Phase& phase) const {
    for (int t = 0; t < nth; ++t) phase(reverse ? nth - 1 - t : t, nth);
  }
  template <class State, class Read, class Write>
  void run_two(const Read& read, const Write& write) const {
    std::vector<State> states(nth);
    run([&](int tid, int n) { read(tid, n, states[tid]); });
    run([&](int tid, int n) { write(tid, n, states[tid]); });
  }
};

// ---------------------------------------------------------------- line passes
// Each pass acts on `lines` lines of length N: line l starts at a + l * lstride, elements at stride st.

// Radix-R pass. Forward (DIF): u[m] = a[j + M m]; a[j + M q] = (sum_m u[m] W_R^(m q)) W_N^(j q).
// Inverse (DIT): v[q] = a[j + M q] conj(W_N^(j q)); a[j + M m] = sum_q v[q] W_R^(-m q).
template <int N, class Sched>
MFM_HD void radix_r_pass(const Sched& sched, cf* a, int lines, int lstride, int st, const cf* tw, bool inverse) {
  using F = FftShape<N>;
  if (F::R == 1) return;
  sched.run([=](int tid, int nth) {
    for (int item = tid; item < lines * F::M; item += nth) {
      cf* line = a + (item / F::M) * lstride;
      const int j = item % F::M;
      cf u[F::R];
#pragma unroll
      for (int m = 0; m < F::R; ++m) u[m] = line[(j + F::M * m) * st];
      if (inverse) {
#pragma unroll
        for (int q = 1; q < F::R; ++q) u[q] = cmulc(u[q], tw[j * q]);
      }
      cf out[F::R];
#pragma unroll
      for (int q = 0; q < F::R; ++q) {
        cf acc = u[0];
#pragma unroll
        for (int m = 1; m < F::R; ++m) {
          const cf w = tw[((m * q) % F::R) * F::M];
          acc = cadd(acc, inverse ? cmulc(u[m], w) : cmul(u[m], w));
        }
        out[q] = (!inverse && q > 0) ? cmul(acc, tw[j * q]) : acc;
      }
#pragma unroll
      for (int q = 0; q < F::R; ++q) line[(j + F::M * q) * st] = out[q];
    }
  });
}

// Radix-2 stages inside each length-M block, K = up to 3 consecutive stages fused per pass (each item
// holds the 2^K elements base + j + t hl, t < 2^K, in registers: the same arithmetic as K separate
// radix-2 passes, bit for bit, with fewer passes and barriers).
// Forward (DIF), spans M/2 .. 1, stage of span h on the pair (i, i + h), i mod 2h < h:
//   x, y = a[i], a[i + h];  a[i] = x + y;  a[i + h] = (x - y) W_2h^(i mod 2h)
// Inverse (DIT), spans 1 .. M/2:  y = a[i + h] conj(W_2h^(i mod 2h));  a[i] = x + y;  a[i + h] = x - y.
constexpr int kMaxFusedStages = 3;

template <int N, int K, class Sched>
MFM_HD void radix2_fused_pass(const Sched& sched, cf* a, int lines, int lstride, int st, const cf* tw, bool inverse,
                              int h_low) {  // h_low: the smallest span of the K stages
  constexpr int T = 1 << K, kItems = N / T;  // items per line
  static_assert(kItems % 2 == 0, "the row-pair interleave below pairs up items");
  // Consecutive threads take the same b of consecutive lines, so a half warp reads 16 lines (columns: 16
  // banks) instead of the 2^K-strided groups of one line (4-7 to a bank). Lines an even number of elements
  // apart (row pairs, 2 WH) would put 2 on a bank, so there b's low bit goes fastest, then the line (8
  // lines x 2 odd-spaced offsets), when h_low >= 2 makes that bit an offset of 1. See bench/smem_banks.py.
  const bool interleave = lstride % 2 == 0 && h_low >= 2;
  sched.run([=](int tid, int nth) {
    for (int item = tid; item < lines * kItems; item += nth) {
      const int l = interleave ? (item >> 1) % lines : item % lines;
      const int b = interleave ? ((item >> 1) / lines) * 2 + (item & 1) : item / lines;
      cf* line = a + l * lstride;
      const int j = b % h_low, base = (b / h_low) * (T * h_low);  // groups of T h_low never straddle blocks
      cf v[T];
#pragma unroll
      for (int t = 0; t < T; ++t) v[t] = line[(base + j + t * h_low) * st];
#pragma unroll
      for (int s = 0; s < K; ++s) {
        const int d = inverse ? (1 << s) : (T >> (s + 1));  // partner distance in t; the span is d h_low
        const int h = d * h_low;
#pragma unroll
        for (int t = 0; t < T; ++t) {
          if (t & d) continue;
          const cf w = tw[((j + t * h_low) % (2 * h)) * (N / (2 * h))];
          const cf x = v[t], y = v[t + d];
          if (inverse) {
            const cf yw = cmulc(y, w);
            v[t] = cadd(x, yw);
            v[t + d] = csub(x, yw);
          } else {
            v[t] = cadd(x, y);
            v[t + d] = cmul(csub(x, y), w);
          }
        }
      }
#pragma unroll
      for (int t = 0; t < T; ++t) line[(base + j + t * h_low) * st] = v[t];
    }
  });
}

template <int N, class Sched>
MFM_HD void radix2_passes(const Sched& sched, cf* a, int lines, int lstride, int st, const cf* tw, bool inverse) {
  using F = FftShape<N>;
  for (int done = 0; done < F::LOG2M;) {  // stages done so far; forward spans fall, inverse spans rise
    const int k = F::LOG2M - done < kMaxFusedStages ? F::LOG2M - done : kMaxFusedStages;
    const int h_low = inverse ? (1 << done) : (F::M >> (done + k));
    if (k == 3) radix2_fused_pass<N, 3>(sched, a, lines, lstride, st, tw, inverse, h_low);
    else if (k == 2) radix2_fused_pass<N, 2>(sched, a, lines, lstride, st, tw, inverse, h_low);
    else radix2_fused_pass<N, 1>(sched, a, lines, lstride, st, tw, inverse, h_low);
    done += k;
  }
}

template <int N, class Sched>
MFM_HD void fft_lines(const Sched& sched, cf* a, int lines, int lstride, int st, const cf* tw, bool inverse) {
  if (!inverse) {
    radix_r_pass<N>(sched, a, lines, lstride, st, tw, false);
    radix2_passes<N>(sched, a, lines, lstride, st, tw, false);
  } else {
    radix2_passes<N>(sched, a, lines, lstride, st, tw, true);
    radix_r_pass<N>(sched, a, lines, lstride, st, tw, true);
  }
}

// ---------------------------------------------------------------- the plane pipeline

// For every row pair p (rows = spec + 2 p WH, its two rows) and k = 0..S/2: v = gather(rows, k) (two
// values), then scatter(rows, k, v). A round takes whole groups of kPairGroup pairs, as many as fit
// Sched::kEntryCap entries per thread, and every gather of a round happens before any scatter of it (the
// values wait in the thread's EntryState: registers on the GPU), so scatter may overwrite anything its
// pair gathers. 5 rounds at 224 with 512 threads (24 pairs each, the last 16).
// Entry e of a round is (pair p0 + kPairGroup (e / (kPairGroup WH)) + e mod kPairGroup, k = (e / kPairGroup)
// mod WH): consecutive threads take one k of 8 consecutive pairs, whose digit-reversed positions fall on
// different banks (k-consecutive entries of one pair put up to 12 on a bank; bench/smem_banks.py).
constexpr int kPairGroup = 8;

template <int CAP>
struct EntryState {
  cf v[2 * CAP];
};

template <int S, class Sched, class Gather, class Scatter>
MFM_HD void per_pair_entry(const Sched& sched, cf* spec, const Gather& gather, const Scatter& scatter) {
  using P = PlaneSmem<S>;
  constexpr int WH = P::WH, PAIRS = P::kPairs, CAP = Sched::kEntryCap, G = kPairGroup;
  static_assert(PAIRS % G == 0, "row pairs come in whole groups");
  const int groups = sched.nth * CAP / (G * WH);  // per round; nth * CAP >= G * WH (HostSched: CAP alone)
  const int per_round = G * (groups < 1 ? 1 : groups);
  const auto rows_of = [=](int p0, int e) { return spec + 2 * (p0 + G * (e / (G * WH)) + e % G) * WH; };
  for (int p0 = 0; p0 < PAIRS; p0 += per_round) {
    const int entries = (PAIRS - p0 < per_round ? PAIRS - p0 : per_round) * WH;
    sched.template run_two<EntryState<CAP>>(
        [=](int tid, int nth, EntryState<CAP>& st) {
#pragma unroll
          for (int j = 0; j < CAP; ++j) {
            const int e = tid + j * nth;
            if (e < entries) gather(rows_of(p0, e), (e / G) % WH, st.v + 2 * j);
          }
        },
        [=](int tid, int nth, EntryState<CAP>& st) {
#pragma unroll
          for (int j = 0; j < CAP; ++j) {
            const int e = tid + j * nth;
            if (e < entries) scatter(rows_of(p0, e), (e / G) % WH, st.v + 2 * j);
          }
        });
  }
}

// The 2D pipeline on one S x S real plane, spec and tw the parts of PlaneSmem<S> (tw filled by
// make_twiddles):
//   spec = rfft2(load)            load(y, x) -> float
//   spectral(ky, kx, v)           for every half-spectrum entry v = spec[ky][kx] (may modify it)
//   store(y, x, irfft2(spec))     when `inverse` (unnormalised: the spectral step owns the scaling)
// Rows run as S/2 complex pair lines, each transformed in the spec rows of its two rows (2 WH >= S
// slots) and unpacked into them in place (per_pair_entry), and packed back before the inverse.
//   prefetch(tid, nth)            asks for the next plane's inputs (l2_prefetch in planes.cuh): at the
//                                 spectral step when there is an inverse (its half of the work hides the
//                                 reads), else right after the load
template <int S, class Sched, class Load, class Spectral, class Store, class Prefetch>
MFM_HD void plane_pipeline(const Sched& sched, cf* spec, const cf* tw, const Load& load,
                           Spectral& spectral, const Store& store, const Prefetch& prefetch, bool inverse) {
  using P = PlaneSmem<S>;
  constexpr int WH = P::WH, PAIRS = P::kPairs;
  // rows: pair line p holds z[x] = row(2p)[x] + i row(2p+1)[x] in spec[2p][0 .. S-1]
  sched.run([=](int tid, int nth) {
    for (int item = tid; item < PAIRS * S; item += nth) {
      const int p = item / S, x = item % S;
      spec[2 * p * WH + x] = {load(2 * p, x), load(2 * p + 1, x)};
    }
    if (!inverse) prefetch(tid, nth);
  });
  fft_lines<S>(sched, spec, PAIRS, 2 * WH, 1, tw, false);
  per_pair_entry<S>(  // unpack: Z (digit-reversed) -> A, B
      sched, spec, [](const cf* z, int k, cf* v) { v[0] = z[freq_pos<S>(k)], v[1] = z[freq_pos<S>((S - k) % S)]; },
      [](cf* rows, int k, const cf* v) {
        const cf zk = v[0], zm = cconj(v[1]);
        const cf a = cscale(cadd(zk, zm), 0.5f), d = cscale(csub(zk, zm), 0.5f);
        rows[k] = a;
        rows[WH + k] = {d.y, -d.x};  // d / i
      });
  fft_lines<S>(sched, spec, WH, 1, WH, tw, false);  // columns: ky digit-reversed from here on
  sched.run([=, &spectral](int tid, int nth) {
    if (inverse) prefetch(tid, nth);
    for (int i = tid; i < S * WH; i += nth) spectral(pos_freq<S>(i / WH), i % WH, spec[i]);
  });
  if (!inverse) return;
  fft_lines<S>(sched, spec, WH, 1, WH, tw, true);
  per_pair_entry<S>(  // pack: A, B -> Z = A + i B over all k, digit-reversed
      sched, spec, [](const cf* rows, int k, cf* v) { v[0] = rows[k], v[1] = rows[WH + k]; },
      [](cf* rows, int k, const cf* v) {
        cf a = v[0], b = v[1];
        if (k == 0 || k == S / 2) a.y = b.y = 0.f;  // irfft ignores the imaginary parts there
        rows[freq_pos<S>(k)] = {a.x - b.y, a.y + b.x};                                 // A + i B
        if (k > 0 && k < S / 2) rows[freq_pos<S>(S - k)] = {a.x + b.y, b.x - a.y};  // conj(A) + i conj(B)
      });
  fft_lines<S>(sched, spec, PAIRS, 2 * WH, 1, tw, true);
  sched.run([=](int tid, int nth) {
    for (int item = tid; item < PAIRS * S; item += nth) {
      const int p = item / S, x = item % S;
      const cf z = spec[2 * p * WH + x];
      store(2 * p, x, z.x);
      store(2 * p + 1, x, z.y);
    }
  });
}

}  // namespace mfm
