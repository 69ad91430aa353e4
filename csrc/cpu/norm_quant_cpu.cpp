// CPU kernel of the norm + quantize ops: RMSNorm (optionally after the fused residual add)
// or LayerNorm, then y / s converted to float8_e4m3fn, float8_e5m2 or int8.
//
// Per row: the statistics (row_group_stats.h, exactly as the unquantized ops compute them), then
// per group of `group` elements (the whole row for per-token and static scales):
//  - static scale: one pass that computes y, scales it and converts it;
//  - dynamic scales: one pass that computes y into a small fp32 buffer (a group, L1/L2
//    sized) while taking its absmax, and one that scales and converts the buffer (groups
//    too large for the buffer recompute y instead).
// The last pass prefetches the next row. y stays fp32 throughout: it is never rounded to
// the input dtype. The conversions are branch-free integer code on the fp32 bits: explicit
// AVX-512 intrinsics (16 lanes, 16 bytes stored per vector) on the AVX-512 build, portable
// scalar code that the compiler vectorizes otherwise (at::vec has no fp8 conversions); both
// give the same bytes.
#include "dispatch.h"
#include "kernels.h"
#include "param_rows.h"
#include "prefault.h"
#include "row_group_stats.h"
#include "row_stats.h"
#include "vec_io.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
// GCC 12's avx512fintrin.h fills the unused pass-through operand of some intrinsics
// (_mm512_srli_epi32, _mm512_min_ps, _mm512_cvtepi32_epi8) with a self-initialized
// "undefined" vector, which -W(maybe-)uninitialized reports wherever they are inlined (a
// false positive), so it is off for the code below (at::vec's own uses, located in torch's
// headers, still report it as before).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace rmsnorm_ext::cpu {
namespace {

using V = Vectorized<float>;
constexpr int64_t kStep = RowIO<float>::kStep;

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// fp32 -> fp8 with MB mantissa bits and exponent bias BIAS: saturate to +-qmax (Inf too),
// round to nearest even, NaN -> 0x7F (a NaN in both e4m3fn and e5m2), sign kept (-0 too).
template <int MB, int BIAS>
inline uint8_t fp8_from_float(float v, float qmax) {
  const uint32_t sign = (bits_of(v) >> 24) & 0x80u;
  const bool nan = v != v;
  float a = std::fabs(v);
  a = a < qmax ? a : qmax;
  // Below the smallest normal 2^(1-BIAS): a multiple of the subnormal step 2^(1-BIAS-MB),
  // rounded by adding 2^(24-BIAS-MB) (whose ulp is that step) and reading the low bits.
  constexpr float kMagic = static_cast<float>(1u << (24 - BIAS - MB));
  constexpr float kMinNormal = 1.0f / static_cast<float>(1u << (BIAS - 1));
  const uint32_t sub = bits_of(a + kMagic) - bits_of(kMagic);
  // Normal: round the fp32 mantissa to MB bits (ties to even), then rebias the exponent.
  constexpr int kShift = 23 - MB;
  const uint32_t ab = bits_of(a);
  const uint32_t rounded = ab + ((ab >> kShift) & 1u) + ((1u << (kShift - 1)) - 1u);
  const uint32_t normal = (rounded >> kShift) - (static_cast<uint32_t>(127 - BIAS) << MB);
  const uint32_t code = a < kMinNormal ? sub : normal;
  return static_cast<uint8_t>((nan ? 0x7Fu : code) | sign);
}

// fp32 -> int8: round half to even, clamp to [-128, 127], NaN -> 0.
inline uint8_t i8_from_float(float v) {
  float c = v != v ? 0.0f : v;
  c = c > 127.0f ? 127.0f : (c < -128.0f ? -128.0f : c);
  // |c| <= 128 < 2^22: adding and removing 1.5 * 2^23 rounds to an integer, ties to even
  // (no -ffast-math here, so the compiler keeps both operations).
  constexpr float kRound = 12582912.0f;
  const float r = (c + kRound) - kRound;
  return static_cast<uint8_t>(static_cast<int8_t>(static_cast<int32_t>(r)));
}

template <QuantDType Q>
inline void convert(const float* q, int64_t n, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (Q == QuantDType::f8e4m3) {
      out[i] = fp8_from_float<3, 7>(q[i], 448.0f);
    } else if constexpr (Q == QuantDType::f8e5m2) {
      out[i] = fp8_from_float<2, 15>(q[i], 57344.0f);
    } else {
      out[i] = i8_from_float(q[i]);
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// 16 lanes of fp8_from_float<MB, BIAS>, bit for bit the same operations.
template <int MB, int BIAS>
inline __m128i fp8_from_float16(__m512 v, float qmax) {
  constexpr float kMagic = static_cast<float>(1u << (24 - BIAS - MB));
  constexpr float kMinNormal = 1.0f / static_cast<float>(1u << (BIAS - 1));
  constexpr int kShift = 23 - MB;
  const __m512i vb = _mm512_castps_si512(v);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  // min_ps(a, q) is a < q ? a : q, NaN included, like the scalar code.
  const __m512 a = _mm512_min_ps(_mm512_abs_ps(v), _mm512_set1_ps(qmax));
  const __m512 magic = _mm512_set1_ps(kMagic);
  const __m512i sub = _mm512_sub_epi32(_mm512_castps_si512(_mm512_add_ps(a, magic)),
                                       _mm512_castps_si512(magic));
  // normal = ((ab + odd + half - 1) >> kShift) - ((127 - BIAS) << MB), with the rebias
  // folded into the added constant: exact for a >= the smallest normal (the lanes that use
  // it), as (127 - BIAS) << 23 is a multiple of 2^kShift.
  const __m512i ab = _mm512_castps_si512(a);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(ab, kShift), _mm512_set1_epi32(1));
  constexpr uint32_t kAdd = ((1u << (kShift - 1)) - 1u) - (static_cast<uint32_t>(127 - BIAS) << 23);
  const __m512i normal = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(ab, odd), _mm512_set1_epi32(static_cast<int>(kAdd))),
      kShift);
  const __mmask16 small = _mm512_cmp_ps_mask(a, _mm512_set1_ps(kMinNormal), _CMP_LT_OQ);
  __m512i code = _mm512_mask_blend_epi32(small, normal, sub);
  code = _mm512_mask_blend_epi32(nan, code, _mm512_set1_epi32(0x7F));
  // code | ((v >> 24) & 0x80) in one ternary-logic op (A | (B & C) = 0xF8).
  code = _mm512_ternarylogic_epi32(code, _mm512_srli_epi32(vb, 24), _mm512_set1_epi32(0x80), 0xF8);
  return _mm512_cvtepi32_epi8(code);  // low byte of each lane
}

