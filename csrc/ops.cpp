// mfm_fast._C: schemas of the CUDA-extension ops (torch.ops.mfm_fast.*_cuda), the tensor checks, the
// CUDA implementations (launchers in csrc/*.cu) and CPU implementations that run the SAME per-plane
// code (planes.cuh / fft.cuh) on the host, one plane per task. The CPU kernels are slow and exist so
// that CI checks the kernel maths without a GPU; mfm_fast's backend="cuda" itself takes CUDA tensors only.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <vector>

#include "launch.h"
#include "loss_band.cuh"

// `import mfm_fast._C` loads this library, which registers the ops below (no Python functions of its own).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "mfm_fast CUDA extension: torch.ops.mfm_fast.*_cuda",
                               -1, nullptr};
  return PyModule_Create(&module);
}

namespace {

using mfm::cf;

int dtype_code(at::ScalarType t, bool allow_u8, const char* name) {
  switch (t) {
    case at::kFloat: return mfm::kF32;
    case at::kHalf: return mfm::kF16;
    case at::kBFloat16: return mfm::kBF16;
    case at::kByte:
      if (allow_u8) return mfm::kU8;
      [[fallthrough]];
    default:
      TORCH_CHECK(false, "mfm_fast CUDA extension: ", name, " must be float32, float16 or bfloat16",
                  allow_u8 ? " or uint8" : "", ", got ", t);
  }
  return -1;
}

// (N, C, S, S), contiguous, S in {224, 112}; returns S.
int64_t check_planes(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "mfm_fast CUDA extension: ", name, " must be (N, C, H, W), got ", t.dim(), " dims");
  const int64_t h = t.size(2), w = t.size(3);
  TORCH_CHECK(h == w && mfm::supported_side(static_cast<int>(h)),
              "mfm_fast CUDA extension: ", name, " planes must be 224 x 224 or 112 x 112 (the compiled sizes), got ",
              h, " x ", w);
  TORCH_CHECK(t.size(1) >= 1 && t.size(1) <= mfm::kMaxChannels, "mfm_fast CUDA extension: ", name,
              " must have 1 to ", mfm::kMaxChannels, " channels, got ", t.size(1));
  TORCH_CHECK(t.is_contiguous(), "mfm_fast CUDA extension: ", name, " must be contiguous (NCHW)");
  return h;
}

void check_mask(const at::Tensor& mask, const at::Tensor& like, int64_t side) {
  TORCH_CHECK(mask.device() == like.device(), "mfm_fast CUDA extension: mask is on ", mask.device(),
              " but the images are on ", like.device());
  TORCH_CHECK(mask.scalar_type() == at::kFloat, "mfm_fast CUDA extension: mask must be float32, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.dim() == 3 && mask.size(0) == like.size(0) && mask.size(1) == side && mask.size(2) == side,
              "mfm_fast CUDA extension: mask must be (N, H, W) = (", like.size(0), ", ", side, ", ", side,
              "), got ", mask.sizes());
  TORCH_CHECK(mask.is_contiguous(), "mfm_fast CUDA extension: mask must be contiguous");
}

mfm::Stats make_stats(at::ArrayRef<double> mean, at::ArrayRef<double> std, int64_t channels, const char* what) {
  TORCH_CHECK(static_cast<int64_t>(mean.size()) == channels && static_cast<int64_t>(std.size()) == channels,
              "mfm_fast CUDA extension: ", what, " mean and std need ", channels, " values each, got ", mean.size(),
              " and ", std.size());
  mfm::Stats s{};
  for (int64_t c = 0; c < channels; ++c) {
    s.mean[c] = static_cast<float>(mean[c]);
    s.std[c] = static_cast<float>(std[c]);
  }
  return s;
}

int reduction_code(c10::string_view r) {
  if (r == "masked") return mfm::kMasked;
  if (r == "mean") return mfm::kMean;
  if (r == "sum") return mfm::kSum;
  TORCH_CHECK(false, "mfm_fast CUDA extension: reduction must be 'masked', 'mean' or 'sum', got '", r, "'");
  return -1;
}

