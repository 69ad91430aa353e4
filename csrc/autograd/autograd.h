// The C++ autograd nodes of the eager fast path (csrc/autograd/autograd.cpp): each records one node
// whose first-order backward is the op's fused *_bwd kernel. Called only by
// csrc/python/python_fast.cpp, for plain calls that need a graph.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace rmsnorm_ext::autograd_impl {

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_autograd(const at::Tensor& input,
                                                         c10::IntArrayRef normalized_shape,
                                                         const std::optional<at::Tensor>& weight,
                                                         double eps, double offset);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_autograd(
    const at::Tensor& input, c10::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_add_rms_norm_fwd_autograd(
    const at::Tensor& input, const at::Tensor& residual, c10::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, double eps, double offset);

}  // namespace rmsnorm_ext::autograd_impl
