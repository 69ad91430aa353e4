// Entry points of the CUDA kernel files, on the parameter structs of ../kernel_params.h.
// Every entry launches on `stream`, never synchronizes, and returns the first launch error
// (cudaSuccess otherwise). Dtype combinations that are not supported return
// cudaErrorInvalidValue. Each file registers its entries in their tags' slots
// (RMSNORM_EXT_REGISTER_CUDA_KERNEL, register_kernel.cuh); the host reaches them only through
// those slots, so a new kernel need not be declared here (these declarations are for the
// entries one kernel file calls in another).
#pragma once

#include <cuda_runtime_api.h>

#include "../kernel_params.h"

namespace rmsnorm_ext {
namespace cuda {

cudaError_t rms_fwd(const RmsFwdParams& p, cudaStream_t stream);            // rms_norm_fwd_kernels.cu
cudaError_t fused_add_rms_fwd(const RmsFwdParams& p, cudaStream_t stream);  // fused_add_rms_norm_kernels.cu
cudaError_t rms_bwd(const RmsBwdParams& p, Workspace ws, cudaStream_t stream);  // rms_norm_bwd_kernels.cu
cudaError_t ln_fwd(const LnFwdParams& p, cudaStream_t stream);  // layer_norm_fwd_kernels.cu
cudaError_t ln_bwd(const LnBwdParams& p, Workspace ws, cudaStream_t stream);  // layer_norm_bwd_kernels.cu
cudaError_t norm_quant(const NormQuantParams& p, cudaStream_t stream);  // norm_quant_kernels.cu
cudaError_t gated_rms_fwd(const GatedRmsFwdParams& p, cudaStream_t stream);  // gated_rms_norm_kernels.cu
cudaError_t gated_rms_bwd(const GatedRmsBwdParams& p, Workspace ws, cudaStream_t stream);  // gated_rms_norm_kernels.cu
cudaError_t qk_norm_rope_fwd(const QkNormRopeFwdParams& p, cudaStream_t stream);  // qk_norm_rope_kernels.cu
cudaError_t qk_norm_rope_bwd(const QkNormRopeBwdParams& p, Workspace ws, cudaStream_t stream);  // qk_norm_rope_kernels.cu
cudaError_t norm_modulate_fwd(const NormModulateParams& p, cudaStream_t stream);  // norm_modulate_kernels.cu
cudaError_t norm_modulate_bwd(const NormModulateBwdParams& p, Workspace ws,
                              cudaStream_t stream);  // norm_modulate_kernels.cu
// The plain norms on the channels-first layout (p.inner > 1, kernel_params.h): the
// rms_norm_2d / layer_norm_2d ops; the plain entries (rms_fwd, rms_bwd, ln_fwd, ln_bwd) call them when p.inner > 1. channels_first_kernels.cu
cudaError_t rms_fwd_channels_first(const RmsFwdParams& p, cudaStream_t stream);
cudaError_t rms_bwd_channels_first(const RmsBwdParams& p, Workspace ws, cudaStream_t stream);
cudaError_t ln_fwd_channels_first(const LnFwdParams& p, cudaStream_t stream);
cudaError_t ln_bwd_channels_first(const LnBwdParams& p, Workspace ws, cudaStream_t stream);

}  // namespace cuda
}  // namespace rmsnorm_ext
