// Shared per-plane math of the CUDA extension: the 2D real-plane FFT pipeline (row r2c, column FFTs,
// spectral step, inverse columns, row c2r) as a sequence of cooperative phases over one plane in
// shared memory.
//
// Every phase splits its work into independent items (line FFTs, entries) that touch disjoint data;
// item i goes to thread i mod nth. A scheduler runs the phases: on the GPU (CtaSched) every thread of
// the CTA runs its items, then __syncthreads; on the host (HostSched) virtual threads 0..nth-1 run one
// after the other, forwards or backwards. The CPU kernels of the ops use the host scheduler, which is
// how CI checks the kernel maths without a GPU, and running a plane with several virtual threads in
// both orders and getting the same bits checks that no phase has two threads touching the same data.
//
// Line FFTs of length N = 7 * M (M = 2^L), in place, no permutation pass, two passes per direction:
//   forward = decimation in frequency: a radix-7 pass (item (line, j): the 7 elements j + M m, a
//             symmetric 7-point butterfly with constant twiddles, then times W_N^(j q)), then one
//             pass of register-resident M-point radix-2 FFTs (item (line, block): M elements in
//             registers, all log2 M stages, constant twiddles). X[k] lands at pos(k) =
//             M (k mod 7) + bitrev_L(k div 7) ("digit-reversed");
//   inverse = decimation in time, the exact reverse: the M-point pass with conjugate twiddles, then the
//             radix-7 pass: digit-reversed input, natural output, unnormalised.
// Every stage size, stride and line count is a compile-time constant; items are stepped through their
// (line, block) grid by additions (for_items), so no pass divides.
// Rows are real: two rows y = 2p, 2p+1 travel as one complex line z = a + i b (pair packing), unpacked
// after the transform with A[k] = (Z[k] + conj Z[-k]) / 2, B[k] = (Z[k] - conj Z[-k]) / 2i. Columns
// stay digit-reversed in ky between the forward and the inverse transform; the spectral step runs
// inside the column M-point pass (forward, spectral, inverse on the same registers) and is told the
// true (ky, kx) of every entry.
//
// Everything here is __host__ __device__ and free of torch headers.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef __CUDACC__
#define MFM_HD __host__ __device__ __forceinline__
#define MFM_HDC __host__ __device__ constexpr
#else
#define MFM_HD inline
#define MFM_HDC constexpr
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
MFM_HDC bool supported_side(int s) { return s == 224 || s == 112; }

MFM_HDC int ilog2(int v) { return v <= 1 ? 0 : 1 + ilog2(v / 2); }

template <int N>
struct FftShape {
  static constexpr int R = 7;      // the odd radix
  static constexpr int M = N / R;  // power-of-two part
  static_assert(N % R == 0 && M > 0 && (M & (M - 1)) == 0, "FFT length must be 7 * 2^k");
  static constexpr int LOG2M = ilog2(M);
};

constexpr size_t kHopperSmemPerBlock = 232448;  // 227 KiB: the most dynamic shared memory a block may opt in to on sm_90

// Shared-memory layout of one S x S plane: its half spectrum spec[S][S/2 + 1] (row pitch WH), then the
// radix-7 twiddles tw[6][M] (tw[(q - 1) M + j] = W_S^(j q)): 204,032 bytes at 224, plus `extra` bytes
// (the loss kernel's reduction buffer). spec and tw start 16-byte aligned (float4 accesses).
template <int S>
struct PlaneSmem {
  static constexpr int WH = S / 2 + 1;
  static constexpr int kPairs = S / 2;
  static constexpr int kTwiddles = (FftShape<S>::R - 1) * FftShape<S>::M;
  static constexpr int kComplex = S * WH + kTwiddles;
  static_assert((S * WH) % 2 == 0 && kComplex % 2 == 0, "16-byte alignment of tw and of what follows");
  static constexpr size_t bytes(size_t extra) { return sizeof(cf) * kComplex + extra; }
  MFM_HD static cf* spec(cf* base) { return base; }
  MFM_HD static cf* twiddles(cf* base) { return base + S * WH; }
};

// ---------------------------------------------------------------- compile-time helpers

