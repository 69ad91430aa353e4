// The CUDA kernel entries one kernel file calls in another. Every entry takes a parameter
// struct of ../kernel_params.h, launches on `stream`, never synchronizes, and returns the
// first launch error (cudaSuccess otherwise); dtype combinations that are not supported
// return cudaErrorInvalidValue. Each file registers its own entries in their tags' slots
// (RMSNORM_EXT_REGISTER_CUDA_KERNEL, register_kernel.cuh), and the host reaches them only
// through those slots: a new kernel is not declared here.
#pragma once

#include <cuda_runtime_api.h>

#include "../kernel_params.h"

namespace rmsnorm_ext {
namespace cuda {

// The plain norms on the channels-first layout (p.inner > 1, kernel_params.h; the
// rms_norm_2d / layer_norm_2d ops): the plain entries (rms_fwd, rms_bwd, ln_fwd, ln_bwd)
// call them when p.inner > 1. channels_first_kernels.cu
cudaError_t rms_fwd_channels_first(const RmsFwdParams& p, cudaStream_t stream);
cudaError_t rms_bwd_channels_first(const RmsBwdParams& p, Workspace ws, cudaStream_t stream);
cudaError_t ln_fwd_channels_first(const LnFwdParams& p, cudaStream_t stream);
cudaError_t ln_bwd_channels_first(const LnBwdParams& p, Workspace ws, cudaStream_t stream);

}  // namespace cuda
}  // namespace rmsnorm_ext
