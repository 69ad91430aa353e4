// CPU kernels for the channels-first norms: RMSNorm and LayerNorm, forward and backward, on a
// contiguous [B, C, S] tensor normalized over C (rms_norm_2d / layer_norm_2d; kernel_params.h,
// inner = S > 1). Row (o, s) has its C elements S apart, so a row-at-a-time kernel would
// gather every element; instead the vectors run ACROSS positions: a SIMD lane is one row,
// and channel j of a window of kStep consecutive positions is one contiguous vector load.
//
// Work is split into tiles (`width` consecutive positions of one batch item, all C channels)
// for the threads, and each tile is walked G windows at a time: for a group of windows the
// statistics passes run over the C channels (the first from memory or L2, the others from
// L1/L2), then the output pass over the C channels with the group's statistics in registers
// (a channel's G windows are one contiguous run, so these passes stream). Meanwhile the next
// tile is prefetched, a whole channel run at a time, so its trip from memory overlaps this
// tile's arithmetic. Each lane sums over C with blocked_row_sum (blocks of channels added into
// a running total: the row kernels' cascade) and forms rstd / mean / dx with the row kernels'
// formulas and grouping, so a row here rounds like a row there; one rounding of each output.
//
// Parameter gradients: each channel's dy * xhat (and dy) over a group of windows is summed
// lane-wise then across lanes into the tile's row of C sums; tiles are the "rows" of the
// param_rows.h tree (blocks of kBlockRows tiles, pairwise above), so dweight / dbias are
// deterministic for a given thread count and accurate over any number of positions.
#include "dispatch.h"
#include "kernels.h"
#include "param_rows.h"
#include "prefault.h"
#include "row_group_stats.h"
#include "vec_io.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

namespace rmsnorm_ext::cpu {
namespace {

// Bytes of input in a tile (x, plus dy in the backward): the tile being prefetched waits in
// L2 next to the one being computed.
constexpr int64_t kTileBytes = int64_t{64} << 10;
// At most this many positions per tile (small C): a long channel run gains nothing more.
constexpr int64_t kMaxTile = 1024;
// Windows per group (see the top): as many as keep the passes' accumulators and statistics
// mostly in registers (the backward holds more per window); measured best on AVX2. The
// forward takes 4, or on AVX2 2 where its loads are the lane-order bfloat16 ones (WinIO),
// which ran 5-10% faster with 2 at C = 192 / 768 (fp32 and fp16 ran 5-20% slower with 2).
constexpr int kFwdGroup = 4;
constexpr int kBwdGroup = 2;

// The tiles of a [B, C, S] tensor. Unit u = (item o, tile k) covers positions [s0, s0 + n) of
// item o. The width is a whole number of window groups (at least one, even past
// kTileBytes: a group of full windows is the most efficient unit of arithmetic). An item has
// max(1, S / width) tiles and the last one takes the remainder too (n in [width, 2 * width)),
// so with S >= kStep every tile holds at least one whole step (Windows).
struct Tiles {
  struct Unit {
    int64_t o, s0, n;
  };
  int64_t C, S, width, per_item, count;

  // group: positions per group of windows; elem_bytes: input bytes per element (summed over
  // the tensors a tile reads).
  Tiles(int64_t M, int64_t C_, int64_t S_, int64_t group, int64_t elem_bytes) : C(C_), S(S_) {
    width = std::clamp(kTileBytes / (C * elem_bytes) / group * group, group, kMaxTile);
    per_item = std::max<int64_t>(1, S / width);
    count = M / S * per_item;
  }
  Unit unit(int64_t u) const {
    const int64_t o = u / per_item, k = u % per_item;
    return {o, k * width, k + 1 == per_item ? S - k * width : width};
  }
  int64_t data(const Unit& t) const { return t.o * C * S + t.s0; }  // element (o, 0, s0)
  int64_t stats(const Unit& t) const { return t.o * S + t.s0; }     // row (o, s0)
};

// The vector windows of a tile of n positions, taken G at a time. Window k covers kStep
// positions from min(k * kStep, n - kStep): where n is not a whole number of steps the last
// window is shifted back to end at n, so it is a full-width load and store that stays inside
// the tile (no padding cost on every channel, e.g. 7 x 7 = 49 positions); its first dup
// lanes repeat positions of the window before: recomputed to the same bits, stored again,
// and masked out of the parameter-gradient sums. The windows that do not fill a last group
// of G go in smaller groups (for_each_group). A tile shorter than one step (S < kStep) is a
// single zero-padded window (RowIO::load_n / store_n).
template <int64_t kStep>
struct Windows {
  template <int G>
  struct Group {
    int64_t off[G];  // the windows' first positions
    int64_t dup[G];  // their repeated lanes
  };
  int64_t n, count, len;
  explicit Windows(int64_t n_)
      : n(n_), count((n_ + kStep - 1) / kStep), len(std::min(n_, kStep)) {}
  // The group of windows [k0, k0 + G) (k0 + G <= count).
  template <int G>
  Group<G> group_at(int64_t k0) const {
    Group<G> g;
    for (int i = 0; i < G; ++i) {
      g.off[i] = off(k0 + i);
      g.dup[i] = (k0 + i) * kStep - g.off[i];
    }
    return g;
  }
  int64_t off(int64_t k) const { return std::min(k * kStep, n - len); }