void check_device(const at::Tensor& t, bool cuda, const char* op) {
  TORCH_CHECK(t.is_cuda() == cuda, "mfm_fast::", op, ": expected ", cuda ? "CUDA" : "CPU", " tensors, got one on ",
              t.device());
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "mfm_fast CUDA extension: ", what, " launch failed: ", cudaGetErrorString(err),
              " (the 224 x 224 kernels need about 225 KB of shared memory per block: H100 / H200 / B200, not A100;"
              " is the extension built for this GPU's arch? see TORCH_CUDA_ARCH_LIST in setup.py)");
}

// The kernels read and write plane rows 4 elements at a time, as one vector access when every buffer is
// 16-byte aligned (a tensor's storage is; a view at an odd offset may not be), else element by element.
bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// MFM_FAST_CUDA_PREFETCH=0 turns off the L2 prefetch of each CTA's next plane (for benchmarks); default on.
bool prefetch_enabled() {
  const char* env = std::getenv("MFM_FAST_CUDA_PREFETCH");
  return env == nullptr || std::string(env) != "0";
}

// ------------------------------------------------------------------ corrupt
struct CorruptPrep {
  at::Tensor out;
  mfm::CorruptArgs args;
  int64_t side, planes;
};

CorruptPrep prep_corrupt(const at::Tensor& x, const at::Tensor& mask, at::ArrayRef<double> mean,
                         at::ArrayRef<double> std, at::ScalarType out_dtype) {
  const int64_t side = check_planes(x, "x");
  check_mask(mask, x, side);
  const int x_dt = dtype_code(x.scalar_type(), true, "x");
  const int out_dt = dtype_code(out_dtype, false, "out_dtype");
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(out_dtype));
  mfm::CorruptArgs a{x.data_ptr(), x_dt, mask.data_ptr<float>(), out.data_ptr(), out_dt,
                     static_cast<int>(x.size(1)), aligned16({x.data_ptr(), out.data_ptr()}),
                     make_stats(mean, std, x.size(1), "corrupt")};
  return {out, a, side, x.size(0) * x.size(1)};
}

// Virtual threads of the CPU kernels: 1 by default; MFM_FAST_HOST_VTHREADS=n runs every phase of a plane as
// n virtual threads one after the other, and -n in reverse order (tests compare the bits of both to find
// phases where two threads touch the same data; see fft.cuh).
mfm::HostSched host_sched() {
  const char* env = std::getenv("MFM_FAST_HOST_VTHREADS");
  const int n = env ? std::atoi(env) : 1;
  return {n == 0 ? 1 : std::abs(n), n < 0};
}

template <int S>
std::vector<cf> host_smem() {
  std::vector<cf> smem(mfm::PlaneSmem<S>::kComplex);
  mfm::make_twiddles<S>(mfm::PlaneSmem<S>::twiddles(smem.data()), 0, 1);
  return smem;
}

template <int S>
void corrupt_host(const mfm::CorruptArgs& a, int64_t planes) {
  const mfm::HostSched sched = host_sched();
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    std::vector<cf> smem = host_smem<S>();
    for (int64_t p = begin; p < end; ++p) mfm::corrupt_plane<S>(a, static_cast<int>(p), -1, smem.data(), sched);
  });
}

at::Tensor corrupt_cpu(const at::Tensor& x, const at::Tensor& mask, at::ArrayRef<double> mean,
                       at::ArrayRef<double> std, at::ScalarType out_dtype) {
  check_device(x, false, "corrupt_cuda (CPU kernel)");
  CorruptPrep p = prep_corrupt(x, mask, mean, std, out_dtype);
  if (p.side == 224) corrupt_host<224>(p.args, p.planes);
  else corrupt_host<112>(p.args, p.planes);
  return p.out;
}

at::Tensor corrupt_cuda(const at::Tensor& x, const at::Tensor& mask, at::ArrayRef<double> mean,
                        at::ArrayRef<double> std, at::ScalarType out_dtype) {
  check_device(x, true, "corrupt_cuda");
  const c10::cuda::CUDAGuard guard(x.device());
  CorruptPrep p = prep_corrupt(x, mask, mean, std, out_dtype);
  check_launch(mfm::launch_corrupt(static_cast<int>(p.side), p.args, static_cast<int>(p.planes), prefetch_enabled(),
                                   c10::cuda::getCurrentCUDAStream().stream()),
               "corrupt");
  return p.out;
}

