// Forward statistics of a group of R rows at once, for short rows (vision widths, N <=
// kGroupMaxN), and of one row (R = 1: row_sumsq, ln_row_stats, at the bottom).
//
// A short row's forward is bound by latency, not bandwidth: its statistics are a chain of
// a few vector adds, a horizontal reduction, a divide and a square root (LayerNorm: twice),
// and the output pass cannot start before the chain ends. With 96 elements that chain is
// most of the row's time, and the out-of-order window is too small to overlap it with the
// next row's. Computing R rows' statistics in one loop interleaves R independent chains.
//
// A row's arithmetic is the same whatever R -- the same steps, accumulators, blocks and
// reduction order, and the one-row functions are R = 1 -- so a row's statistics are bitwise
// the same whether it is computed in a group or alone (tests/test_short_rows.py checks this
// against single-row calls).
#pragma once

#include "row_stats.h"

#include <array>

namespace rmsnorm_ext::cpu {

// Rows up to this long take the grouped path (longer rows are bandwidth-bound already and
// their chain is a small part of their time). kGroupRows: rows per group; two rows' four
// accumulators plus their operands fill AVX2's 16 vector registers (more rows would spill).
// perf on the single-row path (N = 96 bf16, AMD EPYC AVX2) also found its accumulators on
// the stack: std::array fills as `rep stos` (~14% of ln_row_stats) and every vector reloaded
// around the tail's memcpy calls; Acc4 and load_part / store_part below avoid both.
inline constexpr int64_t kGroupMaxN = 1024;
inline constexpr int kGroupRows = 2;
// Rows up to kTinyN long take kTinyGroupRows at once: their time is mostly the chain, and
// four overlap more of it (LayerNorm, channels_last C = 40 / 64, fp32 and bf16, AVX2: 7-16%
// faster; RMSNorm, whose chain is shorter, unchanged). kTinyGroupRows >= kGroupRows.
inline constexpr int64_t kTinyN = 64;
inline constexpr int kTinyGroupRows = 4;
static_assert(kTinyGroupRows >= kGroupRows, "the kept-row scratch is sized for kTinyGroupRows");

// Four accumulator vectors with named members: std::array<V, 4> (blocked_row_sum's) is
// zeroed with memset and kept on the stack by GCC, where these stay in registers.
template <typename V>
struct Acc4 {
  V p0, p1, p2, p3;
  inline void zero() {
    p0 = V(0);
    p1 = V(0);
    p2 = V(0);
    p3 = V(0);
  }
  inline void add(const Acc4& o) {
    p0 = p0 + o.p0;
    p1 = p1 + o.p1;
    p2 = p2 + o.p2;
    p3 = p3 + o.p3;
  }
};

// RowIO's tail loads and stores without its memset / memcpy calls: a call in a row loop
// makes GCC keep the loop's vectors on the stack (every vector register is clobbered by a
// call). Same values: the missing lanes read as zero, only n elements are written.
template <typename T>
inline void load_part(const T* p, int64_t n, typename RowIO<T>::V& a, typename RowIO<T>::V& b) {
  constexpr int64_t S = RowIO<T>::kStep;
  if (n == S) return RowIO<T>::load(p, a, b);
  if (masked::load(p, n, a, b)) return;  // vec_io.h
  alignas(64) T buf[S];
  for (int64_t k = 0; k < S; ++k) buf[k] = k < n ? p[k] : T(0);
  RowIO<T>::load(buf, a, b);
}

template <typename T>
inline void store_part(T* p, int64_t n, const typename RowIO<T>::V& a,
                       const typename RowIO<T>::V& b) {
  constexpr int64_t S = RowIO<T>::kStep;
  if (n == S) return RowIO<T>::store(p, a, b);
  if (masked::store(p, n, a, b)) return;  // vec_io.h
  alignas(64) T buf[S];
  RowIO<T>::store(buf, a, b);
  for (int64_t k = 0; k < n; ++k) p[k] = buf[k];
}

// RowIO::load2_n with load_part.
template <typename T>
inline void load2_part(const T* p, int64_t n, typename RowIO<T>::V& a, typename RowIO<T>::V& b,
                       typename RowIO<T>::V& c, typename RowIO<T>::V& d) {
  constexpr int64_t S = RowIO<T>::kStep;
  load_part(p, std::min(n, S), a, b);
  if (n > S) {
    load_part(p + S, n - S, c, d);
  } else {
    c = typename RowIO<T>::V(0);
    d = typename RowIO<T>::V(0);
  }
}

// blocked_row_sum<4> (vec_io.h) over R rows of N elements at once: f(r, j, n, part) for
// every row r at every step of kStepLen elements, each row with its own accumulators,
// blocks and running total. The same steps in the same order as blocked_row_sum (only the
// last step of a row can be partial); the full steps run in a loop of their own, where n is
// a constant. kBlockSteps must equal blocked_row_sum's (the bitwise test fails otherwise).
template <int R, int64_t kStepLen, typename V, typename F>
inline void blocked_rows_sum(int64_t N, Acc4<V> (&total)[R], F&& f) {
  constexpr int64_t kBlockSteps = 32;
  Acc4<V> part[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) total[r].zero();
  for (int64_t j = 0; j < N;) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) part[r].zero();
    const int64_t end = std::min(N, j + kBlockSteps * kStepLen);
    for (; j + kStepLen <= end; j += kStepLen) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) f(r, j, kStepLen, part[r]);
    }
    if (j < end) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) f(r, j, end - j, part[r]);
      j = end;
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) total[r].add(part[r]);
  }
}

