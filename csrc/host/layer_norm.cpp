// Host functions of layer_norm_fwd and layer_norm_bwd, for every device.
#include "host.h"
#include "register.h"
#include "norm_launch.h"

namespace rmsnorm_ext::host {

void launch_ln_fwd(const Tensor& x, const Tensor& w, const Tensor& b, Tensor& y, Tensor& mean,
                   Tensor& rstd, int64_t M, int64_t N, int64_t inner, double eps) {
  LnFwdParams p{};
  p.t = to_dtype(x.scalar_type());
  p.w = to_dtype(param_dtype(x, w, b));
  p.x = x.const_data_ptr();
  p.weight = ptr_or_null(w);
  p.bias = ptr_or_null(b);
  p.y = y.data_ptr();
  p.mean = mean.data_ptr();
  p.rstd = rstd.data_ptr();
  p.M = M;
  p.N = N;
  p.inner = inner;
  p.eps = eps;
  WorkspaceHolder ws(x);
  run_kernel<LnFwd>(p, x, ws);
}

// dw / db (may be null: not wanted) have the dtype the kernel writes them in: the weight's,
// or without a weight the statistics dtype (see layer_norm_bwd).
void launch_ln_bwd(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& rstd,
                   const Tensor& w, Tensor& dx, Tensor* dw, Tensor* db, int64_t M, int64_t N,
                   int64_t inner) {
  LnBwdParams p{};
  p.t = to_dtype(x.scalar_type());
  p.w = to_dtype(w.defined() ? w.scalar_type() : stats_dtype(x.scalar_type()));
  p.x = x.const_data_ptr();
  p.dy = dy.const_data_ptr();
  p.mean = mean.const_data_ptr();
  p.rstd = rstd.const_data_ptr();
  p.weight = ptr_or_null(w);
  p.dx = dx.data_ptr();
  p.dw = dw ? dw->data_ptr() : nullptr;
  p.db = db ? db->data_ptr() : nullptr;
  p.M = M;
  p.N = N;
  p.inner = inner;
  WorkspaceHolder ws(x);
  run_kernel<LnBwd>(p, x, ws);
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& input,
                                                  at::IntArrayRef normalized_shape,
                                                  const std::optional<Tensor>& weight,
                                                  const std::optional<Tensor>& bias,
                                                  double eps) {
  const RowShape rs = check_layer_norm(input, normalized_shape, weight, bias, eps);

  Tensor y = new_like(input);
  Tensor mean = new_row_stats(input, normalized_shape);
  Tensor rstd = new_row_stats(input, normalized_shape);
  if (shapes_only(input)) return {y, mean, rstd};
  if (rs.empty()) {
    fill_nan(mean);
    fill_nan(rstd);
    return {y, mean, rstd};
  }
  launch_ln_fwd(input.contiguous(), contiguous_or_empty(weight), contiguous_or_empty(bias), y,
                mean, rstd, rs.rows(), rs.N, 1, eps);
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& grad_out, const Tensor& input,
                                                  const Tensor& mean, const Tensor& rstd,
                                                  const std::optional<Tensor>& weight,
                                                  at::IntArrayRef normalized_shape,
                                                  bool compute_weight_grad,
                                                  bool compute_bias_grad) {
  check_input(input, "input");
  const RowShape rs = check_normalized_shape(input, normalized_shape);
  check_exact_grad(grad_out, input, "layer_norm_bwd");
  check_param(weight, "weight", input, normalized_shape);
  check_stats(mean, "mean", input, rs.M);
  check_stats(rstd, "rstd", input, rs.M);

  const Tensor w = contiguous_or_empty(weight);
  const bool want_dw = compute_weight_grad && w.defined();
  const bool want_db = compute_bias_grad;
  // dbias takes the weight's dtype; without a weight, the statistics dtype (float32, or
  // float64): the bias may be float32 beside a bfloat16 input, and a sum rounded through
  // bfloat16 would lose its bits. Autograd casts it to the bias's own dtype.
  const auto popts = w.defined() ? w.options() : stats_options(input);
  Tensor dx = new_like(input);
  Tensor dw = want_dw ? at::empty(normalized_shape, popts) : empty_grad(input);
  Tensor db = want_db ? at::empty(normalized_shape, popts) : empty_grad(input);
  if (shapes_only(input)) return {dx, dw, db};
  if (rs.empty()) {
    if (want_dw) dw.zero_();
    if (want_db) db.zero_();
    return {dx, dw, db};
  }
  launch_ln_bwd(grad_out.contiguous(), input.contiguous(), mean.contiguous(), rstd.contiguous(),
                w, dx, want_dw ? &dw : nullptr, want_db ? &db : nullptr, rs.rows(), rs.N, 1);
  return {dx, dw, db};
}

}  // namespace rmsnorm_ext::host

TORCH_LIBRARY_FRAGMENT(rmsnorm_ext, m) {
  // LayerNorm: y = (x - mean) * rstd * weight + bias. Returns (y, mean, rstd).
  m.def(
      "layer_norm_fwd(Tensor input, int[] normalized_shape, Tensor? weight, Tensor? bias, "
      "float eps) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_input, grad_weight, grad_bias); the parameter gradients are empty
  // tensors when not requested.
  m.def(
      "layer_norm_bwd(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, "
      "int[] normalized_shape, bool compute_weight_grad, bool compute_bias_grad) "
      "-> (Tensor, Tensor, Tensor)");
}

namespace {

void register_layer_norm(torch::Library& m) {
  m.impl("layer_norm_fwd", &rmsnorm_ext::host::layer_norm_fwd);
  m.impl("layer_norm_bwd", &rmsnorm_ext::host::layer_norm_bwd);
}

}  // namespace

RMSNORM_EXT_REGISTER_HOST(register_layer_norm)