// ------------------------------------------------------------------ masked spectral loss
struct LossPrep {
  at::Tensor loss, grad;
  mfm::LossArgs args;
  int64_t side, images;
  int reduction;
};

LossPrep prep_loss(const at::Tensor& pred, const at::Tensor& target, const c10::optional<at::Tensor>& mask,
                   double gamma, c10::string_view reduction, c10::optional<at::ArrayRef<double>> target_mean,
                   c10::optional<at::ArrayRef<double>> target_std, bool need_grad, c10::optional<int64_t> mask_band) {
  const int64_t side = check_planes(pred, "pred");
  TORCH_CHECK(target.sizes() == pred.sizes(), "mfm_fast CUDA extension: target shape ", target.sizes(),
              " does not match pred's ", pred.sizes());
  TORCH_CHECK(target.device() == pred.device(), "mfm_fast CUDA extension: target is on ", target.device(),
              " but pred is on ", pred.device());
  TORCH_CHECK(target.is_contiguous(), "mfm_fast CUDA extension: target must be contiguous (NCHW)");
  const bool norm = target_mean.has_value();
  TORCH_CHECK(norm == target_std.has_value(), "mfm_fast CUDA extension: give both target_mean and target_std or neither");
  const int red = reduction_code(reduction);
  const float* mask_ptr = nullptr;
  if (mask.has_value()) {
    check_mask(*mask, pred, side);
    mask_ptr = mask->data_ptr<float>();
  }
  TORCH_CHECK(red != mfm::kMasked || mask_ptr, "mfm_fast CUDA extension: reduction 'masked' needs a mask");
  TORCH_CHECK(gamma > 0, "mfm_fast CUDA extension: loss_gamma must be > 0, got ", gamma);
  TORCH_CHECK(!mask_band.has_value() || *mask_band >= 1, "mfm_fast CUDA extension: mask_band must be >= 1, got ",
              mask_band.value_or(0));
  // the band path's compiled width (0: every plane on the full path; the promise itself is not checked here)
  const int band = mfm::band_width(mask_band.has_value() ? static_cast<int>(std::min<int64_t>(*mask_band, 1 << 20)) : 0,
                                   static_cast<int>(side), mask_ptr != nullptr);
  const int64_t channels = pred.size(1);
  mfm::Stats stats{};
  if (norm) stats = make_stats(*target_mean, *target_std, channels, "target");
  at::Tensor loss = at::empty({}, pred.options().dtype(at::kFloat));
  at::Tensor grad = need_grad ? at::empty(pred.sizes(), pred.options()) : at::empty({0}, pred.options());
  mfm::LossArgs a{pred.data_ptr(), dtype_code(pred.scalar_type(), false, "pred"), target.data_ptr(),
                  dtype_code(target.scalar_type(), norm, "target"), mask_ptr, need_grad ? grad.data_ptr() : nullptr,
                  dtype_code(pred.scalar_type(), false, "pred"), static_cast<int>(channels),
                  static_cast<float>(gamma), band, norm,
                  aligned16({pred.data_ptr(), target.data_ptr(), need_grad ? grad.data_ptr() : nullptr}), stats};
  return {loss, grad, a, side, pred.size(0), red};
}

