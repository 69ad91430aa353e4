// Host functions of the norm + quantize ops (rms_norm_quant, fused_add_rms_norm_quant,
// layer_norm_quant), for every device: one kernel entry (norm_quant) on NormQuantParams,
// the norm and its fusions selected by the operands.
#include "host.h"
#include "ops.h"

namespace rmsnorm_ext::host {
namespace {

QuantDType to_qdtype(at::ScalarType q) {
  switch (q) {
    case at::ScalarType::Float8_e4m3fn:
      return QuantDType::f8e4m3;
    case at::ScalarType::Float8_e5m2:
      return QuantDType::f8e5m2;
    default:
      return QuantDType::i8;  // check_quant_args admitted only these three
  }
}

bool has(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// Everything after the norm-specific checks: outputs, empty sizes, parameters, launch.
// residual/h: the fused form only (undefined otherwise).
std::tuple<Tensor, Tensor> run_quant(NormKind kind, const Tensor& input, const Tensor& residual,
                                     const Tensor& h, RowShape rs,
                                     at::IntArrayRef normalized_shape,
                                     const std::optional<Tensor>& weight,
                                     const std::optional<Tensor>& bias, double eps,
                                     double offset, const std::optional<Tensor>& scale,
                                     at::ScalarType quant_dtype, std::optional<int64_t> group_size,
                                     const std::optional<Tensor>& scale_ub, const char* op) {
  const int64_t g = check_quant_args(input, rs.N, scale, quant_dtype, group_size, scale_ub, op);
  const bool is_static = has(scale);
  const QuantDType q = to_qdtype(quant_dtype);
  Tensor out = new_like(input, input.options().dtype(quant_dtype));
  // Static: the scale itself (a copy: a functional op returns no alias of an input).
  // Dynamic: leading dims + (groups,), one group per token without group_size.
  Tensor scales;
  if (is_static) {
    scales = scale->clone(at::MemoryFormat::Contiguous);
  } else {
    auto shape = stats_shape(input, normalized_shape);
    shape.push_back(group_size.has_value() ? rs.N / g : 1);
    scales = at::empty_symint(shape, input.options().dtype(at::kFloat));
  }
  if (shapes_only(input)) return {out, scales};
  if (rs.empty()) {
    if (rs.N == 0 && !is_static) scales.fill_(quant_min_scale(q));  // absmax of no elements: 0
    return {out, scales};
  }

  const Tensor x = input.contiguous();
  const Tensor r = residual.defined() ? residual.contiguous() : Tensor();
  const Tensor w = contiguous_or_empty(weight);
  const Tensor b = contiguous_or_empty(bias);
  NormQuantParams p{};
  p.kind = kind;
  p.q = q;
  p.t = to_dtype(x.scalar_type());
  p.w = to_dtype(param_dtype(x, w, b));
  p.r = r.defined() ? to_dtype(r.scalar_type()) : p.t;
  p.x = x.const_data_ptr();
  p.r_in = ptr_or_null(r);
  p.weight = ptr_or_null(w);
  p.bias = ptr_or_null(b);
  p.h = mut_ptr_or_null(h);
  p.out = out.data_ptr();
  p.scales = is_static ? nullptr : scales.data_ptr<float>();
  p.scale = is_static ? scales.const_data_ptr<float>() : nullptr;
  p.scale_ub = has(scale_ub) ? scale_ub->const_data_ptr<float>() : nullptr;
  p.M = rs.rows();
  p.N = rs.N;
  p.group = g;
  p.eps = eps;
  p.offset = offset;
  WorkspaceHolder ws(x);
  kernels_for(x).norm_quant(p, ws.launch(x));
  return {out, scales};
}

}  // namespace

std::tuple<Tensor, Tensor> rms_norm_quant(const Tensor& input, at::IntArrayRef normalized_shape,
                                          const std::optional<Tensor>& weight, double eps,
                                          double weight_offset, const std::optional<Tensor>& scale,
                                          at::ScalarType quant_dtype,
                                          std::optional<int64_t> group_size,
                                          const std::optional<Tensor>& scale_ub) {
  constexpr const char* op = "rms_norm_quant";
  check_quant_input(input, op);
  const RowShape rs = check_rms_norm(input, normalized_shape, weight, eps, weight_offset);
  return run_quant(NormKind::rms, input, Tensor(), Tensor(), rs, normalized_shape, weight,
                   std::nullopt, eps, weight_offset, scale, quant_dtype, group_size, scale_ub, op);
}

std::tuple<Tensor, Tensor, Tensor> fused_add_rms_norm_quant(
    const Tensor& input, const Tensor& residual, at::IntArrayRef normalized_shape,
    const std::optional<Tensor>& weight, double eps, double weight_offset,
    const std::optional<Tensor>& scale, at::ScalarType quant_dtype,
    std::optional<int64_t> group_size, const std::optional<Tensor>& scale_ub) {
  constexpr const char* op = "fused_add_rms_norm_quant";
  check_quant_input(input, op);
  const RowShape rs = check_fused(input, residual, normalized_shape, weight, eps, weight_offset);
  Tensor h = new_like(residual);
  auto [out, scales] = run_quant(NormKind::fused_add_rms, input, residual, h, rs,
                                 normalized_shape, weight, std::nullopt, eps, weight_offset,
                                 scale, quant_dtype, group_size, scale_ub, op);
  return {out, scales, h};
}

std::tuple<Tensor, Tensor> layer_norm_quant(const Tensor& input, at::IntArrayRef normalized_shape,
                                            const std::optional<Tensor>& weight,
                                            const std::optional<Tensor>& bias, double eps,
                                            const std::optional<Tensor>& scale,
                                            at::ScalarType quant_dtype,
                                            std::optional<int64_t> group_size,
                                            const std::optional<Tensor>& scale_ub) {
  constexpr const char* op = "layer_norm_quant";
  check_quant_input(input, op);
  const RowShape rs = check_layer_norm(input, normalized_shape, weight, bias, eps);
  return run_quant(NormKind::layer, input, Tensor(), Tensor(), rs, normalized_shape, weight, bias,
                   eps, 0.0, scale, quant_dtype, group_size, scale_ub, op);
}

}  // namespace rmsnorm_ext::host
