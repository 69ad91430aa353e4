// The C++ autograd nodes of the eager fast path (csrc/python/python_fast.cpp): a Python autograd
// node costs ~10-30 us a call, more than a whole small-shape norm. The fast path records
// these only for plain calls (no torch.func transform, no forward-AD tangent, no autocast);
// every other call reaches the ops' Autograd kernels, which are registered in Python from
// the op table (rmsnorm_ext/_autograd.py: functorch-aware, with jvp and vmap rules).
//
// First order: each forward op's backward is its fused *_bwd op. Second order: when a graph
// of the gradient is being built (create_graph=True, i.e. grad mode is on inside backward)
// the backward is computed instead by a differentiable composite of ATen ops (the same
// formulas, in fp32 or fp64), so double backward, gradient penalties and Hessian-vector
// products get correct, connected gradients. That composite never runs on the first-order
// path, nor under torch.compile (whose traced backward runs without grad mode).
#include <ATen/TensorOperators.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

#include "../host/checks.h"
#include "autograd.h"
#include "op_handles.h"

namespace rmsnorm_ext::autograd_impl {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::variable_list;

namespace oh = rmsnorm_ext::op_handles;

// An inference tensor cannot be saved for backward; torch's composite norms save only
// tensors they compute, so they accept one: a copy keeps us as permissive.
at::Tensor savable(const at::Tensor& t) { return t.defined() && t.is_inference() ? t.clone() : t; }

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// An empty tensor from a *_bwd op means "not computed": no gradient.
at::Tensor grad_or_undef(const at::Tensor& g, bool wanted) {
  return wanted ? g : at::Tensor();
}

// ---------------------------------------------------------------------------------------
// The differentiable composite backward (create_graph=True only).

struct RowDims {
  std::vector<int64_t> norm;  // the normalized (trailing) dims
  std::vector<int64_t> lead;  // the leading dims (summed over for parameter gradients)
};

RowDims row_dims(const at::Tensor& x, size_t n_norm) {
  RowDims d;
  const int64_t nd = x.dim();
  for (int64_t i = 0; i < nd; ++i) {
    (i < nd - static_cast<int64_t>(n_norm) ? d.lead : d.norm).push_back(i);
  }
  return d;
}

at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Sum over the leading dims, in the parameter's dtype (a parameter of a 1-D input is
// summed over nothing).
at::Tensor sum_lead(const at::Tensor& t, const RowDims& d, at::ScalarType dtype) {
  return (d.lead.empty() ? t : t.sum(d.lead)).to(dtype);
}

// RMSNorm backward as differentiable ATen ops: x the normalized tensor, dy the output
// gradient (its dtype is the output's), w_eff = offset + w. Returns (dx in x's dtype,
// dw in w's dtype or undefined).
std::pair<at::Tensor, at::Tensor> rms_backward_composite(const at::Tensor& dy,
                                                          const at::Tensor& x,
                                                          const at::Tensor& w, double offset,
                                                          double eps, size_t n_norm,
                                                          bool want_dw) {
  const auto d = row_dims(x, n_norm);
  const auto acc = acc_dtype(x);
  const at::Tensor xf = x.to(acc);
  const at::Tensor dyf = dy.to(acc);
  const at::Tensor rstd = (xf * xf).mean(d.norm, /*keepdim=*/true).add(eps).rsqrt();
  const at::Tensor xhat = xf * rstd;
  at::Tensor g = w.defined() ? dyf * w.to(acc).add(offset) : dyf;
  at::Tensor dx = rstd * (g - xhat * (g * xhat).mean(d.norm, /*keepdim=*/true));
  at::Tensor dw = want_dw ? sum_lead(dyf * xhat, d, w.scalar_type()) : at::Tensor();
  return {dx.to(x.scalar_type()), dw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ln_backward_composite(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, double eps, size_t n_norm,
    bool want_dw, bool want_db, at::ScalarType db_dtype) {
  const auto d = row_dims(x, n_norm);
  const auto acc = acc_dtype(x);
  const at::Tensor xf = x.to(acc);
  const at::Tensor dyf = dy.to(acc);
  const at::Tensor xc = xf - xf.mean(d.norm, /*keepdim=*/true);
  const at::Tensor rstd = (xc * xc).mean(d.norm, /*keepdim=*/true).add(eps).rsqrt();
  const at::Tensor xhat = xc * rstd;
  const at::Tensor g = w.defined() ? dyf * w.to(acc) : dyf;
  at::Tensor dx = rstd * (g - g.mean(d.norm, /*keepdim=*/true) -
                          xhat * (g * xhat).mean(d.norm, /*keepdim=*/true));
  at::Tensor dw = want_dw ? sum_lead(dyf * xhat, d, w.scalar_type()) : at::Tensor();
  at::Tensor db = want_db ? sum_lead(dyf, d, db_dtype) : at::Tensor();
  return {dx.to(x.scalar_type()), dw, db};
}

// In backward, ctx->needs_input_grad(i) counts only the tensors that were given (the
// node's edges), so an absent optional weight takes no index; the list backward returns
// has one entry per forward argument, tensor or not.

// ---------------------------------------------------------------------------------------
// rms_norm_fwd(input, normalized_shape, weight, eps, weight_offset) -> (y, rstd)

class RmsNormFn : public Function<RmsNormFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               c10::IntArrayRef normalized_shape,
                               const std::optional<at::Tensor>& weight, double eps,
                               double offset) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, rstd] = oh::rms_norm_fwd().call(input, normalized_shape, weight, eps, offset);
    ctx->save_for_backward({savable(input), rstd, savable(weight.value_or(at::Tensor()))});
    ctx->saved_data["ns"] = normalized_shape.vec();
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["offset"] = offset;
    ctx->mark_non_differentiable({rstd});
    ctx->set_materialize_grads(false);
    return {y, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &rstd = saved[1], &w = saved[2];
    const auto ns = ctx->saved_data["ns"].toIntVector();
    const double offset = ctx->saved_data["offset"].toDouble();
    const bool want_dx = ctx->needs_input_grad(0);
    const bool want_dw = w.defined() && ctx->needs_input_grad(1);
    at::Tensor dx, dw;
    if (at::GradMode::is_enabled()) {
      std::tie(dx, dw) = rms_backward_composite(dy, x, w, offset,
                                                ctx->saved_data["eps"].toDouble(), ns.size(),
                                                want_dw);
    } else {
      std::tie(dx, dw) =
          oh::rms_norm_bwd().call(dy, x, rstd, opt(w), ns, offset, std::nullopt, want_dw);
    }
    return {grad_or_undef(dx, want_dx), at::Tensor(), grad_or_undef(dw, want_dw), at::Tensor(),
            at::Tensor()};
  }
};