template <int S>
float loss_host(const mfm::LossArgs& a, int64_t images, int reduction, double loss_weight) {
  const int64_t planes = images * a.channels;
  float scale = static_cast<float>(loss_weight);
  if (reduction == mfm::kMasked) {
    double z = 0.0;
    for (int64_t n = 0; n < images; ++n) {
      const int i = static_cast<int>(n);
      z += a.band == 16   ? mfm::removed_count_band<S, 16>(a.mask, i, 0, 1)
           : a.band == 32 ? mfm::removed_count_band<S, 32>(a.mask, i, 0, 1)
                          : mfm::removed_count<S>(a.mask, i, 0, 1);
    }
    z *= a.channels;
    scale = static_cast<float>(loss_weight / (z > 1e-30 ? z : 1e-30));
  } else if (reduction == mfm::kMean) {
    scale = static_cast<float>(loss_weight / (static_cast<double>(images) * a.channels * S * S));
  }
  std::vector<double> partials(planes);
  const mfm::HostSched sched = host_sched();
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    std::vector<cf> smem = host_smem<S>();
    std::vector<cf> band_smem(mfm::BandSmem<S, 32>::kComplex);
    for (int64_t p = begin; p < end; ++p) {
      const int n = static_cast<int>(p / a.channels), c = static_cast<int>(p % a.channels);
      double acc;
      if (mfm::is_band_image<S>(a, n)) {  // as loss_band_kernel
        acc = a.band == 16 ? (a.grad ? mfm::loss_band_plane<S, 16, true>(a, mfm::BandPlane{n, c}, scale, band_smem.data(), sched)
                                     : mfm::loss_band_plane<S, 16, false>(a, mfm::BandPlane{n, c}, scale, band_smem.data(), sched))
                           : (a.grad ? mfm::loss_band_plane<S, 32, true>(a, mfm::BandPlane{n, c}, scale, band_smem.data(), sched)
                                     : mfm::loss_band_plane<S, 32, false>(a, mfm::BandPlane{n, c}, scale, band_smem.data(), sched));
      } else {
        acc = a.grad ? mfm::loss_plane<S, true>(a, static_cast<int>(p), -1, scale, smem.data(), sched)
                     : mfm::loss_plane<S, false>(a, static_cast<int>(p), -1, scale, smem.data(), sched);
      }
      partials[p] = acc * scale;
    }
  });
  double s = 0.0;
  for (double v : partials) s += v;
  return static_cast<float>(s);
}

std::tuple<at::Tensor, at::Tensor> masked_freq_loss_cpu(
    const at::Tensor& pred, const at::Tensor& target, const c10::optional<at::Tensor>& mask, double gamma,
    c10::string_view reduction, double loss_weight, c10::optional<at::ArrayRef<double>> target_mean,
    c10::optional<at::ArrayRef<double>> target_std, bool need_grad, c10::optional<int64_t> mask_band) {
  check_device(pred, false, "masked_freq_loss_cuda (CPU kernel)");
  LossPrep p = prep_loss(pred, target, mask, gamma, reduction, target_mean, target_std, need_grad, mask_band);
  if (p.images > 0) {
    const float v = p.side == 224 ? loss_host<224>(p.args, p.images, p.reduction, loss_weight)
                                  : loss_host<112>(p.args, p.images, p.reduction, loss_weight);
    p.loss.fill_(v);
  } else {
    p.loss.zero_();
  }
  return {p.loss, p.grad};
}

std::tuple<at::Tensor, at::Tensor> masked_freq_loss_cuda(
    const at::Tensor& pred, const at::Tensor& target, const c10::optional<at::Tensor>& mask, double gamma,
    c10::string_view reduction, double loss_weight, c10::optional<at::ArrayRef<double>> target_mean,
    c10::optional<at::ArrayRef<double>> target_std, bool need_grad, c10::optional<int64_t> mask_band) {
  check_device(pred, true, "masked_freq_loss_cuda");
  const c10::cuda::CUDAGuard guard(pred.device());
  LossPrep p = prep_loss(pred, target, mask, gamma, reduction, target_mean, target_std, need_grad, mask_band);
  if (p.images == 0) {
    p.loss.zero_();
    return {p.loss, p.grad};
  }
  at::Tensor ws = at::empty({p.images * (1 + p.args.channels)}, pred.options().dtype(at::kDouble));
  check_launch(mfm::launch_masked_freq_loss(static_cast<int>(p.side), p.args, static_cast<int>(p.images), p.reduction,
                                            static_cast<float>(loss_weight), ws.data_ptr<double>(),
                                            p.loss.data_ptr<float>(), prefetch_enabled(),
                                            c10::cuda::getCurrentCUDAStream().stream()),
               "masked_freq_loss");
  return {p.loss, p.grad};
}

