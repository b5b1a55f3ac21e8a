// The band path of the masked spectral loss: one CTA per (image, channel) plane of an image whose mask corner
// is 1 under the mask_band promise (csrc/loss_band.cuh); the CTAs of the other images exit at once, as
// loss_kernel's CTAs do for these ones. Writes the plane's partial into the same partials[] slot as
// loss_kernel would, and (kGrad) its whole gradient plane. Small shared memory (42 KB at 224, RB = 16), so
// several CTAs share an SM.
#include "launch.h"
#include "loss_band.cuh"

namespace mfm {
namespace {

// CTAs per SM the register budget is sized for (__launch_bounds__' minimum blocks per SM): 3 for the 224 x 16
// kernel with the gradient and at 112; 2 (<= 128 registers) for the 224 x 16 forward-only kernel, which spills
// under the 3-CTA budget; 1 for the 224 x 32 band (its 32 row accumulators need more than 128 registers).
// Each instantiation's registers and spills: docs/kernels.md, sm_90 build figures (nvcc -Xptxas -v).
template <int S, int RB, bool kGrad>
MFM_HDC int band_ctas_per_sm() { return S >= 224 && RB > 16 ? 1 : (S >= 224 && !kGrad ? 2 : 3); }

// partials[plane] = scale * sum(colw w d) of band plane (n = blockIdx.x, c = blockIdx.y); kGrad: its gradient.
template <int S, int RB, bool kGrad>
__global__ void __launch_bounds__(band_threads<S>(), band_ctas_per_sm<S, RB, kGrad>())
    loss_band_kernel(LossArgs args, int images, int reduction, float loss_weight, const double* removed,
                     double* partials) {
  constexpr int threads = band_threads<S>();
  const int n = blockIdx.x, c = blockIdx.y;
  if (!is_band_image<S>(args, n)) return;  // a full-path plane (loss_kernel's)
  extern __shared__ float4 smem_f4[];
  cf* smem = reinterpret_cast<cf*>(smem_f4);
  double* red = reinterpret_cast<double*>(smem + BandSmem<S, RB>::kComplex);
  float scale = loss_weight;
  if (reduction == kMasked) {  // as loss_kernel: the denominator summed on the device
    const double z = block_sum_of(removed, images, red) * args.channels;
    scale = static_cast<float>(loss_weight / (z > 1e-30 ? z : 1e-30));
  } else if (reduction == kMean) {
    scale = static_cast<float>(loss_weight / (static_cast<double>(images) * args.channels * S * S));
  }
  const CtaSched<threads> sched{static_cast<int>(threadIdx.x)};
  const double acc = loss_band_plane<S, RB, kGrad>(args, BandPlane{n, c}, scale, smem, sched);
  const double total = block_sum(acc, red);
  if (threadIdx.x == 0) partials[n * args.channels + c] = total * scale;
}

template <int S, int RB, bool kGrad>
cudaError_t launch_band(const LossArgs& args, int images, int reduction, float loss_weight, const double* removed,
                        double* partials, cudaStream_t stream) {
  constexpr int threads = band_threads<S>();
  constexpr size_t smem = BandSmem<S, RB>::bytes(sizeof(double) * threads);
  cudaError_t err = cudaFuncSetAttribute(loss_band_kernel<S, RB, kGrad>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 planes(images, args.channels);  // images on x: no 65,535 limit
  loss_band_kernel<S, RB, kGrad><<<planes, threads, smem, stream>>>(args, images, reduction, loss_weight, removed,
                                                                    partials);
  return cudaGetLastError();
}

template <int S, bool kGrad>
cudaError_t launch_band_rb(const LossArgs& args, int images, int reduction, float loss_weight, const double* removed,
                           double* partials, cudaStream_t stream) {
  return args.band == 16 ? launch_band<S, 16, kGrad>(args, images, reduction, loss_weight, removed, partials, stream)
                         : launch_band<S, 32, kGrad>(args, images, reduction, loss_weight, removed, partials, stream);
}

}  // namespace

cudaError_t launch_masked_freq_loss_band(int side, const LossArgs& args, int images, int reduction, float loss_weight,
                                         const double* removed, double* partials, cudaStream_t stream) {
  if (args.band != 16 && args.band != 32) return cudaErrorInvalidValue;
  switch (side) {
    case 224:
      return args.grad ? launch_band_rb<224, true>(args, images, reduction, loss_weight, removed, partials, stream)
                       : launch_band_rb<224, false>(args, images, reduction, loss_weight, removed, partials, stream);
    case 112:
      return args.grad ? launch_band_rb<112, true>(args, images, reduction, loss_weight, removed, partials, stream)
                       : launch_band_rb<112, false>(args, images, reduction, loss_weight, removed, partials, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace mfm
