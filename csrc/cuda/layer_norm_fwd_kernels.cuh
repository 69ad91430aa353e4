// LayerNorm's policy for the shared row-norm forward (norm_fwd_rows.cuh), used by
// layer_norm_fwd_kernels.cu and the LayerNorm modulation (norm_modulate_kernels.cu).
// Mean and biased variance in acc_t<T> with the corrected two-pass formula, the same as the
// CPU kernels (csrc/cpu/layer_norm_cpu.cpp):
//   mean0 = sum(x) / N; d = x - mean0 (second pass over the row)
//   mean = mean0 + sum(d) / N                      (sum(d) is N x the rounding error of mean0)
//   var = max(0, (sum(d^2) - sum(d)^2 / N) / N)    (never E[x^2] - E[x]^2)
//   rstd = 1 / sqrt(var + eps), y = (x - mean) * rstd * w + b.
// Rows with |mean| >> std are where it matters: (x - mean) * rstd amplifies an error in
// the mean by rstd, and a plain two-pass mean is off by up to ~N ulps of |mean|.
#pragma once

#include "norm_fwd_rows.cuh"

namespace rmsnorm_ext {
namespace cuda {

struct LnFwdNorm : PlainRow {
  using Ops = NoOperands;
  static constexpr bool kCustomEpilogue = false;
  static constexpr bool kTwoPass = true;
  template <typename A, typename S, int VEC>
  static __device__ __forceinline__ void first(A& run, const Pack<S, VEC>& p) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) run += to_acc<A>(p.v[j]);
  }
  template <typename A>
  static __device__ __forceinline__ FwdStats<A> after_first(A sum, int64_t N, A) {
    return {sum / static_cast<A>(N), A(0)};  // mean0; the second pass finishes
  }
  template <typename A, typename W, int VEC, class Ex>
  static __device__ __forceinline__ A out(A f, const Pack<W, VEC>& wp, const Pack<W, VEC>& bp, const Ex&,
                                          int j, bool has_w, bool has_b, const FwdStats<A>& st, A) {
    A v = (f - st.mean) * st.rstd;
    if (has_w) v = v * to_acc<A>(wp.v[j]);
    if (has_b) v = v + to_acc<A>(bp.v[j]);
    return v;
  }
};

}  // namespace cuda
}  // namespace rmsnorm_ext
