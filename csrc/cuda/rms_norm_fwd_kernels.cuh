// RMSNorm's policy for the shared row-norm forward (norm_fwd_rows.cuh), plain and with the
// fused residual add, and its launcher (rms_norm_fwd_kernels.cu, fused_add_rms_norm_kernels.cu).
//
//   plain:  y = x * rstd * (offset + w),              rstd = 1 / sqrt(mean(x^2) + eps)
//   fused:  h = round_R(x + r); y = h * rstd * (offset + w), rstd from h
#pragma once

#include "norm_fwd_rows.cuh"

namespace rmsnorm_ext {
namespace cuda {

struct RmsFwdNorm : PlainRow {
  using Ops = NoOperands;
  static constexpr bool kCustomEpilogue = false;
  static constexpr bool kTwoPass = false;
  // Squares in acc_t: fp16 values near 65504 do not overflow. A pack's squares are summed
  // on their own, then added to the running sum.
  template <typename A, typename S, int VEC>
  static __device__ __forceinline__ void first(A& run, const Pack<S, VEC>& p) {
    A acc = A(0);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A f = to_acc<A>(p.v[j]);
      acc += f * f;
    }
    run += acc;
  }
  template <typename A>
  static __device__ __forceinline__ FwdStats<A> after_first(A sumsq, int64_t N, A eps) {
    return {A(0), A(1) / sqrt(sumsq / static_cast<A>(N) + eps)};
  }
  template <typename A, typename W, int VEC, class Ex>
  static __device__ __forceinline__ A out(A f, const Pack<W, VEC>& wp, const Pack<W, VEC>&, const Ex&,
                                          int j, bool has_w, bool, const FwdStats<A>& st, A offset) {
    const A n = f * st.rstd;
    if (!has_w) return n;
    // offset 0 uses w itself: 0 + (-0) would give +0 where x * rstd * w is -0.
    const A wf = to_acc<A>(wp.v[j]);
    return n * (offset != A(0) ? offset + wf : wf);
  }
};

template <typename T, typename W, typename R, bool FUSED>
cudaError_t launch_rms_fwd(const RmsFwdParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  NormFwdArgs<T, W, R> a{};
  a.x = static_cast<const T*>(p.x);
  a.r = static_cast<const R*>(p.r_in);
  a.w = static_cast<const W*>(p.weight);
  a.y = static_cast<T*>(p.y);
  a.h = static_cast<R*>(p.h);
  a.rstd = static_cast<A*>(p.rstd);
  a.M = p.M;
  a.N = p.N;
  a.eps = static_cast<A>(p.eps);
  a.offset = static_cast<A>(p.offset);
  return launch_norm_fwd<RmsFwdNorm, T, W, R, FUSED>(a, stream);
}

}  // namespace cuda
}  // namespace rmsnorm_ext