// The first pass's kept copy of a step (kKeep in row_stats.h): rows r of keep, N floats
// apart, hold the rows converted to fp32 for the passes after the first.
template <typename V, typename A>
inline void keep_part(A* keep, int64_t n, const V& a, const V& b, const V& c, const V& d) {
  constexpr int64_t S = RowIO<A>::kStep;
  store_part(keep, std::min(n, S), a, b);
  if (n > S) store_part(keep + S, n - S, c, d);
}

// sum(x^2) of rows x, x + N, ..., x + (R - 1) * N (row_sumsq of each); keep (kKeep): R * N
// floats, the rows converted to fp32.
template <int R, typename T, bool kKeep = false>
inline std::array<acc_t<T>, R> rows_sumsq(const T* x, int64_t N, acc_t<T>* keep = nullptr) {
  using IO = RowIO<T>;
  using V = typename IO::V;
  Acc4<V> t[R];
  blocked_rows_sum<R, 2 * IO::kStep>(N, t, [&](int r, int64_t j, int64_t n, Acc4<V>& p) {
    V a, b, c, d;
    load2_part(x + r * N + j, n, a, b, c, d);
    if constexpr (kKeep) keep_part(keep + r * N + j, n, a, b, c, d);
    p.p0 = at::vec::fmadd(a, a, p.p0);
    p.p1 = at::vec::fmadd(b, b, p.p1);
    p.p2 = at::vec::fmadd(c, c, p.p2);
    p.p3 = at::vec::fmadd(d, d, p.p3);
  });
  std::array<acc_t<T>, R> out;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) out[r] = reduce_add((t[r].p0 + t[r].p1) + (t[r].p2 + t[r].p3));
  return out;
}

// ln_row_stats of rows x, x + N, ..., x + (R - 1) * N; keep as in rows_sumsq.
template <int R, typename T, bool kKeep = false>
inline std::array<LnStats<acc_t<T>>, R> ln_rows_stats(const T* x, int64_t N, double eps,
                                                      acc_t<T>* keep = nullptr) {
  using IO = RowIO<T>;
  using A = acc_t<T>;
  using V = typename IO::V;
  constexpr int64_t S = IO::kStep;
  Acc4<V> ts[R];
  blocked_rows_sum<R, 2 * S>(N, ts, [&](int r, int64_t j, int64_t n, Acc4<V>& p) {
    V a, b, c, d;
    load2_part(x + r * N + j, n, a, b, c, d);
    if constexpr (kKeep) keep_part(keep + r * N + j, n, a, b, c, d);
    p.p0 = p.p0 + a;
    p.p1 = p.p1 + b;
    p.p2 = p.p2 + c;
    p.p3 = p.p3 + d;
  });
  V vm0[R];
  A mean0[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    mean0[r] = reduce_add((ts[r].p0 + ts[r].p1) + (ts[r].p2 + ts[r].p3)) / static_cast<A>(N);
    vm0[r] = V(mean0[r]);
  }
  // The corrected two-pass variance of ln_row_stats.
  Acc4<V> tv[R];
  blocked_rows_sum<R, S>(N, tv, [&](int r, int64_t j, int64_t n, Acc4<V>& p) {
    V a, b;
    if constexpr (kKeep) {
      load_part(keep + r * N + j, n, a, b);
    } else {
      load_part(x + r * N + j, n, a, b);
    }
    a = a - vm0[r];
    b = b - vm0[r];
    if (n < S) zero_tail(a, b, n);
    p.p0 = at::vec::fmadd(a, a, p.p0);
    p.p1 = at::vec::fmadd(b, b, p.p1);
    p.p2 = p.p2 + a;
    p.p3 = p.p3 + b;
  });
  const A inv_n = A(1) / static_cast<A>(N);
  std::array<LnStats<A>, R> out;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const A sd = reduce_add(tv[r].p2 + tv[r].p3);
    const A mean = mean0[r] + sd * inv_n;
    const A var_raw = (reduce_add(tv[r].p0 + tv[r].p1) - sd * sd * inv_n) * inv_n;
    const A var = var_raw < A(0) ? A(0) : var_raw;  // keeps NaN
    out[r] = {mean, A(1) / std::sqrt(var + static_cast<A>(eps))};
  }
  return out;
}

// One row: sum(x^2) and LayerNorm's mean / rstd (the corrected two-pass variance), the R = 1
// case of the above (its accumulators in registers, no call in the row loop). keep (kKeep):
// N floats, the row converted to fp32 (row_stats.h).
template <typename T, bool kKeep = false>
inline acc_t<T> row_sumsq(const T* x, int64_t N, acc_t<T>* keep = nullptr) {
  return rows_sumsq<1, T, kKeep>(x, N, keep)[0];
}

template <typename T, bool kKeep = false>
inline LnStats<acc_t<T>> ln_row_stats(const T* x, int64_t N, double eps,
                                      acc_t<T>* keep = nullptr) {
  return ln_rows_stats<1, T, kKeep>(x, N, eps, keep)[0];
}

}  // namespace rmsnorm_ext::cpu
