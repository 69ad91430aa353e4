// The kernel table of each device the build has kernels for.
#include "host.h"
#include "../cpu/kernels.h"
#ifdef RMSNORM_EXT_WITH_CUDA
#include "../cuda/launch.h"
#endif

namespace rmsnorm_ext {

const DeviceKernels& kernels_for(const Tensor& t) {
  // Designated initializers: an entry out of DeviceKernels' order does not compile.
  static const DeviceKernels cpu_kernels{
      .rms_fwd = &cpu::rms_fwd,
      .fused_add_rms_fwd = &cpu::fused_add_rms_fwd,
      .rms_bwd = &cpu::rms_bwd,
      .ln_fwd = &cpu::ln_fwd,
      .ln_bwd = &cpu::ln_bwd,
      .norm_quant = &cpu::norm_quant,
      .gated_rms_fwd = &cpu::gated_rms_fwd,
      .gated_rms_bwd = &cpu::gated_rms_bwd,
      .qk_norm_rope_fwd = &cpu::qk_norm_rope_fwd,
      .qk_norm_rope_bwd = &cpu::qk_norm_rope_bwd,
      .norm_modulate_fwd = &cpu::norm_modulate_fwd,
      .norm_modulate_bwd = &cpu::norm_modulate_bwd,
  };
#ifdef RMSNORM_EXT_WITH_CUDA
  static const DeviceKernels cuda_kernels{
      .rms_fwd = &cuda::run_rms_fwd,
      .fused_add_rms_fwd = &cuda::run_fused_add_rms_fwd,
      .rms_bwd = &cuda::run_rms_bwd,
      .ln_fwd = &cuda::run_ln_fwd,
      .ln_bwd = &cuda::run_ln_bwd,
      .norm_quant = &cuda::run_norm_quant,
      .gated_rms_fwd = &cuda::run_gated_rms_fwd,
      .gated_rms_bwd = &cuda::run_gated_rms_bwd,
      .qk_norm_rope_fwd = &cuda::run_qk_norm_rope_fwd,
      .qk_norm_rope_bwd = &cuda::run_qk_norm_rope_bwd,
      .norm_modulate_fwd = &cuda::run_norm_modulate_fwd,
      .norm_modulate_bwd = &cuda::run_norm_modulate_bwd,
  };
  if (t.is_cuda()) return cuda_kernels;
#endif
  TORCH_CHECK(t.is_cpu(), "rmsnorm_ext: no kernels for device ", t.device());
  return cpu_kernels;
}

}  // namespace rmsnorm_ext
