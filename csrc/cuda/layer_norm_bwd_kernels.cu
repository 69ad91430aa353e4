// layer_norm_bwd: LayerNorm's policy for the shared row-norm backward (norm_bwd_rows.cuh).
//
//   xhat = (x - mean) * rstd, g = dy * w (rounded on its own, mul_rn)
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   dw[j] = sum over rows of dy * xhat, db[j] = sum over rows of dy
//
// T: x / dy / dx dtype; W: weight (and dw, db) dtype. A missing weight runs as ones.
#include "norm_bwd_rows.cuh"

namespace rmsnorm_ext {
namespace cuda {
namespace {

struct LnBwdNorm {
  static constexpr int kSums = 2;
  static constexpr int kPlanes = 2;
  static constexpr bool kGradResidual = false;
  static constexpr bool kCentered = true;  // col_partials: xhat = (x - mean) * rstd
  template <typename A>
  struct Coef {
    A mg, mgx;
  };
  template <typename A>
  static __device__ __forceinline__ A weight(A w, A) { return w; }
  template <typename A>
  static __device__ __forceinline__ A xhat(A x, const RowStats<A>& st) {
    return (x - st.mean) * st.rstd;
  }
  template <typename A>
  static __device__ __forceinline__ void row_sums(A (&s)[2], A x, A g, const RowStats<A>& st) {
    const A xh = xhat(x, st);
    s[0] += g;
    s[1] += g * xh;
  }
  template <typename A>
  static __device__ __forceinline__ void param_terms(A (&p)[2], A x, A dy, const RowStats<A>& st) {
    p[0] = dy * xhat(x, st);
    p[1] = dy;
  }
  template <typename A>
  static __device__ __forceinline__ Coef<A> coef(const A (&s)[2], int64_t N, const RowStats<A>&) {
    return {s[0] / static_cast<A>(N), s[1] / static_cast<A>(N)};
  }
  template <typename A>
  static __device__ __forceinline__ A dx(A x, A g, const Coef<A>& c, const RowStats<A>& st) {
    return st.rstd * (g - c.mg - xhat(x, st) * c.mgx);
  }
};

template <typename T, typename W>
cudaError_t launch(const LnBwdParams& p, Workspace ws, cudaStream_t stream) {
  using A = acc_t<T>;
  NormBwdArgs<T, T, W> a{};
  a.x = static_cast<const T*>(p.x);
  a.dy = static_cast<const T*>(p.dy);
  a.mean = static_cast<const A*>(p.mean);
  a.rstd = static_cast<const A*>(p.rstd);
  a.w = static_cast<const W*>(p.weight);
  a.dx = static_cast<T*>(p.dx);
  a.M = p.M;
  a.N = p.N;
  W* const out[2] = {static_cast<W*>(p.dw), static_cast<W*>(p.db)};
  return launch_norm_bwd<LnBwdNorm>(a, out, p.sm_count, ws, stream);
}

}  // namespace

cudaError_t ln_bwd(const LnBwdParams& p, Workspace ws, cudaStream_t stream) {
  if (p.inner > 1) return ln_bwd_channels_first(p, ws, stream);  // channels_first_kernels.cu
  return with_dtype_pair(p.t, p.w, [&](auto t_tag, auto w_tag) -> cudaError_t {
    return launch<decltype(t_tag), decltype(w_tag)>(p, ws, stream);
  });
}

RMSNORM_EXT_REGISTER_CUDA_KERNEL(LnBwd, ln_bwd);

}  // namespace cuda
}  // namespace rmsnorm_ext
