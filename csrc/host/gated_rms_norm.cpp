// Gated RMSNorm (Mamba2, Qwen3-Next, FLA's FusedRMSNormGated): its schemas, its host
// functions for every device, and their registration. With a = act(gate) (silu or sigmoid)
// and the RMS taken over each contiguous group of group_size elements of a row:
//   norm_before_gate=True:   y = x * rstd(x) * w * a
//   norm_before_gate=False:  z = x * a, y = z * rstd(z) * w
// rstd has the input's leading shape + (N // group_size,).

#include <string_view>

#include "host.h"
#include "register.h"

namespace rmsnorm_ext::host {
namespace {

// The argument checks (the one set of rules for every device, meta included).

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


GateAct gate_act(std::string_view activation) {
  return check_activation(activation) ? GateAct::silu : GateAct::sigmoid;
}

// input.shape[:-len(normalized_shape)] + (groups,)
std::vector<c10::SymInt> gated_stats_shape(const Tensor& input,
                                           at::IntArrayRef normalized_shape, int64_t groups) {
  std::vector<c10::SymInt> s = stats_shape(input, normalized_shape);
  s.push_back(groups);
  return s;
}

}  // namespace

std::tuple<Tensor, Tensor> gated_rms_norm_fwd(const Tensor& input, const Tensor& gate,
                                              at::IntArrayRef normalized_shape,
                                              const std::optional<Tensor>& weight, double eps,
                                              int64_t group_size, bool norm_before_gate,
                                              c10::string_view activation) {
  const RowShape rs =
      check_gated(input, gate, normalized_shape, weight, eps, group_size, activation);
  const int64_t groups = rs.N / group_size;

  Tensor y = new_like(input);
  Tensor rstd =
      at::empty_symint(gated_stats_shape(input, normalized_shape, groups), stats_options(input));
  if (shapes_only(input) || rs.empty()) return {y, rstd};  // empty: rstd has no elements either
  const Tensor x = input.contiguous();
  const Tensor g = gate.contiguous();
  const Tensor w = contiguous_or_empty(weight);

  GatedRmsFwdParams p{};
  p.t = to_dtype(x.scalar_type());
  p.w = w.defined() ? to_dtype(w.scalar_type()) : p.t;
  p.act = gate_act(activation);
  p.norm_before_gate = norm_before_gate;
  p.x = x.const_data_ptr();
  p.gate = g.const_data_ptr();
  p.weight = ptr_or_null(w);
  p.y = y.data_ptr();
  p.rstd = rstd.data_ptr();
  p.M = rs.rows();
  p.N = rs.N;
  p.group = group_size;
  p.eps = eps;
  WorkspaceHolder ws(x);
  run_kernel<GatedRmsFwd>(p, x, ws);
  return {y, rstd};
}

std::tuple<Tensor, Tensor, Tensor> gated_rms_norm_bwd(
    const Tensor& grad_out, const Tensor& input, const Tensor& gate, const Tensor& rstd,
    const std::optional<Tensor>& weight, at::IntArrayRef normalized_shape, int64_t group_size,
    bool norm_before_gate, c10::string_view activation, bool compute_weight_grad) {
  const RowShape rs = check_gated_bwd(grad_out, input, gate, rstd, weight, normalized_shape,
                                      group_size, activation);
  const Tensor w = contiguous_or_empty(weight);
  const bool want_dw = compute_weight_grad && w.defined();
  Tensor dx = new_like(input);
  Tensor dg = new_like(input);
  Tensor dw = want_dw ? at::empty(normalized_shape, w.options()) : empty_grad(input);
  if (shapes_only(input)) return {dx, dg, dw};
  if (rs.empty()) {
    if (want_dw) dw.zero_();
    return {dx, dg, dw};
  }
  const Tensor x = input.contiguous();
  const Tensor g = gate.contiguous();
  const Tensor dy = grad_out.contiguous();
  const Tensor rs_c = rstd.contiguous();

  GatedRmsBwdParams p{};
  p.t = to_dtype(x.scalar_type());
  p.w = w.defined() ? to_dtype(w.scalar_type()) : p.t;
  p.act = gate_act(activation);
  p.norm_before_gate = norm_before_gate;
  p.dy = dy.const_data_ptr();
  p.x = x.const_data_ptr();
  p.gate = g.const_data_ptr();
  p.rstd = rs_c.const_data_ptr();
  p.weight = ptr_or_null(w);
  p.dx = dx.data_ptr();
  p.dgate = dg.data_ptr();
  p.dw = want_dw ? dw.data_ptr() : nullptr;
  p.M = rs.rows();
  p.N = rs.N;
  p.group = group_size;
  WorkspaceHolder ws(x);
  run_kernel<GatedRmsBwd>(p, x, ws);
  return {dx, dg, dw};
}

}  // namespace rmsnorm_ext::host

TORCH_LIBRARY_FRAGMENT(rmsnorm_ext, m) {
  // Gated RMSNorm. gate: the input's shape and dtype; activation: "silu" or "sigmoid";
  // group_size divides N = prod(normalized_shape) (N: one group). Returns (y, rstd), rstd
  // of shape input.shape[:-len(normalized_shape)] + (N // group_size,), float32 (float64
  // for float64 input).
  m.def(
      "gated_rms_norm_fwd(Tensor input, Tensor gate, int[] normalized_shape, Tensor? weight, "
      "float eps, int group_size, bool norm_before_gate, str activation) -> (Tensor, Tensor)");
  // Returns (grad_input, grad_gate, grad_weight); grad_weight is an empty tensor when
  // compute_weight_grad is false or there is no weight.
  m.def(
      "gated_rms_norm_bwd(Tensor grad_out, Tensor input, Tensor gate, Tensor rstd, "
      "Tensor? weight, int[] normalized_shape, int group_size, bool norm_before_gate, "
      "str activation, bool compute_weight_grad) -> (Tensor, Tensor, Tensor)");
}

namespace {

void register_gated(torch::Library& m) {
  m.impl("gated_rms_norm_fwd", &rmsnorm_ext::host::gated_rms_norm_fwd);
  m.impl("gated_rms_norm_bwd", &rmsnorm_ext::host::gated_rms_norm_bwd);
}

}  // namespace

RMSNORM_EXT_REGISTER_HOST(register_gated)
