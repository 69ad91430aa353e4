// Vectorized row I/O for the CPU kernels.
//
// Every kernel walks a row in "steps" of two accumulator vectors (2 x 16 floats with
// AVX-512, 2 x 8 with AVX2): one step of a bfloat16/float16 row is exactly one
// Vectorized<T>, so loads convert to fp32 with a single instruction sequence and the
// two halves double as two independent accumulators. The last, partial step goes
// through a small zero-padded stack buffer so it is vectorized too and never reads
// or writes past the row.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>

namespace rmsnorm_ext::cpu {

using at::vec::Vectorized;

// Accumulation type: fp32, or fp64 for fp64 data.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

// Prefetches the part of the next row (`next`, may be null) that matches step j of this
// one: a kernel calls it while writing row i so that row i + 1's trip from memory overlaps
// this row's arithmetic and stores instead of following them.
// kLocality: 3 into L1, 2 into L2 (where the current row's own traffic would evict the
// prefetched lines from L1 before they are read).
template <typename T, int64_t kStep, int kLocality = 3>
inline void prefetch_step(const void* next, int64_t j) {
  if (next == nullptr) return;
  const char* p = static_cast<const char*>(next) + j * static_cast<int64_t>(sizeof(T));
  for (int64_t o = 0; o < kStep * static_cast<int64_t>(sizeof(T)); o += 64) {
    __builtin_prefetch(p + o, 0, kLocality);
  }
}

template <typename T>
struct RowIO {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  static constexpr int64_t kLanes = V::size();
  static constexpr int64_t kStep = 2 * kLanes;
  static_assert(std::is_same_v<T, A> || Vectorized<T>::size() == kStep,
                "a reduced-precision vector must hold two fp32 vectors");

  static inline void load(const T* p, V& a, V& b) {
    if constexpr (std::is_same_v<T, A>) {
      a = V::loadu(p);
      b = V::loadu(p + kLanes);
    } else {
      at::vec::load_to_float<T>(p, a, b);
    }
  }

  static inline void store(T* p, const V& a, const V& b) {
    if constexpr (std::is_same_v<T, A>) {
      a.store(p);
      b.store(p + kLanes);
#if defined(__AVX512BF16__) && defined(CPU_CAPABILITY_AVX512)
    } else if constexpr (std::is_same_v<T, at::BFloat16>) {
      // The avx512bf16 build (setup.py): one instruction rounds 32 floats to nearest-even
      // bfloat16, where at::vec's portable rounding takes about ten. Unlike it, the
      // instruction reads a subnormal float (|v| < 2^-126, 1.2e-38) as zero, so such a
      // result is stored as a signed zero instead of a subnormal bfloat16; NaN stays NaN.
      _mm512_storeu_si512(p, (__m512i)_mm512_cvtne2ps_pbh(b, a));
#endif
    } else {
      at::vec::convert_from_float<T>(a, b).store(p);
    }
  }

  // n < kStep elements; the missing lanes read as zero.
  static inline void load_tail(const T* p, int64_t n, V& a, V& b) {
    alignas(64) T buf[kStep];
    std::memset(static_cast<void*>(buf), 0, sizeof(buf));
    std::memcpy(static_cast<void*>(buf), p, n * sizeof(T));
    load(buf, a, b);
  }

  static inline void store_tail(T* p, int64_t n, const V& a, const V& b) {
    alignas(64) T buf[kStep];
    store(buf, a, b);
    std::memcpy(static_cast<void*>(p), buf, n * sizeof(T));
  }

  // A whole step (n == kStep) or the zero-padded tail (n < kStep).
  static inline void load_n(const T* p, int64_t n, V& a, V& b) {
    if (n == kStep) load(p, a, b);
    else load_tail(p, n, a, b);
  }

  // Two steps (n <= 2 * kStep elements) into four vectors: reductions use them as four
  // independent accumulators, which hides the FMA latency (two chains would stall on it).
  static inline void load2_n(const T* p, int64_t n, V& a, V& b, V& c, V& d) {
    load_n(p, std::min(n, kStep), a, b);
    if (n > kStep) {
      load_n(p + kStep, n - kStep, c, d);
    } else {
      c = V(A(0));
      d = V(A(0));
    }
  }

  static inline void store_n(T* p, int64_t n, const V& a, const V& b) {
    if (n == kStep) store(p, a, b);
    else store_tail(p, n, a, b);
  }
};

// Runs f(j, n, part) over the steps of a row (j: first element, n: its length, part: K
// accumulator vectors), restarting `part` every kBlockSteps steps and adding it into the
// running total. A row of N elements then rounds like a sum of ~kBlockSteps terms plus one
// of N / (kBlockSteps * kStep) terms, instead of N / kStep terms per lane: the accuracy
// of a cascade sum at the cost of one extra add per block.
template <int K, typename V, typename F>
inline std::array<V, K> blocked_row_sum(int64_t N, int64_t step, F&& f) {
  constexpr int64_t kBlockSteps = 32;
  std::array<V, K> total, part;
  total.fill(V(0));
  for (int64_t j = 0; j < N;) {
    part.fill(V(0));
    const int64_t end = std::min(N, j + kBlockSteps * step);
    for (; j < end; j += step) f(j, std::min(step, N - j), part);
    for (int k = 0; k < K; ++k) total[k] = total[k] + part[k];
  }
  return total;
}

// Zero the lanes at and past n (n < kStep) of a step (a, b): used where a padded lane
// would not be zero after arithmetic, e.g. (x - mean) in LayerNorm's variance.
template <typename A>
inline void zero_tail(Vectorized<A>& a, Vectorized<A>& b, int64_t n) {
  constexpr int64_t L = Vectorized<A>::size();
  const Vectorized<A> z(A(0));
  if (n < L) {
    a = Vectorized<A>::set(z, a, n);
    b = z;
  } else {
    b = Vectorized<A>::set(z, b, n - L);
  }
}

template <typename A>
inline A reduce_add(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](Vectorized<A>& x, Vectorized<A>& y) { return x + y; }, v);
}

}  // namespace rmsnorm_ext::cpu
