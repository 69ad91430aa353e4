// The CUDA implementations of the six rmsnorm_ext ops (schemas in csrc/ops.cpp) and
// their registration for the CUDA dispatch key: argument checks (csrc/common.h, the same
// as the CPU kernels), contiguity, output / workspace allocation through the caching
// allocator, and the hand-off to the kernel files through kernels_api.h.
//
// Host code only (no kernels), so that the torch headers are compiled once for the whole
// CUDA half, not once per kernel file.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <limits>
#include <vector>

#include "../common.h"
#include "kernels_api.h"

namespace rmsnorm_ext {
namespace cuda {
namespace {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::f32;
    case at::kDouble:
      return DType::f64;
    case at::kBFloat16:
      return DType::bf16;
    case at::kHalf:
      return DType::f16;
    default:
      TORCH_CHECK_TYPE(false, "rmsnorm_ext: unsupported dtype ", t);
  }
}

// SM count per device, cached (queried on every backward launch).
int sm_count(int device) {
  constexpr int kMax = 64;
  static std::atomic<int> cache[kMax] = {};
  if (device >= 0 && device < kMax) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  if (v <= 0) v = 1;
  if (device >= 0 && device < kMax) cache[device].store(v, std::memory_order_relaxed);
  return v;
}

// Workspace buffers from the caching allocator (no cudaMalloc, CUDA-graph safe); they
// stay alive until the op returns, after the kernels that use them are enqueued on the
// current stream, which is what the caching allocator's stream semantics require.
struct WorkspaceHolder {
  at::TensorOptions opts;
  std::vector<Tensor> bufs;
  static void* alloc(void* ctx, size_t bytes) {
    auto* self = static_cast<WorkspaceHolder*>(ctx);
    self->bufs.push_back(at::empty({static_cast<int64_t>(bytes)}, self->opts.dtype(at::kByte)));
    return self->bufs.back().data_ptr();
  }
  Workspace get() { return Workspace{&WorkspaceHolder::alloc, this}; }
};

at::TensorOptions stats_options(const Tensor& input) {
  return input.options().dtype(stats_dtype(input.scalar_type()));
}

// Statistics when there is nothing to launch for: no rows (an empty tensor), or rows of
// length 0, whose mean is 0/0 = NaN (as torch.mean and the CPU kernels give).
Tensor empty_row_stats(const Tensor& input, at::IntArrayRef normalized_shape) {
  return at::full(stats_shape(input, normalized_shape), std::numeric_limits<double>::quiet_NaN(),
                  stats_options(input));
}

template <typename T>
const void* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr() : nullptr;
}


