// The two ops' per-plane maths (docs/spec.md §2 corruption, §3 masked spectral loss, half-spectrum form),
// shared verbatim by the CUDA kernels (csrc/corrupt.cu, csrc/masked_freq_loss.cu) and the CPU kernels
// of the same ops (csrc/ops.cpp). Torch-free apart from c10's Half / BFloat16 conversions.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <type_traits>

#include "fft.cuh"

namespace mfm {

enum Dtype : int { kF32 = 0, kF16 = 1, kBF16 = 2, kU8 = 3 };
constexpr int kMaxChannels = 8;

struct Stats {  // per-channel mean / std, passed by value to the kernels
  float mean[kMaxChannels];
  float std[kMaxChannels];
};

// ---------------------------------------------------------------- element I/O
// Plane buffers are read and written 4 elements of one row at a time: one 16-byte (float32), 8-byte
// (float16 / bfloat16) or 4-byte (uint8) access when the buffer is 16-byte aligned (`vec`, checked by
// the host at launch: rows are then aligned too, S * elem_bytes being a multiple of 16 for S = 224 and
// 112), else 4 scalar accesses. The element type and the vector choice are template parameters;
// with_dtype and with_bool pick them once per plane.
template <class T>
struct Tag {
  using type = T;
};
template <bool kAllowU8, class F>
MFM_HD void with_dtype(int dt, const F& f) {
  switch (dt) {
    case kF16: f(Tag<c10::Half>{}); break;
    case kBF16: f(Tag<c10::BFloat16>{}); break;
    case kU8:
      if constexpr (kAllowU8) {
        f(Tag<uint8_t>{});
        break;
      }
      [[fallthrough]];
    default: f(Tag<float>{});
  }
}

template <class F>
MFM_HD void with_bool(bool b, const F& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

template <class T>
MFM_HD float to_float(T v) {
  if constexpr (std::is_same_v<T, uint8_t>) return static_cast<float>(v) * (1.f / 255.f);  // [0, 1]
  else return static_cast<float>(v);
}

template <int B>
struct RawWords {
  uint32_t w[B / 4];
};
template <int B>
MFM_HD RawWords<B> load_raw(const void* p) {  // p B-byte aligned
  RawWords<B> r;
#ifdef __CUDA_ARCH__
  if constexpr (B == 16) {
    const uint4 v = *static_cast<const uint4*>(p);
    r.w[0] = v.x, r.w[1] = v.y, r.w[2] = v.z, r.w[3] = v.w;
  } else if constexpr (B == 8) {
    const uint2 v = *static_cast<const uint2*>(p);
    r.w[0] = v.x, r.w[1] = v.y;
  } else {
    r.w[0] = *static_cast<const uint32_t*>(p);
  }
#else
  memcpy(r.w, p, B);
#endif
  return r;
}
MFM_HD uint32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}
template <int B>
MFM_HD void store_raw(void* p, const RawWords<B>& r) {
#ifdef __CUDA_ARCH__  // explicit vector stores: built from scalars, a uint4 store is split into 4 by the compiler
  if constexpr (B == 16)
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(r.w[0]), "r"(r.w[1]), "r"(r.w[2]),
                 "r"(r.w[3])
                 : "memory");
  else if constexpr (B == 8)
    asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(p), "r"(r.w[0]), "r"(r.w[1]) : "memory");
  else
    *static_cast<uint32_t*>(p) = r.w[0];
#else
  memcpy(p, r.w, B);
#endif
}

// out[0..4) = p[0..4) as float.
template <class T, bool kVec>
MFM_HD void load4(const T* p, float (&out)[4]) {
  T v[4];
  if constexpr (kVec) {
    const RawWords<4 * sizeof(T)> r = load_raw<4 * sizeof(T)>(p);
    memcpy(v, r.w, sizeof(v));
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = p[i];
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) out[i] = to_float(v[i]);
}
// p[0..4) = in[0..4) rounded to T (float, c10::Half or c10::BFloat16). The vector store is built from
// the values' bits directly (through memcpy the compiler loses the 16-byte alignment and stores scalars);
// kVec is a template parameter for the same reason (a runtime branch between the two paths gets merged
// into scalar stores).
template <class T, bool kVec>
MFM_HD void store4(T* p, const float (&in)[4]) {
  T v[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = static_cast<T>(in[i]);
  if constexpr (kVec) {
    RawWords<4 * sizeof(T)> r;
    if constexpr (std::is_same_v<T, float>) {
#pragma unroll
      for (int i = 0; i < 4; ++i) r.w[i] = float_bits(in[i]);
    } else {
      r.w[0] = uint32_t{v[0].x} | (uint32_t{v[1].x} << 16), r.w[1] = uint32_t{v[2].x} | (uint32_t{v[3].x} << 16);
    }
    store_raw<4 * sizeof(T)>(p, r);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) p[i] = v[i];
  }
}

