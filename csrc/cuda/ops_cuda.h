// The CUDA implementations of the rmsnorm_ext ops (schemas in csrc/ops.cpp). Each is
// defined in its own .cu file and registered for the CUDA dispatch key in
// register_cuda.cu. Same argument checks and results as the CPU implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <tuple>

namespace rmsnorm_ext {
namespace cuda {

using at::Tensor;

std::tuple<Tensor, Tensor> rms_norm_fwd(const Tensor& input, at::IntArrayRef normalized_shape,
                                        const std::optional<Tensor>& weight, double eps,
                                        double weight_offset);

std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& grad_out, const Tensor& input,
                                        const Tensor& rstd, const std::optional<Tensor>& weight,
                                        at::IntArrayRef normalized_shape, double weight_offset,
                                        const std::optional<Tensor>& grad_residual,
                                        bool compute_weight_grad);

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& input,
                                                  at::IntArrayRef normalized_shape,
                                                  const std::optional<Tensor>& weight,
                                                  const std::optional<Tensor>& bias, double eps);

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& grad_out, const Tensor& input,
                                                  const Tensor& mean, const Tensor& rstd,
                                                  const std::optional<Tensor>& weight,
                                                  at::IntArrayRef normalized_shape,
                                                  bool compute_weight_grad,
                                                  bool compute_bias_grad);

std::tuple<Tensor, Tensor, Tensor> fused_add_rms_norm_fwd(const Tensor& input,
                                                          const Tensor& residual,
                                                          at::IntArrayRef normalized_shape,
                                                          const std::optional<Tensor>& weight,
                                                          double eps, double weight_offset);

void fused_add_rms_norm_inplace(const Tensor& input, const Tensor& residual,
                                at::IntArrayRef normalized_shape,
                                const std::optional<Tensor>& weight, double eps,
                                double weight_offset);

}  // namespace cuda
}  // namespace rmsnorm_ext
