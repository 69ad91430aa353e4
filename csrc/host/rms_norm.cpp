// Host functions of rms_norm_fwd and rms_norm_bwd, for every device.
#include "host.h"
#include "register.h"
#include "norm_launch.h"

namespace rmsnorm_ext::host {

void launch_rms_fwd(const Tensor& x, const Tensor& w, Tensor& y, Tensor& rstd, int64_t M,
                    int64_t N, int64_t inner, double eps, double weight_offset) {
  RmsFwdParams p{};
  p.t = to_dtype(x.scalar_type());
  p.w = w.defined() ? to_dtype(w.scalar_type()) : p.t;
  p.r = p.t;
  p.x = x.const_data_ptr();
  p.weight = ptr_or_null(w);
  p.y = y.data_ptr();
  p.rstd = rstd.data_ptr();
  p.M = M;
  p.N = N;
  p.inner = inner;
  p.eps = eps;
  p.offset = weight_offset;
  WorkspaceHolder ws(x);
  run_kernel<RmsFwd>(p, x, ws);
}

void launch_rms_bwd(const Tensor& dy, const Tensor& x, const Tensor& rstd, const Tensor& w,
                    const Tensor& gres, Tensor& dx, Tensor* dw, int64_t M, int64_t N,
                    int64_t inner, double weight_offset) {
  RmsBwdParams p{};
  p.x = to_dtype(x.scalar_type());
  p.g = to_dtype(dy.scalar_type());
  p.w = w.defined() ? to_dtype(w.scalar_type()) : p.g;
  p.x_in = x.const_data_ptr();
  p.dy = dy.const_data_ptr();
  p.rstd = rstd.const_data_ptr();
  p.weight = ptr_or_null(w);
  p.gres = ptr_or_null(gres);
  p.dx = dx.data_ptr();
  p.dw = dw ? dw->data_ptr() : nullptr;
  p.M = M;
  p.N = N;
  p.inner = inner;
  p.offset = weight_offset;
  WorkspaceHolder ws(x);
  run_kernel<RmsBwd>(p, x, ws);
}

std::tuple<Tensor, Tensor> rms_norm_fwd(const Tensor& input, at::IntArrayRef normalized_shape,
                                        const std::optional<Tensor>& weight, double eps,
                                        double weight_offset) {
  const RowShape rs = check_rms_norm(input, normalized_shape, weight, eps, weight_offset);

  Tensor y = new_like(input);
  Tensor rstd = new_row_stats(input, normalized_shape);
  if (shapes_only(input)) return {y, rstd};
  if (rs.empty()) {
    fill_nan(rstd);
    return {y, rstd};
  }
  launch_rms_fwd(input.contiguous(), contiguous_or_empty(weight), y, rstd, rs.rows(), rs.N, 1,
                 eps, weight_offset);
  return {y, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& grad_out, const Tensor& input,
                                        const Tensor& rstd, const std::optional<Tensor>& weight,
                                        at::IntArrayRef normalized_shape, double weight_offset,
                                        const std::optional<Tensor>& grad_residual,
                                        bool compute_weight_grad) {
  check_input(input, "input");
  const RowShape rs = check_normalized_shape(input, normalized_shape);
  check_grad(grad_out, input);
  // The weight goes with the normalized output, whose dtype is grad_out's (it differs from
  // the input's for the fp32 residual stream of fused_add_rms_norm).
  check_param(weight, "weight", grad_out, normalized_shape);
  check_stats(rstd, "rstd", input, rs.M);
  check_offset(weight_offset);
  const Tensor gres = contiguous_or_empty(grad_residual);
  if (gres.defined()) check_grad_residual(gres, input);

  const Tensor w = contiguous_or_empty(weight);
  const bool want_dw = compute_weight_grad && w.defined();
  Tensor dx = new_like(input);
  Tensor dw = want_dw ? at::empty(normalized_shape, w.options()) : empty_grad(input);
  if (shapes_only(input)) return {dx, dw};
  if (rs.empty()) {
    if (want_dw) dw.zero_();
    return {dx, dw};
  }
  launch_rms_bwd(grad_out.contiguous(), input.contiguous(), rstd.contiguous(), w, gres, dx,
                 want_dw ? &dw : nullptr, rs.rows(), rs.N, 1, weight_offset);
  return {dx, dw};
}

}  // namespace rmsnorm_ext::host

TORCH_LIBRARY_FRAGMENT(rmsnorm_ext, m) {
  // RMSNorm: y = x * rstd * (weight_offset + weight), rstd = 1 / sqrt(mean(x^2) + eps).
  // Returns (y, rstd); rstd has the input's leading (non-normalized) shape.
  m.def(
      "rms_norm_fwd(Tensor input, int[] normalized_shape, Tensor? weight, float eps, "
      "float weight_offset) -> (Tensor, Tensor)");
  // Returns (grad_input, grad_weight). grad_residual, when given, is added to
  // grad_input (the gradient that reaches a fused residual sum from its own output).
  // grad_weight is an empty tensor when compute_weight_grad is false or there is no weight.
  m.def(
      "rms_norm_bwd(Tensor grad_out, Tensor input, Tensor rstd, Tensor? weight, "
      "int[] normalized_shape, float weight_offset, Tensor? grad_residual, "
      "bool compute_weight_grad) -> (Tensor, Tensor)");
}

namespace {

void register_rms_norm(torch::Library& m) {
  m.impl("rms_norm_fwd", &rmsnorm_ext::host::rms_norm_fwd);
  m.impl("rms_norm_bwd", &rmsnorm_ext::host::rms_norm_bwd);
}

}  // namespace

RMSNORM_EXT_REGISTER_HOST(register_rms_norm)