void run_fused(const Tensor& x, const Tensor& r, const Tensor& w, const Tensor& y,
               const Tensor& h, const Tensor& rstd, RowShape rs, double eps, double offset) {
  RmsFwdParams p{};
  p.t = to_dtype(x.scalar_type());
  p.w = w.defined() ? to_dtype(w.scalar_type()) : p.t;
  p.r = to_dtype(r.scalar_type());
  p.x = x.const_data_ptr();
  p.r_in = r.const_data_ptr();
  p.weight = ptr_or_null<void>(w);
  p.y = y.data_ptr();
  p.h = h.data_ptr();
  p.rstd = rstd.data_ptr();
  p.M = rs.M;
  p.N = rs.N;
  p.eps = eps;
  p.offset = offset;
  C10_CUDA_CHECK(fused_add_rms_fwd(p, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

std::tuple<Tensor, Tensor> rms_norm_fwd(const Tensor& input, at::IntArrayRef normalized_shape,
                                        const std::optional<Tensor>& weight, double eps,
                                        double weight_offset) {
  check_input(input, "input");
  const RowShape rs = check_normalized_shape(input, normalized_shape);
  check_param(weight, "weight", input, normalized_shape);
  check_eps(eps);
  check_offset(weight_offset);

  const c10::cuda::CUDAGuard guard(input.device());
  const auto sshape = stats_shape(input, normalized_shape);
  Tensor y = at::empty(input.sizes(), input.options());
  if (rs.M == 0 || rs.N == 0) return {y, empty_row_stats(input, normalized_shape)};
  Tensor rstd = at::empty(sshape, stats_options(input));
  const Tensor x = input.contiguous();
  const Tensor w = contiguous_or_empty(weight);

  RmsFwdParams p{};
  p.t = to_dtype(x.scalar_type());
  p.w = w.defined() ? to_dtype(w.scalar_type()) : p.t;
  p.r = p.t;
  p.x = x.const_data_ptr();
  p.weight = ptr_or_null<void>(w);
  p.y = y.data_ptr();
  p.rstd = rstd.data_ptr();
  p.M = rs.M;
  p.N = rs.N;
  p.eps = eps;
  p.offset = weight_offset;
  C10_CUDA_CHECK(cuda::rms_fwd(p, c10::cuda::getCurrentCUDAStream()));
  return {y, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& grad_out, const Tensor& input,
                                        const Tensor& rstd, const std::optional<Tensor>& weight,
                                        at::IntArrayRef normalized_shape, double weight_offset,
                                        const std::optional<Tensor>& grad_residual,
                                        bool compute_weight_grad) {
  check_input(input, "input");
  const RowShape rs = check_normalized_shape(input, normalized_shape);
  check_grad(grad_out, input);
  check_stats(rstd, "rstd", input, rs.M);
  // The weight goes with the normalized output, whose dtype is grad_out's (it differs from
  // the input's for the fp32 residual stream of fused_add_rms_norm).
  check_param(weight, "weight", grad_out, normalized_shape);
  check_offset(weight_offset);
  const Tensor gres = contiguous_or_empty(grad_residual);
  if (gres.defined()) {
    TORCH_CHECK_VALUE(gres.sizes().equals(input.sizes()), "rmsnorm_ext: grad_residual shape ",
                      gres.sizes(), " does not match the input shape ", input.sizes());
    check_same_device(gres, "grad_residual", input, "the input");
    TORCH_CHECK_TYPE(gres.scalar_type() == input.scalar_type(),
                     "rmsnorm_ext: grad_residual dtype ", gres.scalar_type(),
                     " must match the input dtype ", input.scalar_type());
  }

  const c10::cuda::CUDAGuard guard(input.device());
  const Tensor w = contiguous_or_empty(weight);
  const bool want_dw = compute_weight_grad && w.defined();
  Tensor dx = at::empty(input.sizes(), input.options());
  if (rs.M == 0 || rs.N == 0) {
    Tensor dw = want_dw ? at::zeros(normalized_shape, w.options()) : empty_grad(input);
    return {dx, dw};
  }
  Tensor dw = want_dw ? at::empty(normalized_shape, w.options()) : empty_grad(input);
  const Tensor x = input.contiguous();
  const Tensor dy = grad_out.contiguous();
  const Tensor rs_c = rstd.contiguous();

  RmsBwdParams p{};
  p.x = to_dtype(x.scalar_type());
  p.g = to_dtype(dy.scalar_type());
  p.w = w.defined() ? to_dtype(w.scalar_type()) : p.g;
  p.x_in = x.const_data_ptr();
  p.dy = dy.const_data_ptr();
  p.rstd = rs_c.const_data_ptr();
  p.weight = ptr_or_null<void>(w);
  p.gres = ptr_or_null<void>(gres);
  p.dx = dx.data_ptr();
  p.dw = want_dw ? dw.data_ptr() : nullptr;
  p.M = rs.M;
  p.N = rs.N;
  p.offset = weight_offset;
  p.sm_count = sm_count(input.get_device());
  WorkspaceHolder ws{input.options(), {}};
  C10_CUDA_CHECK(cuda::rms_bwd(p, ws.get(), c10::cuda::getCurrentCUDAStream()));
  return {dx, dw};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& input,
                                                  at::IntArrayRef normalized_shape,
                                                  const std::optional<Tensor>& weight,
                                                  const std::optional<Tensor>& bias,
                                                  double eps) {
  check_input(input, "input");
  const RowShape rs = check_normalized_shape(input, normalized_shape);
  check_param(weight, "weight", input, normalized_shape);
  check_param(bias, "bias", input, normalized_shape);
  check_eps(eps);
  const Tensor w = contiguous_or_empty(weight);
  const Tensor b = contiguous_or_empty(bias);
  TORCH_CHECK_TYPE(!w.defined() || !b.defined() || w.scalar_type() == b.scalar_type(),
                   "rmsnorm_ext: weight dtype ", w.defined() ? w.scalar_type() : at::kFloat,
                   " and bias dtype ", b.defined() ? b.scalar_type() : at::kFloat,
                   " must match");

  const c10::cuda::CUDAGuard guard(input.device());
  const auto sshape = stats_shape(input, normalized_shape);
  Tensor y = at::empty(input.sizes(), input.options());
  if (rs.M == 0 || rs.N == 0) {
    return {y, empty_row_stats(input, normalized_shape), empty_row_stats(input, normalized_shape)};
  }
  Tensor mean = at::empty(sshape, stats_options(input));
  Tensor rstd = at::empty(sshape, stats_options(input));
  const Tensor x = input.contiguous();

  LnFwdParams p{};
  p.t = to_dtype(x.scalar_type());
  p.w = to_dtype(param_dtype(x, w, b));
  p.x = x.const_data_ptr();
  p.weight = ptr_or_null<void>(w);
  p.bias = ptr_or_null<void>(b);
  p.y = y.data_ptr();
  p.mean = mean.data_ptr();
  p.rstd = rstd.data_ptr();
  p.M = rs.M;
  p.N = rs.N;
  p.eps = eps;
  C10_CUDA_CHECK(cuda::ln_fwd(p, c10::cuda::getCurrentCUDAStream()));
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& grad_out, const Tensor& input,
                                                  const Tensor& mean, const Tensor& rstd,
                                                  const std::optional<Tensor>& weight,
                                                  at::IntArrayRef normalized_shape,
                                                  bool compute_weight_grad,
                                                  bool compute_bias_grad) {
  check_input(input, "input");
  const RowShape rs = check_normalized_shape(input, normalized_shape);
  check_ln_grad(grad_out, input);
  check_stats(mean, "mean", input, rs.M);
  check_stats(rstd, "rstd", input, rs.M);
  check_param(weight, "weight", input, normalized_shape);

  const c10::cuda::CUDAGuard guard(input.device());
  const Tensor w = contiguous_or_empty(weight);
  const bool want_dw = compute_weight_grad && w.defined();
  const bool want_db = compute_bias_grad;
  // dbias takes the parameter dtype: the weight's, or the input's without a weight.
  const auto popts = w.defined() ? w.options() : input.options();
  Tensor dx = at::empty(input.sizes(), input.options());
  if (rs.M == 0 || rs.N == 0) {
    return {dx, want_dw ? at::zeros(normalized_shape, popts) : empty_grad(input),
            want_db ? at::zeros(normalized_shape, popts) : empty_grad(input)};
  }
  Tensor dw = want_dw ? at::empty(normalized_shape, popts) : empty_grad(input);
  Tensor db = want_db ? at::empty(normalized_shape, popts) : empty_grad(input);
  const Tensor x = input.contiguous();
  const Tensor dy = grad_out.contiguous();
  const Tensor mean_c = mean.contiguous();
  const Tensor rstd_c = rstd.contiguous();

  LnBwdParams p{};
  p.t = to_dtype(x.scalar_type());
  p.w = w.defined() ? to_dtype(w.scalar_type()) : p.t;
  p.x = x.const_data_ptr();
  p.dy = dy.const_data_ptr();
  p.mean = mean_c.const_data_ptr();
  p.rstd = rstd_c.const_data_ptr();
  p.weight = ptr_or_null<void>(w);
  p.dx = dx.data_ptr();
  p.dw = want_dw ? dw.data_ptr() : nullptr;
  p.db = want_db ? db.data_ptr() : nullptr;
  p.M = rs.M;
  p.N = rs.N;
  p.sm_count = sm_count(input.get_device());
  WorkspaceHolder ws{input.options(), {}};
  C10_CUDA_CHECK(cuda::ln_bwd(p, ws.get(), c10::cuda::getCurrentCUDAStream()));
  return {dx, dw, db};
}

std::tuple<Tensor, Tensor, Tensor> fused_add_rms_norm_fwd(const Tensor& input,
                                                          const Tensor& residual,
                                                          at::IntArrayRef normalized_shape,
                                                          const std::optional<Tensor>& weight,
                                                          double eps, double weight_offset) {
  const RowShape rs = check_fused(input, residual, normalized_shape, weight, eps, weight_offset);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto sshape = stats_shape(input, normalized_shape);
  Tensor y = at::empty(input.sizes(), input.options());
  Tensor h = at::empty(residual.sizes(), residual.options());
  if (rs.M == 0 || rs.N == 0) return {y, h, empty_row_stats(input, normalized_shape)};
  Tensor rstd = at::empty(sshape, stats_options(input));
  run_fused(input.contiguous(), residual.contiguous(), contiguous_or_empty(weight), y, h, rstd,
            rs, eps, weight_offset);
  return {y, h, rstd};
}

void fused_add_rms_norm_inplace(const Tensor& input, const Tensor& residual,
                                at::IntArrayRef normalized_shape,
                                const std::optional<Tensor>& weight, double eps,
                                double weight_offset) {
  const RowShape rs = check_fused(input, residual, normalized_shape, weight, eps, weight_offset);
  // Each element is written once from the same element of both inputs: only well
  // defined when neither tensor overlaps itself or the other.
  at::assert_no_internal_overlap(input);
  at::assert_no_internal_overlap(residual);
  at::assert_no_overlap(input, residual);
  if (rs.M == 0 || rs.N == 0) return;
  const c10::cuda::CUDAGuard guard(input.device());
  // Contiguous operands are updated in place (the kernels read and write each element
  // from the same thread); others go through contiguous copies that are copied back.
  const Tensor x = input.contiguous();
  const Tensor r = residual.contiguous();
  Tensor rstd = at::empty({rs.M}, stats_options(input));
  run_fused(x, r, contiguous_or_empty(weight), x, r, rstd, rs, eps, weight_offset);
  if (!x.is_same(input)) const_cast<Tensor&>(input).copy_(x);
  if (!r.is_same(residual)) const_cast<Tensor&>(residual).copy_(r);
}

}  // namespace cuda
}  // namespace rmsnorm_ext

TORCH_LIBRARY_IMPL(rmsnorm_ext, CUDA, m) {
  m.impl("rms_norm_fwd", &rmsnorm_ext::cuda::rms_norm_fwd);
  m.impl("rms_norm_bwd", &rmsnorm_ext::cuda::rms_norm_bwd);
  m.impl("layer_norm_fwd", &rmsnorm_ext::cuda::layer_norm_fwd);
  m.impl("layer_norm_bwd", &rmsnorm_ext::cuda::layer_norm_bwd);
  m.impl("fused_add_rms_norm_fwd", &rmsnorm_ext::cuda::fused_add_rms_norm_fwd);
  m.impl("fused_add_rms_norm_inplace", &rmsnorm_ext::cuda::fused_add_rms_norm_inplace);
}