// The load / store phases of plane_pipeline: item (chunk c of 4 columns, row pair p), chunks fastest
// (coalesced rows). row4(y, x0, v) gives v[i] = plane(y, x0 + i); put4(y, x0, v) writes them.
template <int S, class Row4>
MFM_HD void load_pairs(int tid, int nth, cf* spec, const Row4& row4) {
  constexpr int WH = S / 2 + 1;
  for_items<S / 4, S / 2>(tid, nth, [&](int c, int p) {
    float a[4], b[4];
    row4(2 * p, 4 * c, a);
    row4(2 * p + 1, 4 * c, b);
    cf* z = spec + 2 * p * WH + 4 * c;
    st2(z, {a[0], b[0]}, {a[1], b[1]});
    st2(z + 2, {a[2], b[2]}, {a[3], b[3]});
  });
}
template <int S, class Put4>
MFM_HD void store_pairs(int tid, int nth, const cf* spec, const Put4& put4) {
  constexpr int WH = S / 2 + 1;
  for_items<S / 4, S / 2>(tid, nth, [&](int c, int p) {
    const cf* z = spec + 2 * p * WH + 4 * c;
    cf v[4];
    ld2(z, v[0], v[1]);
    ld2(z + 2, v[2], v[3]);
    const float a[4] = {v[0].x, v[1].x, v[2].x, v[3].x}, b[4] = {v[0].y, v[1].y, v[2].y, v[3].y};
    put4(2 * p, 4 * c, a);
    put4(2 * p + 1, 4 * c, b);
  });
}

MFM_HD int64_t elem_bytes(int dt) { return dt == kF32 ? 4 : (dt == kU8 ? 1 : 2); }

// a / b from rb = 1 / b (rounded): q = a rb, then one exact-residual correction (Markstein), which gives
// the rounded quotient a / b for finite normal operands: 3 instructions instead of a division.
MFM_HD float div_by(float a, float b, float rb) {
  const float q = a * rb;
  return fmaf(fmaf(-q, b, a), rb, q);
}

// a[c] for a runtime c < kMaxChannels without indexing (an indexed by-value kernel argument would be
// copied to local memory).
MFM_HD float pick(const float (&a)[kMaxChannels], int c) {
  float v = a[0];
#pragma unroll
  for (int i = 1; i < kMaxChannels; ++i) v = c == i ? a[i] : v;
  return v;
}

// Ask L2 for plane `plane` (S * S elements of dtype dt) of the buffer at base, nothing when base is null:
// the next plane's inputs, read while this plane computes so that the next plane's load phase hits L2
// instead of waiting on HBM. GPU only, a no-op on the host. sm_90+: bulk prefetches
// (cp.async.bulk.prefetch.L2) of up to 64 KiB, one per thread (4 threads for a 224 x 224 fp32 plane), the
// range trimmed to 16-byte alignment; older GPUs: the threads share the range's 128-byte lines
// (prefetch.global.L2).
template <int S>
MFM_HD void l2_prefetch_plane(const void* base, int dt, int64_t plane, int tid, int nth) {
#ifdef __CUDA_ARCH__
  if (base == nullptr) return;
  const int64_t bytes = static_cast<int64_t>(S) * S * elem_bytes(dt);
  const char* p = static_cast<const char*>(base) + plane * bytes;
#if __CUDA_ARCH__ >= 900
  constexpr uint64_t kChunk = 65536;
  const uint64_t begin = (reinterpret_cast<uint64_t>(p) + 15) & ~uint64_t{15};
  const uint64_t end = (reinterpret_cast<uint64_t>(p) + bytes) & ~uint64_t{15};
  const uint64_t at = begin + static_cast<uint64_t>(tid) * kChunk;
  if (at < end) {
    const uint32_t n = static_cast<uint32_t>(end - at < kChunk ? end - at : kChunk);
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(at), "r"(n) : "memory");
  }
  (void)nth;  // nth * 64 KiB >= any plane here (S <= 224: 196 KiB at most)
#else
  for (int64_t o = static_cast<int64_t>(tid) * 128; o < bytes; o += static_cast<int64_t>(nth) * 128)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p + o));
#endif
#else
  (void)base, (void)dt, (void)plane, (void)tid, (void)nth;
#endif
}

