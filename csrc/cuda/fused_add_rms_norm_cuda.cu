// fused_add_rms_norm_fwd / fused_add_rms_norm_inplace on CUDA: h = input + residual
// (rounded to the residual's dtype), y = rms_norm(h). Kernels in rms_norm_fwd_kernels.cuh.
#include <ATen/MemoryOverlap.h>
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
namespace {

// residual: same shape and device as the input; dtype the input's, or float32 with a
// bfloat16/float16 input (an fp32 residual stream).
void check_residual(const Tensor& input, const Tensor& residual) {
  TORCH_CHECK_VALUE(residual.sizes().equals(input.sizes()), "rmsnorm_ext: residual shape ",
                    residual.sizes(), " does not match the input shape ", input.sizes());
  check_same_device(residual, "residual", input, "the input");
  const auto rt = residual.scalar_type();
  const auto it = input.scalar_type();
  TORCH_CHECK_TYPE(rt == it || (rt == at::kFloat && is_reduced_float(it)),
                   "rmsnorm_ext: residual dtype ", rt, " is not supported with input dtype ", it,
                   " (use the input's dtype, or float32 with a bfloat16/float16 input)");
}

void check_all(const Tensor& input, const Tensor& residual, at::IntArrayRef ns,
               const std::optional<Tensor>& weight, double eps, double offset) {
  check_input(input, "input");
  check_residual(input, residual);
  check_normalized_shape(input, ns);
  check_param(weight, "weight", input, ns);
  check_eps(eps);
  check_offset(offset);
}

// Launches on contiguous tensors; y may alias x and h may alias r (in-place form).
template <typename T, typename W>
void run(const Tensor& x, const Tensor& r, const Tensor& w, const Tensor& y, const Tensor& h,
         const Tensor& rstd, RowShape rs, double eps, double offset) {
  using A = acc_t<T>;
  auto go = [&](auto r_tag) {
    using R = decltype(r_tag);
    RmsFwdArgs<T, W, R> a{};
    a.x = static_cast<const T*>(x.const_data_ptr());
    a.r = static_cast<const R*>(r.const_data_ptr());
    a.w = w.defined() ? static_cast<const W*>(w.const_data_ptr()) : nullptr;
    a.y = static_cast<T*>(y.data_ptr());
    a.h = static_cast<R*>(h.data_ptr());
    a.rstd = rstd.mutable_data_ptr<A>();
    a.M = rs.M;
    a.N = rs.N;
    a.eps = static_cast<A>(eps);
    a.offset = static_cast<A>(offset);
    launch_rms_fwd<T, W, R, true>(a, c10::cuda::getCurrentCUDAStream());
  };
  if (r.scalar_type() == scalar_type_of<T>) {
    go(T{});
  } else {
    if constexpr (is_reduced_v<T>) {
      go(float{});  // fp32 residual stream (check_residual allows nothing else)
    } else {
      TORCH_CHECK_TYPE(false, "rmsnorm_ext: unsupported residual dtype ", r.scalar_type());
    }
  }
}

void dispatch(const Tensor& x, const Tensor& r, const Tensor& w, const Tensor& y,
              const Tensor& h, const Tensor& rstd, RowShape rs, double eps, double offset) {
  RMSNORM_EXT_DISPATCH_TW(x.scalar_type(), param_dtype(x, w, Tensor()), "fused_add_rms_norm",
                          [&] { run<scalar_t, param_t>(x, r, w, y, h, rstd, rs, eps, offset); });
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> fused_add_rms_norm_fwd(const Tensor& input,
                                                          const Tensor& residual,
                                                          at::IntArrayRef normalized_shape,
                                                          const std::optional<Tensor>& weight,
                                                          double eps, double weight_offset) {
  check_all(input, residual, normalized_shape, weight, eps, weight_offset);
  const RowShape rs = check_normalized_shape(input, normalized_shape);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto sopt = input.options().dtype(stats_dtype(input.scalar_type()));
  const auto sshape = stats_shape(input, normalized_shape);
  Tensor y = at::empty(input.sizes(), input.options());
  Tensor h = at::empty(residual.sizes(), residual.options());
  if (rs.M == 0 || rs.N == 0) return {y, h, at::zeros(sshape, sopt)};
  Tensor rstd = at::empty(sshape, sopt);
  dispatch(input.contiguous(), residual.contiguous(), contiguous_or_empty(weight), y, h, rstd,
           rs, eps, weight_offset);
  return {y, h, rstd};
}

void fused_add_rms_norm_inplace(const Tensor& input, const Tensor& residual,
                                at::IntArrayRef normalized_shape,
                                const std::optional<Tensor>& weight, double eps,
                                double weight_offset) {
  check_all(input, residual, normalized_shape, weight, eps, weight_offset);
  const RowShape rs = check_normalized_shape(input, normalized_shape);
  // Each output element is written once, from the same element of both inputs; that is
  // only well defined when neither tensor overlaps itself or the other.
  at::assert_no_internal_overlap(input);
  at::assert_no_internal_overlap(residual);
  at::assert_no_overlap(input, residual);
  if (rs.M == 0 || rs.N == 0) return;
  const c10::cuda::CUDAGuard guard(input.device());
  // Non-contiguous operands: compute into contiguous copies and copy the results back.
  const Tensor x = input.contiguous();
  const Tensor r = residual.contiguous();
  Tensor rstd = at::empty({rs.M}, input.options().dtype(stats_dtype(input.scalar_type())));
  dispatch(x, r, contiguous_or_empty(weight), x, r, rstd, rs, eps, weight_offset);
  if (!x.is_same(input)) const_cast<Tensor&>(input).copy_(x);
  if (!r.is_same(residual)) const_cast<Tensor&>(residual).copy_(r);
}

}  // namespace cuda
}  // namespace rmsnorm_ext
