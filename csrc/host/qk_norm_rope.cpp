// Fused QK-norm + RoPE (Qwen3, Gemma 3, GLM): per-head RMSNorm of q and k, then the rotary
// embedding. Its schemas, its host functions for every device, and their registration.
//
// q [..., S, Hq, D] and k [..., S, Hk, D] (Hugging Face's layout before its transpose to
// [B, H, S, D]; the same leading dims and S), D even; q_weight / k_weight [D] or None
// (ones); cos, sin [S, D] or [B, S, D] with B the product of the leading dims (Hugging
// Face's rotary embedding output). Each head vector v is normalized, u = v * rstd * w with
// rstd = 1 / sqrt(mean(v^2) + eps), then rotated; every output element uses the cos/sin
// entries of its own index e:
//   interleaved = false (rotate-half; Llama, Qwen, NeoX): pairs (j, j + D/2), j < D/2,
//     out = u * cos + rotate_half(u) * sin,  rotate_half(u) = cat(-u[D/2:], u[:D/2])
//   interleaved = true (GPT-J): pairs (2i, 2i + 1),
//     out[2i] = u[2i] * cos[2i] - u[2i+1] * sin[2i]
//     out[2i+1] = u[2i+1] * cos[2i+1] + u[2i] * sin[2i+1]
// (with Hugging Face's tables, which repeat each frequency in both halves -- or in both
// elements of a pair for GPT-J -- these are the usual formulas.) The statistics q_rstd
// [..., S, Hq] and k_rstd [..., S, Hk] are float32 (float64 for float64 q/k).
//
// The backward gives no gradient to cos and sin (they are position tables, not trained).
#include <torch/library.h>

#include "host.h"