// Symmetrised keep mask (m(k) + m(-k)) / 2 at the unshifted frequency (ky, kx) of an fftshift-ed S x S
// mask, 0 <= ky < S, 0 <= kx <= S / 2: the shifted index of k is (k + S/2) mod S, of -k (S/2 - k) mod S,
// each one compare and select.
template <int S>
MFM_HD float sym_mask(const float* m, int ky, int kx) {
  constexpr int H = S / 2;
  const int y1 = ky < H ? ky + H : ky - H, y2 = ky <= H ? H - ky : 3 * H - ky;
  const int x1 = kx < H ? kx + H : kx - H, x2 = H - kx;
  return 0.5f * (m[y1 * S + x1] + m[y2 * S + x2]);
}

// ---------------------------------------------------------------- corruption
struct CorruptArgs {
  const void* x;
  int x_dt;
  const float* mask;  // (N, S, S) float32, fftshift-ed keep mask
  void* out;
  int out_dt;
  int channels;
  bool vec;  // x and out 16-byte aligned: 4-element vector accesses
  Stats stats;
};

template <int S>
struct CorruptSpectral {
  const float* m;
  MFM_HD float weight(int ky, int kx) const { return sym_mask<S>(m, ky, kx) * (1.f / (S * S)); }  // irfft2's 1/S^2 too
  MFM_HD void operator()(int, int, float w, cf& v) const { v = cscale(v, w); }
  MFM_HD void end_item() const {}
  template <class F>
  MFM_HD void visit(const F& f) {
    f(*this);
  }
};

// Corrupt plane `plane` (= n * C + c); `next`: the plane this CTA runs next (its inputs are prefetched),
// or -1. smem: PlaneSmem<S> with its twiddles filled. out = (clamp(irfft2(mask * rfft2(x)), 0, 1) - mean) / std
// (div_by).
template <int S, class Sched>
MFM_HD void corrupt_plane(const CorruptArgs& a, int plane, int next, cf* smem, const Sched& sched) {
  using P = PlaneSmem<S>;
  constexpr int64_t SS = S * S;
  const int n = plane / a.channels, c = plane % a.channels;
  const int64_t off = plane * SS;
  const bool vec = a.vec;
  const int x_dt = a.x_dt, out_dt = a.out_dt;
  const void* x = a.x;
  void* out = a.out;
  const float mean = pick(a.stats.mean, c), sdev = pick(a.stats.std, c), inv_std = 1.f / sdev;
  const auto load = [=](int tid, int nth, cf* spec) {
    with_dtype<true>(x_dt, [&](auto tag) {
      with_bool(vec, [&](auto kvec) {
        using T = typename decltype(tag)::type;
        const T* src = static_cast<const T*>(x) + off;
        load_pairs<S>(tid, nth, spec,
                      [&](int y, int x0, float (&v)[4]) { load4<T, decltype(kvec)::value>(src + y * S + x0, v); });
      });
    });
  };
  const auto store = [=](int tid, int nth, const cf* spec) {
    with_dtype<false>(out_dt, [&](auto tag) {
     with_bool(vec, [&](auto kvec) {
      using T = typename decltype(tag)::type;
      T* dst = static_cast<T*>(out) + off;
      store_pairs<S>(tid, nth, spec, [&](int y, int x0, const float (&v)[4]) {
        float o[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float u = v[i] > 1.f ? 1.f : v[i];  // clamp to [0, 1], NaN stays NaN (two selects)
          u = u < 0.f ? 0.f : u;
          o[i] = div_by(u - mean, sdev, inv_std);
        }
        store4<T, decltype(kvec)::value>(dst + y * S + x0, o);
      });
     });
    });
  };
  CorruptSpectral<S> spectral{a.mask + n * SS};
  const auto prefetch = [&a, next](int tid, int nth) {
    if (next < 0) return;
    l2_prefetch_plane<S>(a.x, a.x_dt, next, tid, nth);
    l2_prefetch_plane<S>(a.mask, kF32, next / a.channels, tid, nth);
  };
  plane_pipeline<S, true>(sched, P::spec(smem), P::twiddles(smem), load, spectral, store, prefetch);
}

// ---------------------------------------------------------------- the backward's gradient scale
// grad *= grad_output (csrc/scale_grad.cu, the host kernel in ops.cpp): as torch's grad * grad_output.to(T),
// the scale rounded to T, the product in float, rounded to T.
template <class T>
MFM_HD float scale_in(float s) {
  return static_cast<float>(static_cast<T>(s));
}
template <class T, bool kVec>
MFM_HD void scale4(T* p, float s) {
  float v[4];
  load4<T, kVec>(p, v);
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] *= s;
  store4<T, kVec>(p, v);
}