// ------------------------------------------------------------------ the loss backward's gradient scale
// grad *= scale (a one-element float32 tensor on grad's device), in place; no host sync: the kernel reads the
// scale and does nothing when it is 1 in grad's dtype.
int check_scale_grad(const at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK(grad.is_contiguous(), "mfm_fast::scale_grad_cuda_: grad must be contiguous");
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == at::kFloat && scale.device() == grad.device(),
              "mfm_fast::scale_grad_cuda_: scale must be one float32 value on grad's device, got ", scale.numel(),
              " values of ", scale.scalar_type(), " on ", scale.device());
  return dtype_code(grad.scalar_type(), false, "grad");
}

template <class T>
void scale_grad_host(T* g, int64_t n, float s) {
  s = mfm::scale_in<T>(s);
  if (s == 1.f) return;
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) g[i] = static_cast<T>(mfm::to_float(g[i]) * s);
  });
}

void scale_grad_cpu(at::Tensor grad, const at::Tensor& scale) {
  check_device(grad, false, "scale_grad_cuda_ (CPU kernel)");
  const int dt = check_scale_grad(grad, scale);
  const float s = scale.contiguous().data_ptr<float>()[0];
  mfm::with_dtype<false>(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    scale_grad_host(static_cast<T*>(grad.data_ptr()), grad.numel(), s);
  });
}

void scale_grad_cuda(at::Tensor grad, const at::Tensor& scale) {
  check_device(grad, true, "scale_grad_cuda_");
  const c10::cuda::CUDAGuard guard(grad.device());
  const int dt = check_scale_grad(grad, scale);
  const at::Tensor s = scale.contiguous();
  check_launch(mfm::launch_scale_grad(grad.data_ptr(), dt, grad.numel(), s.data_ptr<float>(),
                                      aligned16({grad.data_ptr()}), c10::cuda::getCurrentCUDAStream().stream()),
               "scale_grad");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mfm_fast, m) {
  // Fused corruption of (N, C, S, S) contiguous images (float32 / float16 / bfloat16 / uint8) with an
  // (N, S, S) float32 fftshift-ed keep mask; S in {224, 112}. Returns (N, C, S, S) in out_dtype.
  m.def("corrupt_cuda(Tensor x, Tensor mask, float[] mean, float[] std, ScalarType out_dtype) -> Tensor");
  // Masked spectral loss (reduction masked / mean / sum) and, when need_grad, dloss/dpred in pred's dtype
  // (else an empty tensor). The loss is a float32 scalar. target_mean/std: normalise the target inside.
  // mask_band=R: the caller's promise that every mask equals its corner mask[n, 0, 0] outside the centred
  // box |ky|, |kx| < R (not checked); images whose corner is 1 then run the band kernel (R <= 32, with a mask).
  m.def("masked_freq_loss_cuda(Tensor pred, Tensor target, Tensor? mask, float loss_gamma, str reduction, "
        "float loss_weight, float[]? target_mean, float[]? target_std, bool need_grad, int? mask_band=None) "
        "-> (Tensor, Tensor)");
  // grad *= scale in place (the loss backward: scale = grad_output, one float32 value on grad's device); a
  // launch that returns at once when the scale is 1 in grad's dtype. grad: float32 / float16 / bfloat16.
  m.def("scale_grad_cuda_(Tensor(a!) grad, Tensor scale) -> ()");
}

TORCH_LIBRARY_IMPL(mfm_fast, CUDA, m) {
  m.impl("corrupt_cuda", &corrupt_cuda);
  m.impl("masked_freq_loss_cuda", &masked_freq_loss_cuda);
  m.impl("scale_grad_cuda_", &scale_grad_cuda);
}

TORCH_LIBRARY_IMPL(mfm_fast, CPU, m) {
  m.impl("corrupt_cuda", &corrupt_cpu);
  m.impl("masked_freq_loss_cuda", &masked_freq_loss_cpu);
  m.impl("scale_grad_cuda_", &scale_grad_cpu);
}
