// Argument checks and shape helpers of the host layer (csrc/host/), the one set of rules
// for every device: the shared ones here, an op's own ones in its host file (gated,
// quant, QK-norm + RoPE, modulate). Every op validates its arguments before any kernel runs,
// so a bad call raises a Python exception naming the problem instead of reading out of
// bounds. The
// host functions are registered for the Meta key too, so meta tensors and the fake tensors
// torch.compile traces with run these very checks (there is no Python twin to drift).
//
// Shapes are read as SymInts (sym_sizes, sym_numel): under torch.compile with dynamic
// shapes the leading dims are symbolic, and a plain sizes() call would throw there.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

namespace rmsnorm_ext {

using at::Tensor;

// The input viewed as rows: M rows of N contiguous elements. M may be symbolic on fake
// tensors; rows() is for real tensors, after the host function's meta early return.
// N is a product of normalized_shape (int[] in every schema), so always concrete.
struct RowShape {
  c10::SymInt M;
  int64_t N;
  int64_t rows() const { return M.expect_int(); }
  bool empty() const { return N == 0 || M == 0; }
};

// Whether a symbolic shape equals a concrete one (guards on symbolic dims, as torch's own
// meta functions do).
inline bool same_shape(c10::SymIntArrayRef a, at::IntArrayRef b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) return false;
  }
  return true;
}

// Messages spell dtypes as Python does (torch.float32, not c10's "Float"): that is what
// users write, and what the fake kernels (rmsnorm_ext/_fake.py) print on meta tensors.
inline std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    case at::ScalarType::Float8_e4m3fn: return "torch.float8_e4m3fn";
    case at::ScalarType::Float8_e5m2: return "torch.float8_e5m2";
    case at::ScalarType::Float8_e4m3fnuz: return "torch.float8_e4m3fnuz";
    case at::ScalarType::Float8_e5m2fnuz: return "torch.float8_e5m2fnuz";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline bool is_reduced_float(at::ScalarType t) {
  return t == at::kBFloat16 || t == at::kHalf;
}

// Whether a tensor of dtype t may sit beside an input of dtype input (a parameter, a
// residual, a rotary table): the input's own dtype, or float32 next to bfloat16 / float16.
inline bool same_or_fp32_beside_reduced(at::ScalarType t, at::ScalarType input) {
  return t == input || (t == at::kFloat && is_reduced_float(input));
}

// Statistics (mean, rstd) are float32, or float64 for float64 data.
inline at::ScalarType stats_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Shape of the per-row statistics: the leading (non-normalized) dims of the input.
inline std::vector<c10::SymInt> stats_shape(const Tensor& input,
                                            at::IntArrayRef normalized_shape) {
  auto sizes = input.sym_sizes();
  return std::vector<c10::SymInt>(sizes.begin(), sizes.end() - normalized_shape.size());
}

inline void check_input(const Tensor& input, const char* name) {
  TORCH_CHECK_TYPE(is_supported_float(input.scalar_type()),
                   "rmsnorm_ext: ", name, " must be float32, float64, bfloat16 or float16, got ",
                   py_dtype(input.scalar_type()));
}

// Checks normalized_shape against the input's trailing dims and returns the row view.
inline RowShape check_normalized_shape(const Tensor& input, at::IntArrayRef normalized_shape) {
  TORCH_CHECK_VALUE(!normalized_shape.empty(),
                    "rmsnorm_ext: normalized_shape must have at least one dimension");
  const int64_t nd = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK_VALUE(input.dim() >= nd,
                    "rmsnorm_ext: normalized_shape ", normalized_shape,
                    " has more dimensions than the input of shape ", input.sym_sizes());
  auto trailing = input.sym_sizes().slice(input.dim() - nd);
  TORCH_CHECK_VALUE(same_shape(trailing, normalized_shape),
                    "rmsnorm_ext: normalized_shape ", normalized_shape,
                    " does not match the input's trailing dimensions: input shape ",
                    input.sym_sizes(), " (expected input.shape[-", nd, ":] == normalized_shape)");
  int64_t N = 1;
  for (auto s : normalized_shape) N *= s;
  c10::SymInt M = 1;
  for (int64_t d = 0; d < input.dim() - nd; ++d) M *= input.sym_size(d);
  return {M, N};
}

// A parameter's device and dtype: the input's device; the input's dtype, or float32 when
// the input is bfloat16/float16.
inline void check_param_device_dtype(const Tensor& t, const char* name, const Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), "rmsnorm_ext: ", name, " is on ", t.device(),
              " but the input is on ", input.device(), "; move them to the same device");
  const auto wt = t.scalar_type();
  const auto it = input.scalar_type();
  TORCH_CHECK_TYPE(same_or_fp32_beside_reduced(wt, it), "rmsnorm_ext: ", name,
                   " dtype ", py_dtype(wt), " is not supported with input dtype ", py_dtype(it),
                   " (use the input's dtype, or float32 with a bfloat16/float16 input)");
}

