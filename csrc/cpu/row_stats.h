// Per-row statistics of the CPU forward kernels, shared by the plain norms
// (rms_norm_cpu.cpp, layer_norm_cpu.cpp) and the norm + quantize kernel
// (norm_quant_cpu.cpp), so every op computes a row's rstd / mean the same way and the
// quantized ops normalize exactly like the unquantized ones.
#pragma once

#include "vec_io.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace rmsnorm_ext::cpu {

// sum(x^2) over a row, four independent accumulators, blocked (see blocked_row_sum).
// keep (kKeep): also stores the row converted to fp32 there, as ln_row_stats below.
template <typename T, bool kKeep = false>
acc_t<T> row_sumsq(const T* x, int64_t N, acc_t<T>* keep = nullptr) {
  using IO = RowIO<T>;
  using AIO = RowIO<acc_t<T>>;
  using V = typename IO::V;
  constexpr int64_t S = IO::kStep;
  const auto t = blocked_row_sum<4, V>(N, 2 * S, [&](int64_t j, int64_t n, auto& p) {
    V a, b, c, d;
    IO::load2_n(x + j, n, a, b, c, d);
    if constexpr (kKeep) {
      AIO::store_n(keep + j, std::min(n, S), a, b);
      if (n > S) AIO::store_n(keep + j + S, n - S, c, d);
    }
    p[0] = at::vec::fmadd(a, a, p[0]);
    p[1] = at::vec::fmadd(b, b, p[1]);
    p[2] = at::vec::fmadd(c, c, p[2]);
    p[3] = at::vec::fmadd(d, d, p[3]);
  });
  return reduce_add((t[0] + t[1]) + (t[2] + t[3]));
}

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

// LayerNorm's mean and rstd of a row: two passes over the row (in L1/L2 after the first).
// keep (kKeep; n floats, for bfloat16/float16 rows): the first pass also stores the row
// converted to fp32 there, and the second pass and the caller's output pass read it instead
// of converting the row again (each conversion is ~5 instructions per 16 elements on AVX2,
// a sixth of the op). The sums and their order are the same either way: bitwise the same
// statistics.
template <typename T, bool kKeep = false>
LnStats<acc_t<T>> ln_row_stats(const T* xr, int64_t N, double eps, acc_t<T>* keep = nullptr) {
  using IO = RowIO<T>;
  using A = acc_t<T>;
  using AIO = RowIO<A>;
  using V = typename IO::V;
  constexpr int64_t S = IO::kStep;
  V a, b;
  const auto ts = blocked_row_sum<4, V>(N, 2 * S, [&](int64_t j, int64_t n, auto& p) {
    V c, d;
    IO::load2_n(xr + j, n, a, b, c, d);
    if constexpr (kKeep) {
      AIO::store_n(keep + j, std::min(n, S), a, b);
      if (n > S) AIO::store_n(keep + j + S, n - S, c, d);
    }
    p[0] = p[0] + a;
    p[1] = p[1] + b;
    p[2] = p[2] + c;
    p[3] = p[3] + d;
  });
  const A mean0 = reduce_add((ts[0] + ts[1]) + (ts[2] + ts[3])) / static_cast<A>(N);
  const V vm0(mean0);
  // Corrected two-pass (Bjorck): with d = x - mean0, sum(d) is the rounding error of
  // mean0 times N. mean = mean0 + sum(d)/N is accurate to about an ulp, and
  // var = (sum(d^2) - sum(d)^2/N) / N removes that error from the variance, so rows
  // with |mean| >> std (where (x - mean) * rstd amplifies an error in the mean) stay
  // accurate, at no extra pass.
  const auto tv = blocked_row_sum<4, V>(N, S, [&](int64_t j, int64_t n, auto& p) {
    if constexpr (kKeep) {
      AIO::load_n(keep + j, n, a, b);
    } else {
      IO::load_n(xr + j, n, a, b);
    }
    a = a - vm0;
    b = b - vm0;
    if (n < S) zero_tail(a, b, n);
    p[0] = at::vec::fmadd(a, a, p[0]);
    p[1] = at::vec::fmadd(b, b, p[1]);
    p[2] = p[2] + a;
    p[3] = p[3] + b;
  });
  const A inv_n = A(1) / static_cast<A>(N);
  const A sd = reduce_add(tv[2] + tv[3]);
  const A mean = mean0 + sd * inv_n;
  const A var_raw = (reduce_add(tv[0] + tv[1]) - sd * sd * inv_n) * inv_n;
  const A var = var_raw < A(0) ? A(0) : var_raw;  // keeps NaN (std::max would drop it)
  return {mean, A(1) / std::sqrt(var + static_cast<A>(eps))};
}

// Whether a row of T is worth keeping in fp32 between passes (kKeep above): reduced types.
template <typename T>
inline constexpr bool kKeepRowAsFloat = !std::is_same_v<T, acc_t<T>>;

// Rows longer than this are not kept: the scratch is per thread (the rows in flight times N
// floats), and a row this long no longer sits in L1/L2 between passes anyway.
inline constexpr int64_t kKeepMaxN = 65536;

// Calls f(std::bool_constant<kKeep>{}): whether the kernel keeps rows of N elements of T.
template <typename T, typename F>
inline void with_keep(int64_t N, F&& f) {
  if constexpr (kKeepRowAsFloat<T>) {
    if (N <= kKeepMaxN) return f(std::true_type{});
  }
  f(std::false_type{});
}

}  // namespace rmsnorm_ext::cpu
