// Argument checks and shape helpers of the host layer (csrc/host/), the one set of rules
// for every device. Every op validates its arguments here, before any kernel runs, so a bad
// call raises a Python exception naming the problem instead of reading out of bounds. The
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
  TORCH_CHECK_TYPE(wt == it || (wt == at::kFloat && is_reduced_float(it)), "rmsnorm_ext: ", name,
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
  TORCH_CHECK_TYPE(rt == it || (rt == at::kFloat && is_reduced_float(it)),
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

// ---------------------------------------------------------------------------------------
// Gated RMSNorm (csrc/host/gated_rms_norm.cpp).

// gate: the input's exact shape, device and dtype.
inline void check_gate(const Tensor& gate, const Tensor& input) {
  TORCH_CHECK_VALUE(gate.sym_sizes().equals(input.sym_sizes()), "rmsnorm_ext: gate shape ",
                    gate.sym_sizes(), " does not match the input shape ", input.sym_sizes());
  check_same_device(gate, "gate", input, "the input");
  TORCH_CHECK_TYPE(gate.scalar_type() == input.scalar_type(), "rmsnorm_ext: gate dtype ",
                   py_dtype(gate.scalar_type()), " must match the input dtype ",
                   py_dtype(input.scalar_type()));
}

// The RMS is taken over each group of group_size consecutive elements of a row.
inline void check_group_size(int64_t group_size, int64_t N) {
  TORCH_CHECK_VALUE(group_size > 0, "rmsnorm_ext: group_size must be positive, got ",
                    group_size);
  TORCH_CHECK_VALUE(N % group_size == 0, "rmsnorm_ext: group_size ", group_size,
                    " does not divide the normalized size ", N);
}

// The gate activation: "silu" or "sigmoid". Returns whether it is silu.
inline bool check_activation(std::string_view activation) {
  TORCH_CHECK_VALUE(activation == "silu" || activation == "sigmoid",
                    "rmsnorm_ext: activation must be \"silu\" or \"sigmoid\", got \"",
                    std::string(activation), "\"");
  return activation == "silu";
}

// All the forward arguments of gated_rms_norm: returns the row view.
inline RowShape check_gated(const Tensor& input, const Tensor& gate, at::IntArrayRef ns,
                            const std::optional<Tensor>& weight, double eps, int64_t group_size,
                            std::string_view activation) {
  check_input(input, "input");
  check_gate(gate, input);
  const RowShape rs = check_normalized_shape(input, ns);
  check_param(weight, "weight", input, ns);
  check_eps(eps);
  check_group_size(group_size, rs.N);
  check_activation(activation);
  return rs;
}

// All the backward arguments of gated_rms_norm: returns the row view. grad_out has the
// input's shape, device and dtype; rstd one value per row and group.
inline RowShape check_gated_bwd(const Tensor& grad_out, const Tensor& input, const Tensor& gate,
                                const Tensor& rstd, const std::optional<Tensor>& weight,
                                at::IntArrayRef ns, int64_t group_size,
                                std::string_view activation) {
  check_input(input, "input");
  check_gate(gate, input);
  const RowShape rs = check_normalized_shape(input, ns);
  check_exact_grad(grad_out, input, "gated_rms_norm_bwd");
  check_param(weight, "weight", input, ns);
  check_group_size(group_size, rs.N);
  check_activation(activation);
  const int64_t groups = rs.N / group_size;
  TORCH_CHECK(rstd.sym_numel() == rs.M * groups, "rmsnorm_ext: rstd must have one value per "
              "row and group (", rs.M, " rows x ", groups, " groups), got ", rstd.sym_numel());
  check_stats(rstd, "rstd", input, rs.M * groups);
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

// ---------------------------------------------------------------------------------------
// Norm + quantize (csrc/host/norm_quant.cpp).

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

// ---------------------------------------------------------------------------------------
// Fused QK-norm + RoPE (csrc/host/qk_norm_rope.cpp).

// q [..., S, Hq, D] and k [..., S, Hk, D] as head rows: B positions-batches (the product of
// the leading dims), S positions, Hq / Hk heads of D elements. B, S and the head counts may
// be symbolic on fake tensors; D is read as a concrete int (a head dimension is static).
struct QkShape {
  c10::SymInt B;
  c10::SymInt S;
  c10::SymInt Hq;
  c10::SymInt Hk;
  int64_t D;
  // Real tensors only (after the host function's meta early return).
  int64_t positions() const { return (B * S).expect_int(); }
  bool empty() const { return D == 0 || B == 0 || S == 0 || (Hq == 0 && Hk == 0); }
};

// q or k: [..., S, H, D].
inline void check_qk_rank(const Tensor& t, const char* name, const char* heads) {
  TORCH_CHECK_VALUE(t.dim() >= 3, "rmsnorm_ext: ", name, " must have shape [..., S, ", heads,
                    ", D] (at least 3 dimensions), got ", t.sym_sizes());
}

// q and k: supported float dtype (the same), one device, shapes [..., S, Hq, D] and
// [..., S, Hk, D] with the same leading dims, S and D, D even. Returns the shape.
inline QkShape check_qk(const Tensor& q, const Tensor& k) {
  check_input(q, "q");
  check_input(k, "k");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "rmsnorm_ext: k dtype ",
                   py_dtype(k.scalar_type()), " must match the q dtype ",
                   py_dtype(q.scalar_type()));
  check_same_device(k, "k", q, "q");
  check_qk_rank(q, "q", "Hq");
  check_qk_rank(k, "k", "Hk");
  const auto qs = q.sym_sizes();
  const auto ks = k.sym_sizes();
  TORCH_CHECK_VALUE(q.dim() == k.dim() && qs.slice(0, q.dim() - 2).equals(ks.slice(0, k.dim() - 2)),
                    "rmsnorm_ext: q and k must have the same leading dimensions and sequence "
                    "length (shape[:-2]), got q shape ", qs, " and k shape ", ks);
  TORCH_CHECK_VALUE(qs[q.dim() - 1] == ks[k.dim() - 1],
                    "rmsnorm_ext: q and k must have the same head dimension D (shape[-1]), got "
                    "q shape ", qs, " and k shape ", ks);
  const int64_t D = qs[q.dim() - 1].guard_int(__FILE__, __LINE__);
  TORCH_CHECK_VALUE(D % 2 == 0, "rmsnorm_ext: the head dimension D must be even for the "
                    "rotary embedding, got D = ", D);
  c10::SymInt B = 1;
  for (int64_t d = 0; d < q.dim() - 3; ++d) B *= qs[d];
  return {B, qs[q.dim() - 3], qs[q.dim() - 2], ks[k.dim() - 2], D};
}

// q_weight / k_weight: shape [D], the device of q, dtype q's or float32 next to a
// bfloat16/float16 q.
inline void check_head_param(const std::optional<Tensor>& p, const char* name, const Tensor& q,
                             int64_t D) {
  if (!p.has_value() || !p->defined()) return;
  const Tensor& t = *p;
  TORCH_CHECK_VALUE(t.dim() == 1 && t.sym_size(0) == D, "rmsnorm_ext: ", name,
                    " must have shape [D] = [", D, "], got ", t.sym_sizes());
  check_same_device(t, name, q, "q");
  const auto wt = t.scalar_type();
  const auto it = q.scalar_type();
  TORCH_CHECK_TYPE(wt == it || (wt == at::kFloat && is_reduced_float(it)), "rmsnorm_ext: ", name,
                   " dtype ", py_dtype(wt), " is not supported with q dtype ", py_dtype(it),
                   " (use q's dtype, or float32 with a bfloat16/float16 q)");
}

// cos and sin: [S, D] (shared by the batch) or [B, S, D], the device of q, dtype q's or
// float32 next to a bfloat16/float16 q, sin like cos. Returns whether they are [B, S, D].
inline bool check_rope_tables(const Tensor& cos, const Tensor& sin, const Tensor& q,
                              const QkShape& s) {
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&cos, "cos"}, {&sin, "sin"}}) {
    const auto sz = t->sym_sizes();
    const bool ok = (t->dim() == 2 && sz[0] == s.S && sz[1] == s.D) ||
                    (t->dim() == 3 && sz[0] == s.B && sz[1] == s.S && sz[2] == s.D);
    TORCH_CHECK_VALUE(ok, "rmsnorm_ext: ", name, " must have shape [S, D] = [", s.S, ", ", s.D,
                      "] or [B, S, D] = [", s.B, ", ", s.S, ", ", s.D,
                      "] (B: the product of q's leading dims), got ", sz);
    check_same_device(*t, name, q, "q");
    TORCH_CHECK_TYPE(is_supported_float(t->scalar_type()), "rmsnorm_ext: ", name,
                     " must be float32, float64, bfloat16 or float16, got ",
                     py_dtype(t->scalar_type()));
  }
  TORCH_CHECK_VALUE(sin.dim() == cos.dim(), "rmsnorm_ext: sin shape ", sin.sym_sizes(),
                    " must match the cos shape ", cos.sym_sizes());
  const auto ct = cos.scalar_type();
  const auto it = q.scalar_type();
  TORCH_CHECK_TYPE(sin.scalar_type() == ct, "rmsnorm_ext: sin dtype ", py_dtype(sin.scalar_type()),
                   " must match the cos dtype ", py_dtype(ct));
  TORCH_CHECK_TYPE(ct == it || (ct == at::kFloat && is_reduced_float(it)),
                   "rmsnorm_ext: cos/sin dtype ", py_dtype(ct), " is not supported with q dtype ",
                   py_dtype(it), " (use q's dtype, or float32 with a bfloat16/float16 q)");
  return cos.dim() == 3;
}