template <int I>
using Int = std::integral_constant<int, I>;
template <class F, int... I>
MFM_HD void static_for_impl(const F& f, std::integer_sequence<int, I...>) {
  (f(Int<I>{}), ...);
}
// f(Int<0>{}), ..., f(Int<N - 1>{}): a loop whose index is a constant expression in the body.
template <int N, class F>
MFM_HD void static_for(const F& f) {
  static_for_impl(f, std::make_integer_sequence<int, N>{});
}

MFM_HDC int bit_reverse_c(int v, int bits) { return bits == 0 ? 0 : ((v & 1) << (bits - 1)) | bit_reverse_c(v >> 1, bits - 1); }

MFM_HD int bit_reverse(int v, int bits) {
#ifdef __CUDA_ARCH__
  return bits == 0 ? 0 : static_cast<int>(__brev(static_cast<unsigned>(v)) >> (32 - bits));
#else
  int r = 0;
  for (int b = 0; b < bits; ++b) r = (r << 1) | ((v >> b) & 1);
  return r;
#endif
}

// cos / sin of 2 pi k / n in double, evaluated at compile time (octant reduction on the integers, then
// Taylor series to x^25 on [0, pi/4]..[0, pi/2]: error below 1e-16), for the constant twiddles.
constexpr double kPi = 3.14159265358979323846;
MFM_HDC double taylor_sin(double x) {
  double t = x, s = x;
  for (int i = 1; i <= 12; ++i) t *= -x * x / ((2.0 * i) * (2.0 * i + 1)), s += t;
  return s;
}
MFM_HDC double taylor_cos(double x) {
  double t = 1, s = 1;
  for (int i = 1; i <= 12; ++i) t *= -x * x / ((2.0 * i - 1) * (2.0 * i)), s += t;
  return s;
}
MFM_HDC double cos_2pi(int k, int n) {
  k = ((k % n) + n) % n;
  if (2 * k > n) k = n - k;                                        // cos(2 pi - a) = cos a
  if (4 * k > n) return -taylor_cos(kPi * (n - 2 * k) / n);  // cos(pi - a) = -cos a
  return taylor_cos(2 * kPi * k / n);
}
MFM_HDC double sin_2pi(int k, int n) {
  k = ((k % n) + n) % n;
  double sign = 1;
  if (2 * k > n) k = n - k, sign = -1;
  if (4 * k > n) return sign * taylor_sin(kPi * (n - 2 * k) / n);
  return sign * taylor_sin(2 * kPi * k / n);
}

// v * W_N^K, W_N = exp(-2 pi i / N), K and N compile-time: no multiply for 1, -1, +-i.
template <int K, int N>
MFM_HD cf mul_w(cf v) {
  constexpr int k = ((K % N) + N) % N;
  if constexpr (k == 0) {
    return v;
  } else if constexpr (4 * k == N) {
    return {v.y, -v.x};
  } else if constexpr (2 * k == N) {
    return {-v.x, -v.y};
  } else if constexpr (4 * k == 3 * N) {
    return {-v.y, v.x};
  } else {
    constexpr float c = static_cast<float>(cos_2pi(k, N)), s = static_cast<float>(-sin_2pi(k, N));
    return {v.x * c - v.y * s, v.x * s + v.y * c};
  }
}

// ---------------------------------------------------------------- butterflies (registers)

// M-point forward FFT in registers, decimation in frequency: natural order in, v[t] = X[bitrev(t)] out.
// Stage of span h on (t, t + h), t mod 2h < h: x, y = v[t], v[t + h]; v[t] = x + y; v[t + h] = (x - y) W_2h^(t mod 2h).
template <int M>
MFM_HD void dif_regs(cf (&v)[M]) {
  static_for<ilog2(M)>([&](auto stage) {
    constexpr int h = M >> (decltype(stage)::value + 1);
    static_for<M / 2>([&](auto u) {
      constexpr int t = (decltype(u)::value / h) * 2 * h + decltype(u)::value % h;
      const cf x = v[t], y = v[t + h];
      v[t] = cadd(x, y);
      v[t + h] = mul_w<t % (2 * h), 2 * h>(csub(x, y));
    });
  });
}

