// layer_norm_fwd: the row kernels of norm_fwd_rows.cuh with LayerNorm's policy
// (layer_norm_fwd_kernels.cuh); channels-first inputs go to channels_first_kernels.cu.
#include "layer_norm_fwd_kernels.cuh"

namespace rmsnorm_ext {
namespace cuda {
namespace {

template <typename T, typename W>
cudaError_t launch(const LnFwdParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  NormFwdArgs<T, W, T> a{};
  a.x = static_cast<const T*>(p.x);
  a.w = static_cast<const W*>(p.weight);
  a.b = static_cast<const W*>(p.bias);
  a.y = static_cast<T*>(p.y);
  a.mean = static_cast<A*>(p.mean);
  a.rstd = static_cast<A*>(p.rstd);
  a.M = p.M;
  a.N = p.N;
  a.eps = static_cast<A>(p.eps);
  return launch_norm_fwd<LnFwdNorm, T, W, T, false>(a, stream);
}

}  // namespace

cudaError_t ln_fwd(const LnFwdParams& p, cudaStream_t stream) {
  if (p.inner > 1) return ln_fwd_channels_first(p, stream);  // channels_first_kernels.cu
  return with_dtype_pair(p.t, p.w, [&](auto t_tag, auto w_tag) -> cudaError_t {
    return launch<decltype(t_tag), decltype(w_tag)>(p, stream);
  });
}

RMSNORM_EXT_REGISTER_CUDA_KERNEL(LnFwd, ln_fwd);

}  // namespace cuda
}  // namespace rmsnorm_ext
