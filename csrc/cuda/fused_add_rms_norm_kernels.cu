// fused_add_rms_norm_fwd / _inplace kernel instantiations: (T, W, R) with W and R each T
// or (for bf16/fp16 T) float: 10 combinations x 3-4 kernels.
#include "rms_norm_fwd_kernels.cuh"

namespace rmsnorm_ext {
namespace cuda {

cudaError_t fused_add_rms_fwd(const RmsFwdParams& p, cudaStream_t stream) {
  return with_dtype_pair(p.t, p.w, [&](auto t_tag, auto w_tag) -> cudaError_t {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    if (p.r == p.t) return launch_rms_fwd<T, W, T, true>(p, stream);
    if constexpr (is_reduced_v<T>) {
      if (p.r == DType::f32) return launch_rms_fwd<T, W, float, true>(p, stream);
    }
    return cudaErrorInvalidValue;
  });
}

RMSNORM_EXT_REGISTER_CUDA_KERNEL(FusedAddRmsFwd, fused_add_rms_fwd);

}  // namespace cuda
}  // namespace rmsnorm_ext