// weight / bias: shape == normalized_shape, same device as the input, dtype equal to
// the input's or float32 when the input is bfloat16/float16.
inline void check_param(const std::optional<Tensor>& p, const char* name, const Tensor& input,
                        at::IntArrayRef normalized_shape) {
  if (!p.has_value() || !p->defined()) return;
  const Tensor& t = *p;
  TORCH_CHECK_VALUE(same_shape(t.sym_sizes(), normalized_shape), "rmsnorm_ext: ", name,
                    " must have shape normalized_shape ", normalized_shape, ", got ",
                    t.sym_sizes());
  check_param_device_dtype(t, name, input);
}

inline void check_same_device(const Tensor& a, const char* an, const Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), "rmsnorm_ext: ", an, " is on ", a.device(), " but ", bn,
              " is on ", b.device(), "; move them to the same device");
}

inline void check_eps(double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0,
                    "rmsnorm_ext: eps must be a finite number >= 0, got ", eps);
}

inline void check_offset(double weight_offset) {
  TORCH_CHECK_VALUE(std::isfinite(weight_offset),
                    "rmsnorm_ext: weight_offset must be finite, got ", weight_offset);
}

// Statistics tensors handed back to a backward op: same leading shape, stats dtype.
inline void check_stats(const Tensor& s, const char* name, const Tensor& input,
                        const c10::SymInt& M) {
  TORCH_CHECK(s.sym_numel() == M, "rmsnorm_ext: ", name, " must have one value per row (", M,
              " rows), got ", s.sym_numel());
  TORCH_CHECK(s.scalar_type() == stats_dtype(input.scalar_type()), "rmsnorm_ext: ", name,
              " must be ", py_dtype(stats_dtype(input.scalar_type())), ", got ",
              py_dtype(s.scalar_type()));
  check_same_device(s, name, input, "the input");
}

// Gradient w.r.t. an output: same shape as the normalized tensor; its dtype is the
// tensor's, or bfloat16/float16 for a float32 tensor (the fp32-residual stream of
// fused_add_rms_norm, whose output has the activation dtype).
inline void check_grad(const Tensor& g, const Tensor& input) {
  TORCH_CHECK_VALUE(g.sym_sizes().equals(input.sym_sizes()), "rmsnorm_ext: grad_out shape ",
                    g.sym_sizes(), " does not match the input shape ", input.sym_sizes());
  check_same_device(g, "grad_out", input, "the input");
  const auto gt = g.scalar_type();
  const auto it = input.scalar_type();
  TORCH_CHECK_TYPE(gt == it || (it == at::kFloat && is_reduced_float(gt)),
                   "rmsnorm_ext: grad_out dtype ", py_dtype(gt),
                   " is not supported with input dtype ", py_dtype(it));
}

// grad_out of a backward with no mixed activation dtype (layer_norm_bwd, gated_rms_norm_bwd,
// norm_modulate_bwd, the 2d norms' backwards; `op` names it): the input's exact shape,
// device and dtype.
inline void check_exact_grad(const Tensor& grad_out, const Tensor& input, const char* op) {
  TORCH_CHECK_VALUE(grad_out.sym_sizes().equals(input.sym_sizes()), "rmsnorm_ext: grad_out shape ",
                    grad_out.sym_sizes(), " does not match the input shape ", input.sym_sizes());
  check_same_device(grad_out, "grad_out", input, "the input");
  TORCH_CHECK_TYPE(grad_out.scalar_type() == input.scalar_type(), "rmsnorm_ext: ", op,
                   ": grad_out dtype ", py_dtype(grad_out.scalar_type()),
                   " must match the input dtype ", py_dtype(input.scalar_type()));
}

// residual: same shape and device as the input; dtype the input's, or float32 with a
// bfloat16/float16 input (an fp32 residual stream).
inline void check_residual(const Tensor& input, const Tensor& residual) {
  TORCH_CHECK_VALUE(residual.sym_sizes().equals(input.sym_sizes()),
                    "rmsnorm_ext: residual shape ", residual.sym_sizes(),
                    " does not match the input shape ", input.sym_sizes());
  check_same_device(residual, "residual", input, "the input");
  const auto rt = residual.scalar_type();
  const auto it = input.scalar_type();
  TORCH_CHECK_TYPE(same_or_fp32_beside_reduced(rt, it),
                   "rmsnorm_ext: residual dtype ", py_dtype(rt),
                   " is not supported with input dtype ", py_dtype(it),
                   " (use the input's dtype, or float32 with a bfloat16/float16 input)");
}

