// The loss backward's gradient scale in place: grad *= grad_output, with grad_output read on the device
// (no host sync). Every CTA reads the scale first and returns at once when it is 1 in grad's dtype (the
// loss.backward() case: one launch, no traffic); any other value (a GradScaler's) scales every element as
// torch's grad * grad_output.to(grad.dtype) does: the product in float, rounded to grad's dtype.
#include "launch.h"

namespace mfm {

constexpr int kScaleThreads = 256;
constexpr int kScaleBlocksPerSm = 8;  // a grid-stride grid of 8 CTAs per SM: enough loads in flight for HBM

template <class T>
__global__ void __launch_bounds__(kScaleThreads) scale_grad_kernel(T* grad, int64_t n, const float* scale, bool vec) {
  const float s = scale_in<T>(*scale);
  if (s == 1.f) return;  // every thread of every CTA: the same value, one load
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t quads = n / 4;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < quads; q += stride) {
    if (vec) scale4<T, true>(grad + 4 * q, s);
    else scale4<T, false>(grad + 4 * q, s);
  }
  for (int64_t i = 4 * quads + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride)
    grad[i] = static_cast<T>(to_float(grad[i]) * s);
}

cudaError_t launch_scale_grad(void* grad, int dt, int64_t n, const float* scale, bool vec, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  int dev = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  const int64_t want = (n / 4 + kScaleThreads - 1) / kScaleThreads;
  const int64_t most = int64_t{sms} * kScaleBlocksPerSm;
  const int blocks = static_cast<int>(want < 1 ? 1 : (want < most ? want : most));
  with_dtype<false>(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    scale_grad_kernel<T><<<blocks, kScaleThreads, 0, stream>>>(static_cast<T*>(grad), n, scale, vec);
  });
  return cudaGetLastError();
}

}  // namespace mfm
