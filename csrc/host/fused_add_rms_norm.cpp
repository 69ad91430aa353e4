// Host functions of fused_add_rms_norm_fwd and its in-place variant, for every device.
#include "host.h"
#include "register.h"

namespace rmsnorm_ext::host {
namespace {

// x/y may be the same tensor and r/h too (the in-place variant): the kernels read each
// element before writing it, from the same thread.
void run_fused(const Tensor& x, const Tensor& r, const Tensor& w, const Tensor& y,
               const Tensor& h, const Tensor& rstd, RowShape rs, double eps, double offset) {
  RmsFwdParams p{};
  p.t = to_dtype(x.scalar_type());
  p.w = w.defined() ? to_dtype(w.scalar_type()) : p.t;
  p.r = to_dtype(r.scalar_type());
  p.x = x.const_data_ptr();
  p.r_in = r.const_data_ptr();
  p.weight = ptr_or_null(w);
  p.y = y.data_ptr();
  p.h = h.data_ptr();
  p.rstd = rstd.data_ptr();
  p.M = rs.rows();
  p.N = rs.N;
  p.eps = eps;
  p.offset = offset;
  WorkspaceHolder ws(x);
  run_kernel<FusedAddRmsFwd>(p, x, ws);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> fused_add_rms_norm_fwd(const Tensor& input,
                                                          const Tensor& residual,
                                                          at::IntArrayRef normalized_shape,
                                                          const std::optional<Tensor>& weight,
                                                          double eps, double weight_offset) {
  const RowShape rs = check_fused(input, residual, normalized_shape, weight, eps, weight_offset);
  Tensor y = new_like(input);
  Tensor h = new_like(residual);
  Tensor rstd = new_row_stats(input, normalized_shape);
  if (shapes_only(input)) return {y, h, rstd};
  if (rs.empty()) {
    fill_nan(rstd);
    return {y, h, rstd};
  }
  run_fused(input.contiguous(), residual.contiguous(), contiguous_or_empty(weight), y, h, rstd,
            rs, eps, weight_offset);
  return {y, h, rstd};
}

void fused_add_rms_norm_inplace(const Tensor& input, const Tensor& residual,
                                at::IntArrayRef normalized_shape,
                                const std::optional<Tensor>& weight, double eps,
                                double weight_offset) {
  const RowShape rs = check_fused(input, residual, normalized_shape, weight, eps, weight_offset);
  check_inplace_operands(input, "input", residual, "residual", "fused_add_rms_norm_");
  if (shapes_only(input) || rs.empty()) return;
  // Contiguous operands are updated in place; others go through contiguous copies that
  // are copied back.
  const Tensor x = input.contiguous();
  const Tensor r = residual.contiguous();
  Tensor rstd = at::empty({rs.rows()}, stats_options(input));
  run_fused(x, r, contiguous_or_empty(weight), x, r, rstd, rs, eps, weight_offset);
  if (!x.is_same(input)) const_cast<Tensor&>(input).copy_(x);
  if (!r.is_same(residual)) const_cast<Tensor&>(residual).copy_(r);
}

}  // namespace rmsnorm_ext::host

TORCH_LIBRARY_FRAGMENT(rmsnorm_ext, m) {
  // h = input + residual (in residual's dtype), y = rms_norm(h) (in input's dtype).
  // Returns (y, h, rstd). residual may be float32 while input is bfloat16/float16.
  m.def(
      "fused_add_rms_norm_fwd(Tensor input, Tensor residual, int[] normalized_shape, "
      "Tensor? weight, float eps, float weight_offset) -> (Tensor, Tensor, Tensor)");
  // In-place inference variant: residual <- input + residual, input <- rms_norm(residual).
  m.def(
      "fused_add_rms_norm_inplace(Tensor(a!) input, Tensor(b!) residual, int[] normalized_shape, "
      "Tensor? weight, float eps, float weight_offset) -> ()");
}

namespace {

void register_fused_add_rms_norm(torch::Library& m) {
  m.impl("fused_add_rms_norm_fwd", &rmsnorm_ext::host::fused_add_rms_norm_fwd);
  m.impl("fused_add_rms_norm_inplace", &rmsnorm_ext::host::fused_add_rms_norm_inplace);
}

}  // namespace

RMSNORM_EXT_REGISTER_HOST(register_fused_add_rms_norm)