// 16 lanes of i8_from_float: NaN -> 0, clamp, round half to even (explicitly, as the
// scalar code's add and subtract of 1.5 * 2^23 does in the default rounding mode).
inline __m128i i8_from_float16(__m512 v) {
  const __mmask16 ord = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
  __m512 c = _mm512_maskz_mov_ps(ord, v);
  c = _mm512_max_ps(_mm512_min_ps(c, _mm512_set1_ps(127.0f)), _mm512_set1_ps(-128.0f));
  const __m512i r = _mm512_cvt_roundps_epi32(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_cvtepi32_epi8(r);
}

template <QuantDType Q>
inline __m128i quant16(__m512 v) {
  if constexpr (Q == QuantDType::f8e4m3) {
    return fp8_from_float16<3, 7>(v, 448.0f);
  } else if constexpr (Q == QuantDType::f8e5m2) {
    return fp8_from_float16<2, 15>(v, 57344.0f);
  } else {
    return i8_from_float16(v);
  }
}

// A step of scaled values (a, b: kStep lanes, n valid) to n output bytes.
template <QuantDType Q>
inline void store_quant(const V& a, const V& b, int64_t n, uint8_t* out) {
  static_assert(V::size() == 16 && kStep == 32);
  const __m128i lo = quant16<Q>(static_cast<__m512>(a));
  const __m128i hi = quant16<Q>(static_cast<__m512>(b));
  if (n == kStep) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), lo);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), hi);
  } else if (n <= 16) {
    _mm_mask_storeu_epi8(out, static_cast<__mmask16>((1u << n) - 1u), lo);
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), lo);
    _mm_mask_storeu_epi8(out + 16, static_cast<__mmask16>((1u << (n - 16)) - 1u), hi);
  }
}
#else
// A step of scaled values (a, b: kStep lanes, n valid) to n output bytes.
template <QuantDType Q>
inline void store_quant(const V& a, const V& b, int64_t n, uint8_t* out) {
  alignas(64) float buf[kStep];
  a.store(buf);
  b.store(buf + V::size());
  if (n == kStep) {
    convert<Q>(buf, kStep, out);  // constant trip count: fully vectorized
  } else {
    convert<Q>(buf, n, out);
  }
}
#endif

