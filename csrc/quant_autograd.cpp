// The Autograd kernels of the norm + quantize ops: they are inference only (a quantized
// output has no gradient), so a call that would need a graph -- grad mode on and an input
// that requires grad -- raises instead of silently returning outputs detached from it (or,
// with no Autograd kernel at all, outputs whose backward fails later). Otherwise the call
// goes straight to the device kernel.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
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

}  // namespace

TORCH_LIBRARY_IMPL(rmsnorm_ext, Autograd, m) {
  m.impl("rms_norm_quant", &rms_norm_quant_autograd);
  m.impl("fused_add_rms_norm_quant", &fused_add_rms_norm_quant_autograd);
  m.impl("layer_norm_quant", &layer_norm_quant_autograd);
}