// ---------------------------------------------------------------- masked spectral loss
enum Reduction : int { kMasked = 0, kMean = 1, kSum = 2 };

struct LossArgs {
  const void* pred;
  int pred_dt;
  const void* target;
  int target_dt;
  const float* mask;  // (N, S, S) keep mask or nullptr (weight 1 everywhere)
  void* grad;         // (N, C, S, S) in grad_dt, or nullptr
  int grad_dt;
  int channels;
  float gamma;
  int band;  // mask_band promise: the compiled band width RB of the band path (csrc/loss_band.cuh), 0 = none
  bool normalize_target;
  bool vec;  // pred, target and grad 16-byte aligned: 4-element vector accesses
  Stats stats;
};

// 1 / sqrt(x) for a normal x > 0: the GPU's rsqrtf (2 ulp, no slow-path call), 1 / sqrtf on the host.
MFM_HD float rsqrt(float x) {
#ifdef __CUDA_ARCH__
  return rsqrtf(x);
#else
  return 1.f / std::sqrt(x);
#endif
}

// d = s^gamma, s^2 = |D|^2 + 1e-12, and the gradient factor w gamma s^(gamma - 2) (times grad_scale) of one
// entry D, without overflow for every finite D whose d fits in float: when max(|D.x|, |D.y|) >= 2^60
// (|D|^2 could pass 2^120), D is scaled by 2^-64 (exact) before squaring and the powers of two go back
// into the results (the 1e-12 is below the rounding of |D|^2 there). One rsqrt (gamma = 1) or powf per entry:
// p = s^(gamma - 2), d = p s^2. visit(f) hands the column pass a Mode with gamma == 1 decided at compile
// time (one branch per plane, not per entry); a Mode sums an item's colw w d in float, then adds it to acc.
template <int S>
struct LossSpectral {
  const float* m;     // this image's mask or nullptr
  float gamma;
  float grad_scale;   // scale * gamma / S (the 1/S is the ortho inverse), 0 when no gradient is wanted
  bool need_grad;
  double acc = 0.0;   // this thread's sum of colw * w * d
  MFM_HD float weight(int ky, int kx) const { return m ? 1.f - sym_mask<S>(m, ky, kx) : 1.f; }
  // colw w d; v = the gradient's spectrum entry. e = 2^(32 gamma), e1 = 2^(32 (gamma - 1)): 2^(64 g) = e^2.
  template <bool kOne>
  MFM_HD float entry(int kx, float w, cf& v, float e, float e1) const {
    const cf D = cscale(v, 1.f / S);  // ortho forward
    const bool big = fmaxf(fabsf(D.x), fabsf(D.y)) >= 0x1p60f;
    const cf Ds = big ? cscale(D, 0x1p-64f) : D;
    const float s2 = Ds.x * Ds.x + Ds.y * Ds.y + (big ? 0.f : 1e-12f);
    const float E = big ? e : 1.f, E1 = big ? e1 : 1.f;
    float d, slope;  // slope: for Ds
    if constexpr (kOne) {
      const float r = rsqrt(s2);
      d = ((s2 * r) * E) * E;
      slope = r;
    } else {
      const float p = powf(s2, 0.5f * gamma - 1.f);
      d = ((p * s2) * E) * E;
      slope = (p * E1) * E1;
    }
    if (need_grad) v = cscale(Ds, w * slope * grad_scale);
    return ((kx == 0 || kx == S / 2) ? 1.f : 2.f) * w * d;
  }
  template <bool kOne>
  struct Mode {
    LossSpectral* s;
    float e = exp2f(32.f * s->gamma), e1 = exp2f(32.f * (s->gamma - 1.f));
    float item = 0.f;
    MFM_HD float weight(int ky, int kx) const { return s->weight(ky, kx); }
    MFM_HD void operator()(int, int kx, float w, cf& v) { item += s->template entry<kOne>(kx, w, v, e, e1); }
    MFM_HD void end_item() { s->acc += static_cast<double>(item), item = 0.f; }
  };
  template <class F>
  MFM_HD void visit(const F& f) {
    if (gamma == 1.f) {
      Mode<true> mode{this};
      f(mode);
    } else {
      Mode<false> mode{this};
      f(mode);
    }
  }
};