  // Calls f(size, group, p, np) for the windows G at a time while G remain, then the rest in
  // groups of G / 2, G / 4, ..., 1 windows (size: a std::integral_constant<int, g>; p: the
  // group's index among the np): a partial group of G would cost a whole group's arithmetic
  // on repeated windows (a 7 x 7 map on AVX-512 is 2 windows: half of a group of 4).
  // A lane's arithmetic does not depend on its group's size, so neither do its results.
  template <int G, typename F>
  void for_each_group(F&& f) const {
    static_assert(G > 0 && (G & (G - 1)) == 0, "the remainder's groups are G's binary digits");
    const int64_t np = count / G + __builtin_popcountll(static_cast<uint64_t>(count % G));
    int64_t k = 0, p = 0;
    for (; k + G <= count; k += G) f(std::integral_constant<int, G>{}, group_at<G>(k), p++, np);
    tail<G / 2>(k, p, np, f);
  }

 private:
  template <int G, typename F>
  void tail(int64_t k, int64_t p, int64_t np, F& f) const {
    if constexpr (G >= 1) {
      if (k + G <= count) {
        f(std::integral_constant<int, G>{}, group_at<G>(k), p++, np);
        k += G;
      }
      tail<G / 2>(k, p, np, f);
    }
  }
};

// The 2 * G accumulator-width vectors of a group of G windows.
template <typename A, int G>
using Vecs = std::array<Vectorized<A>, 2 * G>;

// Whole windows (kFull: S >= kStep) of a bfloat16 map load in a lane order of their own,
// where at::vec's in-order conversions cost about a fifth of a bfloat16 LayerNorm's
// instructions (its three passes reload their input):
//  - AVX2: two unpacks against zero leave the positions in the lanes in the order {0-3, 8-11}
//    and {4-7, 12-15}; a plain pack of the two stores them (no lane crossing either way; an
//    in-order load takes a lane-crossing extract and two widenings, a store a permute);
//  - AVX-512 with BF16: a shift and a mask leave the even positions in one vector and the odd
//    ones in the other (an in-order load widens each half: four instructions for two); a store
//    rounds both with one instruction, as RowIO does, and interleaves the words with one
//    permute.
// A lane here is one position and never meets another lane, so only what is stored or summed
// per position sees the order: the statistics go to and from memory order once per group
// (to_memory / to_lanes), and the backward's parameter-gradient terms before they are summed
// across lanes, so every result has the same bits as with in-order loads. Same rounding as
// the in-order path of each build (AVX2: at::vec's nearest-even, NaN as 0xFFFF).
template <typename T, bool kFull>
struct WinIO {
  using A = acc_t<T>;
  using V = Vectorized<A>;
#if defined(CPU_CAPABILITY_AVX2) || (defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__))
  static constexpr bool kPermuted = kFull && std::is_same_v<T, c10::BFloat16>;
#else
  static constexpr bool kPermuted = false;
#endif

  static inline void load(const T* p, int64_t len, V& a, V& b) {
    if constexpr (kPermuted) {
#if defined(CPU_CAPABILITY_AVX2)
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m256i z = _mm256_setzero_si256();
      a = V(_mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v)));
      b = V(_mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v)));
#elif defined(CPU_CAPABILITY_AVX512)
      const __m512i v = _mm512_loadu_si512(p);
      a = V(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));  // even positions
      b = V(_mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int32_t(0xFFFF0000u)))));
