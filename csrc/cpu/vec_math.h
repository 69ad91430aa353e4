// Fast elementwise math for kernels whose results are rounded to bfloat16 / float16.
//
// at::vec's exp() is Sleef's 1-ulp expf, an out-of-line call, and 1 / x is a division
// (vdivps: about 3.5 cycles per 8 lanes on Zen 3): the gate's sigmoid spent most of
// gated_rms_norm's forward there. A result stored as bfloat16 (8 significant bits) or
// float16 (11) cannot see a relative error of a few 1e-7 in fp32, so those kernels use an
// inline polynomial exp and a reciprocal estimate refined by one Newton step. fp32 / fp64
// results keep the exact functions.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <type_traits>

namespace rmsnorm_ext::cpu {

using at::vec::Vectorized;

// True for the storage types whose results may use the fast functions below.
template <typename T>
inline constexpr bool kReducedPrecision = !std::is_same_v<T, float> && !std::is_same_v<T, double>;

// exp(x) for x <= 0 (the sigmoid's exp(-|g|)); NaN in -> NaN out. Fast: x = n ln2 + r with
// |r| <= ln2 / 2, a degree-5 polynomial for exp(r) and 2^n built in the exponent bits:
// relative error below 5e-7. Below ln(FLT_MIN) the result is 0 (exp < 1.2e-38 rounds to 0
// in bfloat16 and float16 as well). 13 instructions, inline, against Sleef's call.
template <bool kFast, typename A>
inline Vectorized<A> exp_nonpos(const Vectorized<A>& x) {
  if constexpr (kFast && std::is_same_v<A, float>) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    using V = Vectorized<A>;
    const V lo(-87.33654f);  // ln(FLT_MIN): 2^n stays a normal float down to here
    // maxps returns its second operand when either is NaN: a NaN x comes through
#if defined(CPU_CAPABILITY_AVX512)
    const V xc(_mm512_max_ps(lo, x));
#else
    const V xc(_mm256_max_ps(lo, x));
#endif
    const V magic(12582912.0f + 127.0f);  // 1.5 * 2^23: rounds x * log2(e) to an integer
    const V t = at::vec::fmadd(xc, V(1.44269504f), magic);  // its bits end in n + 127
    const V n = t - magic;
    // One ln2 constant: its rounding error (2e-9) times |n| <= 126 moves exp by < 3e-7,
    // relative, far below the output's rounding.
    const V r = at::vec::fnmadd(n, V(0.693147182f), xc);
    // exp(r) - 1 = r (c1 + c2 r + ... + c5 r^4) on |r| <= ln2 / 2, coefficients fitted for
    // least maximum relative error (9e-8; 2e-7 evaluated in fp32), in Estrin's form: the
    // latency of a step, not its instruction count, bounds these loops (a chain of ~90
    // cycles from load to store), so independent halves run side by side.
    const V r2 = r * r;
    const V lo2 = at::vec::fmadd(r, V(0.166676357f), V(0.499991506f));
    const V hi2 = at::vec::fmadd(r, V(0.00829031505f), V(0.0418979302f));
    const V p = at::vec::fmadd(r, V(0.999999702f), V(1.0f)) + r2 * at::vec::fmadd(r2, hi2, lo2);
#if defined(CPU_CAPABILITY_AVX512)
    const V scale(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(t), 23)));
#else
    const V scale(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23)));
#endif
    // x < ln(FLT_MIN) (including -inf): 0; NaN compares false and stays NaN
    return V::blendv(p * scale, V(A(0)), x < lo);
#else
    return x.exp();
#endif
  } else {
    return x.exp();
  }
}

// 1 / d for positive d (and NaN -> NaN). Fast: the hardware estimate (12 bits with AVX2,
// 14 with AVX-512) and one Newton step, r = r0 * (2 - d * r0): relative error ~2^-22.
template <bool kFast, typename A>
inline Vectorized<A> recip_of(const Vectorized<A>& d) {
  if constexpr (kFast && std::is_same_v<A, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    const Vectorized<A> r0(_mm512_rcp14_ps(d));
#elif defined(CPU_CAPABILITY_AVX2)
    const Vectorized<A> r0(_mm256_rcp_ps(d));
#else
    return Vectorized<A>(A(1)) / d;
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    return r0 * at::vec::fnmadd(d, r0, Vectorized<A>(A(2)));
#endif
  } else {
    return Vectorized<A>(A(1)) / d;
  }
}

}  // namespace rmsnorm_ext::cpu
