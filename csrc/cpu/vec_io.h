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
#include <cstdint>
#include <cstring>
#include <tuple>
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

// Masked tail I/O: the first n (0 <= n < kStep) elements of a step as two fp32 vectors (the
// rest zero), or stored from them, in a few vector instructions where the ISA has masked
// loads and stores -- where the scalar loop over a zero-padded buffer cost more than the
// row's arithmetic for short rows (a channels_last ConvNeXt-atto map, C = 40: 16 + 16 + 8).
// Returns false where there is no masked path (default ISA, fp64): the caller falls back.
namespace masked {

#if defined(CPU_CAPABILITY_AVX512)
inline __mmask16 m16(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}
inline __mmask32 m32(int64_t n) {
  return n >= 32 ? __mmask32(0xFFFFFFFFu) : n <= 0 ? __mmask32(0) : __mmask32((1u << n) - 1);
}
#elif defined(CPU_CAPABILITY_AVX2)
inline __m256i m8(int64_t n) {  // int32 lanes < n all-ones
  const int32_t k = static_cast<int32_t>(n < 0 ? 0 : n > 8 ? 8 : n);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif

template <typename T, typename V>
inline bool load(const T* p, int64_t n, V& a, V& b) {
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    a = V(_mm512_maskz_loadu_ps(m16(n), p));
    b = V(_mm512_maskz_loadu_ps(m16(n - 16), p + 16));
    return true;
#elif defined(CPU_CAPABILITY_AVX2)
    a = V(_mm256_maskload_ps(p, m8(n)));
    b = V(_mm256_maskload_ps(p + 8, m8(n - 8)));
    return true;
#endif
  } else if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512i v = _mm512_maskz_loadu_epi16(m32(n), p);
    std::tie(a, b) = at::vec::convert_to_float<T>(Vectorized<T>(v));
    return true;
#elif defined(CPU_CAPABILITY_AVX2)
    // Pairs of elements as int32 lanes, then an odd last element on its own.
    __m256i v = _mm256_maskload_epi32(reinterpret_cast<const int*>(p), m8(n / 2));
    if (n % 2) {
      uint16_t last;
      std::memcpy(&last, p + n - 1, sizeof(last));
      const __m256i lane = _mm256_cmpeq_epi32(_mm256_set1_epi32(static_cast<int32_t>(n / 2)),
                                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      v = _mm256_or_si256(v, _mm256_and_si256(lane, _mm256_set1_epi32(last)));
    }
    std::tie(a, b) = at::vec::convert_to_float<T>(Vectorized<T>(v));
    return true;
#endif
  }
  return false;
}

template <typename T, typename V>
inline bool store(T* p, int64_t n, const V& a, const V& b) {
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    _mm512_mask_storeu_ps(p, m16(n), a);
    _mm512_mask_storeu_ps(p + 16, m16(n - 16), b);
    return true;
#elif defined(CPU_CAPABILITY_AVX2)
    _mm256_maskstore_ps(p, m8(n), a);
    _mm256_maskstore_ps(p + 8, m8(n - 8), b);
    return true;
#endif
  } else if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    Vectorized<T> v;
#if defined(__AVX512BF16__) && defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      v = Vectorized<T>((__m512i)_mm512_cvtne2ps_pbh(b, a));  // as RowIO::store
    } else {
      v = at::vec::convert_from_float<T>(a, b);
    }
#else
    v = at::vec::convert_from_float<T>(a, b);
#endif
#if defined(CPU_CAPABILITY_AVX512)
    _mm512_mask_storeu_epi16(p, m32(n), v);
#else
    _mm256_maskstore_epi32(reinterpret_cast<int*>(p), m8(n / 2), v);
    if (n % 2) {
      alignas(32) T buf[16];
      v.store(buf);
      p[n - 1] = buf[n - 1];
    }
#endif
    return true;
#endif
  }
  return false;
}

}  // namespace masked

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
    if (masked::load(p, n, a, b)) return;
    alignas(64) T buf[kStep];
    std::memset(static_cast<void*>(buf), 0, sizeof(buf));
    std::memcpy(static_cast<void*>(buf), p, n * sizeof(T));
    load(buf, a, b);
  }

  static inline void store_tail(T* p, int64_t n, const V& a, const V& b) {
    if (masked::store(p, n, a, b)) return;
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

// A normalized value's output: d * r, times w where there is a weight, plus b where there
// is a bias, the last product and the bias added as one explicit FMA. Written out, not left
// to GCC's contraction of `d * r * w + b`, which fuses or not depending on the code around
// it: the same row rounded an ulp apart in two instantiations of a kernel.
template <typename A>
C10_ALWAYS_INLINE Vectorized<A> affine_out(const Vectorized<A>& d, const Vectorized<A>& r,
                                           bool has_w, const Vectorized<A>& w, bool has_b,
                                           const Vectorized<A>& b) {
  if (!has_w) return has_b ? at::vec::fmadd(d, r, b) : d * r;
  const Vectorized<A> u = d * r;
  return has_b ? at::vec::fmadd(u, w, b) : u * w;
}

template <typename A>
inline A reduce_add(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](Vectorized<A>& x, Vectorized<A>& y) { return x + y; }, v);
}

}  // namespace rmsnorm_ext::cpu
