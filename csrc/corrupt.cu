// Fused frequency corruption (MFM_SPEC.md §2): one CTA per (image, channel) plane; the plane's half
// spectrum lives in shared memory (224: 224 x 113 complex fp32 = 198 KB). Maths in planes.cuh.
#include "launch.h"

namespace mfm {

template <int S>
__global__ void __launch_bounds__(256) corrupt_kernel(CorruptArgs args) {
  extern __shared__ float4 smem_f4[];  // float4: 16-byte alignment
  cf* tw = reinterpret_cast<cf*>(smem_f4);
  cf* spec = tw + S;
  make_twiddles<S>(tw, threadIdx.x, blockDim.x);
  __syncthreads();
  corrupt_plane<S>(args, blockIdx.x, spec, tw, threadIdx.x, blockDim.x);
}

template <int S>
static cudaError_t launch(const CorruptArgs& args, int planes, cudaStream_t stream) {
  const size_t smem = sizeof(cf) * (S + S * (S / 2 + 1));
  cudaError_t err = cudaFuncSetAttribute(corrupt_kernel<S>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  corrupt_kernel<S><<<planes, S >= 224 ? 256 : 128, smem, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launch_corrupt(int side, const CorruptArgs& args, int planes, cudaStream_t stream) {
  if (planes == 0) return cudaSuccess;
  switch (side) {
    case 224: return launch<224>(args, planes, stream);
    case 112: return launch<112>(args, planes, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace mfm
