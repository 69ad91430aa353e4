// rms_norm_fwd on CUDA: checks, output allocation and dtype dispatch; the kernels are in
// rms_norm_fwd_kernels.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../common.h"
#include "ops_cuda.h"
#include "rms_norm_fwd_kernels.cuh"

namespace rmsnorm_ext {
namespace cuda {

std::tuple<Tensor, Tensor> rms_norm_fwd(const Tensor& input, at::IntArrayRef normalized_shape,
                                        const std::optional<Tensor>& weight, double eps,
                                        double weight_offset) {
  check_input(input, "input");
  const RowShape rs = check_normalized_shape(input, normalized_shape);
  check_param(weight, "weight", input, normalized_shape);
  check_eps(eps);
  check_offset(weight_offset);

  const c10::cuda::CUDAGuard guard(input.device());
  const auto sdt = stats_dtype(input.scalar_type());
  Tensor y = at::empty(input.sizes(), input.options());
  if (rs.M == 0 || rs.N == 0) {
    // Nothing to normalize: no launch. Rows of length 0 get rstd 0 (the CPU kernels agree).
    return {y, at::zeros(stats_shape(input, normalized_shape), input.options().dtype(sdt))};
  }
  Tensor rstd = at::empty(stats_shape(input, normalized_shape), input.options().dtype(sdt));
  const Tensor x = input.contiguous();
  const Tensor w = contiguous_or_empty(weight);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  RMSNORM_EXT_DISPATCH_TW(x.scalar_type(), param_dtype(x, w, Tensor()), "rms_norm_fwd", [&] {
    using A = acc_t<scalar_t>;
    RmsFwdArgs<scalar_t, param_t, scalar_t> a{};
    a.x = x.const_data_ptr<scalar_t>();
    a.r = nullptr;
    a.w = data_or_null<param_t>(w);
    a.y = y.mutable_data_ptr<scalar_t>();
    a.h = nullptr;
    a.rstd = rstd.mutable_data_ptr<A>();
    a.M = rs.M;
    a.N = rs.N;
    a.eps = static_cast<A>(eps);
    a.offset = static_cast<A>(weight_offset);
    launch_rms_fwd<scalar_t, param_t, scalar_t, false>(a, stream);
  });
  return {y, rstd};
}

}  // namespace cuda
}  // namespace rmsnorm_ext
