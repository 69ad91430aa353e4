// The plain norms' kernel calls, shared by their host functions (rms_norm.cpp,
// layer_norm.cpp) and those of the channels-first norms (norm_2d.cpp). Every op's host
// function is defined, with its schema, and registered in its own file (csrc/host/<op>.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace rmsnorm_ext::host {

using at::Tensor;

// The tensors as the kernels read them (contiguous;
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

}  // namespace rmsnorm_ext::host