// The gradient of q_out (k_out): q's (k's) shape, device and dtype.
inline void check_qk_grad(const Tensor& g, const char* gname, const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(g.sym_sizes().equals(t.sym_sizes()), "rmsnorm_ext: ", gname, " shape ",
                    g.sym_sizes(), " does not match the ", name, " shape ", t.sym_sizes());
  check_same_device(g, gname, t, name);
  TORCH_CHECK_TYPE(g.scalar_type() == t.scalar_type(), "rmsnorm_ext: ", gname, " dtype ",
                   py_dtype(g.scalar_type()), " must match the ", name, " dtype ",
                   py_dtype(t.scalar_type()));
}

// All the forward arguments of qk_norm_rope: returns the shape; *cs_per_batch: whether
// cos/sin are [B, S, D].
inline QkShape check_qk_norm_rope(const Tensor& q, const Tensor& k,
                                  const std::optional<Tensor>& q_weight,
                                  const std::optional<Tensor>& k_weight, const Tensor& cos,
                                  const Tensor& sin, bool* cs_per_batch) {
  const QkShape s = check_qk(q, k);
  check_head_param(q_weight, "q_weight", q, s.D);
  check_head_param(k_weight, "k_weight", q, s.D);
  *cs_per_batch = check_rope_tables(cos, sin, q, s);
  return s;
}

// adaLN modulation (csrc/host/norm_modulate.cpp): y = norm(x) * (1 + scale) + shift over
// the last dim D of an input [B, ..., D], with one scale / shift vector per sample b.

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
  TORCH_CHECK_TYPE(st == it || (st == at::kFloat && is_reduced_float(it)), "rmsnorm_ext: ", name,
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

}  // namespace rmsnorm_ext
