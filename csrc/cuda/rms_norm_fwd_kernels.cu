// rms_norm_fwd kernel instantiations: (T, W) in {f32,f32}, {f64,f64}, {bf16,bf16},
// {bf16,f32}, {f16,f16}, {f16,f32}; x 4 kernels (register ITEMS=4/8, re-read
// vectorized/scalar).
#include "rms_norm_fwd_kernels.cuh"

namespace rmsnorm_ext {
namespace cuda {

cudaError_t rms_fwd(const RmsFwdParams& p, cudaStream_t stream) {
  if (p.inner > 1) return rms_fwd_channels_first(p, stream);  // channels_first_kernels.cu
  return with_dtype_pair(p.t, p.w, [&](auto t_tag, auto w_tag) -> cudaError_t {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    return launch_rms_fwd<T, W, T, false>(p, stream);
  });
}

RMSNORM_EXT_REGISTER_CUDA_KERNEL(RmsFwd, rms_fwd);

}  // namespace cuda
}  // namespace rmsnorm_ext
