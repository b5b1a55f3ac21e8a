// The two ops' per-plane maths (MFM_SPEC.md §2 corruption, §3 masked spectral loss, half-spectrum form),
// shared verbatim by the CUDA kernels (csrc/corrupt.cu, csrc/masked_freq_loss.cu) and the CPU kernels
// of the same ops (csrc/ops.cpp). Torch-free apart from c10's Half / BFloat16 conversions.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "fft.cuh"

namespace mfm {

enum Dtype : int { kF32 = 0, kF16 = 1, kBF16 = 2, kU8 = 3 };
constexpr int kMaxChannels = 8;

struct Stats {  // per-channel mean / std, passed by value to the kernels
  float mean[kMaxChannels];
  float std[kMaxChannels];
};

// Element i of a plane buffer as float ([0, 1] for uint8: v / 255).
MFM_HD float load_elem(const void* p, int dt, int64_t i) {
  switch (dt) {
    case kF16: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    case kBF16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    case kU8: return static_cast<float>(static_cast<const uint8_t*>(p)[i]) / 255.f;
    default: return static_cast<const float*>(p)[i];
  }
}

MFM_HD void store_elem(void* p, int dt, int64_t i, float v) {
  switch (dt) {
    case kF16: static_cast<c10::Half*>(p)[i] = c10::Half(v); break;
    case kBF16: static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

MFM_HD int64_t elem_bytes(int dt) { return dt == kF32 ? 4 : (dt == kU8 ? 1 : 2); }

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

// Symmetrised keep mask (m(k) + m(-k)) / 2 at the unshifted frequency (ky, kx) of an fftshift-ed S x S mask.
template <int S>
MFM_HD float sym_mask(const float* m, int ky, int kx) {
  const int y1 = (ky + S / 2) % S, x1 = (kx + S / 2) % S;
  const int y2 = ((S - ky) % S + S / 2) % S, x2 = ((S - kx) % S + S / 2) % S;
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
  Stats stats;
};

struct PlaneLoad {
  const void* p;
  int dt;
  int64_t off;
  int S;
  MFM_HD float operator()(int y, int x) const { return load_elem(p, dt, off + y * S + x); }
};

template <int S>
struct CorruptSpectral {
  const float* m;
  MFM_HD void operator()(int ky, int kx, cf& v) const {
    v = cscale(v, sym_mask<S>(m, ky, kx) * (1.f / (S * S)));  // irfft2 normalisation folded in
  }
};

struct CorruptStore {
  void* out;
  int dt;
  int64_t off;
  int S;
  float mean, std;
  MFM_HD void operator()(int y, int x, float v) const {
    v = v < 0.f ? 0.f : (v > 1.f ? 1.f : v);
    store_elem(out, dt, off + y * S + x, (v - mean) / std);
  }
};

// Corrupt plane `plane` (= n * C + c); `next`: the plane this CTA runs next (its inputs are prefetched),
// or -1. smem: PlaneSmem<S> with its twiddles filled.
template <int S, class Sched>
MFM_HD void corrupt_plane(const CorruptArgs& a, int plane, int next, cf* smem, const Sched& sched) {
  using P = PlaneSmem<S>;
  constexpr int64_t SS = S * S;
  const int n = plane / a.channels, c = plane % a.channels;
  const int64_t off = plane * SS;
  PlaneLoad load{a.x, a.x_dt, off, S};
  CorruptSpectral<S> spectral{a.mask + n * SS};
  CorruptStore store{a.out, a.out_dt, off, S, a.stats.mean[c], a.stats.std[c]};
  const auto prefetch = [&a, next](int tid, int nth) {
    if (next < 0) return;
    l2_prefetch_plane<S>(a.x, a.x_dt, next, tid, nth);
    l2_prefetch_plane<S>(a.mask, kF32, next / a.channels, tid, nth);
  };
  plane_pipeline<S>(sched, P::spec(smem), P::twiddles(smem), load, spectral, store, prefetch, true);
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
  bool normalize_target;
  Stats stats;
};

struct DiffLoad {  // pred - normalise(target), in float
  const void* p;
  int pdt;
  const void* t;
  int tdt;
  int64_t off;
  int S;
  bool norm;
  float mean, std;
  MFM_HD float operator()(int y, int x) const {
    const int64_t i = off + y * S + x;
    float t_v = load_elem(t, tdt, i);
    if (norm) t_v = (t_v - mean) / std;
    return load_elem(p, pdt, i) - t_v;
  }
};

template <int S>
struct LossSpectral {
  const float* m;     // this image's mask or nullptr
  float gamma;
  float grad_scale;   // scale * gamma / S (the 1/S is the ortho inverse), 0 when no gradient is wanted
  bool need_grad;
  double acc;         // this thread's sum of colw * w * d
  MFM_HD void operator()(int ky, int kx, cf& v) {
    const cf D = cscale(v, 1.f / S);  // ortho forward
    const float s2 = D.x * D.x + D.y * D.y + 1e-12f;
    const float w = m ? 1.f - sym_mask<S>(m, ky, kx) : 1.f;
    const bool one = gamma == 1.f;
    const float d = one ? sqrtf(s2) : powf(s2, 0.5f * gamma);
    const float colw = (kx == 0 || kx == S / 2) ? 1.f : 2.f;
    acc += static_cast<double>(colw * w * d);
    if (need_grad) {
      const float slope = one ? 1.f / sqrtf(s2) : powf(s2, 0.5f * gamma - 1.f);
      v = cscale(D, w * slope * grad_scale);
    }
  }
};

struct GradStore {
  void* g;
  int dt;
  int64_t off;
  int S;
  MFM_HD void operator()(int y, int x, float v) const { store_elem(g, dt, off + y * S + x, v); }
};

// One plane of the loss: returns this thread's share of sum(colw * w * d) (unscaled; every virtual thread's
// on the host) and, when a.grad,
// writes scale * dL/dpred for the plane. scale: the reduction's factor (loss_weight / Z etc.).
// `next`: as in corrupt_plane.
template <int S, class Sched>
MFM_HD double loss_plane(const LossArgs& a, int plane, int next, float scale, cf* smem, const Sched& sched) {
  using P = PlaneSmem<S>;
  constexpr int64_t SS = S * S;
  const int n = plane / a.channels, c = plane % a.channels;
  const int64_t off = plane * SS;
  DiffLoad load{a.pred, a.pred_dt, a.target, a.target_dt, off, S, a.normalize_target, a.stats.mean[c],
                a.stats.std[c]};
  const bool need_grad = a.grad != nullptr;
  LossSpectral<S> spectral{a.mask ? a.mask + n * SS : nullptr, a.gamma,
                           need_grad ? scale * a.gamma / S : 0.f, need_grad, 0.0};
  GradStore store{a.grad, a.grad_dt, off, S};
  const auto prefetch = [&a, next](int tid, int nth) {
    if (next < 0) return;
    l2_prefetch_plane<S>(a.pred, a.pred_dt, next, tid, nth);
    l2_prefetch_plane<S>(a.target, a.target_dt, next, tid, nth);
    l2_prefetch_plane<S>(a.mask, kF32, next / a.channels, tid, nth);
  };
  plane_pipeline<S>(sched, P::spec(smem), P::twiddles(smem), load, spectral, store, prefetch, need_grad);
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

}  // namespace mfm
