// NVIDIA's reference point for the CUDA extension's plane FFT: a 2D round trip of S x S fp32 image planes
// built from cuFFTDx block FFTs (PyPI nvidia-mathdx, header-only), one CTA per plane as in csrc/:
//
//   rows     R2C   (S real -> S/2 + 1 complex per row, FFTsPerBlock rows at a time)
//   columns  C2C forward, [optional: times mask(n, (ky + S/2) % S, (kx + S/2) % S)], C2C inverse
//   rows     C2R,  then out = (clamp(v / S^2, 0, 1) - mean[c]) / std[c]
//
// The half spectrum (S x (S/2 + 1) complex fp32, 202,496 B at 224) stays in shared memory, beside the
// scratch cuFFTDx's block FFTs exchange data through. With the mask pointer null and mean 0, std 1 the
// output is clamp(x, 0, 1): the same bytes and the same transforms as torch.ops.mfm_fast.corrupt_cuda with
// an all-ones mask. The mask step reads the same mask bytes as corrupt_cuda but takes m as it is (no
// (m(k) + m(-k)) / 2 symmetrisation); MFM disc masks are symmetric, so the result is the same for them.
// A forward-only variant writes the unnormalised half spectrum (torch.fft.rfft2's layout) for checks.
//
// Built only when asked (tools/cufftdx_plane.py): nvcc -std=c++17 -arch=sm_90 -shared -Xcompiler -fPIC
//   -I <site-packages>/nvidia/mathdx/include -I <site-packages>/nvidia/mathdx/external/cutlass/include.
// C entry points (ctypes), every pointer on the current device; each returns a cudaError_t code.
#include <cuda_runtime.h>

#include <cufftdx.hpp>

namespace mfm_cufftdx {

constexpr int kMaxChannels = 8;
constexpr size_t kHopperSmemPerBlock = 232448;  // sm_90's opt-in shared memory per block

// Block FFT shapes: elements per thread (a size in cuFFTDx's sm_90 database for 224 and 112) and lines per
// pass. 224: 16 threads per line x 16 lines = 256 threads (28 KiB of scratch: what is left beside the plane).
template <int S>
struct Shape;
template <>
struct Shape<224> {
  static constexpr unsigned kEpt = 14, kLines = 16;
};
template <>
struct Shape<112> {
  static constexpr unsigned kEpt = 14, kLines = 32;
};

constexpr size_t max4(size_t a, size_t b, size_t c, size_t d) {
  const size_t ab = a > b ? a : b, cd = c > d ? c : d;
  return ab > cd ? ab : cd;
}

template <int S>
struct Plane {
  using Base = decltype(cufftdx::Block() + cufftdx::Precision<float>() + cufftdx::SM<900>() + cufftdx::Size<S>() +
                        cufftdx::ElementsPerThread<Shape<S>::kEpt>() + cufftdx::FFTsPerBlock<Shape<S>::kLines>());
  using RowR2C = decltype(Base() + cufftdx::Type<cufftdx::fft_type::r2c>());
  using ColFwd = decltype(Base() + cufftdx::Type<cufftdx::fft_type::c2c>() +
                          cufftdx::Direction<cufftdx::fft_direction::forward>());
  using ColInv = decltype(Base() + cufftdx::Type<cufftdx::fft_type::c2c>() +
                          cufftdx::Direction<cufftdx::fft_direction::inverse>());
  using RowC2R = decltype(Base() + cufftdx::Type<cufftdx::fft_type::c2r>());
  using complex_t = typename ColFwd::value_type;

  static constexpr int kHalf = S / 2 + 1;
  static constexpr unsigned kStride = ColFwd::stride;  // element i of a thread is line index tid.x + i * kStride
  static constexpr unsigned kLines = Shape<S>::kLines;
  static constexpr unsigned kStorage = ColFwd::storage_size > RowR2C::storage_size ? ColFwd::storage_size
                                                                                    : RowR2C::storage_size;
  static constexpr size_t kPlaneBytes = sizeof(complex_t) * S * kHalf;
  static constexpr size_t kScratchBytes = max4(RowR2C::shared_memory_size, ColFwd::shared_memory_size,
                                               ColInv::shared_memory_size, RowC2R::shared_memory_size);
  static constexpr size_t kSmemBytes = kPlaneBytes + kScratchBytes;
  static constexpr unsigned kThreads = ColFwd::max_threads_per_block;

