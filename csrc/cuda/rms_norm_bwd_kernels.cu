// rms_norm_bwd: RMSNorm's policy for the shared row-norm backward (norm_bwd_rows.cuh).
//
//   g = dy * (offset + w)  (dy without a weight), rounded on its own (mul_rn)
//   xhat = x * rstd, c = rstd * mean(g * x)
//   dx = rstd * (g - xhat * c)  [+ grad_residual, in fp32 before rounding]
//      (= rstd * (g - x * rstd^2 * mean(g * x)), grouped so that no intermediate is
//      larger than the result: rstd^2 alone overflows fp32 for rms < ~5e-20 with eps = 0,
//      and rstd^3 underflows for |x| >~ 1e13; xhat and c are O(|x| rstd) and O(|g|).)
//   dw[j] = sum over rows of dy * xhat
#include "norm_bwd_rows.cuh"

namespace rmsnorm_ext {
namespace cuda {
namespace {

struct RmsBwdNorm {
  static constexpr int kSums = 1;
  static constexpr int kPlanes = 1;
  static constexpr bool kGradResidual = true;
  static constexpr bool kCentered = false;  // col_partials: xhat = x * rstd
  template <typename A>
  static __device__ __forceinline__ A weight(A w, A offset) { return offset + w; }
  template <typename A>
  static __device__ __forceinline__ void row_sums(A (&s)[1], A x, A g, const RowStats<A>&) {
    s[0] += g * x;
  }
  template <typename A>
  static __device__ __forceinline__ void param_terms(A (&p)[1], A x, A dy, const RowStats<A>& st) {
    p[0] = dy * (x * st.rstd);
  }
  template <typename A>
  static __device__ __forceinline__ A coef(const A (&s)[1], int64_t N, const RowStats<A>& st) {
    return st.rstd * (s[0] / static_cast<A>(N));
  }
  template <typename A>
  static __device__ __forceinline__ A dx(A x, A g, A c, const RowStats<A>& st) {
    return st.rstd * (g - (x * st.rstd) * c);
  }
};

template <typename X, typename G, typename W>
cudaError_t launch(const RmsBwdParams& p, Workspace ws, cudaStream_t stream) {
  using A = acc_t<X>;
  NormBwdArgs<X, G, W> a{};
  a.x = static_cast<const X*>(p.x_in);
  a.dy = static_cast<const G*>(p.dy);
  a.rstd = static_cast<const A*>(p.rstd);
  a.w = static_cast<const W*>(p.weight);
  a.gres = static_cast<const X*>(p.gres);
  a.dx = static_cast<X*>(p.dx);
  a.M = p.M;
  a.N = p.N;
  a.offset = static_cast<A>(p.offset);
  W* const out[1] = {p.weight != nullptr ? static_cast<W*>(p.dw) : nullptr};
  return launch_norm_bwd<RmsBwdNorm>(a, out, p.sm_count, ws, stream);
}

}  // namespace

cudaError_t rms_bwd(const RmsBwdParams& p, Workspace ws, cudaStream_t stream) {
  if (p.inner > 1) return rms_bwd_channels_first(p, ws, stream);  // channels_first_kernels.cu
  return with_dtype_pair(p.g, p.w, [&](auto g_tag, auto w_tag) -> cudaError_t {
    using G = decltype(g_tag);
    using W = decltype(w_tag);
    if (p.x == p.g) return launch<G, G, W>(p, ws, stream);
    if constexpr (is_reduced_v<G>) {
      if (p.x == DType::f32) return launch<float, G, W>(p, ws, stream);
    }
    return cudaErrorInvalidValue;
  });
}

RMSNORM_EXT_REGISTER_CUDA_KERNEL(RmsBwd, rms_bwd);

}  // namespace cuda
}  // namespace rmsnorm_ext
