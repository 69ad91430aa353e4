// Statistics of a group of R rows at once, for short rows (vision widths, N <=
// kGroupMaxN), and of one row (R = 1: row_sumsq, ln_row_stats, at the bottom).
//
// A short row is bound by latency, not bandwidth: its statistics end in a chain of a
// horizontal reduction, a divide and a square root (LayerNorm: twice), and its output pass
// cannot start before the chain ends. With 96 elements that chain is most of the row's time.
// A group runs its rows' passes one after another (independent: the out-of-order core
// overlaps them) and finishes their chains together, one row per vector lane: the horizontal
// sums transposed into one vector (hsum_rows), one divide and one square root for the group.
// The backward kernels group their rows' reductions the same way (for_row_groups).
//
// A row's arithmetic is the same whatever R -- the same steps, accumulators, blocks and
// reduction order, lane-wise finishing -- and the one-row functions are R = 1, so a row's
// statistics are bitwise the same whether it is computed in a group or alone, whatever the
// thread split (tests/test_short_rows.py checks this against single-row calls).
#pragma once

#include "row_stats.h"

#include <algorithm>
#include <array>
#include <memory>
#include <type_traits>

namespace rmsnorm_ext::cpu {

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

// R vectors, one per row of a group, in storage that is not zero-filled first (an array of
// Vectorized is: GCC emits `rep stos` for it, ~16% of a short row's statistics).
template <typename V, int R>
struct RowVecs {
  alignas(64) typename V::value_type a[R * V::size()];
  inline V operator[](int r) const { return V::loadu(a + r * V::size()); }
  inline void set(int r, const V& v) { v.store(a + r * V::size()); }
};

// Lane r (r < R) of the result: the horizontal sum of v[r], in reduce_add's association
// for every row, so a row's sum is bitwise the same alone (R = 1) or in a group; lanes >= R
// are zero. A group's statistics then finish as one vector (one divide, one square root for
// R rows) instead of R scalar chains. AVX2 fp32: R rows' vectors transposed into one by a
// tree of 128-bit, 64-bit and 32-bit halves (the steps of reduce_add, for 8 rows in ~21
// instructions instead of ~48 and 8 extractions); elsewhere reduce_add per row.
template <int R, typename V>
__attribute__((always_inline)) inline V hsum_rows(const RowVecs<V, R>& v) {
  using A = typename V::value_type;
  static_assert(R >= 1 && R <= V::size(), "a group is at most one row per lane");
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    auto row = [&](int r) -> __m256 { return r < R ? __m256(v[r]) : _mm256_setzero_ps(); };
    // s_i = a_i + a_(i+4): rows 2k (low half) and 2k + 1 (high half).
    __m256 p[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      const __m256 a = row(2 * k), b = row(2 * k + 1);
      p[k] = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
    }
    // t0 = s0 + s2, t1 = s1 + s3: rows (0, 2 | 1, 3) and (4, 6 | 5, 7), two lanes each.
    const __m256 q0 = _mm256_add_ps(_mm256_shuffle_ps(p[0], p[1], 0x44),
                                    _mm256_shuffle_ps(p[0], p[1], 0xEE));
    const __m256 q1 = _mm256_add_ps(_mm256_shuffle_ps(p[2], p[3], 0x44),
                                    _mm256_shuffle_ps(p[2], p[3], 0xEE));
    // t0 + t1: lanes hold rows 0, 2, 4, 6, 1, 3, 5, 7; put them in order with immediate
    // shuffles (an index vector would stay live in a register across the callers' row loops,
    // where GCC then spills an accumulator).
    const __m256 t = _mm256_add_ps(_mm256_shuffle_ps(q0, q1, 0x88), _mm256_shuffle_ps(q0, q1, 0xDD));
    const __m256 h = _mm256_permute2f128_ps(t, t, 0x01);
    return V(_mm256_permute2f128_ps(_mm256_unpacklo_ps(t, h), _mm256_unpackhi_ps(t, h), 0x20));
  }
#elif defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float> && R >= 2) {
    // reduce_add's AVX-512 tree adds lane i to lane i + 8, then i + 4, i + 2, i + 1; here
    // each level takes two rows' halves (or quarters, ...) at once: 24 instructions for 8
    // rows instead of ~80 (8 trees, their stores and the reload).
    auto row = [&](int r) -> __m512 { return r < R ? __m512(v[r]) : _mm512_setzero_ps(); };
    // p[k]: rows 2k | 2k + 1, eight lanes each (s_i = a_i + a_(i+8)).
    __m512 p[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      const __m512 a = row(2 * k), b = row(2 * k + 1);
      p[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    }
    // q0: rows 0 | 1 | 2 | 3, q1: rows 4 | 5 | 6 | 7, four lanes each (+ lane i + 4).
    const __m512 q0 = _mm512_add_ps(_mm512_shuffle_f32x4(p[0], p[1], 0x88),
                                    _mm512_shuffle_f32x4(p[0], p[1], 0xDD));
    const __m512 q1 = _mm512_add_ps(_mm512_shuffle_f32x4(p[2], p[3], 0x88),
                                    _mm512_shuffle_f32x4(p[2], p[3], 0xDD));
    // 128-bit block k: row k in lanes 0-1, row k + 4 in lanes 2-3 (+ lane i + 2) ...
    const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(q0, q1, 0x44), _mm512_shuffle_ps(q0, q1, 0xEE));
    // ... then + lane i + 1: row k at lane 4k, row k + 4 at lane 4k + 2; gathered in order.
    const __m512 u = _mm512_add_ps(t, _mm512_shuffle_ps(t, t, 0xB1));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
    return V(_mm512_maskz_permutexvar_ps(__mmask16(0x00FF), order, u));
  }
