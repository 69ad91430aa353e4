// Shared argument checks, shape helpers and dtype dispatch for the CPU and CUDA
// implementations. Every op validates its arguments here, before any kernel runs,
// so a bad call raises a Python exception naming the problem instead of reading
// out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/irange.h>

#include <cmath>
#include <optional>
#include <tuple>

namespace rmsnorm_ext {

using at::Tensor;

// The input viewed as rows: M rows of N contiguous elements.
struct RowShape {
  int64_t M;
  int64_t N;
};

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline bool is_reduced_float(at::ScalarType t) {
  return t == at::kBFloat16 || t == at::kHalf;
}

// Statistics (mean, rstd) are float32, or float64 for float64 data.
inline at::ScalarType stats_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Shape of the per-row statistics: the leading (non-normalized) dims of the input.
inline std::vector<int64_t> stats_shape(const Tensor& input, at::IntArrayRef normalized_shape) {
  auto sizes = input.sizes();
  return std::vector<int64_t>(sizes.begin(), sizes.end() - normalized_shape.size());
}

inline void check_input(const Tensor& input, const char* name) {
  TORCH_CHECK_TYPE(is_supported_float(input.scalar_type()),
                   "rmsnorm_ext: ", name, " must be float32, float64, bfloat16 or float16, got ",
                   input.scalar_type());
}

// Checks normalized_shape against the input's trailing dims and returns the row view.
inline RowShape check_normalized_shape(const Tensor& input, at::IntArrayRef normalized_shape) {
  TORCH_CHECK_VALUE(!normalized_shape.empty(),
                    "rmsnorm_ext: normalized_shape must have at least one dimension");
  const int64_t nd = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK_VALUE(input.dim() >= nd,
                    "rmsnorm_ext: normalized_shape ", normalized_shape,
                    " has more dimensions than the input of shape ", input.sizes());
  auto trailing = input.sizes().slice(input.dim() - nd);
  TORCH_CHECK_VALUE(trailing.equals(normalized_shape),
                    "rmsnorm_ext: normalized_shape ", normalized_shape,
                    " does not match the input's trailing dimensions: input shape ", input.sizes(),
                    " (expected input.shape[-", nd, ":] == normalized_shape)");
  int64_t N = 1;
  for (auto s : normalized_shape) N *= s;
  int64_t M = 1;
  for (int64_t d = 0; d < input.dim() - nd; ++d) M *= input.size(d);
  return {M, N};
}

// weight / bias: shape == normalized_shape, same device as the input, dtype equal to
// the input's or float32 when the input is bfloat16/float16.
inline void check_param(const std::optional<Tensor>& p, const char* name, const Tensor& input,
                        at::IntArrayRef normalized_shape) {
  if (!p.has_value() || !p->defined()) return;
  const Tensor& t = *p;
  TORCH_CHECK_VALUE(t.sizes().equals(normalized_shape), "rmsnorm_ext: ", name,
                    " must have shape normalized_shape ", normalized_shape, ", got ", t.sizes());
  TORCH_CHECK(t.device() == input.device(), "rmsnorm_ext: ", name, " is on ", t.device(),
              " but the input is on ", input.device(), "; move them to the same device");
  const auto wt = t.scalar_type();
  const auto it = input.scalar_type();
  TORCH_CHECK_TYPE(wt == it || (wt == at::kFloat && is_reduced_float(it)), "rmsnorm_ext: ", name,
                   " dtype ", wt, " is not supported with input dtype ", it,
                   " (use the input's dtype, or float32 with a bfloat16/float16 input)");
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
inline void check_stats(const Tensor& s, const char* name, const Tensor& input, int64_t M) {
  TORCH_CHECK(s.numel() == M, "rmsnorm_ext: ", name, " must have one value per row (", M,
              " rows), got ", s.numel());
  TORCH_CHECK(s.scalar_type() == stats_dtype(input.scalar_type()), "rmsnorm_ext: ", name,
              " must be ", stats_dtype(input.scalar_type()), ", got ", s.scalar_type());
  check_same_device(s, name, input, "the input");
}

// Gradient w.r.t. an output: same shape as the normalized tensor; its dtype is the
// tensor's, or bfloat16/float16 for a float32 tensor (the fp32-residual stream of
// fused_add_rms_norm, whose output has the activation dtype).
inline void check_grad(const Tensor& g, const Tensor& input) {
  TORCH_CHECK_VALUE(g.sizes().equals(input.sizes()), "rmsnorm_ext: grad_out shape ", g.sizes(),
                    " does not match the input shape ", input.sizes());
  check_same_device(g, "grad_out", input, "the input");
  const auto gt = g.scalar_type();
  const auto it = input.scalar_type();
  TORCH_CHECK_TYPE(gt == it || (it == at::kFloat && is_reduced_float(gt)),
                   "rmsnorm_ext: grad_out dtype ", gt, " is not supported with input dtype ", it);
}

// residual: same shape and device as the input; dtype the input's, or float32 with a
// bfloat16/float16 input (an fp32 residual stream).
inline void check_residual(const Tensor& input, const Tensor& residual) {
  TORCH_CHECK_VALUE(residual.sizes().equals(input.sizes()), "rmsnorm_ext: residual shape ",
                    residual.sizes(), " does not match the input shape ", input.sizes());
  check_same_device(residual, "residual", input, "the input");
  const auto rt = residual.scalar_type();
  const auto it = input.scalar_type();
  TORCH_CHECK_TYPE(rt == it || (rt == at::kFloat && is_reduced_float(it)),
                   "rmsnorm_ext: residual dtype ", rt, " is not supported with input dtype ", it,
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

// The CPU kernels' own device check (the dispatcher may route a call with a CPU input and
// a tensor elsewhere to them).
inline void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "rmsnorm_ext: ", name, " must be a CPU tensor here, got ",
              t.device());
}

// LayerNorm's backward has no mixed activation dtype: grad_out matches the input exactly.
inline void check_ln_grad(const Tensor& grad_out, const Tensor& input) {
  check_grad(grad_out, input);
  TORCH_CHECK_TYPE(grad_out.scalar_type() == input.scalar_type(),
                   "rmsnorm_ext: layer_norm_bwd: grad_out dtype ", grad_out.scalar_type(),
                   " must match the input dtype ", input.scalar_type());
}

inline Tensor contiguous_or_empty(const std::optional<Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->contiguous() : Tensor();
}

template <typename T>
inline const T* data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Dispatch over the input dtype (T) and the parameter dtype (W: T, or float for
// bfloat16/float16 inputs). `PARAM_DTYPE` is the dtype of weight/bias, or of the
// input when there are none.
#define RMSNORM_EXT_DISPATCH_TW(INPUT_DTYPE, PARAM_DTYPE, NAME, ...)                          \
  [&] {                                                                                       \
    const auto _it = (INPUT_DTYPE);                                                           \
    const bool _wf = (PARAM_DTYPE) == at::kFloat;                                             \
    switch (_it) {                                                                            \
      case at::kFloat: {                                                                      \
        using scalar_t = float;                                                               \
        using param_t = float;                                                                \
        return __VA_ARGS__();                                                                 \
      }                                                                                       \
      case at::kDouble: {                                                                     \
        using scalar_t = double;                                                              \
        using param_t = double;                                                               \
        return __VA_ARGS__();                                                                 \
      }                                                                                       \
      case at::kBFloat16: {                                                                   \
        using scalar_t = c10::BFloat16;                                                       \
        if (_wf) {                                                                            \
          using param_t = float;                                                              \
          return __VA_ARGS__();                                                               \
        } else {                                                                              \
          using param_t = c10::BFloat16;                                                      \
          return __VA_ARGS__();                                                               \
        }                                                                                     \
      }                                                                                       \
      case at::kHalf: {                                                                       \
        using scalar_t = c10::Half;                                                           \
        if (_wf) {                                                                            \
          using param_t = float;                                                              \
          return __VA_ARGS__();                                                               \
        } else {                                                                              \
          using param_t = c10::Half;                                                          \
          return __VA_ARGS__();                                                               \
        }                                                                                     \
      }                                                                                       \
      default:                                                                                \
        TORCH_CHECK_TYPE(false, "rmsnorm_ext: ", NAME, ": unsupported dtype ", _it);          \
    }                                                                                         \
  }()

// The parameter dtype to dispatch on: the weight's (or bias's) when present.
inline at::ScalarType param_dtype(const Tensor& input, const Tensor& weight, const Tensor& bias) {
  if (weight.defined()) return weight.scalar_type();
  if (bias.defined()) return bias.scalar_type();
  return input.scalar_type();
}

template <typename T>
struct TypeTag {
  using type = T;
};

// The dtype of a tensor that is either `S` or, when `S` is bfloat16/float16, float32 (the
// fp32 residual stream of fused_add_rms_norm): calls f(TypeTag<that type>{}).
template <typename S, typename F>
inline void dispatch_same_or_float(at::ScalarType t, F&& f) {
  if constexpr (std::is_same_v<S, c10::BFloat16> || std::is_same_v<S, c10::Half>) {
    if (t == at::kFloat) return f(TypeTag<float>{});
  }
  f(TypeTag<S>{});
}

// The gradient w.r.t. a parameter, or an empty tensor when it is not wanted
// (the autograd layer turns that into None).
inline Tensor empty_grad(const Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace rmsnorm_ext