// All the arguments of fused_add_rms_norm(_): returns the row view.
inline RowShape check_fused(const Tensor& input, const Tensor& residual, at::IntArrayRef ns,
                            const std::optional<Tensor>& weight, double eps, double offset) {
  check_input(input, "input");
  check_residual(input, residual);
  const RowShape rs = check_normalized_shape(input, ns);
  check_param(weight, "weight", input, ns);
  check_eps(eps);
  check_offset(offset);
  return rs;
}


// grad_residual (the gradient reaching a fused residual sum from its own output): the
// input's shape, device and dtype.
inline void check_grad_residual(const Tensor& g, const Tensor& input) {
  TORCH_CHECK_VALUE(g.sym_sizes().equals(input.sym_sizes()),
                    "rmsnorm_ext: grad_residual shape ", g.sym_sizes(),
                    " does not match the input shape ", input.sym_sizes());
  check_same_device(g, "grad_residual", input, "the input");
  TORCH_CHECK_TYPE(g.scalar_type() == input.scalar_type(), "rmsnorm_ext: grad_residual dtype ",
                   py_dtype(g.scalar_type()), " must match the input dtype ",
                   py_dtype(input.scalar_type()));
}

// LayerNorm's weight and bias are read as one parameter dtype.
inline void check_same_param_dtype(const std::optional<Tensor>& w, const std::optional<Tensor>& b) {
  if (!w.has_value() || !w->defined() || !b.has_value() || !b->defined()) return;
  TORCH_CHECK_TYPE(w->scalar_type() == b->scalar_type(), "rmsnorm_ext: weight dtype ",
                   py_dtype(w->scalar_type()), " and bias dtype ", py_dtype(b->scalar_type()),
                   " must match");
}

// All the forward arguments of rms_norm (and rms_norm_quant): returns the row view.
inline RowShape check_rms_norm(const Tensor& input, at::IntArrayRef ns,
                               const std::optional<Tensor>& weight, double eps, double offset) {
  check_input(input, "input");
  const RowShape rs = check_normalized_shape(input, ns);
  check_param(weight, "weight", input, ns);
  check_eps(eps);
  check_offset(offset);
  return rs;
}

// All the forward arguments of layer_norm (and layer_norm_quant): returns the row view.
inline RowShape check_layer_norm(const Tensor& input, at::IntArrayRef ns,
                                 const std::optional<Tensor>& weight,
                                 const std::optional<Tensor>& bias, double eps) {
  check_input(input, "input");
  const RowShape rs = check_normalized_shape(input, ns);
  check_param(weight, "weight", input, ns);
  check_param(bias, "bias", input, ns);
  check_same_param_dtype(weight, bias);
  check_eps(eps);
  return rs;
}

// An in-place kernel writes each element once, from the same element of its inputs: it
// refuses a tensor whose elements share memory (expanded) and two tensors whose elements
// overlap. Views of one buffer that share no element (interleaved columns) are fine.
inline void check_inplace_operands(const Tensor& a, const char* an, const Tensor& b,
                                   const char* bn, const char* op) {
  for (const auto& [t, n] : {std::pair<const Tensor*, const char*>{&a, an}, {&b, bn}}) {
    TORCH_CHECK_VALUE(at::has_internal_overlap(*t) != at::MemOverlap::Yes, "rmsnorm_ext: ", op,
                      ": ", n, " has elements that share memory (expanded or overlapping); it "
                      "cannot be written in place");
  }
  // Symbolic (fake) tensors: only the same-tensor case is decidable at trace time; the
  // partial-overlap check runs on the real tensors when the traced graph runs.
  const bool symbolic = a.unsafeGetTensorImpl()->has_symbolic_sizes_strides() ||
                        b.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
  const auto s = symbolic ? (a.is_same(b) ? at::MemOverlapStatus::Full : at::MemOverlapStatus::No)
                          : at::get_overlap_status(a, b);
  TORCH_CHECK_VALUE(s != at::MemOverlapStatus::Full && s != at::MemOverlapStatus::Partial,
                    "rmsnorm_ext: ", op, ": ", an, " and ", bn,
                    " overlap in memory; they cannot both be written in place");
}

inline Tensor contiguous_or_empty(const std::optional<Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->contiguous() : Tensor();
}

// The parameter dtype to dispatch on: the weight's (or bias's) when present.
inline at::ScalarType param_dtype(const Tensor& input, const Tensor& weight, const Tensor& bias) {
  if (weight.defined()) return weight.scalar_type();
  if (bias.defined()) return bias.scalar_type();
  return input.scalar_type();
}

// The gradient w.r.t. a parameter, or an empty tensor when it is not wanted
// (the autograd layer turns that into None).
inline Tensor empty_grad(const Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace rmsnorm_ext