// Its inverse (unnormalised), decimation in time: v[t] = X[bitrev(t)] in, natural order out.
// Stage of span h = 1 .. M/2: y = v[t + h] conj(W_2h^(t mod 2h)); v[t] = x + y; v[t + h] = x - y.
template <int M>
MFM_HD void dit_regs(cf (&v)[M]) {
  static_for<ilog2(M)>([&](auto stage) {
    constexpr int h = 1 << decltype(stage)::value;
    static_for<M / 2>([&](auto u) {
      constexpr int t = (decltype(u)::value / h) * 2 * h + decltype(u)::value % h;
      const cf x = v[t], y = mul_w<-(t % (2 * h)), 2 * h>(v[t + h]);
      v[t] = cadd(x, y);
      v[t + h] = csub(x, y);
    });
  });
}

// 7-point DFT in place, u[q] = sum_m u[m] exp(-+2 pi i m q / 7) (sign - forward, + inverse), by the
// symmetric factorisation: a_k = u_k + u_(7-k), b_k = u_k - u_(7-k) (k = 1..3),
//   r_q = u_0 + sum_k cos(2 pi k q / 7) a_k,  t_q = sum_k sin(2 pi k q / 7) b_k,
//   u[q] = r_q -+ i t_q,  u[7 - q] = r_q +- i t_q.
template <bool kInverse>
MFM_HD void dft7(cf (&u)[7]) {
  constexpr float c1 = static_cast<float>(cos_2pi(1, 7)), c2 = static_cast<float>(cos_2pi(2, 7)),
                  c3 = static_cast<float>(cos_2pi(3, 7));
  constexpr float s1 = static_cast<float>(sin_2pi(1, 7)), s2 = static_cast<float>(sin_2pi(2, 7)),
                  s3 = static_cast<float>(sin_2pi(3, 7));
  const cf a1 = cadd(u[1], u[6]), a2 = cadd(u[2], u[5]), a3 = cadd(u[3], u[4]);
  const cf b1 = csub(u[1], u[6]), b2 = csub(u[2], u[5]), b3 = csub(u[3], u[4]);
  const cf u0 = u[0];
  const auto r = [&](float ca, float cb, float cc) -> cf {
    return {u0.x + ca * a1.x + cb * a2.x + cc * a3.x, u0.y + ca * a1.y + cb * a2.y + cc * a3.y};
  };
  const auto t = [&](float sa, float sb, float sc) -> cf {
    return {sa * b1.x + sb * b2.x + sc * b3.x, sa * b1.y + sb * b2.y + sc * b3.y};
  };
  const cf r1 = r(c1, c2, c3), r2 = r(c2, c3, c1), r3 = r(c3, c1, c2);
  const cf t1 = t(s1, s2, s3), t2 = t(s2, -s3, -s1), t3 = t(s3, -s1, s2);
  u[0] = {u0.x + a1.x + a2.x + a3.x, u0.y + a1.y + a2.y + a3.y};
  const auto put = [&](int q, cf rq, cf tq) {  // forward: r - i t at q, r + i t at 7 - q
    const cf minus = {rq.x + tq.y, rq.y - tq.x}, plus = {rq.x - tq.y, rq.y + tq.x};
    u[q] = kInverse ? plus : minus;
    u[7 - q] = kInverse ? minus : plus;
  };
  put(1, r1, t1);
  put(2, r2, t2);
  put(3, r3, t3);
}

// tw[(q - 1) M + j] = W_N^(j q), j < M, q = 1..6, rounded from double.
template <int N>
MFM_HD void make_twiddles(cf* tw, int tid, int nth) {
  using F = FftShape<N>;
  for (int i = tid; i < (F::R - 1) * F::M; i += nth) {
    const int q = i / F::M + 1, j = i % F::M;
    const double a = -2.0 * kPi * j * q / N;
    tw[i] = {static_cast<float>(cos(a)), static_cast<float>(sin(a))};
  }
}

// ---------------------------------------------------------------- schedulers

// v, which the compiler may not assume equal to any value it computed before (GPU: an empty asm), so
// that index values are recomputed in a later phase instead of held in registers across the phases between.
MFM_HD int opaque(int v) {
#ifdef __CUDA_ARCH__
  asm volatile("" : "+r"(v));
#endif
  return v;
}

MFM_HD void block_sync() {
#ifdef __CUDA_ARCH__
  __syncthreads();
#endif
}

