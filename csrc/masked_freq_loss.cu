// Masked spectral loss (docs/spec.md §3), forward and gradient in one pass: one CTA per (image, channel)
// plane computes D = rfft2_ortho(pred - normalise(target)) in shared memory, its partial sum of
// colw * w * d, and (when asked) the gradient scale * irfft2_ortho(w gamma s^(gamma-2) D) in pred's dtype.
// Deterministic: per-plane partials reduced by a fixed tree, then summed by a fixed tree over the planes.
// No host sync: the masked reduction's denominator is summed on the device before the plane pass.
#include "launch.h"
#include "loss_band.cuh"

namespace mfm {

constexpr int kRedThreads = 256;  // removed_kernel's and finish_kernel's block

// removed[n] = sum over image n of (1 - mask); RB > 0: under the mask_band promise, from the band box only.
template <int S, int RB>
__global__ void __launch_bounds__(kRedThreads) removed_kernel(const float* mask, double* removed) {
  __shared__ double red[kRedThreads];
  const double v =
      block_sum(removed_count_band<S, RB>(mask, blockIdx.x, threadIdx.x, kRedThreads), red);  // its launch's block
  if (threadIdx.x == 0) removed[blockIdx.x] = v;
}

// 512 at 224 (16 warps: at most 128 registers each, a budget the kernel meets without spills because the pack
// re-derives its entry indices, plane_pipeline's kFreshPack, instead of holding the unpack's across the column
// passes; registers and spills: docs/kernels.md, sm_90 build figures).
template <int S>
MFM_HDC int loss_threads() { return S >= 224 ? 512 : 256; }

// partials[plane] = scale * sum(colw w d) of the plane; scale from the reduction (masked: from removed[]);
// kGrad: also the plane's gradient (args.grad). One CTA per plane; it prefetches plane blockIdx.x +
// lookahead's inputs into L2 (as corrupt_kernel).
template <int S, bool kGrad>
__global__ void __launch_bounds__(loss_threads<S>()) loss_kernel(LossArgs args, int images, int reduction,
                                                                 float loss_weight, const double* removed,
                                                                 double* partials, int lookahead) {
  if (is_band_image<S>(args, static_cast<int>(blockIdx.x) / args.channels)) return;  // loss_band_kernel's plane
  extern __shared__ float4 smem_f4[];
  cf* smem = reinterpret_cast<cf*>(smem_f4);
  double* red = reinterpret_cast<double*>(smem + PlaneSmem<S>::kComplex);
  make_twiddles<S>(PlaneSmem<S>::twiddles(smem), threadIdx.x, blockDim.x);
  float scale = loss_weight;
  if (reduction == kMasked) {
    const double z = block_sum_of(removed, images, red) * args.channels;
    scale = static_cast<float>(loss_weight / (z > 1e-30 ? z : 1e-30));
  } else if (reduction == kMean) {
    scale = static_cast<float>(loss_weight / (static_cast<double>(images) * args.channels * S * S));
  }
  __syncthreads();
  const CtaSched<loss_threads<S>()> sched{static_cast<int>(threadIdx.x)};
  const int plane = blockIdx.x, next = plane + lookahead;
  const double acc =
      loss_plane<S, kGrad>(args, plane, lookahead > 0 && next < images * args.channels ? next : -1, scale, smem, sched);
  const double total = block_sum(acc, red);
  if (threadIdx.x == 0) partials[plane] = total * scale;
}

// loss = sum of the plane partials.
__global__ void __launch_bounds__(kRedThreads) finish_kernel(const double* partials, int planes, float* loss) {
  __shared__ double red[kRedThreads];
  const double total = block_sum_of(partials, planes, red);
  if (threadIdx.x == 0) *loss = static_cast<float>(total);
}

template <int S, bool kGrad>
static cudaError_t launch(const LossArgs& args, int images, int reduction, float loss_weight, double* ws,
                          float* loss_out, bool prefetch, cudaStream_t stream) {
  const int planes = images * args.channels;
  double* removed = ws;
  double* partials = ws + images;
  if (reduction == kMasked) {
    if (args.band == 16) removed_kernel<S, 16><<<images, kRedThreads, 0, stream>>>(args.mask, removed);
    else if (args.band == 32) removed_kernel<S, 32><<<images, kRedThreads, 0, stream>>>(args.mask, removed);
    else removed_kernel<S, 0><<<images, kRedThreads, 0, stream>>>(args.mask, removed);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  constexpr int threads = loss_threads<S>();
  constexpr size_t smem = PlaneSmem<S>::bytes(sizeof(double) * threads);
  static_assert(smem <= kHopperSmemPerBlock, "the loss plane does not fit sm_90 shared memory");
  cudaError_t err = cudaFuncSetAttribute(loss_kernel<S, kGrad>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  int lookahead = 0;
  if (prefetch) err = resident_ctas(loss_kernel<S, kGrad>, threads, smem, &lookahead);
  if (err != cudaSuccess) return err;
  loss_kernel<S, kGrad><<<planes, threads, smem, stream>>>(args, images, reduction, loss_weight, removed, partials,
                                                    lookahead);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (args.band) {  // the high-pass planes (mask corner 1) under the mask_band promise: csrc/loss_band.cu
    err = launch_masked_freq_loss_band(S, args, images, reduction, loss_weight, removed, partials, stream);
    if (err != cudaSuccess) return err;
  }
  finish_kernel<<<1, kRedThreads, 0, stream>>>(partials, planes, loss_out);
  return cudaGetLastError();
}

cudaError_t launch_masked_freq_loss(int side, const LossArgs& args, int images, int reduction, float loss_weight,
                                    double* workspace, float* loss_out, bool prefetch, cudaStream_t stream) {
  switch (side) {
    case 224:
      return args.grad ? launch<224, true>(args, images, reduction, loss_weight, workspace, loss_out, prefetch, stream)
                       : launch<224, false>(args, images, reduction, loss_weight, workspace, loss_out, prefetch, stream);
    case 112:
      return args.grad ? launch<112, true>(args, images, reduction, loss_weight, workspace, loss_out, prefetch, stream)
                       : launch<112, false>(args, images, reduction, loss_weight, workspace, loss_out, prefetch, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace mfm