namespace rmsnorm_ext::host {
namespace {

// t.shape[:-1]: the statistics' shape (one value per head row).
std::vector<c10::SymInt> head_stats_shape(const Tensor& t) {
  auto sizes = t.sym_sizes();
  return std::vector<c10::SymInt>(sizes.begin(), sizes.end() - 1);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> qk_norm_rope_fwd(
    const Tensor& q, const Tensor& k, const std::optional<Tensor>& q_weight,
    const std::optional<Tensor>& k_weight, const Tensor& cos, const Tensor& sin, double eps,
    bool interleaved) {
  bool cs_per_batch = false;
  const QkShape s = check_qk_norm_rope(q, k, q_weight, k_weight, cos, sin, &cs_per_batch);
  check_eps(eps);

  Tensor q_out = new_like(q);
  Tensor k_out = new_like(k);
  Tensor q_rstd = at::empty_symint(head_stats_shape(q), stats_options(q));
  Tensor k_rstd = at::empty_symint(head_stats_shape(k), stats_options(k));
  if (shapes_only(q)) return {q_out, k_out, q_rstd, k_rstd};
  if (s.empty()) {
    // Rows of no elements have mean 0/0 = NaN (as rms_norm_fwd gives); no rows: nothing.
    if (s.D == 0) {
      fill_nan(q_rstd);
      fill_nan(k_rstd);
    }
    return {q_out, k_out, q_rstd, k_rstd};
  }
  const Tensor qc = q.contiguous();
  const Tensor kc = k.contiguous();
  const Tensor wq = contiguous_or_empty(q_weight);
  const Tensor wk = contiguous_or_empty(k_weight);
  const Tensor cc = cos.contiguous();
  const Tensor sc = sin.contiguous();

  QkNormRopeFwdParams p{};
  p.t = to_dtype(qc.scalar_type());
  p.cs = to_dtype(cc.scalar_type());
  p.wq = wq.defined() ? to_dtype(wq.scalar_type()) : p.t;
  p.wk = wk.defined() ? to_dtype(wk.scalar_type()) : p.t;
  p.interleaved = interleaved;
  p.cs_per_batch = cs_per_batch;
  p.q = qc.const_data_ptr();
  p.k = kc.const_data_ptr();
  p.q_weight = ptr_or_null(wq);
  p.k_weight = ptr_or_null(wk);
  p.cos = cc.const_data_ptr();
  p.sin = sc.const_data_ptr();
  p.q_out = q_out.data_ptr();
  p.k_out = k_out.data_ptr();
  p.q_rstd = q_rstd.data_ptr();
  p.k_rstd = k_rstd.data_ptr();
  p.P = s.positions();
  p.S = s.S.expect_int();
  p.Hq = s.Hq.expect_int();
  p.Hk = s.Hk.expect_int();
  p.D = s.D;
  p.eps = eps;
  WorkspaceHolder ws(qc);
  kernels_for(qc).qk_norm_rope_fwd(p, ws.launch(qc));
  return {q_out, k_out, q_rstd, k_rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> qk_norm_rope_bwd(
    const Tensor& grad_q, const Tensor& grad_k, const Tensor& q, const Tensor& k,
    const std::optional<Tensor>& q_weight, const std::optional<Tensor>& k_weight,
    const Tensor& cos, const Tensor& sin, const Tensor& q_rstd, const Tensor& k_rstd,
    bool interleaved, bool compute_weight_grad) {
  bool cs_per_batch = false;
  const QkShape s = check_qk_norm_rope(q, k, q_weight, k_weight, cos, sin, &cs_per_batch);
  check_qk_grad(grad_q, "grad_q", q, "q");
  check_qk_grad(grad_k, "grad_k", k, "k");
  check_stats(q_rstd, "q_rstd", q, s.B * s.S * s.Hq);
  check_stats(k_rstd, "k_rstd", k, s.B * s.S * s.Hk);

  const Tensor wq = contiguous_or_empty(q_weight);
  const Tensor wk = contiguous_or_empty(k_weight);
  const bool want_dwq = compute_weight_grad && wq.defined();
  const bool want_dwk = compute_weight_grad && wk.defined();
  Tensor dq = new_like(q);
  Tensor dk = new_like(k);
  Tensor dwq = want_dwq ? at::empty({s.D}, wq.options()) : empty_grad(q);
  Tensor dwk = want_dwk ? at::empty({s.D}, wk.options()) : empty_grad(q);
  if (shapes_only(q)) return {dq, dk, dwq, dwk};
  if (s.empty()) {
    if (want_dwq) dwq.zero_();
    if (want_dwk) dwk.zero_();
    return {dq, dk, dwq, dwk};
  }
  const Tensor qc = q.contiguous();
  const Tensor kc = k.contiguous();
  const Tensor gq = grad_q.contiguous();
  const Tensor gk = grad_k.contiguous();
  const Tensor cc = cos.contiguous();
  const Tensor sc = sin.contiguous();
  const Tensor rq = q_rstd.contiguous();
  const Tensor rk = k_rstd.contiguous();

  QkNormRopeBwdParams p{};
  p.t = to_dtype(qc.scalar_type());
  p.cs = to_dtype(cc.scalar_type());
  p.wq = wq.defined() ? to_dtype(wq.scalar_type()) : p.t;
  p.wk = wk.defined() ? to_dtype(wk.scalar_type()) : p.t;
  p.interleaved = interleaved;
  p.cs_per_batch = cs_per_batch;
  p.dq_out = gq.const_data_ptr();
  p.dk_out = gk.const_data_ptr();
  p.q = qc.const_data_ptr();
  p.k = kc.const_data_ptr();
  p.q_weight = ptr_or_null(wq);
  p.k_weight = ptr_or_null(wk);
  p.cos = cc.const_data_ptr();
  p.sin = sc.const_data_ptr();
  p.q_rstd = rq.const_data_ptr();
  p.k_rstd = rk.const_data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dwq = want_dwq ? dwq.data_ptr() : nullptr;
  p.dwk = want_dwk ? dwk.data_ptr() : nullptr;
  p.P = s.positions();
  p.S = s.S.expect_int();
  p.Hq = s.Hq.expect_int();
  p.Hk = s.Hk.expect_int();
  p.D = s.D;
  WorkspaceHolder ws(qc);
  kernels_for(qc).qk_norm_rope_bwd(p, ws.launch(qc));
  return {dq, dk, dwq, dwk};
}

}  // namespace rmsnorm_ext::host

TORCH_LIBRARY_FRAGMENT(rmsnorm_ext, m) {
  // Fused QK-norm + RoPE. q [..., S, Hq, D], k [..., S, Hk, D] (same leading dims and S, D
  // even, same dtype); q_weight / k_weight [D] or None; cos, sin [S, D] or [B, S, D]
  // (B = prod of the leading dims). Returns (q_out, k_out, q_rstd [..., S, Hq],
  // k_rstd [..., S, Hk]); rstd float32 (float64 for float64 q/k).
  m.def(
      "qk_norm_rope_fwd(Tensor q, Tensor k, Tensor? q_weight, Tensor? k_weight, Tensor cos, "
      "Tensor sin, float eps, bool interleaved) -> (Tensor, Tensor, Tensor, Tensor)");
  // Returns (grad_q, grad_k, grad_q_weight, grad_k_weight); a weight gradient is an empty
  // tensor when compute_weight_grad is false or that weight is None. No gradient for cos
  // and sin.
  m.def(
      "qk_norm_rope_bwd(Tensor grad_q, Tensor grad_k, Tensor q, Tensor k, Tensor? q_weight, "
      "Tensor? k_weight, Tensor cos, Tensor sin, Tensor q_rstd, Tensor k_rstd, "
      "bool interleaved, bool compute_weight_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}

namespace {

void register_qk_norm_rope(torch::Library& m) {
  m.impl("qk_norm_rope_fwd", &rmsnorm_ext::host::qk_norm_rope_fwd);
  m.impl("qk_norm_rope_bwd", &rmsnorm_ext::host::qk_norm_rope_bwd);
}

}  // namespace

TORCH_LIBRARY_IMPL(rmsnorm_ext, CPU, m) { register_qk_norm_rope(m); }
TORCH_LIBRARY_IMPL(rmsnorm_ext, Meta, m) { register_qk_norm_rope(m); }
#ifdef RMSNORM_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(rmsnorm_ext, CUDA, m) { register_qk_norm_rope(m); }
#endif