// The dynamic scale of a group from its absmax; NaN stays NaN (a NaN in y gives a NaN
// scale, so the group dequantizes to NaN rather than to plausible numbers).
inline float dynamic_scale(float amax, const float* ub, float qmax, float min_scale) {
  float a = amax;
  if (ub != nullptr) {
    const float u = *ub;
    a = (a != a || u != u) ? a + u : (a < u ? a : u);
  }
  const float s = a / qmax;
  return s != s ? s : (s > min_scale ? s : min_scale);
}

// y of one step of a row in fp32: RMSNorm x * rstd * w, LayerNorm (x - mean) * rstd * w + b,
// in the same order of operations as the unquantized kernels. S: the normalized row's
// storage type (the input's, or the residual's for the fused add).
template <typename S>
struct RowNorm {
  const S* src;
  const float* w;  // effective weight (offset added), may be null
  const float* b;  // may be null
  V mean;
  V rstd;
  bool center;

  inline void operator()(int64_t j, int64_t n, V& a, V& c) const {
    RowIO<S>::load_n(src + j, n, a, c);
    if (center) {
      a = a - mean;
      c = c - mean;
    }
    // The unquantized kernels' output rounding (affine_out: `* w + b` as one explicit FMA).
    V wa(1.0f), wb(1.0f), ba(0.0f), bb(0.0f);
    if (w) RowIO<float>::load_n(w + j, n, wa, wb);
    if (b) RowIO<float>::load_n(b + j, n, ba, bb);
    a = affine_out(a, rstd, w != nullptr, wa, b != nullptr, ba);
    c = affine_out(c, rstd, w != nullptr, wb, b != nullptr, bb);
  }
};

// Groups of at most this many elements are computed once into the fp32 buffer (256 KiB,
// L2 sized); larger ones recompute y for the conversion pass.
constexpr int64_t kMaxBuffered = 65536;

// Quantizes one normalized row, group by group. scales_row: this row's dynamic scales
// (null for a static scale, whose reciprocal is inv_static). buf: at least
// round_up(group, kStep) floats when group <= kMaxBuffered (else unused). pf(j): prefetches
// the next row's data matching step j, called in the last pass.
template <QuantDType Q, typename S, typename PF>
void quantize_row(const RowNorm<S>& y, int64_t N, int64_t group, float inv_static,
                  float* scales_row, const float* ub, float* buf, uint8_t* out, PF&& pf) {
  constexpr float qmax = quant_max(Q);
  constexpr float min_scale = quant_min_scale(Q);
  V a, b;
  if (scales_row == nullptr) {
    const V vi(inv_static);
    int64_t j = 0;
    for (; j + kStep <= N; j += kStep) {
      pf(j);
      y(j, kStep, a, b);
      store_quant<Q>(a * vi, b * vi, kStep, out + j);
    }
    if (j < N) {
      y(j, N - j, a, b);
      store_quant<Q>(a * vi, b * vi, N - j, out + j);
    }
    return;
  }
  const bool buffered = group <= kMaxBuffered;
  for (int64_t g0 = 0; g0 < N; g0 += group) {
    const int64_t end = g0 + group;
    V m0(0.0f), m1(0.0f);
    for (int64_t j = g0; j < end; j += kStep) {
      const int64_t n = std::min(kStep, end - j);
      y(j, n, a, b);
      if (n < kStep) zero_tail(a, b, n);
      m0 = at::vec::maximum(m0, a.abs());  // maximum propagates NaN
      m1 = at::vec::maximum(m1, b.abs());
      if (buffered) RowIO<float>::store(buf + (j - g0), a, b);
    }
    const float amax = at::vec::vec_reduce_all<float>(
        [](V& p, V& q) { return at::vec::maximum(p, q); }, at::vec::maximum(m0, m1));
    const float s = dynamic_scale(amax, ub, qmax, min_scale);
    scales_row[g0 / group] = s;
    const V vi(1.0f / s);
    for (int64_t j = g0; j < end; j += kStep) {
      const int64_t n = std::min(kStep, end - j);
      pf(j);
      if (buffered) {
        RowIO<float>::load(buf + (j - g0), a, b);
      } else {
        y(j, n, a, b);
      }
      store_quant<Q>(a * vi, b * vi, n, out + j);
    }
  }
}