#endif
      return;
    }
    if constexpr (kFull) RowIO<T>::load(p, a, b);
    else RowIO<T>::load_n(p, len, a, b);
  }

  static inline void store(T* p, int64_t len, const V& a, const V& b) {
    if constexpr (kPermuted) {
#if defined(CPU_CAPABILITY_AVX2)
      const __m256i v = _mm256_packus_epi32(bf16_bits(a), bf16_bits(b));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
#elif defined(CPU_CAPABILITY_AVX512)
      // words 0-15: the even positions, 16-31: the odd ones -> position order.
      const __m512i w = (__m512i)_mm512_cvtne2ps_pbh(b, a);
      const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                             24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                             16, 0);
      _mm512_storeu_si512(p, _mm512_permutexvar_epi16(order, w));
#endif
      return;
    }
    if constexpr (kFull) RowIO<T>::store(p, a, b);
    else RowIO<T>::store_n(p, len, a, b);
  }

  // Statistics vectors from the lane order to memory order (positions in order) ...
  static inline void to_memory(V& a, V& b) {
    if constexpr (kPermuted) {
#if defined(CPU_CAPABILITY_AVX2)
      swap_halves(a, b);
#elif defined(CPU_CAPABILITY_AVX512)
      const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
      const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30,
                                           15, 31);
      const __m512 m0 = _mm512_permutex2var_ps(a, lo, b), m1 = _mm512_permutex2var_ps(a, hi, b);
      a = V(m0);
      b = V(m1);
#endif
    }
  }

  // ... and back.
  static inline void to_lanes(V& a, V& b) {
    if constexpr (kPermuted) {
#if defined(CPU_CAPABILITY_AVX2)
      swap_halves(a, b);
#elif defined(CPU_CAPABILITY_AVX512)
      const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                             28, 30);
      const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29,
                                            31);
      const __m512 e = _mm512_permutex2var_ps(a, even, b), o = _mm512_permutex2var_ps(a, odd, b);
      a = V(e);
      b = V(o);
#endif
    }
  }

 private:
#if defined(CPU_CAPABILITY_AVX2)
  // AVX2: the lane order swaps 128-bit halves, the same swap both ways.
  static inline void swap_halves(V& a, V& b) {
    const __m256 lo = _mm256_permute2f128_ps(a, b, 0x20);
    const __m256 hi = _mm256_permute2f128_ps(a, b, 0x31);
    a = V(lo);
    b = V(hi);
  }

  // Each lane's float rounded to nearest-even bfloat16 bits in its low 16 bits (NaN: 0xFFFF),
  // as at::vec's cvtfp32_bf16.
  static inline __m256i bf16_bits(__m256 x) {
    const __m256i i = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(i, 16), _mm256_set1_epi32(1));
    __m256i t = _mm256_add_epi32(_mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)), i);
    t = _mm256_srli_epi32(t, 16);
    const __m256i ordered = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_ORD_Q));
    return _mm256_blendv_epi8(_mm256_set1_epi32(0xffff), t, ordered);
  }
#endif
};

template <typename T, bool kFull, int G>
inline void to_memory(Vecs<acc_t<T>, G>& v) {
  for (int i = 0; i < G; ++i) WinIO<T, kFull>::to_memory(v[2 * i], v[2 * i + 1]);
}

template <typename T, bool kFull, int G>
inline void to_lanes(Vecs<acc_t<T>, G>& v) {
  for (int i = 0; i < G; ++i) WinIO<T, kFull>::to_lanes(v[2 * i], v[2 * i + 1]);
}

template <bool kFull, int G, typename T, int64_t kStep>
inline Vecs<acc_t<T>, G> load_group(const T* p, const Windows<kStep>& w,
                                    const typename Windows<kStep>::template Group<G>& gr) {
  Vecs<acc_t<T>, G> v;
  for (int i = 0; i < G; ++i) {
    WinIO<T, kFull>::load(p + gr.off[i], w.len, v[2 * i], v[2 * i + 1]);
  }
  return v;
}

template <bool kFull, int G, typename T, int64_t kStep>
inline void store_group(T* p, const Windows<kStep>& w,
                        const typename Windows<kStep>::template Group<G>& gr,
                        const Vecs<acc_t<T>, G>& v) {
  for (int i = 0; i < G; ++i) WinIO<T, kFull>::store(p + gr.off[i], w.len, v[2 * i], v[2 * i + 1]);
}

// Zero the lanes of v that repeat other positions (Group::dup), for the parameter
// gradients' sums.
template <typename A, int G, typename Group>
inline void zero_dup(Vecs<A, G>& v, const Group& gr) {
  constexpr int64_t L = Vectorized<A>::size();
  const Vectorized<A> z(A(0));
  for (int i = 0; i < G; ++i) {
    const int64_t k = gr.dup[i];
    if (k == 0) continue;
    Vectorized<A>& a = v[2 * i];
    Vectorized<A>& b = v[2 * i + 1];
    if (k >= L) {
      a = z;
      b = Vectorized<A>::set(b, z, k - L);
    } else {
      a = Vectorized<A>::set(a, z, k);
    }
  }
}

