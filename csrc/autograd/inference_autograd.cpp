// The Autograd kernels of the ops without a gradient: the norm + quantize ops (a quantized
// output has no gradient) and the in-place fused_add_rms_norm_inplace. A call that would
// need a graph -- grad mode on and an input that requires grad -- raises instead of
// silently returning outputs detached from it. The in-place op also gets the
// ADInplaceOrView kernel every torch in-place op has: it bumps the version counters of the
// tensors it writes, so a tensor saved for backward and then overwritten makes that
// backward raise ("modified by an inplace operation") instead of computing wrong gradients.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include "op_handles.h"

#include <initializer_list>
#include <optional>
#include <tuple>

namespace {

using at::Tensor;

bool requires_grad(const Tensor& t) { return t.defined() && t.requires_grad(); }
bool requires_grad(const std::optional<Tensor>& t) { return t.has_value() && requires_grad(*t); }

template <typename... Ts>
void refuse_graph(const char* op, const Ts&... ts) {
  if (!at::GradMode::is_enabled()) return;
  const bool any = (requires_grad(ts) || ...);
  TORCH_CHECK(!any, "rmsnorm_ext: ", op,
              " is inference-only: its quantized output has no gradient. Call it under "
              "torch.no_grad() or torch.inference_mode(), or pass tensors that do not require "
              "grad (.detach())");
}

namespace oh = rmsnorm_ext::op_handles;

std::tuple<Tensor, Tensor> rms_norm_quant_autograd(
    const Tensor& input, c10::IntArrayRef ns, const std::optional<Tensor>& weight, double eps,
    double offset, const std::optional<Tensor>& scale, at::ScalarType q,
    std::optional<int64_t> group_size, const std::optional<Tensor>& scale_ub) {
  refuse_graph("rms_norm_quant", input, weight, scale, scale_ub);
  at::AutoDispatchBelowADInplaceOrView below;
  return oh::rms_norm_quant().call(input, ns, weight, eps, offset, scale, q, group_size, scale_ub);
}

std::tuple<Tensor, Tensor, Tensor> fused_add_rms_norm_quant_autograd(
    const Tensor& input, const Tensor& residual, c10::IntArrayRef ns,
    const std::optional<Tensor>& weight, double eps, double offset,
    const std::optional<Tensor>& scale, at::ScalarType q, std::optional<int64_t> group_size,
    const std::optional<Tensor>& scale_ub) {
  refuse_graph("fused_add_rms_norm_quant", input, residual, weight, scale, scale_ub);
  at::AutoDispatchBelowADInplaceOrView below;
  return oh::fused_add_rms_norm_quant().call(input, residual, ns, weight, eps, offset, scale, q, group_size, scale_ub);
}

std::tuple<Tensor, Tensor> layer_norm_quant_autograd(
    const Tensor& input, c10::IntArrayRef ns, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, double eps, const std::optional<Tensor>& scale,
    at::ScalarType q, std::optional<int64_t> group_size, const std::optional<Tensor>& scale_ub) {
  refuse_graph("layer_norm_quant", input, weight, bias, scale, scale_ub);
  at::AutoDispatchBelowADInplaceOrView below;
  return oh::layer_norm_quant().call(input, ns, weight, bias, eps, scale, q, group_size, scale_ub);
}

void fused_add_rms_norm_inplace_autograd(const Tensor& input, const Tensor& residual,
                                         c10::IntArrayRef ns,
                                         const std::optional<Tensor>& weight, double eps,
                                         double offset) {
  if (at::GradMode::is_enabled()) {
    TORCH_CHECK(!(requires_grad(input) || requires_grad(residual) || requires_grad(weight)),
                "rmsnorm_ext: fused_add_rms_norm_ is in-place and not differentiable; call it "
                "under torch.no_grad()/torch.inference_mode(), or use fused_add_rms_norm");
  }
  at::AutoDispatchBelowAutograd below;  // on to ADInplaceOrView
  oh::fused_add_rms_norm_inplace().call(input, residual, ns, weight, eps, offset);
}

void fused_add_rms_norm_inplace_view(const Tensor& input, const Tensor& residual,
                                     c10::IntArrayRef ns, const std::optional<Tensor>& weight,
                                     double eps, double offset) {
  {
    at::AutoDispatchBelowADInplaceOrView below;
    oh::fused_add_rms_norm_inplace().call(input, residual, ns, weight, eps, offset);
  }
  torch::autograd::impl::bump_version(input);
  torch::autograd::impl::bump_version(residual);
}

}  // namespace

TORCH_LIBRARY_IMPL(rmsnorm_ext, ADInplaceOrView, m) {
  m.impl("fused_add_rms_norm_inplace", &fused_add_rms_norm_inplace_view);
}

TORCH_LIBRARY_IMPL(rmsnorm_ext, Autograd, m) {
  m.impl("fused_add_rms_norm_inplace", &fused_add_rms_norm_inplace_autograd);
  m.impl("rms_norm_quant", &rms_norm_quant_autograd);
  m.impl("fused_add_rms_norm_quant", &fused_add_rms_norm_quant_autograd);
  m.impl("layer_norm_quant", &layer_norm_quant_autograd);
}