template <typename T, typename R, QuantDType Q>
void norm_quant_rows(const NormQuantParams& p, const float* w, const float* bias) {
  const T* x = static_cast<const T*>(p.x);
  const R* r = static_cast<const R*>(p.r_in);
  R* h = static_cast<R*>(p.h);
  uint8_t* out = static_cast<uint8_t*>(p.out);
  const int64_t N = p.N;
  const int64_t groups = N / p.group;
  const float inv_static = p.scale != nullptr ? 1.0f / *p.scale : 0.0f;
  const bool buffered = p.scales != nullptr && p.group <= kMaxBuffered;
  const int64_t buf_len = buffered ? (p.group + kStep - 1) / kStep * kStep : 0;
  // Both outputs are fresh (prefault.h); h is null unless fused.
  const OutputPrefault pf_out(out, p.M, N);
  const OutputPrefault pf_h(h, p.M, N * static_cast<int64_t>(sizeof(R)));
  at::parallel_for(0, p.M, row_grain(N), [&](int64_t rb, int64_t re) {
    std::unique_ptr<float[]> buf_owner(buffered ? new float[buf_len] : nullptr);
    float* buf = buf_owner.get();
    for (int64_t i = rb; i < re; ++i) {
      pf_out.before_row(i, rb, re);
      pf_h.before_row(i, rb, re);
      const T* xr = x + i * N;
      const bool last = i + 1 >= re;
      const T* xn = last ? nullptr : xr + N;
      float* srow = p.scales != nullptr ? p.scales + i * groups : nullptr;
      uint8_t* orow = out + i * N;
      if (p.kind == NormKind::fused_add_rms) {
        R* hr = h + i * N;
        const R* rn = last ? nullptr : r + (i + 1) * N;
        const float rs = rstd_from(fused_add_row_sumsq<T, R>(xr, r + i * N, hr, N), N, p.eps);
        const RowNorm<R> y{hr, w, nullptr, V(0.0f), V(rs), false};
        quantize_row<Q, R>(y, N, p.group, inv_static, srow, p.scale_ub, buf, orow,
                           [&](int64_t j) {
                             prefetch_step<T, kStep>(xn, j);
                             prefetch_step<R, kStep>(rn, j);
                           });
      } else if (p.kind == NormKind::layer) {
        const auto st = ln_row_stats<T>(xr, N, p.eps);
        const RowNorm<T> y{xr, w, bias, V(st.mean), V(st.rstd), true};
        quantize_row<Q, T>(y, N, p.group, inv_static, srow, p.scale_ub, buf, orow,
                           [&](int64_t j) { prefetch_step<T, kStep>(xn, j); });
      } else {
        const float rs = rstd_from(row_sumsq(xr, N), N, p.eps);
        const RowNorm<T> y{xr, w, nullptr, V(0.0f), V(rs), false};
        quantize_row<Q, T>(y, N, p.group, inv_static, srow, p.scale_ub, buf, orow,
                           [&](int64_t j) { prefetch_step<T, kStep>(xn, j); });
      }
    }
  });
}

template <typename F>
void dispatch_quant(QuantDType q, F&& f) {
  switch (q) {
    case QuantDType::f8e4m3:
      return f(std::integral_constant<QuantDType, QuantDType::f8e4m3>{});
    case QuantDType::f8e5m2:
      return f(std::integral_constant<QuantDType, QuantDType::f8e5m2>{});
    case QuantDType::i8:
      return f(std::integral_constant<QuantDType, QuantDType::i8>{});
  }
  TORCH_CHECK(false, "rmsnorm_ext: unknown quant dtype tag ", static_cast<int>(q));
}

}  // namespace

void norm_quant(const NormQuantParams& p, const Launch&) {
  TORCH_CHECK(p.t != DType::f64, "rmsnorm_ext: norm_quant has no float64 kernel");
  dispatch_pair(p.t, p.w, [&](auto t_tag, auto w_tag) {
    using T = typename decltype(t_tag)::type;
    using W = typename decltype(w_tag)::type;
    if constexpr (!std::is_same_v<T, double>) {
      const bool rms = p.kind != NormKind::layer;
      EffectiveParam<float> wp(static_cast<const W*>(p.weight), p.N, rms ? p.offset : 0.0);
      EffectiveParam<float> bp(static_cast<const W*>(p.bias), p.N, 0.0);
      dispatch_quant(p.q, [&](auto q_tag) {
        constexpr QuantDType Q = decltype(q_tag)::value;
        if (p.kind == NormKind::fused_add_rms) {
          dispatch_companion<T>(p.r, [&](auto r_tag) {
            using R = typename decltype(r_tag)::type;
            norm_quant_rows<T, R, Q>(p, wp.get(), bp.get());
          });
        } else {
          norm_quant_rows<T, T, Q>(p, wp.get(), bp.get());
        }
      });
    }
  });
}

RMSNORM_EXT_REGISTER_CPU_KERNEL(NormQuant, norm_quant);

}  // namespace rmsnorm_ext::cpu