// a * b rounded on its own (the CPU twin of cuda_utils.cuh's mul_rn). GCC contracts a
// product into a following add or subtract (an FMA) even across statements, so where the
// same product is formed in two passes and must cancel exactly (g = dy * w, whose mean
// LayerNorm's backward subtracts: exactly 0 for C = 1), both passes form it with this: an
// explicit FMA with a -0 addend is the rounded product (signed zeros included) and is never
// fused further.
template <typename A>
inline Vectorized<A> mul_rn(const Vectorized<A>& a, const Vectorized<A>& b) {
  return at::vec::fmadd(a, b, Vectorized<A>(A(-0.0)));
}

// Prefetches the next tile (into L2: it waits there while this tile's traffic passes through
// L1), spread over the output passes of this tile's np window groups: group p fetches the next
// tile's channels [p * ceil(C / np), (p + 1) * ceil(C / np)), one channel's whole run every
// np-th channel it computes, so each request is a contiguous run and the runs come evenly
// through the tile. One or two tensors (x, and dy in the backward).
template <typename T>
class NextTilePrefetch {
 public:
  NextTilePrefetch(const T* a, const T* b, const Tiles& tl, const Tiles::Unit* next, int64_t p,
                   int64_t np)
      : base_{a, b}, S_(tl.S), np_(np), wait_(0) {
    if (next == nullptr) return;
    const int64_t per = (tl.C + np - 1) / np;
    bytes_ = next->n * static_cast<int64_t>(sizeof(T));
    row_ = std::min(tl.C, p * per);
    end_ = std::min(tl.C, row_ + per);
    for (const T*& t : base_) t = t ? t + tl.data(*next) : nullptr;
  }

  // Called once per channel of the output pass.
  void step() {
    if (row_ == end_ || --wait_ > 0) return;
    wait_ = np_;
    for (const T* t : base_) {
      if (t == nullptr) continue;
      const char* r = reinterpret_cast<const char*>(t + row_ * S_);
      const uintptr_t end = reinterpret_cast<uintptr_t>(r + bytes_);
      for (uintptr_t a = reinterpret_cast<uintptr_t>(r) & ~uintptr_t{63}; a < end; a += 64) {
        __builtin_prefetch(reinterpret_cast<const void*>(a), 0, 2);
      }
    }
    ++row_;
  }

 private:
  const T* base_[2];
  int64_t S_, np_, wait_;
  int64_t bytes_ = 0, row_ = 0, end_ = 0;
};

// Runs f(t, next) for the units [from, to) of a thread's contiguous range [b, e) (next: the
// unit after t if it is in the range, for prefetching, else null), backing the output's
// pages (prefault.h) one batch item at a time before the item's first tile in the range: an
// item's channels span all of its memory, so the item, not the tile, is the unit of
// prefaulting.
template <typename F>
void for_each_unit(const Tiles& tl, const OutputPrefault& pf, int64_t b, int64_t e, int64_t from,
                   int64_t to, F&& f) {
  const int64_t ob = b / tl.per_item, oe = (e - 1) / tl.per_item + 1;
  for (int64_t u = from; u < to; ++u) {
    const Tiles::Unit t = tl.unit(u);
    if (u == b || t.s0 == 0) pf.before_row(t.o, ob, oe);
    const Tiles::Unit next = u + 1 < e ? tl.unit(u + 1) : Tiles::Unit{0, 0, 0};
    f(t, u + 1 < e ? &next : nullptr);
  }
}

// ---------------------------------------------------------------------------------------
// Forward

template <typename T>
struct FwdArgs {
  const T* x;
  T* y;
  acc_t<T>* mean;  // layer norm only
  acc_t<T>* rstd;
  const acc_t<T>* w;     // may be null
  const acc_t<T>* bias;  // layer norm only; may be null
  double eps;
};

