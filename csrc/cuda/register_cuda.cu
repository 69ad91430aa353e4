// Registers the CUDA implementations for the ops defined in csrc/ops.cpp.
#include <torch/library.h>

#include "ops_cuda.h"

TORCH_LIBRARY_IMPL(rmsnorm_ext, CUDA, m) {
  m.impl("rms_norm_fwd", &rmsnorm_ext::cuda::rms_norm_fwd);
  m.impl("rms_norm_bwd", &rmsnorm_ext::cuda::rms_norm_bwd);
  m.impl("layer_norm_fwd", &rmsnorm_ext::cuda::layer_norm_fwd);
  m.impl("layer_norm_bwd", &rmsnorm_ext::cuda::layer_norm_bwd);
  m.impl("fused_add_rms_norm_fwd", &rmsnorm_ext::cuda::fused_add_rms_norm_fwd);
  m.impl("fused_add_rms_norm_inplace", &rmsnorm_ext::cuda::fused_add_rms_norm_inplace);
}