#endif
  alignas(64) A s[V::size()];
  for (int r = 0; r < V::size(); ++r) s[r] = r < R ? reduce_add(v[r]) : A(0);
  return V::loadu(s);
}

// The most rows a group takes at once: one per lane, at most 8 (AVX2 fp32: 8; fp64: 4).
template <typename T>
inline constexpr int kStatsRows = std::min<int>(8, RowIO<T>::V::size());

// A group of short rows holds about kGroupElems elements (8 KB as fp32): kStatsRows rows
// halved (at most twice) while they hold more. Its rows then stay in L1 between passes next
// to what the passes write (AVX2, fp32 N = 768: 8 rows ~20% slower than 4, 4 ~5% slower
// than 2; N <= 256 gains from 8).
inline constexpr int64_t kGroupElems = 2048;

// Calls f(i, rows) for consecutive groups [i, i + rows) covering [begin, end), rows a
// std::integral_constant<int, R>: groups (above) where rows are short, then single rows (the
// remainder, and every row of a long-row call).
template <typename T, typename F>
inline void for_row_groups(int64_t begin, int64_t end, int64_t N, F&& f) {
  constexpr int R = kStatsRows<T>;
  int64_t i = begin;
  auto groups = [&](auto rows) {
    constexpr int G = decltype(rows)::value;
    for (; i + G <= end; i += G) f(i, rows);
  };
  if (N <= kGroupMaxN) {
    if (N * R <= kGroupElems) {
      groups(std::integral_constant<int, R>{});
    } else if (N * R <= 2 * kGroupElems) {
      groups(std::integral_constant<int, std::max(1, R / 2)>{});
    } else {
      groups(std::integral_constant<int, std::max(1, R / 4)>{});
    }
  }
  for (; i < end; ++i) f(i, std::integral_constant<int, 1>{});
}