// The statistics of a group of G windows: rstd, and for LayerNorm the mean (as
// ln_row_stats, row_group_stats.h, lane-wise: the mean, then the corrected two-pass variance
// sum(d^2) - sum(d)^2 / C with d = x - mean0). Stored, and returned for the output pass.
template <typename T, bool kLayer, bool kFull, int G, int64_t kStep>
void fwd_group_stats(const FwdArgs<T>& a, const Tiles& tl, const Tiles::Unit& t, const T* x,
                     const Windows<kStep>& win,
                     const typename Windows<kStep>::template Group<G>& gr,
                     Vecs<acc_t<T>, G>& mu, Vecs<acc_t<T>, G>& rs) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int K = 2 * G;
  const V vn(static_cast<A>(tl.C)), ve(static_cast<A>(a.eps)), one(A(1)), zero(A(0));
  auto load = [&](int64_t j) { return load_group<kFull, G>(x + j * tl.S, win, gr); };
  if constexpr (!kLayer) {
    const auto s = blocked_row_sum<K, V>(tl.C, 1, [&](int64_t j, int64_t, auto& p) {
      const auto v = load(j);
      for (int i = 0; i < K; ++i) p[i] = at::vec::fmadd(v[i], v[i], p[i]);
    });
    for (int i = 0; i < K; ++i) rs[i] = one / (s[i] / vn + ve).sqrt();  // rstd_from
  } else {
    const auto s = blocked_row_sum<K, V>(tl.C, 1, [&](int64_t j, int64_t, auto& p) {
      const auto v = load(j);
      for (int i = 0; i < K; ++i) p[i] = p[i] + v[i];
    });
    Vecs<A, G> m0;
    for (int i = 0; i < K; ++i) m0[i] = s[i] / vn;
    const auto tv = blocked_row_sum<2 * K, V>(tl.C, 1, [&](int64_t j, int64_t, auto& p) {
      const auto v = load(j);
      for (int i = 0; i < K; ++i) {
        const V d = v[i] - m0[i];
        p[i] = at::vec::fmadd(d, d, p[i]);
        p[K + i] = p[K + i] + d;
      }
    });
    const V vinv(A(1) / static_cast<A>(tl.C));
    for (int i = 0; i < K; ++i) {
      const V sd = tv[K + i];
      mu[i] = m0[i] + sd * vinv;
      const V var = (tv[i] - sd * sd * vinv) * vinv;
      rs[i] = one / (V::blendv(var, zero, var < zero) + ve).sqrt();  // var < 0 ? 0 : var
    }
    auto m = mu;
    to_memory<T, kFull, G>(m);
    store_group<kFull, G>(a.mean + tl.stats(t), win, gr, m);
  }
  auto r = rs;
  to_memory<T, kFull, G>(r);
  store_group<kFull, G>(a.rstd + tl.stats(t), win, gr, r);
}

// y = (x - mean) * rstd * w + bias (RMSNorm: x * rstd * w), a tile by groups of G windows.
template <typename T, bool kLayer, bool kFull, int G>
void fwd_tile(const FwdArgs<T>& a, const Tiles& tl, const Tiles::Unit& t,
              const Tiles::Unit* next) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t kStep = RowIO<T>::kStep;
  const Windows<kStep> win(t.n);
  const T* x = a.x + tl.data(t);
  T* y = a.y + tl.data(t);
  win.template for_each_group<G>([&](auto size, const auto& gr, int64_t p, int64_t ng) {
    constexpr int g = decltype(size)::value;
    Vecs<A, g> mu, rs;
    fwd_group_stats<T, kLayer, kFull, g>(a, tl, t, x, win, gr, mu, rs);
    NextTilePrefetch<T> pf(a.x, nullptr, tl, next, p, ng);
    for (int64_t j = 0; j < tl.C; ++j) {
      pf.step();
      auto v = load_group<kFull, g>(x + j * tl.S, win, gr);
      const V wj(a.w ? a.w[j] : A(1)), bj(a.bias ? a.bias[j] : A(0));
      for (int i = 0; i < 2 * g; ++i) {
        if constexpr (kLayer) v[i] = v[i] - mu[i];
        v[i] = affine_out(v[i], rs[i], a.w != nullptr, wj, kLayer && a.bias != nullptr, bj);
      }
      store_group<kFull, g>(y + j * tl.S, win, gr, v);
    }
  });
}

template <typename T, bool kLayer>
void fwd_units(const FwdArgs<T>& a, int64_t M, int64_t C, int64_t S) {
#if defined(CPU_CAPABILITY_AVX2)
  constexpr int G = WinIO<T, true>::kPermuted ? 2 : kFwdGroup;
#else
  constexpr int G = kFwdGroup;  // AVX-512 (32 registers): 4 ran 5-10% faster than 2 in L2
#endif
  const Tiles tl(M, C, S, G * RowIO<T>::kStep, sizeof(T));
  const OutputPrefault pf(a.y, M / S, C * S * static_cast<int64_t>(sizeof(T)));
  at::parallel_for(0, tl.count, row_grain(C * tl.width), [&](int64_t b, int64_t e) {
    for_each_unit(tl, pf, b, e, b, e, [&](const Tiles::Unit& t, const Tiles::Unit* next) {
      if (S >= RowIO<T>::kStep) fwd_tile<T, kLayer, true, G>(a, tl, t, next);
      else fwd_tile<T, kLayer, false, G>(a, tl, t, next);
    });
  });
}

