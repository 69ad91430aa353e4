// Fused QK-norm + RoPE (Qwen3, Gemma 3, GLM): per-head RMSNorm of q and k, then the rotary
// embedding. Its schemas, its host functions for every device, and their registration.
//
// q [..., S, Hq, D] and k [..., S, Hk, D] (Hugging Face's layout before its transpose to
// [B, H, S, D]; the same leading dims and S), D even; q_weight / k_weight [D] or None
// (ones); cos, sin [S, D], [1, S, D] or [B, S, D] with B the product of the leading dims
// (Hugging Face's rotary embedding output: [1, S, D] for the default position ids). Each
// head vector v is normalized, u = v * rstd * w with rstd = 1 / sqrt(mean(v^2) + eps), then
// rotated; every output element uses the cos/sin entries of its own index e:
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

#include "host.h"
#include "register.h"

namespace rmsnorm_ext::host {
namespace {

// The argument checks (the one set of rules for every device, meta included).

// q [..., S, Hq, D] and k [..., S, Hk, D] as head rows: B positions-batches (the product of
// the leading dims), S positions, Hq / Hk heads of D elements. B, S and the head counts may
// be symbolic on fake tensors; D is read as a concrete int (a head dimension is static).
struct QkShape {
  c10::SymInt B;
  c10::SymInt S;
  c10::SymInt Hq;
  c10::SymInt Hk;
  int64_t D;
  // Real tensors only (after the host function's meta early return).
  int64_t positions() const { return (B * S).expect_int(); }
  bool empty() const { return D == 0 || B == 0 || S == 0 || (Hq == 0 && Hk == 0); }
};

// q or k: [..., S, H, D].
inline void check_qk_rank(const Tensor& t, const char* name, const char* heads) {
  TORCH_CHECK_VALUE(t.dim() >= 3, "rmsnorm_ext: ", name, " must have shape [..., S, ", heads,
                    ", D] (at least 3 dimensions), got ", t.sym_sizes());
}

// q and k: supported float dtype (the same), one device, shapes [..., S, Hq, D] and
// [..., S, Hk, D] with the same leading dims, S and D, D even. Returns the shape.
inline QkShape check_qk(const Tensor& q, const Tensor& k) {
  check_input(q, "q");
  check_input(k, "k");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "rmsnorm_ext: k dtype ",
                   py_dtype(k.scalar_type()), " must match the q dtype ",
                   py_dtype(q.scalar_type()));
  check_same_device(k, "k", q, "q");
  check_qk_rank(q, "q", "Hq");
  check_qk_rank(k, "k", "Hk");
  const auto qs = q.sym_sizes();
  const auto ks = k.sym_sizes();
  TORCH_CHECK_VALUE(q.dim() == k.dim() && qs.slice(0, q.dim() - 2).equals(ks.slice(0, k.dim() - 2)),
                    "rmsnorm_ext: q and k must have the same leading dimensions and sequence "
                    "length (shape[:-2]), got q shape ", qs, " and k shape ", ks);
  TORCH_CHECK_VALUE(qs[q.dim() - 1] == ks[k.dim() - 1],
                    "rmsnorm_ext: q and k must have the same head dimension D (shape[-1]), got "
                    "q shape ", qs, " and k shape ", ks);
  const int64_t D = qs[q.dim() - 1].guard_int(__FILE__, __LINE__);
  TORCH_CHECK_VALUE(D % 2 == 0, "rmsnorm_ext: the head dimension D must be even for the "
                    "rotary embedding, got D = ", D);
  c10::SymInt B = 1;
  for (int64_t d = 0; d < q.dim() - 3; ++d) B *= qs[d];
  return {B, qs[q.dim() - 3], qs[q.dim() - 2], ks[k.dim() - 2], D};
}

// q_weight / k_weight: shape [D], the device of q, dtype q's or float32 next to a
// bfloat16/float16 q.
inline void check_head_param(const std::optional<Tensor>& p, const char* name, const Tensor& q,
                             int64_t D) {
  if (!p.has_value() || !p->defined()) return;
  const Tensor& t = *p;
  TORCH_CHECK_VALUE(t.dim() == 1 && t.sym_size(0) == D, "rmsnorm_ext: ", name,
                    " must have shape [D] = [", D, "], got ", t.sym_sizes());
  check_same_device(t, name, q, "q");
  const auto wt = t.scalar_type();
  const auto it = q.scalar_type();
  TORCH_CHECK_TYPE(same_or_fp32_beside_reduced(wt, it), "rmsnorm_ext: ", name,
                   " dtype ", py_dtype(wt), " is not supported with q dtype ", py_dtype(it),
                   " (use q's dtype, or float32 with a bfloat16/float16 q)");
}

// cos and sin: [S, D] or [1, S, D] (shared by the batch: the same memory) or [B, S, D], the
// device of q, dtype q's or float32 next to a bfloat16/float16 q, sin like cos. Returns
// whether they are per batch item ([B, S, D] with B != 1).
inline bool check_rope_tables(const Tensor& cos, const Tensor& sin, const Tensor& q,
                              const QkShape& s) {
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&cos, "cos"}, {&sin, "sin"}}) {
    const auto sz = t->sym_sizes();
    const bool ok = (t->dim() == 2 && sz[0] == s.S && sz[1] == s.D) ||
                    (t->dim() == 3 && (sz[0] == s.B || sz[0] == 1) && sz[1] == s.S &&
                     sz[2] == s.D);
    TORCH_CHECK_VALUE(ok, "rmsnorm_ext: ", name, " must have shape [S, D] = [", s.S, ", ", s.D,
                      "], [1, S, D] or [B, S, D] = [", s.B, ", ", s.S, ", ", s.D,
                      "] (B: the product of q's leading dims), got ", sz);
    check_same_device(*t, name, q, "q");
    TORCH_CHECK_TYPE(is_supported_float(t->scalar_type()), "rmsnorm_ext: ", name,
                     " must be float32, float64, bfloat16 or float16, got ",
                     py_dtype(t->scalar_type()));
  }
  TORCH_CHECK_VALUE(sin.dim() == cos.dim(), "rmsnorm_ext: sin shape ", sin.sym_sizes(),
                    " must match the cos shape ", cos.sym_sizes());
  const auto ct = cos.scalar_type();
  const auto it = q.scalar_type();
  TORCH_CHECK_TYPE(sin.scalar_type() == ct, "rmsnorm_ext: sin dtype ", py_dtype(sin.scalar_type()),
                   " must match the cos dtype ", py_dtype(ct));
  TORCH_CHECK_TYPE(same_or_fp32_beside_reduced(ct, it),
                   "rmsnorm_ext: cos/sin dtype ", py_dtype(ct), " is not supported with q dtype ",
                   py_dtype(it), " (use q's dtype, or float32 with a bfloat16/float16 q)");
  TORCH_CHECK_VALUE(sin.dim() == 2 || sin.sym_sizes()[0] == cos.sym_sizes()[0],
                    "rmsnorm_ext: sin shape ", sin.sym_sizes(), " must match the cos shape ",
                    cos.sym_sizes());
  return cos.dim() == 3 && cos.sym_sizes()[0] != 1;
}