// ---------------------------------------------------------------------------------------
// layer_norm_fwd(input, normalized_shape, weight, bias, eps) -> (y, mean, rstd)

class LayerNormFn : public Function<LayerNormFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               c10::IntArrayRef normalized_shape,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, mean, rstd] = oh::layer_norm_fwd().call(input, normalized_shape, weight, bias, eps);
    ctx->save_for_backward({savable(input), mean, rstd, savable(weight.value_or(at::Tensor()))});
    ctx->saved_data["ns"] = normalized_shape.vec();
    ctx->saved_data["eps"] = eps;
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->saved_data["bias_dtype"] =
        has_bias ? static_cast<int64_t>(bias->scalar_type()) : int64_t{-1};
    ctx->mark_non_differentiable({mean, rstd});
    ctx->set_materialize_grads(false);
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &mean = saved[1], &rstd = saved[2], &w = saved[3];
    const auto ns = ctx->saved_data["ns"].toIntVector();
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    const bool want_dx = ctx->needs_input_grad(0);
    const bool want_dw = w.defined() && ctx->needs_input_grad(1);
    const bool want_db = bias_dtype >= 0 && ctx->needs_input_grad(w.defined() ? 2 : 1);
    const auto db_dtype = bias_dtype >= 0 ? static_cast<at::ScalarType>(bias_dtype)
                                          : x.scalar_type();
    at::Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {
      std::tie(dx, dw, db) = ln_backward_composite(dy, x, w, ctx->saved_data["eps"].toDouble(),
                                                   ns.size(), want_dw, want_db, db_dtype);
    } else {
      std::tie(dx, dw, db) = oh::layer_norm_bwd().call(dy, x, mean, rstd, opt(w), ns, want_dw, want_db);
      // The kernel writes dbias in the parameter dtype; only a bias without a weight, in
      // a dtype other than the input's, needs a cast.
      if (want_db && db.scalar_type() != db_dtype) db = db.to(db_dtype);
    }
    return {grad_or_undef(dx, want_dx), at::Tensor(), grad_or_undef(dw, want_dw),
            grad_or_undef(db, want_db), at::Tensor()};
  }
};

