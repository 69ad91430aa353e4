// The kernel table of each device the build has kernels for.
#include "host.h"
#include "../cpu/kernels.h"
#ifdef RMSNORM_EXT_WITH_CUDA
#include "../cuda/launch.h"
#endif

namespace rmsnorm_ext {

const DeviceKernels& kernels_for(const Tensor& t) {
  static const DeviceKernels cpu_kernels{&cpu::rms_fwd,           &cpu::fused_add_rms_fwd,
                                         &cpu::rms_bwd,           &cpu::ln_fwd,
                                         &cpu::ln_bwd,            &cpu::norm_quant,
                                         &cpu::norm_modulate_fwd, &cpu::norm_modulate_bwd};
#ifdef RMSNORM_EXT_WITH_CUDA
  static const DeviceKernels cuda_kernels{&cuda::run_rms_fwd,
                                          &cuda::run_fused_add_rms_fwd,
                                          &cuda::run_rms_bwd,
                                          &cuda::run_ln_fwd,
                                          &cuda::run_ln_bwd,
                                          &cuda::run_norm_quant,
                                          &cuda::run_norm_modulate_fwd,
                                          &cuda::run_norm_modulate_bwd};
  if (t.is_cuda()) return cuda_kernels;
#endif
  TORCH_CHECK(t.is_cpu(), "rmsnorm_ext: no kernels for device ", t.device());
  return cpu_kernels;
}

}  // namespace rmsnorm_ext