// The scratch a thread's groups keep their rows in as fp32 (kKeep, row_stats.h): the most
// rows for_row_groups takes at once, N floats each; null without kKeep.
template <typename T, bool kKeep>
inline std::unique_ptr<acc_t<T>[]> group_keep_scratch(int64_t N) {
  if constexpr (!kKeep) return nullptr;
  const int64_t rows = N <= kGroupMaxN ? kStatsRows<T> : 1;
  return std::unique_ptr<acc_t<T>[]>(new acc_t<T>[rows * N]);
}

// Row r of a group (first row xg, rows N apart) as the passes after the first read it: its
// fp32 copy in the scratch (kKeep) or the row itself.
template <bool kKeep, typename T>
inline auto group_row(const T* xg, const acc_t<T>* keep, int64_t N, int r) {
  if constexpr (kKeep) {
    return keep + r * N;
  } else {
    return xg + r * N;
  }
}

// The first R lanes of v.
template <int R, typename V>
inline std::array<typename V::value_type, R> first_lanes(const V& v) {
  alignas(64) typename V::value_type s[V::size()];
  v.store(s);
  std::array<typename V::value_type, R> out;
  for (int r = 0; r < R; ++r) out[r] = s[r];
  return out;
}

// One pass of blocked_rows_sum over the R rows of a group, two rows per loop (a row alone is
// latency-bound on its accumulators' adds: two rows' chains fill the gaps), handing each
// row's accumulators to done(r, acc). f(r, j, n, acc) as blocked_rows_sum's, for row r.
template <int R, int64_t kStepLen, typename V, typename F, typename D>
inline void group_pass(int64_t N, F&& f, D&& done) {
  constexpr int P = R >= 2 ? 2 : 1;
  static_assert(R % P == 0, "a group is whole pairs of rows");
  for (int r0 = 0; r0 < R; r0 += P) {
    Acc4<V> t[P];
    blocked_rows_sum<P, kStepLen>(
        N, t, [&](int q, int64_t j, int64_t n, Acc4<V>& p) { f(r0 + q, j, n, p); });
#pragma GCC unroll 2
    for (int q = 0; q < P; ++q) done(r0 + q, t[q]);
  }
}

// sum(x^2) of rows x, x + N, ..., x + (R - 1) * N (row_sumsq of each) as lanes of a vector;
// keep (kKeep): R * N floats, the rows converted to fp32.
template <int R, typename T, bool kKeep = false>
inline typename RowIO<T>::V rows_sumsq_lanes(const T* x, int64_t N, acc_t<T>* keep = nullptr) {
  using IO = RowIO<T>;
  using V = typename IO::V;
  RowVecs<V, R> s;
  group_pass<R, 2 * IO::kStep, V>(
      N,
      [&](int r, int64_t j, int64_t n, Acc4<V>& p) {
        V a, b, c, d;
        load2_part(x + r * N + j, n, a, b, c, d);
        if constexpr (kKeep) keep_part(keep + r * N + j, n, a, b, c, d);
        p.p0 = at::vec::fmadd(a, a, p.p0);
        p.p1 = at::vec::fmadd(b, b, p.p1);
        p.p2 = at::vec::fmadd(c, c, p.p2);
        p.p3 = at::vec::fmadd(d, d, p.p3);
      },
      [&](int r, const Acc4<V>& t) { s.set(r, (t.p0 + t.p1) + (t.p2 + t.p3)); });
  return hsum_rows<R>(s);
}

// rstd_from (row_stats.h) of rows_sumsq_lanes, lane-wise: the same divide, add and square
// root.
template <int R, typename T, bool kKeep = false>
inline std::array<acc_t<T>, R> rows_rstd(const T* x, int64_t N, double eps,
                                         acc_t<T>* keep = nullptr) {
  using A = acc_t<T>;
  using V = typename RowIO<T>::V;
  const V ss = rows_sumsq_lanes<R, T, kKeep>(x, N, keep);
  return first_lanes<R>(V(A(1)) / (ss / V(static_cast<A>(N)) + V(static_cast<A>(eps))).sqrt());
}