// ---------------------------------------------------------------------------------------
// fused_add_rms_norm_fwd(input, residual, normalized_shape, weight, eps, weight_offset)
//   -> (y, h, rstd), h = input + residual, y = rms_norm(h)

class FusedAddRmsNormFn : public Function<FusedAddRmsNormFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& residual, c10::IntArrayRef normalized_shape,
                               const std::optional<at::Tensor>& weight, double eps,
                               double offset) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, h, rstd] = oh::fused_add_rms_norm_fwd().call(input, residual, normalized_shape, weight, eps, offset);
    // h is an output: in a create_graph backward its gradient flows back through this
    // node (h = input + residual), so the composite needs no copy of the inputs.
    ctx->save_for_backward({h, rstd, savable(weight.value_or(at::Tensor()))});
    ctx->saved_data["ns"] = normalized_shape.vec();
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["input_dtype"] = static_cast<int64_t>(input.scalar_type());
    ctx->mark_non_differentiable({rstd});
    ctx->set_materialize_grads(false);
    return {y, h, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor &dy = grads[0], &dh_direct = grads[1];
    const auto input_dtype = static_cast<at::ScalarType>(ctx->saved_data["input_dtype"].toInt());
    auto to_inputs = [&](const at::Tensor& dh) -> variable_list {
      at::Tensor dx;
      if (dh.defined() && ctx->needs_input_grad(0)) {
        dx = dh.scalar_type() == input_dtype ? dh : dh.to(input_dtype);  // fp32 residual stream
      }
      return {dx, ctx->needs_input_grad(1) ? dh : at::Tensor(), at::Tensor(), at::Tensor(),
              at::Tensor(), at::Tensor()};
    };
    if (!dy.defined()) {
      // Only h was used: its gradient passes straight to both summands, and the saved h is
      // not unpacked (as in the composite h = input + residual, whose add saves nothing, an
      // in-place change to h after the call is then no error).
      return to_inputs(dh_direct);
    }
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &h = saved[0], &rstd = saved[1], &w = saved[2];
    const auto ns = ctx->saved_data["ns"].toIntVector();
    const double offset = ctx->saved_data["offset"].toDouble();
    const bool want_dw = w.defined() && ctx->needs_input_grad(2);
    at::Tensor dh, dw;
    if (at::GradMode::is_enabled()) {
      std::tie(dh, dw) = rms_backward_composite(dy, h, w, offset,
                                                ctx->saved_data["eps"].toDouble(), ns.size(),
                                                want_dw);
      if (dh_direct.defined()) dh = dh + dh_direct;
    } else {
      // The gradient reaching h directly is added inside the kernel.
      std::tie(dh, dw) = oh::rms_norm_bwd().call(dy, h, rstd, opt(w), ns, offset, opt(dh_direct),
                                           want_dw);
    }
    variable_list out = to_inputs(dh);
    out[3] = grad_or_undef(dw, want_dw);
    return out;
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_autograd(const at::Tensor& input,
                                                         c10::IntArrayRef normalized_shape,
                                                         const std::optional<at::Tensor>& weight,
                                                         double eps, double offset) {
  auto out = RmsNormFn::apply(input, normalized_shape, weight, eps, offset);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_autograd(
    const at::Tensor& input, c10::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  auto out = LayerNormFn::apply(input, normalized_shape, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_add_rms_norm_fwd_autograd(
    const at::Tensor& input, const at::Tensor& residual, c10::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, double eps, double offset) {
  auto out = FusedAddRmsNormFn::apply(input, residual, normalized_shape, weight, eps, offset);
  return {out[0], out[1], out[2]};
}

}  // namespace rmsnorm_ext::autograd_impl