// The gradient of q_out (k_out): q's (k's) shape, device and dtype.
inline void check_qk_grad(const Tensor& g, const char* gname, const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(g.sym_sizes().equals(t.sym_sizes()), "rmsnorm_ext: ", gname, " shape ",
                    g.sym_sizes(), " does not match the ", name, " shape ", t.sym_sizes());
  check_same_device(g, gname, t, name);
  TORCH_CHECK_TYPE(g.scalar_type() == t.scalar_type(), "rmsnorm_ext: ", gname, " dtype ",
                   py_dtype(g.scalar_type()), " must match the ", name, " dtype ",
                   py_dtype(t.scalar_type()));
}

// All the forward arguments of qk_norm_rope: returns the shape; *cs_per_batch: whether
// cos/sin are [B, S, D].
inline QkShape check_qk_norm_rope(const Tensor& q, const Tensor& k,
                                  const std::optional<Tensor>& q_weight,
                                  const std::optional<Tensor>& k_weight, const Tensor& cos,
                                  const Tensor& sin, bool* cs_per_batch) {
  const QkShape s = check_qk(q, k);
  check_head_param(q_weight, "q_weight", q, s.D);
  check_head_param(k_weight, "k_weight", q, s.D);
  *cs_per_batch = check_rope_tables(cos, sin, q, s);
  return s;
}


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
  run_kernel<QkNormRopeFwd>(p, qc, ws);
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
  run_kernel<QkNormRopeBwd>(p, qc, ws);
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

RMSNORM_EXT_REGISTER_HOST(register_qk_norm_rope)