  static_assert(kSmemBytes <= kHopperSmemPerBlock, "the plane and cuFFTDx's scratch do not fit sm_90 shared memory");
  static_assert(RowR2C::block_dim.x == ColFwd::block_dim.x && RowC2R::block_dim.x == ColFwd::block_dim.x &&
                    RowR2C::block_dim.y == ColFwd::block_dim.y && RowC2R::block_dim.y == ColFwd::block_dim.y,
                "the row and column FFTs must share one block shape");
  static_assert(!RowR2C::requires_workspace && !ColFwd::requires_workspace && !ColInv::requires_workspace &&
                    !RowC2R::requires_workspace,
                "these sizes run without a global workspace");
  static_assert(RowC2R::storage_size <= kStorage && ColInv::storage_size <= kStorage, "register storage");
};

struct Args {
  const float* x;       // (planes, S, S)
  const float* mask;    // (planes / channels, S, S) fftshift-ed keep mask, or null (no spectral step)
  float* out;           // (planes, S, S)
  float2* spectrum;     // forward-only: (planes, S, S / 2 + 1) complex
  int channels;
  float mean[kMaxChannels];
  float inv_std[kMaxChannels];
};

template <int S, bool kForwardOnly>
__global__ void __launch_bounds__(Plane<S>::kThreads) plane_kernel(Args a) {
  using P = Plane<S>;
  using complex_t = typename P::complex_t;
  extern __shared__ __align__(16) unsigned char smem[];
  complex_t* plane = reinterpret_cast<complex_t*>(smem);
  void* scratch = smem + P::kPlaneBytes;
  const unsigned tx = threadIdx.x, ty = threadIdx.y;
  const size_t p = blockIdx.x;
  complex_t data[P::kStorage];

  // Rows: x -> half spectrum (row index r = r0 + ty; lines past S compute on zeros and store nothing).
  const float* x = a.x + p * S * S;
  for (int r0 = 0; r0 < S; r0 += P::kLines) {
    const int r = r0 + static_cast<int>(ty);
    float* re = reinterpret_cast<float*>(data);
    for (unsigned i = 0; i < P::RowR2C::input_ept; ++i) re[i] = r < S ? x[r * S + tx + i * P::kStride] : 0.f;
    __syncthreads();  // the previous pass's reads of the scratch are done
    typename P::RowR2C().execute(data, scratch);
    for (unsigned i = 0; i < P::RowR2C::output_ept; ++i) {
      const unsigned k = tx + i * P::kStride;
      if (r < S && k < P::kHalf) plane[r * P::kHalf + k] = data[i];
    }
  }
  __syncthreads();

  // Columns: forward, spectral step, inverse (column kx = c0 + ty; element i is row ky = tx + i * kStride).
  const float* m = a.mask != nullptr ? a.mask + (p / a.channels) * S * S : nullptr;
  for (int c0 = 0; c0 < P::kHalf; c0 += P::kLines) {
    const int kx = c0 + static_cast<int>(ty);
    const bool live = kx < P::kHalf;
    for (unsigned i = 0; i < P::ColFwd::input_ept; ++i)
      data[i] = live ? plane[(tx + i * P::kStride) * P::kHalf + kx] : complex_t{0.f, 0.f};
    __syncthreads();
    typename P::ColFwd().execute(data, scratch);
    if constexpr (kForwardOnly) {
      float2* spec = a.spectrum + p * S * P::kHalf;
      for (unsigned i = 0; i < P::ColFwd::output_ept; ++i)
        if (live) spec[(tx + i * P::kStride) * P::kHalf + kx] = make_float2(data[i].x, data[i].y);
    } else {
      if (m != nullptr && live) {
        for (unsigned i = 0; i < P::ColFwd::output_ept; ++i) {
          const unsigned ky = tx + i * P::kStride;
          const float w = m[((ky + S / 2) % S) * S + (kx + S / 2) % S];
          data[i].x *= w;
          data[i].y *= w;
        }
      }
      __syncthreads();
      typename P::ColInv().execute(data, scratch);
      for (unsigned i = 0; i < P::ColInv::output_ept; ++i)
        if (live) plane[(tx + i * P::kStride) * P::kHalf + kx] = data[i];
    }
  }
  if constexpr (!kForwardOnly) {
    __syncthreads();
    // Rows: half spectrum -> real, then the corruption epilogue.
    const int c = static_cast<int>(p % a.channels);
    float mean = 0.f, inv_std = 1.f;
#pragma unroll
    for (int j = 0; j < kMaxChannels; ++j) {  // constant indices: the parameter arrays stay out of local memory
      if (j == c) {
        mean = a.mean[j];
        inv_std = a.inv_std[j];
      }
    }
    constexpr float kScale = 1.f / (static_cast<float>(S) * S);
    float* out = a.out + p * S * S;
    for (int r0 = 0; r0 < S; r0 += P::kLines) {
      const int r = r0 + static_cast<int>(ty);
      for (unsigned i = 0; i < P::RowC2R::input_ept; ++i) {
        const unsigned k = tx + i * P::kStride;
        data[i] = r < S && k < P::kHalf ? plane[r * P::kHalf + k] : complex_t{0.f, 0.f};
      }
      __syncthreads();
      typename P::RowC2R().execute(data, scratch);
      const float* re = reinterpret_cast<const float*>(data);
      if (r < S) {
        for (unsigned i = 0; i < P::RowC2R::output_ept; ++i) {
          const float v = fminf(fmaxf(re[i] * kScale, 0.f), 1.f);
          out[r * S + tx + i * P::kStride] = (v - mean) * inv_std;
        }
      }
    }
  }
}

template <int S, bool kForwardOnly>
cudaError_t launch(const Args& a, int planes, cudaStream_t stream) {
  using P = Plane<S>;
  if (planes <= 0) return planes == 0 ? cudaSuccess : cudaErrorInvalidValue;
  cudaError_t err = cudaFuncSetAttribute(plane_kernel<S, kForwardOnly>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(P::kSmemBytes));
  if (err != cudaSuccess) return err;
  plane_kernel<S, kForwardOnly><<<planes, P::ColFwd::block_dim, P::kSmemBytes, stream>>>(a);
  return cudaGetLastError();
}

template <bool kForwardOnly>
cudaError_t launch_side(int side, const Args& a, int planes, cudaStream_t stream) {
  switch (side) {
    case 224: return launch<224, kForwardOnly>(a, planes, stream);
    case 112: return launch<112, kForwardOnly>(a, planes, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace mfm_cufftdx

extern "C" {

// out = normalise(clamp(round trip of x [with the mask step])), images * channels planes of side 224 or 112.
// mean / std: `channels` floats each (host memory); mask may be null.
int cufftdx_plane_roundtrip(int side, const float* x, const float* mask, float* out, int images, int channels,
                            const float* mean, const float* std, void* stream) {
  if (channels < 1 || channels > mfm_cufftdx::kMaxChannels || images < 0) return cudaErrorInvalidValue;
  mfm_cufftdx::Args a{x, mask, out, nullptr, channels, {}, {}};
  for (int c = 0; c < channels; ++c) {
    a.mean[c] = mean[c];
    a.inv_std[c] = 1.f / std[c];
  }
  return mfm_cufftdx::launch_side<false>(side, a, images * channels, static_cast<cudaStream_t>(stream));
}

// spectrum (planes, side, side / 2 + 1) complex64 = the unnormalised rfft2 of each plane of x.
int cufftdx_plane_forward(int side, const float* x, void* spectrum, int planes, void* stream) {
  mfm_cufftdx::Args a{x, nullptr, nullptr, static_cast<float2*>(spectrum), 1, {0.f}, {1.f}};
  return mfm_cufftdx::launch_side<true>(side, a, planes, static_cast<cudaStream_t>(stream));
}

// Threads per CTA and dynamic shared memory bytes of the side's kernels (0 for an unknown side).
int cufftdx_plane_threads(int side) {
  return side == 224 ? mfm_cufftdx::Plane<224>::kThreads : side == 112 ? mfm_cufftdx::Plane<112>::kThreads : 0;
}
int cufftdx_plane_smem_bytes(int side) {
  return side == 224 ? static_cast<int>(mfm_cufftdx::Plane<224>::kSmemBytes)
                     : side == 112 ? static_cast<int>(mfm_cufftdx::Plane<112>::kSmemBytes) : 0;
}

const char* cufftdx_plane_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // extern "C"
