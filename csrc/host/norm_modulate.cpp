// Fused adaLN modulation (DiT, SD3, Flux, Wan): y = norm(x) * (1 + scale) + shift, with
// norm RMSNorm (optional weight) or LayerNorm (optional weight, bias) over the last dim D of
// an input [B, ..., D], and scale / shift one vector per sample ([B, D], [B, 1, ..., D]) or
// one for all rows ([1, D], [D]). Schemas, host functions (for every device, and Meta) and
// their registration: one kernel entry per direction (norm_modulate_fwd / _bwd on
// NormModulateParams / NormModulateBwdParams), the norm selected by the operands.

#include "host.h"
#include "register.h"

namespace rmsnorm_ext::host {
namespace {

// The argument checks (the one set of rules for every device, meta included).

// One normalized dim, and a leading batch dim in front of it.
inline void check_modulate_shape(const Tensor& input, at::IntArrayRef normalized_shape,
                                 const char* op) {
  TORCH_CHECK_VALUE(normalized_shape.size() == 1, "rmsnorm_ext: ", op,
                    ": normalized_shape must have exactly one dimension (the last dim D), got ",
                    normalized_shape);
  TORCH_CHECK_VALUE(input.dim() >= 2, "rmsnorm_ext: ", op,
                    ": input must have a batch dimension and the normalized one, [B, ..., D], "
                    "got shape ", input.sym_sizes());
}

// scale / shift: D last, 1 in every middle dim, B (= input.shape[0]) or 1 first: [B, D],
// [B, 1, D], [1, D], [D], ... (at most the input's number of dims); on the input's device;
// dtype the input's, or float32 with a bfloat16/float16 input. Returns whether it holds one
// vector per sample (first dim B, B > 1) rather than one for all rows.
inline bool check_modulation(const Tensor& s, const char* name, const Tensor& input, int64_t D) {
  const auto ss = s.sym_sizes();
  const auto is = input.sym_sizes();
  const int64_t sd = s.dim();
  bool ok = sd >= 1 && sd <= input.dim() && ss[sd - 1] == D;
  bool per_sample = false;
  if (ok && sd >= 2) {
    for (int64_t k = 1; ok && k + 1 < sd; ++k) ok = ss[k] == 1;
    per_sample = ok && ss[0] != 1;
    ok = ok && (ss[0] == 1 || ss[0] == is[0]);
  }
  TORCH_CHECK_VALUE(ok, "rmsnorm_ext: ", name, " of shape ", ss,
                    " does not fit the input of shape ", is, ": expected [B, D], [B, 1, ..., 1, D], "
                    "[1, D] or [D] with B = ", is[0], " (the input's first dim) and D = ", D,
                    " (normalized_shape), at most ", input.dim(), " dims");
  TORCH_CHECK(s.device() == input.device(), "rmsnorm_ext: ", name, " is on ", s.device(),
              " but the input is on ", input.device(), "; move them to the same device");
  const auto st = s.scalar_type();
  const auto it = input.scalar_type();
  TORCH_CHECK_TYPE(same_or_fp32_beside_reduced(st, it), "rmsnorm_ext: ", name,
                   " dtype ", py_dtype(st), " is not supported with input dtype ", py_dtype(it),
                   " (use the input's dtype, or float32 with a bfloat16/float16 input)");
  return per_sample;
}

// scale and the optional shift together: one dtype, and both per sample or both shared.
// Returns whether they are per sample.
inline bool check_scale_shift(const Tensor& scale, const std::optional<Tensor>& shift,
                              const Tensor& input, int64_t D) {
  const bool per_sample = check_modulation(scale, "scale", input, D);
  if (!shift.has_value() || !shift->defined()) return per_sample;
  const bool shift_per_sample = check_modulation(*shift, "shift", input, D);
  TORCH_CHECK_VALUE(per_sample == shift_per_sample, "rmsnorm_ext: scale of shape ",
                    scale.sym_sizes(), " and shift of shape ", shift->sym_sizes(),
                    " must both hold one vector per sample (first dim B) or both one vector for "
                    "all rows (first dim 1, or 1-D)");
  TORCH_CHECK_TYPE(scale.scalar_type() == shift->scalar_type(), "rmsnorm_ext: scale dtype ",
                   py_dtype(scale.scalar_type()), " and shift dtype ",
                   py_dtype(shift->scalar_type()), " must match");
  return per_sample;
}

// The row view of a modulated input, and whether scale / shift hold one vector per sample.
struct ModulateShape {
  RowShape rows;
  bool per_sample;
};

// All the forward arguments of rms_norm_modulate_fwd / layer_norm_modulate_fwd (bias: layer
// only).
inline ModulateShape check_norm_modulate(const Tensor& input, at::IntArrayRef ns,
                                         const Tensor& scale, const std::optional<Tensor>& shift,
                                         const std::optional<Tensor>& weight,
                                         const std::optional<Tensor>& bias, double eps,
                                         const char* op) {
  check_input(input, "input");
  const RowShape rs = check_normalized_shape(input, ns);
  check_modulate_shape(input, ns, op);
  check_param(weight, "weight", input, ns);
  check_param(bias, "bias", input, ns);
  check_same_param_dtype(weight, bias);
  const bool per_sample = check_scale_shift(scale, shift, input, rs.N);
  check_eps(eps);
  return {rs, per_sample};
}


bool has(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// Rows per scale row for a non-empty input: S = M / B per sample, all M rows otherwise.
int64_t rows_per_scale(const Tensor& input, int64_t M, bool per_sample) {
  return per_sample ? M / input.size(0) : M;
}

// The forward of either norm after its checks: (y, mean, rstd); mean only for LayerNorm.
std::tuple<Tensor, Tensor, Tensor> run_fwd(NormKind kind, const ModulateShape& ms,
                                           const Tensor& input, at::IntArrayRef normalized_shape,
                                           const Tensor& scale, const std::optional<Tensor>& shift,
                                           const std::optional<Tensor>& weight,
                                           const std::optional<Tensor>& bias, double eps) {
  const RowShape& rs = ms.rows;
  const bool layer = kind == NormKind::layer;
  Tensor y = new_like(input);
  Tensor mean = layer ? new_row_stats(input, normalized_shape) : Tensor();
  Tensor rstd = new_row_stats(input, normalized_shape);
  if (shapes_only(input)) return {y, mean, rstd};
  if (rs.empty()) {
    if (layer) fill_nan(mean);
    fill_nan(rstd);
    return {y, mean, rstd};
  }
  const Tensor x = input.contiguous();
  const Tensor w = contiguous_or_empty(weight);
  const Tensor b = contiguous_or_empty(bias);
  const Tensor s = scale.contiguous();
  const Tensor sh = contiguous_or_empty(shift);

  NormModulateParams p{};
  p.kind = kind;
  p.t = to_dtype(x.scalar_type());
  p.w = to_dtype(param_dtype(x, w, b));
  p.s = to_dtype(s.scalar_type());
  p.x = x.const_data_ptr();
  p.weight = ptr_or_null(w);
  p.bias = ptr_or_null(b);
  p.scale = s.const_data_ptr();
  p.shift = ptr_or_null(sh);
  p.y = y.data_ptr();
  p.mean = mut_ptr_or_null(mean);
  p.rstd = rstd.data_ptr();
  p.M = rs.rows();
  p.N = rs.N;
  p.S = rows_per_scale(x, p.M, ms.per_sample);
  p.eps = eps;
  WorkspaceHolder ws(x);
  run_kernel<NormModulateFwd>(p, x, ws);
  return {y, mean, rstd};
}

}  // namespace

std::tuple<Tensor, Tensor> rms_norm_modulate_fwd(const Tensor& input,
                                                 at::IntArrayRef normalized_shape,
                                                 const Tensor& scale,
                                                 const std::optional<Tensor>& shift,
                                                 const std::optional<Tensor>& weight, double eps) {
  const ModulateShape ms = check_norm_modulate(input, normalized_shape, scale, shift, weight,
                                               std::nullopt, eps, "rms_norm_modulate_fwd");
  auto [y, mean, rstd] = run_fwd(NormKind::rms, ms, input, normalized_shape, scale, shift, weight,
                                 std::nullopt, eps);
  return {y, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_modulate_fwd(
    const Tensor& input, at::IntArrayRef normalized_shape, const Tensor& scale,
    const std::optional<Tensor>& shift, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, double eps) {
  const ModulateShape ms = check_norm_modulate(input, normalized_shape, scale, shift, weight, bias,
                                               eps, "layer_norm_modulate_fwd");
  return run_fwd(NormKind::layer, ms, input, normalized_shape, scale, shift, weight, bias, eps);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> norm_modulate_bwd(
    const Tensor& grad_out, const Tensor& input, const std::optional<Tensor>& mean,
    const Tensor& rstd, const Tensor& scale, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, at::IntArrayRef normalized_shape,
    bool compute_scale_grad, bool compute_shift_grad, bool compute_weight_grad,
    bool compute_bias_grad) {
  constexpr const char* op = "norm_modulate_bwd";
  check_input(input, "input");
  const RowShape rs = check_normalized_shape(input, normalized_shape);
  check_modulate_shape(input, normalized_shape, op);
  check_exact_grad(grad_out, input, "norm_modulate_bwd");
  const bool layer = has(mean);
  TORCH_CHECK_VALUE(layer || !has(bias), "rmsnorm_ext: ", op,
                    ": a bias needs the LayerNorm statistics (mean); RMSNorm has no bias");
  check_param(weight, "weight", input, normalized_shape);
  check_param(bias, "bias", input, normalized_shape);
  check_same_param_dtype(weight, bias);
  if (layer) check_stats(*mean, "mean", input, rs.M);
  check_stats(rstd, "rstd", input, rs.M);
  const bool per_sample = check_modulation(scale, "scale", input, rs.N);

  const Tensor w = contiguous_or_empty(weight);
  const Tensor b = contiguous_or_empty(bias);
  const bool want_ds = compute_scale_grad;
  const bool want_dsh = compute_shift_grad;
  const bool want_dw = compute_weight_grad && w.defined();
  const bool want_db = compute_bias_grad && b.defined();
  Tensor dx = new_like(input);
  Tensor ds = want_ds ? new_like(scale) : empty_grad(input);
  Tensor dsh = want_dsh ? new_like(scale) : empty_grad(input);
  Tensor dw = want_dw ? at::empty(normalized_shape, w.options()) : empty_grad(input);
  Tensor db = want_db ? at::empty(normalized_shape, b.options()) : empty_grad(input);
  if (shapes_only(input)) return {dx, ds, dsh, dw, db};
  if (rs.empty()) {
    for (Tensor* g : {&ds, &dsh, &dw, &db}) {
      if (g->numel() > 0) g->zero_();
    }
    return {dx, ds, dsh, dw, db};
  }
  const Tensor x = input.contiguous();
  const Tensor dy = grad_out.contiguous();
  const Tensor mean_c = layer ? mean->contiguous() : Tensor();
  const Tensor rstd_c = rstd.contiguous();
  const Tensor s = scale.contiguous();

  NormModulateBwdParams p{};
  p.kind = layer ? NormKind::layer : NormKind::rms;
  p.t = to_dtype(x.scalar_type());
  p.w = to_dtype(param_dtype(x, w, b));
  p.s = to_dtype(s.scalar_type());
  p.x = x.const_data_ptr();
  p.dy = dy.const_data_ptr();
  p.mean = ptr_or_null(mean_c);
  p.rstd = rstd_c.const_data_ptr();
  p.weight = ptr_or_null(w);
  p.bias = ptr_or_null(b);
  p.scale = s.const_data_ptr();
  p.dx = dx.data_ptr();
  p.dscale = want_ds ? ds.data_ptr() : nullptr;
  p.dshift = want_dsh ? dsh.data_ptr() : nullptr;
  p.dweight = want_dw ? dw.data_ptr() : nullptr;
  p.dbias = want_db ? db.data_ptr() : nullptr;
  p.M = rs.rows();
  p.N = rs.N;
  p.S = rows_per_scale(x, p.M, per_sample);
  WorkspaceHolder ws(x);
  run_kernel<NormModulateBwd>(p, x, ws);
  return {dx, ds, dsh, dw, db};
}

}  // namespace rmsnorm_ext::host

// ---------------------------------------------------------------------------------------
// Schemas and registration.

TORCH_LIBRARY_FRAGMENT(rmsnorm_ext, m) {
  // adaLN modulation: y = rms_norm(input) * (1 + scale) + shift, rms_norm with the optional
  // weight. normalized_shape: [D], the input's last dim; input [B, ..., D]; scale (and shift)
  // [B, D] or [B, 1, ..., 1, D] (one vector per sample, broadcast over the middle dims) or
  // [1, D] / [D] (one vector for all rows), the input's dtype or float32 with a
  // bfloat16/float16 input. Returns (y, rstd); rstd has the input's leading shape.
  m.def(
      "rms_norm_modulate_fwd(Tensor input, int[] normalized_shape, Tensor scale, Tensor? shift, "
      "Tensor? weight, float eps) -> (Tensor, Tensor)");
  // The same with LayerNorm (optional weight and bias). Returns (y, mean, rstd).
  m.def(
      "layer_norm_modulate_fwd(Tensor input, int[] normalized_shape, Tensor scale, "
      "Tensor? shift, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  // Backward of both: mean None means RMSNorm (no bias), given means LayerNorm. Returns
  // (grad_input, grad_scale, grad_shift, grad_weight, grad_bias); grad_scale and grad_shift
  // have scale's shape and dtype (compute_shift_grad: shift was given), grad_weight and
  // grad_bias their parameter's dtype. A gradient not computed (its flag false or its
  // parameter absent) is an empty tensor.
  m.def(
      "norm_modulate_bwd(Tensor grad_out, Tensor input, Tensor? mean, Tensor rstd, "
      "Tensor scale, Tensor? weight, Tensor? bias, int[] normalized_shape, "
      "bool compute_scale_grad, bool compute_shift_grad, bool compute_weight_grad, "
      "bool compute_bias_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace {

void register_modulate(torch::Library& m) {
  using namespace rmsnorm_ext::host;
  m.impl("rms_norm_modulate_fwd", &rms_norm_modulate_fwd);
  m.impl("layer_norm_modulate_fwd", &layer_norm_modulate_fwd);
  m.impl("norm_modulate_bwd", &norm_modulate_bwd);
}

}  // namespace

RMSNORM_EXT_REGISTER_HOST(register_modulate)
