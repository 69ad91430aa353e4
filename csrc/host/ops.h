// The host function of every op (one per op, for every device), registered in
// csrc/host/register.cpp. Schemas: csrc/ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace rmsnorm_ext::host {

using at::Tensor;

// The kernel calls of the plain norms, shared by their host functions and those of the
// channels-first norms (norm_2d.cpp): the tensors as the kernels read them (contiguous;
// w / b / gres undefined when absent), outputs allocated by the caller, M rows of N
// (`inner`: kernel_params.h). rms_norm.cpp and layer_norm.cpp.
void launch_rms_fwd(const Tensor& x, const Tensor& w, Tensor& y, Tensor& rstd, int64_t M,
                    int64_t N, int64_t inner, double eps, double weight_offset);
void launch_rms_bwd(const Tensor& dy, const Tensor& x, const Tensor& rstd, const Tensor& w,
                    const Tensor& gres, Tensor& dx, Tensor* dw, int64_t M, int64_t N,
                    int64_t inner, double weight_offset);
void launch_ln_fwd(const Tensor& x, const Tensor& w, const Tensor& b, Tensor& y, Tensor& mean,
                   Tensor& rstd, int64_t M, int64_t N, int64_t inner, double eps);
void launch_ln_bwd(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& rstd,
                   const Tensor& w, Tensor& dx, Tensor* dw, Tensor* db, int64_t M, int64_t N,
                   int64_t inner);

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
                                                  bool compute_weight_grad, bool compute_bias_grad);
std::tuple<Tensor, Tensor, Tensor> fused_add_rms_norm_fwd(const Tensor& input,
                                                          const Tensor& residual,
                                                          at::IntArrayRef normalized_shape,
                                                          const std::optional<Tensor>& weight,
                                                          double eps, double weight_offset);
void fused_add_rms_norm_inplace(const Tensor& input, const Tensor& residual,
                                at::IntArrayRef normalized_shape,
                                const std::optional<Tensor>& weight, double eps,
                                double weight_offset);

// Norm + quantize (norm_quant.cpp): (out, scales) and, fused, (out, scales, residual_out).
std::tuple<Tensor, Tensor> rms_norm_quant(const Tensor& input, at::IntArrayRef normalized_shape,
                                          const std::optional<Tensor>& weight, double eps,
                                          double weight_offset, const std::optional<Tensor>& scale,
                                          at::ScalarType quant_dtype,
                                          std::optional<int64_t> group_size,
                                          const std::optional<Tensor>& scale_ub);
std::tuple<Tensor, Tensor, Tensor> fused_add_rms_norm_quant(
    const Tensor& input, const Tensor& residual, at::IntArrayRef normalized_shape,
    const std::optional<Tensor>& weight, double eps, double weight_offset,
    const std::optional<Tensor>& scale, at::ScalarType quant_dtype,
    std::optional<int64_t> group_size, const std::optional<Tensor>& scale_ub);
std::tuple<Tensor, Tensor> layer_norm_quant(const Tensor& input, at::IntArrayRef normalized_shape,
                                            const std::optional<Tensor>& weight,
                                            const std::optional<Tensor>& bias, double eps,
                                            const std::optional<Tensor>& scale,
                                            at::ScalarType quant_dtype,
                                            std::optional<int64_t> group_size,
                                            const std::optional<Tensor>& scale_ub);

// adaLN modulation (norm_modulate.cpp, which also defines their schemas and registers
// them): (y, rstd), (y, mean, rstd), and (dx, dscale, dshift, dweight, dbias).
std::tuple<Tensor, Tensor> rms_norm_modulate_fwd(const Tensor& input,
                                                 at::IntArrayRef normalized_shape,
                                                 const Tensor& scale,
                                                 const std::optional<Tensor>& shift,
                                                 const std::optional<Tensor>& weight, double eps);
std::tuple<Tensor, Tensor, Tensor> layer_norm_modulate_fwd(
    const Tensor& input, at::IntArrayRef normalized_shape, const Tensor& scale,
    const std::optional<Tensor>& shift, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, double eps);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> norm_modulate_bwd(
    const Tensor& grad_out, const Tensor& input, const std::optional<Tensor>& mean,
    const Tensor& rstd, const Tensor& scale, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, at::IntArrayRef normalized_shape,
    bool compute_scale_grad, bool compute_shift_grad, bool compute_weight_grad,
    bool compute_bias_grad);

}  // namespace rmsnorm_ext::host
