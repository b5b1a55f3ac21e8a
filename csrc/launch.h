// Launchers of the CUDA kernels (csrc/*.cu): plain C++ signatures so that the .cu files need no torch
// headers beyond c10's Half / BFloat16. csrc/ops.cpp checks the tensors and calls these.
#pragma once

#include <cuda_runtime_api.h>

#include "planes.cuh"

namespace mfm {

#ifdef __CUDACC__
// Fixed-order tree sum of one double per thread (any blockDim.x: the threads past the largest power of
// two p <= blockDim.x fold into the first ones, then a tree over p).
__device__ inline double block_sum(double v, double* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  int p = 1;
  while (2 * p <= static_cast<int>(blockDim.x)) p *= 2;
  if (static_cast<int>(threadIdx.x) + p < static_cast<int>(blockDim.x)) red[threadIdx.x] += red[threadIdx.x + p];
  __syncthreads();
  for (int s = p / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  const double out = red[0];
  __syncthreads();
  return out;
}

// Sum of v[0 .. n): strided per thread, then the fixed tree (deterministic: the same bits in every CTA).
__device__ inline double block_sum_of(const double* v, int n, double* red) {
  double part = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) part += v[i];
  return block_sum(part, red);
}

// How many CTAs of `kernel` the current device holds at once (SM count x occupancy): the look-ahead of the
// plane kernels' L2 prefetch (CTA b prefetches plane b + resident, the plane that takes its slot when it
// ends). Host calls only, no sync. An occupancy of 0 (the plane does not fit this GPU's shared memory) is
// an error.
template <class Kernel>
cudaError_t resident_ctas(Kernel kernel, int threads, size_t smem, int* resident) {
  int dev = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
  if (err != cudaSuccess) return err;
  if (per_sm < 1) return cudaErrorInvalidConfiguration;
  *resident = sms * per_sm;
  return cudaSuccess;
}
#endif

// out = corrupt(x) for N * C planes of side S (224 or 112); every pointer on the current device.
// prefetch: each CTA asks L2 for the inputs of the plane that takes its place (see resident_ctas).
cudaError_t launch_corrupt(int side, const CorruptArgs& args, int planes, bool prefetch, cudaStream_t stream);

// loss partials and (when args.grad) the gradient. workspace: N + N * C floats/doubles (see the .cu).
// loss_out: one float. reduction: Reduction; removed-count denominators are computed on the device.
cudaError_t launch_masked_freq_loss(int side, const LossArgs& args, int images, int reduction, float loss_weight,
                                   double* workspace, float* loss_out, bool prefetch, cudaStream_t stream);

// The band path's kernel (csrc/loss_band.cu) for the planes whose mask corner is 1 when args.band > 0: writes
// their partials[] slots (loss_kernel's CTAs exit for them) and gradients. removed: the masked denominators.
cudaError_t launch_masked_freq_loss_band(int side, const LossArgs& args, int images, int reduction, float loss_weight,
                                         const double* removed, double* partials, cudaStream_t stream);
// grad[0 .. n) *= scale[0] (grad of Dtype dt, not uint8; scale: one float on the device), nothing to do when
// scale[0] is 1 in grad's dtype (decided on the device). vec: grad 16-byte aligned.
cudaError_t launch_scale_grad(void* grad, int dt, int64_t n, const float* scale, bool vec, cudaStream_t stream);

}  // namespace mfm
