// CUDA kernels of the norm + quantize ops (NormQuantParams): RMSNorm, the fused residual
// add + RMSNorm, or LayerNorm, then y / s converted to float8_e4m3fn, float8_e5m2 or int8.
//
// The row kernels of norm_fwd_rows.cuh (the plain norms' statistics and y, register or
// re-reading) with a policy whose epilogue quantizes: for dynamic scales the absmax of y --
// per row by a shuffle / shared-memory reduction, per group by atomicMax on the fp32 bits
// of |y| in shared memory (or, for very many groups per row, in the scales buffer itself)
// -- then y * (1 / s) converted and stored VEC bytes at a time; each pass over the row's
// packs from registers (or L1/L2). The quant dtype and the scale mode are uniform runtime
// branches, not template parameters, to keep the number of instantiations (and the compile
// time) down.
#include <cuda_fp8.h>

#include "cuda_utils.cuh"
#include "layer_norm_fwd_kernels.cuh"
#include "rms_norm_fwd_kernels.cuh"

namespace rmsnorm_ext {
namespace cuda {
namespace {

// Shared memory for per-group absmax: rpb * groups floats at most this many bytes, else the
// scales buffer in global memory is used as the atomic scratch.
constexpr size_t kQSmemBytes = 32 * 1024;

enum class Mode : int { static_scale = 0, per_row = 1, per_group = 2 };

__device__ __forceinline__ uint8_t quantize(float v, QuantDType q) {
  const uint32_t sign = (__float_as_uint(v) >> 24) & 0x80u;
  if (q == QuantDType::i8) {
    if (v != v) return 0;
    return static_cast<uint8_t>(static_cast<int8_t>(__float2int_rn(fminf(fmaxf(v, -128.0f), 127.0f))));
  }
  if (v != v) return static_cast<uint8_t>(0x7Fu | sign);  // the CPU kernel's NaN
  // satfinite: saturates to +-qmax (Inf too), round to nearest even.
  return static_cast<uint8_t>(
      __nv_cvt_float_to_fp8(v, __NV_SATFINITE, q == QuantDType::f8e4m3 ? __NV_E4M3 : __NV_E5M2));
}

// NaN-propagating max of non-negative floats: their bit patterns order like the values and
// every NaN (as |NaN|) sorts above +Inf.
__device__ __forceinline__ float absmax2(float a, float b) {
  return __uint_as_float(max(__float_as_uint(a), __float_as_uint(b)));
}

__device__ __forceinline__ float dynamic_scale(float amax, const float* ub, float qmax,
                                               float min_scale) {
  float a = amax;
  if (ub != nullptr) {
    const float u = *ub;
    a = (a != a || u != u) ? a + u : fminf(a, u);
  }
  const float s = a / qmax;
  return s != s ? s : fmaxf(s, min_scale);
}

// NaN-propagating absmax over a row's group of threads (every thread of the block calls it;
// see group_sum). smem: 32 floats.
__device__ __forceinline__ float group_absmax(float v, int tpr, float* smem) {
  const int width = tpr < 32 ? tpr : 32;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    if (off < width) v = absmax2(v, __shfl_xor_sync(0xffffffffu, v, off));
  }
  if (tpr <= 32) return v;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int wpr = tpr >> 5;
  const int first = (warp / wpr) * wpr;
  float m = smem[first];
  for (int j = 1; j < wpr; ++j) m = absmax2(m, smem[first + j]);
  return m;
}

template <class P>
struct PackVec;
template <typename T, int VEC>
struct PackVec<Pack<T, VEC>> {
  static constexpr int value = VEC;
};

// The quantizer's operands (the norm's come in NormFwdArgs): where the codes and the scales
// go, the scale mode and its bounds.
struct QuantOperands {
  uint8_t* out;
  float* scales;          // dynamic: per row or per group (output)
  const float* scale;     // static scale (one element), or nullptr
  const float* scale_ub;  // upper bound of dynamic scales, or nullptr
  int64_t group;
  int64_t groups;         // N / group
  float qmax;
  float min_scale;
  QuantDType q;
  Mode mode;
  bool smem_amax;  // per-group absmax in shared memory (else in `scales`)
  template <int VEC>
  struct Extra {};
  template <int VEC, typename I>
  static __device__ __forceinline__ Extra<VEC> extra(const QuantOperands&, int64_t, I) {
    return {};
  }
  // A pack's codes are one VEC-byte store; a pack lies in one group.
  static bool aligned(const QuantOperands& o, size_t vec) {
    return is_aligned(o.out, vec) && (o.mode != Mode::per_group || o.group % static_cast<int64_t>(vec) == 0);
  }
  static size_t prepare(QuantOperands& o, int rpb) {
    if (o.mode != Mode::per_group) return 0;
    const size_t need = static_cast<size_t>(rpb) * static_cast<size_t>(o.groups) * sizeof(float);
    o.smem_amax = need <= kQSmemBytes;
    return o.smem_amax ? need : 0;
  }
};

// y as the plain norm computes it (Base: RmsFwdNorm, LnFwdNorm), then quantized.
template <class Base>
struct QuantNorm : Base {
  using Ops = QuantOperands;
  static constexpr bool kCustomEpilogue = true;

