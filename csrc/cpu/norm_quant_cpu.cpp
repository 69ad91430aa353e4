// CPU kernel of the norm + quantize ops: RMSNorm (optionally after the fused residual add)
// or LayerNorm, then y / s converted to float8_e4m3fn, float8_e5m2 or int8.
//
// Per row: the statistics (row_stats.h, exactly as the unquantized ops compute them), then
// per group of `group` elements (the whole row for per-token and static scales) one pass
// for the absmax of y (dynamic scales only) and one that recomputes y, scales it and
// converts it, while the row sits in L1/L2. y stays fp32 throughout: it is never rounded
// to the input dtype. The conversions are branch-free integer code on the fp32 bits that
// the compiler vectorizes for any ISA (at::vec has no fp8 conversions).
#include "dispatch.h"
#include "kernels.h"
#include "param_rows.h"
#include "row_stats.h"
#include "vec_io.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>

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
    a = a * rstd;
    c = c * rstd;
    V wa, wb;
    if (w) {
      RowIO<float>::load_n(w + j, n, wa, wb);
      a = a * wa;
      c = c * wb;
    }
    if (b) {
      RowIO<float>::load_n(b + j, n, wa, wb);
      a = a + wa;
      c = c + wb;
    }
  }
};

// Quantizes one normalized row, group by group. scales_row: this row's dynamic scales
// (null for a static scale, whose reciprocal is inv_static).
template <QuantDType Q, typename S>
void quantize_row(const RowNorm<S>& y, int64_t N, int64_t group, float inv_static,
                  float* scales_row, const float* ub, uint8_t* out) {
  constexpr float qmax = quant_max(Q);
  constexpr float min_scale = quant_min_scale(Q);
  for (int64_t g0 = 0; g0 < N; g0 += group) {
    const int64_t end = g0 + group;
    float inv = inv_static;
    V a, b;
    if (scales_row != nullptr) {
      V m0(0.0f), m1(0.0f);
      for (int64_t j = g0; j < end; j += kStep) {
        const int64_t n = std::min(kStep, end - j);
        y(j, n, a, b);
        if (n < kStep) zero_tail(a, b, n);
        m0 = at::vec::maximum(m0, a.abs());  // maximum propagates NaN
        m1 = at::vec::maximum(m1, b.abs());
      }
      const float amax = at::vec::vec_reduce_all<float>(
          [](V& p, V& q) { return at::vec::maximum(p, q); }, at::vec::maximum(m0, m1));
      const float s = dynamic_scale(amax, ub, qmax, min_scale);
      scales_row[g0 / group] = s;
      inv = 1.0f / s;
    }
    const V vi(inv);
    for (int64_t j = g0; j < end; j += kStep) {
      const int64_t n = std::min(kStep, end - j);
      y(j, n, a, b);
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
  at::parallel_for(0, p.M, row_grain(N), [&](int64_t rb, int64_t re) {
    for (int64_t i = rb; i < re; ++i) {
      const T* xr = x + i * N;
      float* srow = p.scales != nullptr ? p.scales + i * groups : nullptr;
      uint8_t* orow = out + i * N;
      if (p.kind == NormKind::fused_add_rms) {
        R* hr = h + i * N;
        const float rs = rstd_from(fused_add_row_sumsq<T, R>(xr, r + i * N, hr, N), N, p.eps);
        const RowNorm<R> y{hr, w, nullptr, V(0.0f), V(rs), false};
        quantize_row<Q, R>(y, N, p.group, inv_static, srow, p.scale_ub, orow);
      } else if (p.kind == NormKind::layer) {
        const auto st = ln_row_stats<T>(xr, N, p.eps);
        const RowNorm<T> y{xr, w, bias, V(st.mean), V(st.rstd), true};
        quantize_row<Q, T>(y, N, p.group, inv_static, srow, p.scale_ub, orow);
      } else {
        const float rs = rstd_from(row_sumsq(xr, N), N, p.eps);
        const RowNorm<T> y{xr, w, nullptr, V(0.0f), V(rs), false};
        quantize_row<Q, T>(y, N, p.group, inv_static, srow, p.scale_ub, orow);
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

}  // namespace rmsnorm_ext::cpu
