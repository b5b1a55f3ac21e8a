// Launchers of the CUDA kernels (csrc/*.cu): plain C++ signatures so that the .cu files need no torch
// headers beyond c10's Half / BFloat16. csrc/ops.cpp checks the tensors and calls these.
#pragma once

#include <cuda_runtime_api.h>

#include "planes.cuh"

namespace mfm {

// out = corrupt(x) for N * C planes of side S (224 or 112); every pointer on the current device.
cudaError_t launch_corrupt(int side, const CorruptArgs& args, int planes, cudaStream_t stream);

// loss partials and (when args.grad) the gradient. workspace: N + N * C floats/doubles (see the .cu).
// loss_out: one float. reduction: Reduction; removed-count denominators are computed on the device.
cudaError_t launch_masked_freq_loss(int side, const LossArgs& args, int images, int reduction, float loss_weight,
                                   double* workspace, float* loss_out, cudaStream_t stream);

}  // namespace mfm
