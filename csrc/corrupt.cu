// Fused frequency corruption (docs/spec.md §2): one CTA per (image, channel) plane; the plane's half
// spectrum lives in shared memory (224: 224 x 113 complex fp32 = 198 KiB, 204,032 B with the twiddles).
// Maths in planes.cuh, FFT phases in fft.cuh.
#include "launch.h"

namespace mfm {

template <int S>
MFM_HDC int corrupt_threads() { return S >= 224 ? 512 : 256; }

// One CTA per plane. It also asks L2 for the inputs of plane blockIdx.x + lookahead, the one that takes its
// place on the SM when it ends (lookahead = CTAs resident at once, launch.h; 0: no prefetch).
template <int S>
__global__ void __launch_bounds__(corrupt_threads<S>()) corrupt_kernel(CorruptArgs args, int planes, int lookahead) {
  extern __shared__ float4 smem_f4[];  // float4: 16-byte alignment
  cf* smem = reinterpret_cast<cf*>(smem_f4);
  make_twiddles<S>(PlaneSmem<S>::twiddles(smem), threadIdx.x, blockDim.x);
  __syncthreads();
  const int plane = blockIdx.x, next = plane + lookahead;
  corrupt_plane<S>(args, plane, lookahead > 0 && next < planes ? next : -1, smem,
                   CtaSched<corrupt_threads<S>()>{static_cast<int>(threadIdx.x)});
}

template <int S>
static cudaError_t launch(const CorruptArgs& args, int planes, bool prefetch, cudaStream_t stream) {
  constexpr size_t smem = PlaneSmem<S>::bytes(0);
  static_assert(smem <= kHopperSmemPerBlock, "the corruption plane does not fit sm_90 shared memory");
  cudaError_t err = cudaFuncSetAttribute(corrupt_kernel<S>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  int lookahead = 0;
  if (prefetch) err = resident_ctas(corrupt_kernel<S>, corrupt_threads<S>(), smem, &lookahead);
  if (err != cudaSuccess) return err;
  corrupt_kernel<S><<<planes, corrupt_threads<S>(), smem, stream>>>(args, planes, lookahead);
  return cudaGetLastError();
}

cudaError_t launch_corrupt(int side, const CorruptArgs& args, int planes, bool prefetch, cudaStream_t stream) {
  if (planes == 0) return cudaSuccess;
  switch (side) {
    case 224: return launch<224>(args, planes, prefetch, stream);
    case 112: return launch<112>(args, planes, prefetch, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace mfm