// run(phase): phase(tid, nth) for every thread, then a barrier.
// run_two<State>(read, write): read(tid, nth, state) for every thread into its own State (registers on
// the GPU), a barrier, write(tid, nth, state), a barrier: for phases whose writes land where other
// threads read.
template <int NTH>
struct CtaSched {  // the calling GPU thread's share of each phase, then a CTA barrier; NTH = blockDim.x
  static constexpr int kEntryCap = 6;  // per_pair_entry values per thread and round (registers)
  int tid;
  static constexpr int nth = NTH;
  template <class Phase>
  MFM_HD void run(const Phase& phase) const {
    phase(tid, NTH);
    block_sync();
  }
  template <class State, class Read, class Write>
  MFM_HD void run_two(const Read& read, const Write& write) const {
    State state;
    read(tid, NTH, state);
    block_sync();
    write(tid, NTH, state);
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

// f(l, b) for this thread's items of an L x B grid, item = l + L b (line fastest: consecutive threads
// take consecutive lines), items tid, tid + nth, ...: (l, b) stepped by additions (nth is a compile-time
// constant on the GPU, so the only division is the one that places tid).
template <int L, int B, class F>
MFM_HD void for_items(int tid, int nth, const F& f) {
  const int dl = nth % L, db = nth / L;
  int l = tid % L, b = tid / L;
  while (b < B) {
    f(l, b);
    l += dl, b += db;
    if (l >= L) l -= L, ++b;
  }
}

// ---------------------------------------------------------------- line passes
// Two line sets per plane, both compile-time: the S/2 row-pair lines (line p at spec + 2 p WH, unit
// stride: 16-byte accesses of two neighbours) and the WH columns (line kx at spec + kx, stride WH).
template <int S>
struct RowLines {
  static constexpr int L = S / 2, pitch = 2 * (S / 2 + 1), st = 1;
};
template <int S>
struct ColLines {
  static constexpr int L = S / 2 + 1, pitch = 1, st = S / 2 + 1;
};

// Two neighbouring complex values: one 16-byte shared-memory access on the GPU (p 16-byte aligned).
MFM_HD void ld2(const cf* p, cf& a, cf& b) {
#ifdef __CUDA_ARCH__
  const float4 v = *reinterpret_cast<const float4*>(p);
  a = {v.x, v.y}, b = {v.z, v.w};
#else
  a = p[0], b = p[1];
#endif
}
MFM_HD void st2(cf* p, cf a, cf b) {
#ifdef __CUDA_ARCH__
  *reinterpret_cast<float4*>(p) = make_float4(a.x, a.y, b.x, b.y);
#else
  p[0] = a, p[1] = b;
#endif
}

// Radix-7 pass over every line of `Lines`, J = 2 neighbouring j per item on unit-stride lines (16-byte
// accesses), else 1. Forward (DIF): u[m] = a[j + M m]; a[j + M q] = DFT7(u)[q] W_N^(j q).
// Inverse (DIT): u[q] = a[j + M q] conj(W_N^(j q)); a[j + M m] = IDFT7(u)[m].
// Consecutive threads take consecutive lines at the same j: conflict-free (columns: 16 consecutive
// complex; row pairs: 8 lines 1808 bytes apart per quarter warp), twiddle reads are broadcasts.
// first(tid, nth) runs before the items (the next plane's prefetch).
struct NoOp {
  MFM_HD void operator()(int, int) const {}
};
template <int S, class Lines, bool kInverse, class Sched, class First = NoOp>
MFM_HD void radix7_pass(const Sched& sched, cf* spec, const cf* tw, const First& first = {}) {
  constexpr int M = FftShape<S>::M, J = Lines::st == 1 ? 2 : 1, ST = Lines::st;
  sched.run([=](int tid, int nth) {
    first(tid, nth);
    for_items<Lines::L, M / J>(tid, nth, [&](int l, int b) {
      cf* a = spec + l * Lines::pitch + J * b * ST;
      const cf* w = tw + J * b;
      cf u[J][7];
#pragma unroll
      for (int m = 0; m < 7; ++m) {
        if constexpr (J == 2) ld2(a + M * m, u[0][m], u[1][m]);
        else u[0][m] = a[M * m * ST];
      }
#pragma unroll
      for (int q = 1; q < 7 && kInverse; ++q) {
        cf w0, w1;
        if constexpr (J == 2) ld2(w + (q - 1) * M, w0, w1), u[1][q] = cmulc(u[1][q], w1);
        else w0 = w[(q - 1) * M];
        u[0][q] = cmulc(u[0][q], w0);
      }
#pragma unroll
      for (int i = 0; i < J; ++i) dft7<kInverse>(u[i]);
#pragma unroll
      for (int q = 1; q < 7 && !kInverse; ++q) {
        cf w0, w1;
        if constexpr (J == 2) ld2(w + (q - 1) * M, w0, w1), u[1][q] = cmul(u[1][q], w1);
        else w0 = w[(q - 1) * M];
        u[0][q] = cmul(u[0][q], w0);
      }
#pragma unroll
      for (int m = 0; m < 7; ++m) {
        if constexpr (J == 2) st2(a + M * m, u[0][m], u[1][m]);
        else a[M * m * ST] = u[0][m];
      }
    });
  });
}

// The M elements of block `blk` of a line into registers and back (16-byte accesses on unit stride).
template <int M, int ST>
MFM_HD void load_block(const cf* a, cf (&v)[M]) {
#pragma unroll
  for (int t = 0; t < M; t += 2) {
    if constexpr (ST == 1) ld2(a + t, v[t], v[t + 1]);
    else v[t] = a[t * ST], v[t + 1] = a[(t + 1) * ST];
  }
}
template <int M, int ST>
MFM_HD void store_block(cf* a, const cf (&v)[M]) {
#pragma unroll
  for (int t = 0; t < M; t += 2) {
    if constexpr (ST == 1) st2(a + t, v[t], v[t + 1]);
    else a[t * ST] = v[t], a[(t + 1) * ST] = v[t + 1];
  }
}

// M-point pass: item (line, block of M elements), all radix-2 stages in registers (dif_regs / dit_regs).
template <int S, class Lines, bool kInverse, class Sched>
MFM_HD void radix2_block_pass(const Sched& sched, cf* spec) {
  using F = FftShape<S>;
  sched.run([=](int tid, int nth) {
    for_items<Lines::L, F::R>(tid, nth, [&](int l, int blk) {
      cf* a = spec + l * Lines::pitch + blk * F::M * Lines::st;
      cf v[F::M];
      load_block<F::M, Lines::st>(a, v);
      if constexpr (kInverse) dit_regs(v);
      else dif_regs(v);
      store_block<F::M, Lines::st>(a, v);
    });
  });
}

// The column M-point pass with the spectral step inside: w = spectral.weight(ky, kx) of each entry of
// (kx, blk) (the mask reads), the forward M-point FFT, then spectral(ky, kx, w, v) on each entry (ky = blk +
// 7 bitrev(t), a constant offset per register), then (kInverse) the inverse M-point FFT and the write-back;
// without it nothing is written.
template <int S, bool kInverse, class Sched, class Spectral>
MFM_HD void column_spectral_pass(const Sched& sched, cf* spec, Spectral& spectral) {
  using F = FftShape<S>;
  using C = ColLines<S>;
  sched.run([=, &spectral](int tid, int nth) {
    for_items<C::L, F::R>(tid, nth, [&](int kx, int blk) {
      cf* a = spec + kx + blk * F::M * C::st;
      float wt[F::M];  // the entries' weights first (global reads), then the M-point FFT
      static_for<F::M>([&](auto t) {
        wt[decltype(t)::value] = spectral.weight(blk + F::R * bit_reverse_c(decltype(t)::value, F::LOG2M), kx);
      });
      cf v[F::M];
      load_block<F::M, C::st>(a, v);
      dif_regs(v);
      static_for<F::M>([&](auto t) {
        constexpr int dky = F::R * bit_reverse_c(decltype(t)::value, F::LOG2M);
        spectral(blk + dky, kx, wt[decltype(t)::value], v[decltype(t)::value]);
      });
      spectral.end_item();
      if constexpr (kInverse) {
        dit_regs(v);
        store_block<F::M, C::st>(a, v);
      }
    });
  });
}

// ---------------------------------------------------------------- the plane pipeline

// Position of frequency k in a forward-transformed line, and the frequency at position p.
template <int N>
MFM_HD int freq_pos(int k) {
  using F = FftShape<N>;
  const int q = k / F::R;
  return F::M * (k - F::R * q) + bit_reverse(q, F::LOG2M);
}
template <int N>
MFM_HD int pos_freq(int p) {
  using F = FftShape<N>;
  return (p >> F::LOG2M) + F::R * bit_reverse(p & (F::M - 1), F::LOG2M);
}

// For every row pair p (rows = spec + 2 p WH, its two rows) and k = 0..S/2: v = gather(rows, k) (two
// values), then scatter(rows, k, v). A round takes whole groups of kPairGroup pairs, as many as fit
// Sched::kEntryCap entries per thread, and every gather of a round happens before any scatter of it (the
// values wait in the thread's EntryState: registers on the GPU), so scatter may overwrite anything its
// pair gathers. 5 rounds at 224 with 512 threads (24 pairs each, the last 16).
// Entry e of a round is (pair p0 + kPairGroup g + i, k) with e = i + kPairGroup (k + WH g): consecutive
// threads take one k of 8 consecutive pairs, whose digit-reversed positions fall on different banks
// (k-consecutive entries of one pair put up to 12 on a bank; tools/smem_banks.py). EntryWalk steps
// (i, k, g) by additions.
constexpr int kPairGroup = 8;

template <int CAP>
struct EntryState {
  cf v[2 * CAP];
};

template <int WH>
struct EntryWalk {  // e = i + G (k + WH g), stepped by nth
  int i, k, g, di, dk, dg;
  MFM_HD EntryWalk(int tid, int nth)
      : i(tid % kPairGroup), k((tid / kPairGroup) % WH), g(tid / (kPairGroup * WH)), di(nth % kPairGroup),
        dk((nth / kPairGroup) % WH), dg(nth / (kPairGroup * WH)) {}
  MFM_HD void step() {
    i += di;
    if (i >= kPairGroup) i -= kPairGroup, ++k;
    k += dk;
    if (k >= WH) k -= WH, ++g;
    g += dg;
  }
};

template <int S, bool kFresh = false, class Sched, class Gather, class Scatter>
MFM_HD void per_pair_entry(const Sched& sched, cf* spec, const Gather& gather, const Scatter& scatter) {
  using P = PlaneSmem<S>;
  constexpr int WH = P::WH, PAIRS = P::kPairs, CAP = Sched::kEntryCap, G = kPairGroup;
  static_assert(PAIRS % G == 0, "row pairs come in whole groups");
  const int groups = sched.nth * CAP / (G * WH);  // per round; nth * CAP >= G * WH (HostSched: CAP alone)
  const int per_round = G * (groups < 1 ? 1 : groups);
  // 0, but with kFresh opaque: this call's walk indices are its own, not held from an earlier call (registers)
  const int salt = kFresh ? opaque(0) : 0;
  for (int p0 = 0; p0 < PAIRS; p0 += per_round) {
    const int last_g = (PAIRS - p0 < per_round ? PAIRS - p0 : per_round) / G;  // groups this round
    const auto rows_of = [=](const EntryWalk<WH>& w) { return spec + 2 * (p0 + G * w.g + w.i) * WH; };
    sched.template run_two<EntryState<CAP>>(
        [=](int tid, int nth, EntryState<CAP>& st) {
          EntryWalk<WH> w(tid + salt, nth);
#pragma unroll
          for (int j = 0; j < CAP; ++j, w.step())
            if (w.g < last_g) gather(rows_of(w), w.k, st.v + 2 * j);
        },
        [=](int tid, int nth, EntryState<CAP>& st) {
          EntryWalk<WH> w(tid + salt, nth);
#pragma unroll
          for (int j = 0; j < CAP; ++j, w.step())
            if (w.g < last_g) scatter(rows_of(w), w.k, st.v + 2 * j);
        });
  }
}

// The 2D pipeline on one S x S real plane, spec and tw the parts of PlaneSmem<S> (tw filled by
// make_twiddles):
//   load(tid, nth, spec)         this thread's share of the plane into the pair lines:
//                                spec[2p WH + x] = (row 2p [x], row 2p+1 [x]) (planes.cuh, load_pairs)
//   spectral(ky, kx, w, v)       for every half-spectrum entry v = rfft2(plane)[ky][kx] (may modify it),
//                                w = spectral.weight(ky, kx) (its mask weight); spectral.end_item() after
//                                each column block; spectral.visit(f) calls f with the functor to use
//                                (the loss: its gamma == 1 or general form)
//   store(tid, nth, spec)        when `kInverse`: this thread's share of the plane from the pair lines,
//                                which then hold irfft2(spec) (unnormalised: the spectral step owns the
//                                scaling)
//   prefetch(tid, nth)           asks for the next plane's inputs (l2_prefetch_plane in planes.cuh): at the
//                                forward column radix-7 pass when there is an inverse (the second half
//                                of the work hides the reads), else right after the load
// Rows run as S/2 complex pair lines, each transformed in the spec rows of its two rows (2 WH >= S
// slots) and unpacked into them in place (per_pair_entry), and packed back before the inverse.
// Phases (barriers): load, rows radix-7, rows M-point, unpack (2), columns radix-7, columns M-point +
// spectral (+ inverse M-point), then with kInverse: columns inverse radix-7, pack (2), rows inverse
// M-point, rows inverse radix-7, store.
// kFreshPack: the pack derives its entry indices anew (per_pair_entry's kFresh) instead of letting the
// compiler keep the unpack's in registers across the column passes (so the loss kernel fits 512 threads'
// 128 registers per thread without spills).
template <int S, bool kInverse, bool kFreshPack = false, class Sched, class Load, class Spectral, class Store,
          class Prefetch>
MFM_HD void plane_pipeline(const Sched& sched, cf* spec, const cf* tw, const Load& load, Spectral& spectral,
                           const Store& store, const Prefetch& prefetch) {
  using P = PlaneSmem<S>;
  constexpr int WH = P::WH;
  sched.run([=](int tid, int nth) {
    load(tid, nth, spec);
    if (!kInverse) prefetch(tid, nth);
  });
  radix7_pass<S, RowLines<S>, false>(sched, spec, tw);
  radix2_block_pass<S, RowLines<S>, false>(sched, spec);
  per_pair_entry<S>(  // unpack: Z (digit-reversed) -> A, B
      sched, spec,
      [](const cf* z, int k, cf* v) { v[0] = z[freq_pos<S>(k)], v[1] = z[freq_pos<S>(k == 0 ? 0 : S - k)]; },
      [](cf* rows, int k, const cf* v) {
        const cf zk = v[0], zm = cconj(v[1]);
        const cf a = cscale(cadd(zk, zm), 0.5f), d = cscale(csub(zk, zm), 0.5f);
        rows[k] = a;
        rows[WH + k] = {d.y, -d.x};  // d / i
      });
  if constexpr (!kInverse) {
    radix7_pass<S, ColLines<S>, false>(sched, spec, tw);  // columns: ky digit-reversed from here on
    spectral.visit([&](auto& sp) { column_spectral_pass<S, false>(sched, spec, sp); });
    return;
  } else {
    radix7_pass<S, ColLines<S>, false>(sched, spec, tw, prefetch);
    spectral.visit([&](auto& sp) { column_spectral_pass<S, true>(sched, spec, sp); });
    radix7_pass<S, ColLines<S>, true>(sched, spec, tw);
    per_pair_entry<S, kFreshPack>(  // pack: A, B -> Z = A + i B over all k, digit-reversed
        sched, spec, [](const cf* rows, int k, cf* v) { v[0] = rows[k], v[1] = rows[WH + k]; },
        [](cf* rows, int k, const cf* v) {
          cf a = v[0], b = v[1];
          if (k == 0 || k == S / 2) a.y = b.y = 0.f;  // irfft ignores the imaginary parts there
          rows[freq_pos<S>(k)] = {a.x - b.y, a.y + b.x};                                 // A + i B
          if (k > 0 && k < S / 2) rows[freq_pos<S>(S - k)] = {a.x + b.y, b.x - a.y};  // conj(A) + i conj(B)
        });
    radix2_block_pass<S, RowLines<S>, true>(sched, spec);
    radix7_pass<S, RowLines<S>, true>(sched, spec, tw);
    sched.run([=](int tid, int nth) { store(tid, nth, spec); });
  }
}

}  // namespace mfm
