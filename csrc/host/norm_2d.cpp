// Channels-first norms (ConvNeXt, SAM, Hiera; timm's LayerNorm2d / RmsNorm2d): RMSNorm and
// LayerNorm over dim 1 of a [B, C, *spatial] tensor, with weight / bias of shape [C]. Their
// schemas, host functions for every device, and registration.
//
// The input is read in its own memory format, never permuted into a copy:
//  - contiguous [B, C, *S]: the strided kernels (kernel_params.h, `inner` = prod(S));
//  - channels_last-dense (stride 1 on C, i.e. [B, *S, C] in memory): contiguous rows of C,
//    the very kernels of rms_norm / layer_norm (inner 1);
//  - anything else is first made contiguous.
// The output has the layout that was computed in (the input's for the first two), the
// statistics are [B, *S] (float32, float64 for float64), and the backward reads grad_out in
// the input's layout (a grad_out in the other layout is copied once).

#include <ATen/ops/empty.h>

#include <numeric>

#include "host.h"
#include "register.h"
#include "norm_launch.h"

namespace rmsnorm_ext::host {
namespace {

// dims [0, 2, ..., d-1, 1]: a channels_last-dense [B, C, *S] tensor permuted by it is
// contiguous [B, *S, C].
std::vector<int64_t> channels_last_order(int64_t dim) {
  std::vector<int64_t> p{0};
  for (int64_t d = 2; d < dim; ++d) p.push_back(d);
  p.push_back(1);
  return p;
}

// How a [B, C, *S] tensor is read, and its sizes. C may be symbolic on fake tensors.
struct Layout2d {
  bool rows;  // channels_last-dense: contiguous rows of C
  c10::SymInt B, C, S;
  int64_t inner() const { return rows ? 1 : S.expect_int(); }
  c10::SymInt M() const { return B * S; }
  bool empty() const { return B == 0 || C == 0 || S == 0; }
};

Layout2d layout_of(const Tensor& input) {
  c10::SymInt S = 1;
  for (int64_t d = 2; d < input.dim(); ++d) S *= input.sym_size(d);
  // A tensor that is both (C == 1 or S == 1) is read as contiguous: then inner == 1 too.
  const bool rows =
      !input.is_contiguous() && input.permute(channels_last_order(input.dim())).is_contiguous();
  return {rows, input.sym_size(0), input.sym_size(1), S};
}

// The tensor `t` (input or grad_out, input's shape) as the kernels read it under `l`.
Tensor as_read(const Tensor& t, const Layout2d& l) {
  if (!l.rows) return t.contiguous();
  const auto order = channels_last_order(t.dim());
  return t.permute(order).contiguous().permute(order);  // no copy when already channels_last
}

// A new tensor of the input's shape in the layout `l` computes in.
Tensor new_in_layout(const Tensor& input, const Layout2d& l) {
  if (!l.rows) return new_like(input);
  const auto order = channels_last_order(input.dim());
  std::vector<c10::SymInt> sizes;
  for (int64_t d : order) sizes.push_back(input.sym_size(d));
  std::vector<int64_t> inverse(order.size());
  for (size_t i = 0; i < order.size(); ++i) inverse[order[i]] = static_cast<int64_t>(i);
  return at::empty_symint(sizes, input.options()).permute(inverse);
}

// [B, *S]
Tensor new_stats_2d(const Tensor& input) {
  std::vector<c10::SymInt> s{input.sym_size(0)};
  for (int64_t d = 2; d < input.dim(); ++d) s.push_back(input.sym_size(d));
  return at::empty_symint(s, stats_options(input));
}

void check_input_2d(const Tensor& input, const char* op) {
  check_input(input, "input");
  TORCH_CHECK_VALUE(input.dim() >= 3, "rmsnorm_ext.", op, ": input must be [N, C, *spatial] "
                    "with at least one spatial dim (the norm is over dim 1, the channels), got "
                    "shape ", input.sym_sizes(),
                    "; for a norm over the last dim use rms_norm / layer_norm");
}

// weight / bias: [C], the input's device, the input's dtype or float32 with bf16/f16 input.
void check_channel_param(const std::optional<Tensor>& p, const char* name, const Tensor& input) {
  if (!p.has_value() || !p->defined()) return;
  TORCH_CHECK_VALUE(p->dim() == 1 && p->sym_size(0) == input.sym_size(1), "rmsnorm_ext: ", name,
                    " must have shape [C] = [", input.sym_size(1), "] (the input's dim 1), got ",
                    p->sym_sizes());
  check_param_device_dtype(*p, name, input);
}

Tensor new_param_grad(const Tensor& input, at::TensorOptions opts) {
  return at::empty_symint({input.sym_size(1)}, opts);
}

}  // namespace

std::tuple<Tensor, Tensor> rms_norm_2d_fwd(const Tensor& input,
                                           const std::optional<Tensor>& weight, double eps) {
  check_input_2d(input, "rms_norm_2d");
  check_channel_param(weight, "weight", input);
  check_eps(eps);
  const Layout2d l = layout_of(input);
  Tensor y = new_in_layout(input, l);
  Tensor rstd = new_stats_2d(input);
  if (shapes_only(input)) return {y, rstd};
  if (l.empty()) {
    fill_nan(rstd);
    return {y, rstd};
  }
  launch_rms_fwd(as_read(input, l), contiguous_or_empty(weight), y, rstd, l.M().expect_int(),
                 l.C.expect_int(), l.inner(), eps, 0.0);
  return {y, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_2d_bwd(const Tensor& grad_out, const Tensor& input,
                                           const Tensor& rstd, const std::optional<Tensor>& weight,
                                           bool compute_weight_grad) {
  check_input_2d(input, "rms_norm_2d_bwd");
  check_exact_grad(grad_out, input, "rms_norm_2d_bwd");
  check_channel_param(weight, "weight", input);
  const Layout2d l = layout_of(input);
  check_stats(rstd, "rstd", input, l.M());

  const Tensor w = contiguous_or_empty(weight);
  const bool want_dw = compute_weight_grad && w.defined();
  Tensor dx = new_in_layout(input, l);
  Tensor dw = want_dw ? new_param_grad(input, w.options()) : empty_grad(input);
  if (shapes_only(input)) return {dx, dw};
  if (l.empty()) {
    if (want_dw) dw.zero_();
    return {dx, dw};
  }
  launch_rms_bwd(as_read(grad_out, l), as_read(input, l), rstd.contiguous(), w, Tensor(), dx,
                 want_dw ? &dw : nullptr, l.M().expect_int(), l.C.expect_int(), l.inner(), 0.0);
  return {dx, dw};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_2d_fwd(const Tensor& input,
                                                     const std::optional<Tensor>& weight,
                                                     const std::optional<Tensor>& bias,
                                                     double eps) {
  check_input_2d(input, "layer_norm_2d");
  check_channel_param(weight, "weight", input);
  check_channel_param(bias, "bias", input);
  check_same_param_dtype(weight, bias);
  check_eps(eps);
  const Layout2d l = layout_of(input);
  Tensor y = new_in_layout(input, l);
  Tensor mean = new_stats_2d(input);
  Tensor rstd = new_stats_2d(input);
  if (shapes_only(input)) return {y, mean, rstd};
  if (l.empty()) {
    fill_nan(mean);
    fill_nan(rstd);
    return {y, mean, rstd};
  }
  launch_ln_fwd(as_read(input, l), contiguous_or_empty(weight), contiguous_or_empty(bias), y,
                mean, rstd, l.M().expect_int(), l.C.expect_int(), l.inner(), eps);
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_2d_bwd(const Tensor& grad_out, const Tensor& input,
                                                     const Tensor& mean, const Tensor& rstd,
                                                     const std::optional<Tensor>& weight,
                                                     bool compute_weight_grad,
                                                     bool compute_bias_grad) {
  check_input_2d(input, "layer_norm_2d_bwd");
  check_exact_grad(grad_out, input, "layer_norm_2d_bwd");
  check_channel_param(weight, "weight", input);
  const Layout2d l = layout_of(input);
  check_stats(mean, "mean", input, l.M());
  check_stats(rstd, "rstd", input, l.M());

  const Tensor w = contiguous_or_empty(weight);
  const bool want_dw = compute_weight_grad && w.defined();
  const bool want_db = compute_bias_grad;
  // dbias without a weight: the statistics dtype, as layer_norm_bwd (layer_norm.cpp).
  const auto popts = w.defined() ? w.options() : stats_options(input);
  Tensor dx = new_in_layout(input, l);
  Tensor dw = want_dw ? new_param_grad(input, popts) : empty_grad(input);
  Tensor db = want_db ? new_param_grad(input, popts) : empty_grad(input);
  if (shapes_only(input)) return {dx, dw, db};
  if (l.empty()) {
    if (want_dw) dw.zero_();
    if (want_db) db.zero_();
    return {dx, dw, db};
  }
  launch_ln_bwd(as_read(grad_out, l), as_read(input, l), mean.contiguous(), rstd.contiguous(), w,
                dx, want_dw ? &dw : nullptr, want_db ? &db : nullptr, l.M().expect_int(),
                l.C.expect_int(), l.inner());
  return {dx, dw, db};
}

}  // namespace rmsnorm_ext::host

TORCH_LIBRARY_FRAGMENT(rmsnorm_ext, m) {
  // Norms over dim 1 of [B, C, *spatial] (see the top of this file). Return (y, rstd) and
  // (y, mean, rstd); the statistics have shape [B, *spatial].
  m.def("rms_norm_2d_fwd(Tensor input, Tensor? weight, float eps) -> (Tensor, Tensor)");
  m.def(
      "layer_norm_2d_fwd(Tensor input, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  // Parameter gradients are empty tensors when not computed (flag false, or no weight).
  m.def(
      "rms_norm_2d_bwd(Tensor grad_out, Tensor input, Tensor rstd, Tensor? weight, "
      "bool compute_weight_grad) -> (Tensor, Tensor)");
  m.def(
      "layer_norm_2d_bwd(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, "
      "Tensor? weight, bool compute_weight_grad, bool compute_bias_grad) "
      "-> (Tensor, Tensor, Tensor)");
}

namespace {

void register_norm_2d(torch::Library& m) {
  m.impl("rms_norm_2d_fwd", &rmsnorm_ext::host::rms_norm_2d_fwd);
  m.impl("rms_norm_2d_bwd", &rmsnorm_ext::host::rms_norm_2d_bwd);
  m.impl("layer_norm_2d_fwd", &rmsnorm_ext::host::layer_norm_2d_fwd);
  m.impl("layer_norm_2d_bwd", &rmsnorm_ext::host::layer_norm_2d_bwd);
}

}  // namespace

RMSNORM_EXT_REGISTER_HOST(register_norm_2d)