// ---------------------------------------------------------------------------------------
// Backward

template <typename T>
struct BwdArgs {
  const T* dy;
  const T* x;
  const acc_t<T>* mean;  // layer norm only
  const acc_t<T>* rstd;
  const acc_t<T>* w;  // may be null
  T* dx;
};

// A tile by groups of G windows, as ln_bwd_rows / rms_bwd_rows lane-wise. With
// xhat = (x - mean) * rstd (RMSNorm: x * rstd) and g = dy * w:
//   LayerNorm: dx = rstd * (g - c1 - xhat * c2), c1 = mean(g), c2 = mean(g * xhat);
//   RMSNorm:   dx = rstd * (g - xhat * c),       c = rstd * mean(g * x)
// (rms_norm_cpu.cpp's grouping: no intermediate outgrows |dx|). dwp / dbp (may be null):
// the tile's sums of dy * xhat and of dy, one entry per channel, added to.
template <typename T, bool kLayer, bool kFull, int G>
void bwd_tile(const BwdArgs<T>& a, const Tiles& tl, const Tiles::Unit& t,
              const Tiles::Unit* next, acc_t<T>* dwp, acc_t<T>* dbp) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t kStep = RowIO<T>::kStep;
  const Windows<kStep> win(t.n);
  const int64_t base = tl.data(t);
  const T* dy = a.dy + base;
  const T* x = a.x + base;
  T* dx = a.dx + base;
  win.template for_each_group<G>([&](auto size, const auto& gr, int64_t p, int64_t ng) {
    constexpr int Gs = decltype(size)::value;
    constexpr int K = 2 * Gs;
    auto load = [&](const auto* ptr) { return load_group<kFull, Gs>(ptr, win, gr); };
    // Padded lanes (S < kStep) load mean = rstd = 0 and dy = 0: every sum stays 0 there.
    Vecs<A, Gs> mu{}, rs = load(a.rstd + tl.stats(t)), c1{}, c2;
    to_lanes<T, kFull, Gs>(rs);  // to the lane order of T's windows (WinIO)
    if constexpr (kLayer) {
      mu = load(a.mean + tl.stats(t));
      to_lanes<T, kFull, Gs>(mu);
      const auto s = blocked_row_sum<2 * K, V>(tl.C, 1, [&](int64_t j, int64_t, auto& acc) {
        auto g = load(dy + j * tl.S);
        const auto v = load(x + j * tl.S);
        const V wj(a.w ? a.w[j] : A(1));
        for (int i = 0; i < K; ++i) {
          if (a.w) g[i] = mul_rn(g[i], wj);
          acc[i] = acc[i] + g[i];
          acc[K + i] = at::vec::fmadd(g[i], (v[i] - mu[i]) * rs[i], acc[K + i]);
        }
      });
      const V vinv(A(1) / static_cast<A>(tl.C));
      for (int i = 0; i < K; ++i) {
        c1[i] = s[i] * vinv;
        c2[i] = s[K + i] * vinv;
      }
    } else {
      const auto s = blocked_row_sum<K, V>(tl.C, 1, [&](int64_t j, int64_t, auto& acc) {
        const auto g = load(dy + j * tl.S);
        const auto v = load(x + j * tl.S);
        const V wj(a.w ? a.w[j] : A(1));
        for (int i = 0; i < K; ++i) {
          acc[i] = at::vec::fmadd(a.w ? mul_rn(g[i], wj) : g[i], v[i], acc[i]);
        }
      });
      const V vn(static_cast<A>(tl.C));
      for (int i = 0; i < K; ++i) c2[i] = rs[i] * (s[i] / vn);
    }
    bool masked = false;
    for (int i = 0; i < Gs; ++i) masked = masked || gr.dup[i] != 0;
    NextTilePrefetch<T> pf(a.x, a.dy, tl, next, p, ng);
    // The channels' parameter-gradient vectors, L channels at a time: their horizontal sums
    // taken together (hsum_rows, row_group_stats.h: each lane is reduce_add of its vector, so
    // the sums are bitwise a reduce_add per channel) and added to dwp / dbp as one vector,
    // instead of a reduction chain and a scalar read-modify-write per channel.
    constexpr int L = kStatsRows<T>;
    RowVecs<V, L> wsum, bsum;
    int held = 0;  // channels [j - held, j) wait in wsum / bsum
    auto flush = [&](int64_t j_end) {
      const int64_t j0 = j_end - held;
      if (held == L) {
        if (dwp) (V::loadu(dwp + j0) + hsum_rows<L>(wsum)).store(dwp + j0);
        if (dbp) (V::loadu(dbp + j0) + hsum_rows<L>(bsum)).store(dbp + j0);
      } else {
        for (int r = 0; r < held; ++r) {
          if (dwp) dwp[j0 + r] += reduce_add(wsum[r]);
          if (dbp) dbp[j0 + r] += reduce_add(bsum[r]);
        }
      }
      held = 0;
    };
    for (int64_t j = 0; j < tl.C; ++j) {
      pf.step();
      auto g = load(dy + j * tl.S);
      auto v = load(x + j * tl.S);
      for (int i = 0; i < K; ++i) {
        if constexpr (kLayer) v[i] = v[i] - mu[i];
        v[i] = v[i] * rs[i];  // xhat
      }
      if (dwp || dbp) {  // before dy is scaled by w
        // In memory order: a channel's sums add its positions in the same order whatever
        // the lane order of the loads (so the same bits).
        auto gm = g, xh = v;
        to_memory<T, kFull, Gs>(gm);
        to_memory<T, kFull, Gs>(xh);
        if (masked) zero_dup<A, Gs>(gm, gr);
        if (dwp) {
          V s = gm[0] * xh[0];
          for (int i = 1; i < K; ++i) s = at::vec::fmadd(gm[i], xh[i], s);
          wsum.set(held, s);
        }
        if (dbp) {
          V s = gm[0];
          for (int i = 1; i < K; ++i) s = s + gm[i];
          bsum.set(held, s);
        }
        if (++held == L) flush(j + 1);
      }
      const V wj(a.w ? a.w[j] : A(1));
      for (int i = 0; i < K; ++i) {
        if (a.w) g[i] = mul_rn(g[i], wj);
        if constexpr (kLayer) g[i] = g[i] - c1[i];
        g[i] = (g[i] - v[i] * c2[i]) * rs[i];
      }
      store_group<kFull, Gs>(dx + j * tl.S, win, gr, g);
    }
    if (held > 0) flush(tl.C);
  });
}