// One plane of the loss: returns this thread's share of sum(colw * w * d) (unscaled; every virtual thread's
// on the host) and, when kGrad (a.grad non-null), writes scale * dL/dpred for the plane. scale: the
// reduction's factor (loss_weight / Z etc.). `next`: as in corrupt_plane.
template <int S, bool kGrad, class Sched>
MFM_HD double loss_plane(const LossArgs& a, int plane, int next, float scale, cf* smem, const Sched& sched) {
  using P = PlaneSmem<S>;
  constexpr int64_t SS = S * S;
  const int n = plane / a.channels, c = plane % a.channels;
  const int64_t off = plane * SS;
  const bool vec = a.vec, norm = a.normalize_target;
  const int pred_dt = a.pred_dt, target_dt = a.target_dt, grad_dt = a.grad_dt;
  const void* pred = a.pred;
  const void* target = a.target;
  void* grad = a.grad;
  const float mean = pick(a.stats.mean, c), sdev = pick(a.stats.std, c), inv_std = 1.f / sdev;
  const auto load = [=](int tid, int nth, cf* spec) {  // pred - normalise(target)
    with_dtype<false>(pred_dt, [&](auto ptag) {
      with_dtype<true>(target_dt, [&](auto ttag) {
        using TP = typename decltype(ptag)::type;
        using TT = typename decltype(ttag)::type;
        const TP* p = static_cast<const TP*>(pred) + off;
        const TT* t = static_cast<const TT*>(target) + off;
        with_bool(vec, [&](auto kvec) {
          load_pairs<S>(tid, nth, spec, [&](int y, int x0, float (&v)[4]) {
            float tv[4];
            load4<TP, decltype(kvec)::value>(p + y * S + x0, v);
            load4<TT, decltype(kvec)::value>(t + y * S + x0, tv);
#pragma unroll
            for (int i = 0; i < 4; ++i) v[i] -= norm ? div_by(tv[i] - mean, sdev, inv_std) : tv[i];
          });
        });
      });
    });
  };
  const auto store = [=](int tid, int nth, const cf* spec) {
    with_dtype<false>(grad_dt, [&](auto tag) {
      using T = typename decltype(tag)::type;
      T* dst = static_cast<T*>(grad) + off;
      with_bool(vec, [&](auto kvec) {
        store_pairs<S>(tid, nth, spec,
                       [&](int y, int x0, const float (&v)[4]) { store4<T, decltype(kvec)::value>(dst + y * S + x0, v); });
      });
    });
  };
  LossSpectral<S> spectral{a.mask ? a.mask + n * SS : nullptr, a.gamma, kGrad ? scale * a.gamma / S : 0.f, kGrad};
  const auto prefetch = [&a, next](int tid, int nth) {
    if (next < 0) return;
    l2_prefetch_plane<S>(a.pred, a.pred_dt, next, tid, nth);
    l2_prefetch_plane<S>(a.target, a.target_dt, next, tid, nth);
    l2_prefetch_plane<S>(a.mask, kF32, next / a.channels, tid, nth);
  };
  plane_pipeline<S, kGrad, true>(sched, P::spec(smem), P::twiddles(smem), load, spectral, store, prefetch);
  return spectral.acc;
}

// This thread's share of sum(1 - mask) over image n's S x S mask (the masked reduction's denominator / C).
template <int S>
MFM_HD double removed_count(const float* mask, int n, int tid, int nth) {
  const float* m = mask + static_cast<int64_t>(n) * S * S;
  double acc = 0.0;
  for (int i = tid; i < S * S; i += nth) acc += 1.0 - static_cast<double>(m[i]);
  return acc;
}

// The same sum under the mask_band promise with band width RB (every entry outside the centred box
// |ky|, |kx| < RB equals the corner m[0, 0]): the (2 RB - 1)^2 box entries, and thread 0 adds
// (S^2 - (2 RB - 1)^2) (1 - corner). Reads 4 KB of the mask instead of S^2 floats. RB = 0: the full sum.
template <int S, int RB>
MFM_HD double removed_count_band(const float* mask, int n, int tid, int nth) {
  if constexpr (RB == 0) {
    return removed_count<S>(mask, n, tid, nth);
  } else {
    constexpr int kBox = 2 * RB - 1, kLo = S / 2 - RB + 1;  // fftshift-ed rows / columns of the box
    const float* m = mask + static_cast<int64_t>(n) * S * S;
    double acc = tid == 0 ? static_cast<double>(S * S - kBox * kBox) * (1.0 - static_cast<double>(m[0])) : 0.0;
    for (int i = tid; i < kBox * kBox; i += nth) {
      const int r = i / kBox, c = i - r * kBox;  // division by a compile-time constant
      acc += 1.0 - static_cast<double>(m[(kLo + r) * S + kLo + c]);
    }
    return acc;
  }
}

}  // namespace mfm