// ln_row_stats of rows x, x + N, ..., x + (R - 1) * N; keep as in rows_sumsq_lanes. The mean, then
// the corrected two-pass variance: var = (sum(d^2) - sum(d)^2 / N) / N with d = x - mean0,
// mean = mean0 + sum(d) / N; both finish lane-wise for the group.
template <int R, typename T, bool kKeep = false>
inline std::array<LnStats<acc_t<T>>, R> ln_rows_stats(const T* x, int64_t N, double eps,
                                                      acc_t<T>* keep = nullptr) {
  using IO = RowIO<T>;
  using A = acc_t<T>;
  using V = typename IO::V;
  constexpr int64_t S = IO::kStep;
  RowVecs<V, R> s;
  group_pass<R, 2 * S, V>(
      N,
      [&](int r, int64_t j, int64_t n, Acc4<V>& p) {
        V a, b, c, d;
        load2_part(x + r * N + j, n, a, b, c, d);
        if constexpr (kKeep) keep_part(keep + r * N + j, n, a, b, c, d);
        p.p0 = p.p0 + a;
        p.p1 = p.p1 + b;
        p.p2 = p.p2 + c;
        p.p3 = p.p3 + d;
      },
      [&](int r, const Acc4<V>& t) { s.set(r, (t.p0 + t.p1) + (t.p2 + t.p3)); });
  const V mean0 = hsum_rows<R>(s) / V(static_cast<A>(N));
  const auto m0 = first_lanes<R>(mean0);
  RowVecs<V, R> sq, sd;
  group_pass<R, S, V>(
      N,
      [&](int r, int64_t j, int64_t n, Acc4<V>& p) {
        const V vm(m0[r]);
        V a, b;
        load_part(group_row<kKeep>(x, keep, N, r) + j, n, a, b);
        a = a - vm;
        b = b - vm;
        if (n < S) zero_tail(a, b, n);
        p.p0 = at::vec::fmadd(a, a, p.p0);
        p.p1 = at::vec::fmadd(b, b, p.p1);
        p.p2 = p.p2 + a;
        p.p3 = p.p3 + b;
      },
      [&](int r, const Acc4<V>& t) {
        sq.set(r, t.p0 + t.p1);
        sd.set(r, t.p2 + t.p3);
      });
  const V inv_n(A(1) / static_cast<A>(N));
  const V vsd = hsum_rows<R>(sd);
  const V mean = at::vec::fmadd(vsd, inv_n, mean0);
  const V var_raw = at::vec::fnmadd(vsd * vsd, inv_n, hsum_rows<R>(sq)) * inv_n;
  const V var = V::blendv(var_raw, V(A(0)), var_raw < V(A(0)));  // keeps NaN and -0
  const V rstd = V(A(1)) / (var + V(static_cast<A>(eps))).sqrt();
  const auto mm = first_lanes<R>(mean), rr = first_lanes<R>(rstd);
  std::array<LnStats<A>, R> out;
  for (int r = 0; r < R; ++r) out[r] = {mm[r], rr[r]};
  return out;
}

// One row: sum(x^2) and LayerNorm's mean / rstd (the corrected two-pass variance), the R = 1
// case of the above (its accumulators in registers, no call in the row loop). keep (kKeep):
// N floats, the row converted to fp32 (row_stats.h).
template <typename T, bool kKeep = false>
inline acc_t<T> row_sumsq(const T* x, int64_t N, acc_t<T>* keep = nullptr) {
  return first_lanes<1>(rows_sumsq_lanes<1, T, kKeep>(x, N, keep))[0];
}

template <typename T, bool kKeep = false>
inline LnStats<acc_t<T>> ln_row_stats(const T* x, int64_t N, double eps,
                                      acc_t<T>* keep = nullptr) {
  return ln_rows_stats<1, T, kKeep>(x, N, eps, keep)[0];
}

}  // namespace rmsnorm_ext::cpu