// Runs every unit: without parameter gradients in plain parallel ranges, otherwise in
// RowChunks of units with a PartialTree each (param_rows.h): each tile sums its own
// [dweight | dbias] row (each part padded to a whole step; a running sum over the tile's
// window groups), which is added into the partial row of its block of kBlockRows tiles; then
// dw / db (dtype W) = the chunks' sums added pairwise.
template <typename T, bool kLayer, typename W>
void bwd_units(const BwdArgs<T>& a, const Launch& l, int64_t M, int64_t C, int64_t S, W* dw,
               W* db) {
  using A = acc_t<T>;
  const Tiles tl(M, C, S, kBwdGroup * RowIO<T>::kStep, 2 * sizeof(T));
  const OutputPrefault pf(a.dx, M / S, C * S * static_cast<int64_t>(sizeof(T)));
  if (dw == nullptr && db == nullptr) {
    at::parallel_for(0, tl.count, row_grain(C * tl.width), [&](int64_t b, int64_t e) {
      for_each_unit(tl, pf, b, e, b, e, [&](const Tiles::Unit& t, const Tiles::Unit* next) {
        if (S >= RowIO<T>::kStep) {
          bwd_tile<T, kLayer, true, kBwdGroup>(a, tl, t, next, nullptr, nullptr);
        } else {
          bwd_tile<T, kLayer, false, kBwdGroup>(a, tl, t, next, nullptr, nullptr);
        }
      });
    });
    return;
  }
  const RowChunks chunks(tl.count, C * tl.width);
  const int64_t stride = padded<A>(C);
  const int64_t db_off = dw ? stride : 0;
  const int64_t width = ((dw != nullptr) + (db != nullptr)) * stride;
  const TreeWorkspace<A> ws(l.ws, chunks, width);
  std::vector<A*> sums(static_cast<size_t>(chunks.count));
  for_each_chunk(chunks, [&](int64_t c) {
    PartialTree<A> tree = ws.tree(c);
    std::vector<A> tile_row(static_cast<size_t>(width));
    const int64_t cb = chunks.begin(c), ce = chunks.end(c);
    for_each_block(tree, cb, ce, [&](int64_t b, int64_t e, A* part) {
      // The chunk, not the block, is the thread's range (prefetching crosses blocks).
      for_each_unit(tl, pf, cb, ce, b, e, [&](const Tiles::Unit& t, const Tiles::Unit* next) {
        std::fill(tile_row.begin(), tile_row.end(), A(0));
        A* dwp = dw ? tile_row.data() : nullptr;
        A* dbp = db ? tile_row.data() + db_off : nullptr;
        if (S >= RowIO<T>::kStep) bwd_tile<T, kLayer, true, kBwdGroup>(a, tl, t, next, dwp, dbp);
        else bwd_tile<T, kLayer, false, kBwdGroup>(a, tl, t, next, dwp, dbp);
        add_row(part, tile_row.data(), width);
      });
    });
    sums[c] = tree.finish();
  });
  if (dw) sum_chunk_rows<A, W>(sums, 0, C, dw);
  if (db) sum_chunk_rows<A, W>(sums, db_off, C, db);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Entries (kernels.h), called by rms_fwd / rms_bwd / ln_fwd / ln_bwd when p.inner > 1.
// M = B * S rows of N = C channels; S = p.inner.

void rms_fwd_channels_first(const RmsFwdParams& p, const Launch&) {
  dispatch_pair(p.t, p.w, [&](auto t_tag, auto w_tag) {
    using T = typename decltype(t_tag)::type;
    using W = typename decltype(w_tag)::type;
    using A = acc_t<T>;
    EffectiveParam<A> wp(static_cast<const W*>(p.weight), p.N, p.offset);
    const FwdArgs<T> a{static_cast<const T*>(p.x), static_cast<T*>(p.y), nullptr,
                       static_cast<A*>(p.rstd), wp.get(), nullptr, p.eps};
    fwd_units<T, false>(a, p.M, p.N, p.inner);
  });
}

void ln_fwd_channels_first(const LnFwdParams& p, const Launch&) {
  dispatch_pair(p.t, p.w, [&](auto t_tag, auto w_tag) {
    using T = typename decltype(t_tag)::type;
    using W = typename decltype(w_tag)::type;
    using A = acc_t<T>;
    EffectiveParam<A> wp(static_cast<const W*>(p.weight), p.N, 0.0);
    EffectiveParam<A> bp(static_cast<const W*>(p.bias), p.N, 0.0);
    const FwdArgs<T> a{static_cast<const T*>(p.x), static_cast<T*>(p.y), static_cast<A*>(p.mean),
                       static_cast<A*>(p.rstd), wp.get(), bp.get(), p.eps};
    fwd_units<T, true>(a, p.M, p.N, p.inner);
  });
}

void rms_bwd_channels_first(const RmsBwdParams& p, const Launch& l) {
  // The channels-first host (norm_2d.cpp) passes dy in x's dtype and no grad_residual.
  TORCH_CHECK(p.x == p.g && p.gres == nullptr,
              "rmsnorm_ext: channels-first rms backward takes dy in x's dtype, no grad_residual");
  dispatch_pair(p.g, p.w, [&](auto t_tag, auto w_tag) {
    using T = typename decltype(t_tag)::type;
    using W = typename decltype(w_tag)::type;
    using A = acc_t<T>;
    EffectiveParam<A> wp(static_cast<const W*>(p.weight), p.N, p.offset);
    const BwdArgs<T> a{static_cast<const T*>(p.dy), static_cast<const T*>(p.x_in), nullptr,
                       static_cast<const A*>(p.rstd), wp.get(), static_cast<T*>(p.dx)};
    bwd_units<T, false>(a, l, p.M, p.N, p.inner, static_cast<W*>(p.dw),
                        static_cast<W*>(nullptr));
  });
}

void ln_bwd_channels_first(const LnBwdParams& p, const Launch& l) {
  dispatch_pair(p.t, p.w, [&](auto t_tag, auto w_tag) {
    using T = typename decltype(t_tag)::type;
    using W = typename decltype(w_tag)::type;
    using A = acc_t<T>;
    EffectiveParam<A> wp(static_cast<const W*>(p.weight), p.N, 0.0);
    const BwdArgs<T> a{static_cast<const T*>(p.dy), static_cast<const T*>(p.x),
                       static_cast<const A*>(p.mean), static_cast<const A*>(p.rstd), wp.get(),
                       static_cast<T*>(p.dx)};
    // dw and db have dtype W (the weight's, or the statistics' without a weight).
    bwd_units<T, true>(a, l, p.M, p.N, p.inner, static_cast<W*>(p.dw), static_cast<W*>(p.db));
  });
}

}  // namespace rmsnorm_ext::cpu
