// Per-row statistics of the CPU forward kernels: rstd, the fused residual add's sum of
// squares, and when a row is kept in fp32 between passes. The statistics of a row themselves
// (row_sumsq, ln_row_stats) are the one-row case of row_group_stats.h's, so every op computes
// a row's rstd / mean the same way, grouped or alone, and the quantized ops normalize exactly
// like the unquantized ones.
#pragma once

#include "vec_io.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace rmsnorm_ext::cpu {

template <typename A>
inline A rstd_from(A sumsq, int64_t N, double eps) {
  return A(1) / std::sqrt(sumsq / static_cast<A>(N) + static_cast<A>(eps));
}

// The fused residual add of one row: h = x + r, rounded to R and stored; returns the sum
// of squares of h as stored (so the fused result equals the unfused add-then-normalize
// exactly), in the same accumulation order as row_sumsq. h may alias r (in place).
template <typename T, typename R>
acc_t<T> fused_add_row_sumsq(const T* xr, const R* rr, R* hr, int64_t N) {
  using XIO = RowIO<T>;
  using HIO = RowIO<R>;
  using V = typename XIO::V;
  static_assert(std::is_same_v<acc_t<T>, acc_t<R>>);
  constexpr int64_t S = XIO::kStep;
  const auto t = blocked_row_sum<4, V>(N, 2 * S, [&](int64_t j, int64_t n, auto& p) {
    const int64_t n1 = std::min(n, S);
    V xa, xb, ra, rb, hc(0), hd(0);
    XIO::load_n(xr + j, n1, xa, xb);
    HIO::load_n(rr + j, n1, ra, rb);
    HIO::store_n(hr + j, n1, xa + ra, xb + rb);
    HIO::load_n(hr + j, n1, ra, rb);
    if (n > S) {
      XIO::load_n(xr + j + S, n - S, xa, xb);
      HIO::load_n(rr + j + S, n - S, hc, hd);
      HIO::store_n(hr + j + S, n - S, xa + hc, xb + hd);
      HIO::load_n(hr + j + S, n - S, hc, hd);
    }
    p[0] = at::vec::fmadd(ra, ra, p[0]);
    p[1] = at::vec::fmadd(rb, rb, p[1]);
    p[2] = at::vec::fmadd(hc, hc, p[2]);
    p[3] = at::vec::fmadd(hd, hd, p[3]);
  });
  return reduce_add((t[0] + t[1]) + (t[2] + t[3]));
}

template <typename A>
struct LnStats {
  A mean;
  A rstd;
};

// Whether a row of T is worth keeping in fp32 between passes (kKeep in row_group_stats.h: the
// first pass stores the row converted to fp32 in the caller's scratch, the later passes and
// the output pass read it instead of converting again -- ~5 instructions per 16 elements on
// AVX2 each; the sums and their order are the same, so the statistics are bitwise the same):
// reduced types.
template <typename T>
inline constexpr bool kKeepRowAsFloat = !std::is_same_v<T, acc_t<T>>;

// Rows longer than this are not kept: the scratch is per thread (the rows in flight times N
// floats), and a row this long no longer sits in L1/L2 between passes anyway.
inline constexpr int64_t kKeepMaxN = 65536;

// Rows up to this long are short: their statistics are taken in groups (row_group_stats.h);
// longer rows are bandwidth-bound already and their reduction chain is a small part of their
// time.
inline constexpr int64_t kGroupMaxN = 1024;

// Whether a kernel that reads a row of N elements of T `rereads` more times after its first
// pass keeps it in fp32. AVX2 converts a bfloat16 / float16 step in ~5 instructions: keeping
// pays for any reread. AVX-512 converts in 2, and there storing and reloading the fp32 copy
// cost more than converting again for one reread (RMSNorm: 15-25% faster without, rows of
// 128-1024, single thread, Xeon VM), and for two where rows are long (LayerNorm
// N = 4096: 28% faster without in L2, 4% at [4096, 4096]); LayerNorm's short rows (two
// rereads) still gain from it (0-12%).
template <typename T>
inline bool keep_row(int64_t N, int rereads) {
  if (!kKeepRowAsFloat<T> || N > kKeepMaxN) return false;
#if defined(CPU_CAPABILITY_AVX512)
  return rereads >= 2 && N <= kGroupMaxN;
#else
  (void)rereads;
  return true;
#endif
}

// Calls f(std::bool_constant<kKeep>{}) with kKeep = keep_row<T>(N, rereads).
template <typename T, typename F>
inline void with_keep(int64_t N, int rereads, F&& f) {
  if constexpr (kKeepRowAsFloat<T>) {
    if (keep_row<T>(N, rereads)) return f(std::true_type{});
  }
  f(std::false_type{});
}

}  // namespace rmsnorm_ext::cpu
