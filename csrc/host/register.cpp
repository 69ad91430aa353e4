// Registers the one host function of each op for every device this build has kernels for,
// and for Meta: meta and fake tensors get the same checks and output shapes (host.h,
// shapes_only), so there are no separate fake kernels to keep in step.
#include <torch/library.h>

#include "ops.h"

namespace {

void register_host(torch::Library& m) {
  using namespace rmsnorm_ext::host;
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
  m.impl("fused_add_rms_norm_fwd", &fused_add_rms_norm_fwd);
  m.impl("fused_add_rms_norm_inplace", &fused_add_rms_norm_inplace);
  m.impl("rms_norm_quant", &rms_norm_quant);
  m.impl("fused_add_rms_norm_quant", &fused_add_rms_norm_quant);
  m.impl("layer_norm_quant", &layer_norm_quant);
}

}  // namespace

TORCH_LIBRARY_IMPL(rmsnorm_ext, CPU, m) { register_host(m); }
TORCH_LIBRARY_IMPL(rmsnorm_ext, Meta, m) { register_host(m); }
#ifdef RMSNORM_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(rmsnorm_ext, CUDA, m) { register_host(m); }
#endif