  template <class Args, typename A, class ForPacks>
  static __device__ __forceinline__ void epilogue(const Args& a, int64_t row, bool valid, int t,
                                                  int tpr, const FwdStats<A>& st,
                                                  ForPacks&& for_packs) {
    static_assert(std::is_same_v<A, float>, "quantized ops take fp32 / bf16 / fp16 input");
    using W = std::remove_cv_t<std::remove_pointer_t<decltype(a.w)>>;
    const QuantOperands& o = a.ops;
    const bool has_w = a.w != nullptr;
    const bool has_b = a.b != nullptr;
    const typename QuantOperands::template Extra<1> none{};
    auto y_of = [&](const auto& v, const auto& wv, const auto& bv, int j) -> A {
      return Base::out(to_acc<A>(v.v[j]), wv, bv, none, j, has_w, has_b, st, a.offset);
    };
    auto for_y_packs = [&](auto&& f) {  // f(row pack, weight pack, bias pack, pack index)
      for_packs([&](const auto& v, int64_t pi) {
        constexpr int VEC = PackVec<std::decay_t<decltype(v)>>::value;
        Pack<W, VEC> wv, bv;
        if (has_w) wv = load_pack<W, VEC>(a.w, pi);
        if (has_b) bv = load_pack<W, VEC>(a.b, pi);
        f(v, wv, bv, pi);
      });
    };
    extern __shared__ float amax_smem[];  // per-group absmax (rpb * groups) if smem_amax
    __shared__ float amax_red[32];
    const int64_t off = valid ? row * a.N : 0;

    // ---- dynamic scales: absmax of y per row or per group
    float* gmax = nullptr;  // per group of this row: absmax (bits of |y|, atomicMax), then s
    A inv = A(0);
    if (o.mode == Mode::per_group) {
      gmax = o.smem_amax ? amax_smem + static_cast<int64_t>(threadIdx.x / tpr) * o.groups
                         : o.scales + (valid ? row * o.groups : 0);
      if (valid) {
        for (int64_t k = t; k < o.groups; k += tpr) gmax[k] = 0.0f;
      }
      __syncthreads();
      if (valid) {
        for_y_packs([&](const auto& v, const auto& wv, const auto& bv, int64_t pi) {
          constexpr int VEC = PackVec<std::decay_t<decltype(v)>>::value;
          float m = 0.0f;
#pragma unroll
          for (int j = 0; j < VEC; ++j) m = absmax2(m, fabsf(y_of(v, wv, bv, j)));
          // a pack lies in one group (the host vectorizes only when VEC divides the group)
          atomicMax(reinterpret_cast<unsigned*>(gmax) + (pi * VEC) / o.group, __float_as_uint(m));
        });
      }
      __syncthreads();
      // absmax -> scale, in place (and into the scales output when the scratch is shared)
      if (valid) {
        for (int64_t k = t; k < o.groups; k += tpr) {
          const float sc = dynamic_scale(gmax[k], o.scale_ub, o.qmax, o.min_scale);
          gmax[k] = sc;
          if (o.smem_amax) o.scales[row * o.groups + k] = sc;
        }
      }
      __syncthreads();
    } else if (o.mode == Mode::per_row) {
      float m = 0.0f;
      if (valid) {
        for_y_packs([&](const auto& v, const auto& wv, const auto& bv, int64_t) {
          constexpr int VEC = PackVec<std::decay_t<decltype(v)>>::value;
#pragma unroll
          for (int j = 0; j < VEC; ++j) m = absmax2(m, fabsf(y_of(v, wv, bv, j)));
        });
      }
      m = group_absmax(m, tpr, amax_red);
      const float sc = dynamic_scale(m, o.scale_ub, o.qmax, o.min_scale);
      if (valid && t == 0) o.scales[row] = sc;
      inv = A(1) / sc;
    } else {
      inv = A(1) / *o.scale;
    }
    if (!valid) return;  // no block-wide sync below

    // ---- y * (1 / s), converted, VEC bytes per store
    int64_t cur_group = -1;
    A cur_inv = inv;
    for_y_packs([&](const auto& v, const auto& wv, const auto& bv, int64_t pi) {
      constexpr int VEC = PackVec<std::decay_t<decltype(v)>>::value;
      if (o.mode == Mode::per_group) {
        const int64_t gi = (pi * VEC) / o.group;
        if (gi != cur_group) {
          cur_group = gi;
          cur_inv = A(1) / gmax[gi];
        }
      }
      Pack<uint8_t, VEC> q;
#pragma unroll
      for (int j = 0; j < VEC; ++j) q.v[j] = quantize(y_of(v, wv, bv, j) * cur_inv, o.q);
      store_pack<uint8_t, VEC>(o.out + off, pi, q);
    });
  }
};

template <typename T, typename W, typename R, NormKind KIND>
cudaError_t launch_norm_quant(const NormQuantParams& p, cudaStream_t stream) {
  constexpr bool FUSED = KIND == NormKind::fused_add_rms;
  using Norm = QuantNorm<std::conditional_t<KIND == NormKind::layer, LnFwdNorm, RmsFwdNorm>>;
  NormFwdArgs<T, W, R, QuantOperands> a{};
  a.x = static_cast<const T*>(p.x);
  a.r = static_cast<const R*>(p.r_in);
  a.w = static_cast<const W*>(p.weight);
  a.b = static_cast<const W*>(p.bias);
  a.h = static_cast<R*>(p.h);
  a.M = p.M;
  a.N = p.N;
  a.eps = static_cast<float>(p.eps);
  a.offset = static_cast<float>(p.offset);
  QuantOperands& o = a.ops;
  o.out = static_cast<uint8_t*>(p.out);
  o.scales = p.scales;
  o.scale = p.scale;
  o.scale_ub = p.scale_ub;
  o.group = p.group;
  o.groups = p.N / p.group;
  o.qmax = quant_max(p.q);
  o.min_scale = quant_min_scale(p.q);
  o.q = p.q;
  o.mode = p.scale != nullptr ? Mode::static_scale : (p.group == p.N ? Mode::per_row : Mode::per_group);
  // The fused form's statistics are those of h (dtype R): packs of h's width give it the
  // same thread layout and summation order as the unfused kernel run on h, so that
  // fused_add_rms_norm_quant(x, r) is bitwise rms_norm_quant(h) (tests/test_quant.py).
  using VT = std::conditional_t<FUSED && (sizeof(R) > sizeof(T)), R, T>;
  return launch_norm_fwd<Norm, T, W, R, FUSED, VT>(a, stream);
}

}  // namespace

cudaError_t norm_quant(const NormQuantParams& p, cudaStream_t stream) {
  return with_dtype_pair(p.t, p.w, [&](auto t_tag, auto w_tag) -> cudaError_t {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    if constexpr (std::is_same_v<T, double>) {
      return cudaErrorInvalidValue;  // the host refuses float64 input
    } else {
      switch (p.kind) {
        case NormKind::rms:
          return launch_norm_quant<T, W, T, NormKind::rms>(p, stream);
        case NormKind::layer:
          return launch_norm_quant<T, W, T, NormKind::layer>(p, stream);
        case NormKind::fused_add_rms:
          if (p.r == p.t) return launch_norm_quant<T, W, T, NormKind::fused_add_rms>(p, stream);
          if constexpr (is_reduced_v<T>) {
            if (p.r == DType::f32)
              return launch_norm_quant<T, W, float, NormKind::fused_add_rms>(p, stream);
          }
          return cudaErrorInvalidValue;
      }
      return cudaErrorInvalidValue;
    }
  });
}

RMSNORM_EXT_REGISTER_CUDA_KERNEL(NormQuant, norm_quant);

}  // namespace cuda
}  // namespace rmsnorm_ext
