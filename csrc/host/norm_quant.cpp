// Host functions of the norm + quantize ops (rms_norm_quant, fused_add_rms_norm_quant,
// layer_norm_quant), for every device: one kernel entry (norm_quant) on NormQuantParams,
// the norm and its fusions selected by the operands.
#include "host.h"
#include "register.h"

namespace rmsnorm_ext::host {
namespace {

// The argument checks (the one set of rules for every device, meta included).

inline bool is_quant_dtype(at::ScalarType q) {
  return q == at::ScalarType::Float8_e4m3fn || q == at::ScalarType::Float8_e5m2 ||
         q == at::kChar;
}

// The quantized ops take the activation dtypes (float32, bfloat16, float16).
inline void check_quant_input(const Tensor& input, const char* op) {
  const auto t = input.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, "rmsnorm_ext: ", op,
                   ": input must be float32, bfloat16 or float16, got ", py_dtype(t));
}

// scale / scale_ub: a one-element float32 tensor on the input's device. Only metadata is
// checked: reading the value would need a device sync (and is impossible on meta tensors
// and under CUDA-graph capture).
inline void check_quant_scalar(const std::optional<Tensor>& s, const char* name,
                               const Tensor& input, const char* op) {
  if (!s.has_value() || !s->defined()) return;
  TORCH_CHECK_TYPE(s->scalar_type() == at::kFloat, "rmsnorm_ext: ", op, ": ", name,
                   " must be a float32 tensor, got ", py_dtype(s->scalar_type()));
  TORCH_CHECK_VALUE(s->sym_numel() == 1, "rmsnorm_ext: ", op, ": ", name,
                    " must have exactly one element, got shape ", s->sym_sizes());
  TORCH_CHECK(s->device() == input.device(), "rmsnorm_ext: ", op, ": ", name, " is on ",
              s->device().str(), " but the input is on ", input.device().str(),
              "; move them to the same device");
}

// The quantization arguments; returns the group size (N for per-token and static scales).
inline int64_t check_quant_args(const Tensor& input, int64_t N, const std::optional<Tensor>& scale,
                                at::ScalarType quant_dtype, std::optional<int64_t> group_size,
                                const std::optional<Tensor>& scale_ub, const char* op) {
  TORCH_CHECK_TYPE(is_quant_dtype(quant_dtype), "rmsnorm_ext: ", op,
                   ": quant_dtype must be torch.float8_e4m3fn, torch.float8_e5m2 or torch.int8, "
                   "got ", py_dtype(quant_dtype));
  check_quant_scalar(scale, "scale", input, op);
  check_quant_scalar(scale_ub, "scale_ub", input, op);
  const bool is_static = scale.has_value() && scale->defined();
  TORCH_CHECK_VALUE(!(is_static && group_size.has_value()), "rmsnorm_ext: ", op,
                    ": a static scale cannot be combined with group_size (per-group scales "
                    "are dynamic); pass scale=None for dynamic per-group scales");
  TORCH_CHECK_VALUE(!(is_static && scale_ub.has_value() && scale_ub->defined()), "rmsnorm_ext: ",
                    op, ": scale_ub bounds dynamic scales; it cannot be combined with a static "
                    "scale");
  if (!group_size.has_value()) return N;
  const int64_t g = *group_size;
  TORCH_CHECK_VALUE(g > 0, "rmsnorm_ext: ", op, ": group_size must be positive, got ", g);
  TORCH_CHECK_VALUE(N % g == 0, "rmsnorm_ext: ", op, ": group_size ", g,
                    " does not divide the normalized size ", N);
  return g;
}


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
  run_kernel<NormQuant>(p, x, ws);
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

TORCH_LIBRARY_FRAGMENT(rmsnorm_ext, m) {
  // Norm + quantize, inference only (no autograd): y is the norm's output above in fp32,
  // out = quantize(y / s) in quant_dtype (float8_e4m3fn, float8_e5m2 or int8) with s the
  // static dequantization scale `scale` (one float32 element; scales is a copy of it), or
  // dynamic per row (group_size None) / per group of group_size elements of a row:
  // s = max(min(absmax(y), scale_ub) / qmax, min_scale), scales of shape leading + (groups,).
  m.def(
      "rms_norm_quant(Tensor input, int[] normalized_shape, Tensor? weight, float eps, "
      "float weight_offset, Tensor? scale, ScalarType quant_dtype, int? group_size, "
      "Tensor? scale_ub) -> (Tensor, Tensor)");
  // Returns (out, scales, residual_out); residual_out = input + residual as in
  // fused_add_rms_norm_fwd, and y = rms_norm(residual_out).
  m.def(
      "fused_add_rms_norm_quant(Tensor input, Tensor residual, int[] normalized_shape, "
      "Tensor? weight, float eps, float weight_offset, Tensor? scale, ScalarType quant_dtype, "
      "int? group_size, Tensor? scale_ub) -> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_quant(Tensor input, int[] normalized_shape, Tensor? weight, Tensor? bias, "
      "float eps, Tensor? scale, ScalarType quant_dtype, int? group_size, Tensor? scale_ub) "
      "-> (Tensor, Tensor)");
}

namespace {

void register_norm_quant(torch::Library& m) {
  m.impl("rms_norm_quant", &rmsnorm_ext::host::rms_norm_quant);
  m.impl("fused_add_rms_norm_quant", &rmsnorm_ext::host::fused_add_rms_norm_quant);
  m.impl("layer_norm_quant", &rmsnorm_ext::host::layer_norm_quant);
}

}  // namespace

RMSNORM_EXT_REGISTER_HOST(register_norm_quant)
