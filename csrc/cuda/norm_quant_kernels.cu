// CUDA kernels of the norm + quantize ops (NormQuantParams): RMSNorm, the fused residual
// add + RMSNorm, or LayerNorm, then y / s converted to float8_e4m3fn, float8_e5m2 or int8.
//
// One kernel family, the launch shapes of the forward kernels (rms_norm_fwd_kernels.cuh):
// a group of tpr threads per row, rpb rows per block. Register variant (ITEMS = 4 packs per
// thread): the row is read from memory once and kept in registers for the statistics, the
// absmax and the conversion. Re-reading variant (ITEMS = 0: long rows, or rows that cannot
// be vectorized, VEC = 1): the later passes re-read the row, mostly from L1/L2.
//
// Passes over the row (registers or L1/L2): statistics (fp32, the same formulas as the
// unquantized kernels; LayerNorm with the corrected two-pass variance), then for dynamic
// scales the absmax of y -- per row by a shuffle / shared-memory reduction, per group by
// atomicMax on the fp32 bits of |y| in shared memory (or, for very many groups per row, in
// the scales buffer itself) -- and finally y * (1 / s) converted and stored VEC bytes at a
// time. The quant dtype and the scale mode are uniform runtime branches, not template
// parameters, to keep the number of instantiations (and the compile time) down.
#include <cuda_fp8.h>

#include "cuda_utils.cuh"

namespace rmsnorm_ext {
namespace cuda {
namespace {

constexpr int kQMaxThreads = 512;
constexpr int kQItems = 4;
// Shared memory for per-group absmax: rpb * groups floats at most this many bytes, else the
// scales buffer in global memory is used as the atomic scratch.
constexpr size_t kQSmemBytes = 32 * 1024;

enum class Mode : int { static_scale = 0, per_row = 1, per_group = 2 };

template <typename T, typename W, typename R>
struct QArgs {
  const T* x;
  const R* r;    // fused only
  const W* w;    // may be null
  const W* b;    // layer only, may be null
  R* h;          // fused only
  uint8_t* out;
  float* scales;
  const float* scale;
  const float* scale_ub;
  int64_t M;
  int64_t N;
  int64_t group;
  int64_t groups;  // N / group
  float eps;
  float offset;
  float qmax;
  float min_scale;
  QuantDType q;
  Mode mode;
  bool smem_amax;  // per-group absmax in shared memory (else in `scales`)
  int tpr;
  int rpb;
};

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

template <typename T, typename W, typename R, NormKind KIND, int VEC, int ITEMS>
__global__ void __launch_bounds__(kQMaxThreads) norm_quant_kernel(const QArgs<T, W, R> a) {
  using A = float;
  constexpr bool FUSED = KIND == NormKind::fused_add_rms;
  using S = std::conditional_t<FUSED, R, T>;  // the normalized row's storage type
  extern __shared__ float amax_smem[];        // per-group absmax (rpb * groups) if smem_amax
  __shared__ A red[4 * 32];  // sum (32), two sums (64), absmax (32)

  const int tpr = a.tpr;
  const int group = threadIdx.x / tpr;
  const int t = threadIdx.x - group * tpr;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * a.rpb + group;
  const bool valid = row < a.M;
  const int64_t P = a.N / VEC;
  const int64_t off = valid ? row * a.N : 0;
  const S* src = FUSED ? reinterpret_cast<const S*>(a.h + off)
                       : reinterpret_cast<const S*>(a.x + off);
  const bool has_w = a.w != nullptr;
  const bool has_b = a.b != nullptr;
  constexpr bool CACHE = ITEMS > 0;
  constexpr int U = CACHE ? ITEMS : 4;  // packs per thread per iteration
  Pack<S, VEC> cache[CACHE ? ITEMS : 1];

  // Runs f(pack, pi) over this thread's packs of the row, U at a time; from the register
  // cache, or (re-reading) loaded from memory first.
  auto for_packs = [&](auto&& f) {
    if constexpr (CACHE) {
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int64_t pi = t + static_cast<int64_t>(i) * tpr;
        if (pi < P) f(cache[i], pi);
      }
    } else {
      for (int64_t base = t; base < P; base += static_cast<int64_t>(U) * tpr) {
        Pack<S, VEC> v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t pi = base + static_cast<int64_t>(u) * tpr;
          if (pi < P) v[u] = load_pack<S, VEC>(src, pi);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t pi = base + static_cast<int64_t>(u) * tpr;
          if (pi < P) f(v[u], pi);
        }
      }
    }
  };

  // ---- pass 1: load (fused: add and store h) and the first statistic
  A s1 = A(0);
  if (valid) {
    if constexpr (FUSED) {
      // h = x + r rounded to R (y is the norm of the h handed back), stored and kept.
      auto add_pack = [&](const Pack<T, VEC>& xv, const Pack<R, VEC>& rv, int64_t pi) {
        Pack<R, VEC> hv;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          hv.v[j] = from_acc<R>(to_acc<A>(xv.v[j]) + to_acc<A>(rv.v[j]));
          const A f = to_acc<A>(hv.v[j]);
          s1 += f * f;
        }
        store_pack<R, VEC>(a.h + off, pi, hv);
        return hv;
      };
      if constexpr (CACHE) {
        Pack<T, VEC> xv[ITEMS];
        Pack<R, VEC> rv[ITEMS];
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          const int64_t pi = t + static_cast<int64_t>(i) * tpr;
          if (pi < P) {
            xv[i] = load_pack<T, VEC>(a.x + off, pi);
            rv[i] = load_pack<R, VEC>(a.r + off, pi);
          }
        }
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          const int64_t pi = t + static_cast<int64_t>(i) * tpr;
          if (pi < P) cache[i] = add_pack(xv[i], rv[i], pi);
        }
      } else {
        for (int64_t base = t; base < P; base += static_cast<int64_t>(U) * tpr) {
          Pack<T, VEC> xv[U];
          Pack<R, VEC> rv[U];
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int64_t pi = base + static_cast<int64_t>(u) * tpr;
            if (pi < P) {
              xv[u] = load_pack<T, VEC>(a.x + off, pi);
              rv[u] = load_pack<R, VEC>(a.r + off, pi);
            }
          }
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int64_t pi = base + static_cast<int64_t>(u) * tpr;
            if (pi < P) add_pack(xv[u], rv[u], pi);
          }
        }
      }
    } else {
      if constexpr (CACHE) {
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          const int64_t pi = t + static_cast<int64_t>(i) * tpr;
          if (pi < P) cache[i] = load_pack<S, VEC>(src, pi);
        }
      }
      for_packs([&](const Pack<S, VEC>& v, int64_t) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const A f = to_acc<A>(v.v[j]);
          s1 += (KIND == NormKind::layer) ? f : f * f;
        }
      });
    }
  }
  A v1[1] = {s1};
  group_sum<A, 1>(v1, tpr, red);
  A mean = A(0), rstd;
  if constexpr (KIND == NormKind::layer) {
    // Corrected two-pass variance (as the CPU kernel): d = x - mean0, then
    // mean = mean0 + sum(d) / N and var = (sum(d^2) - sum(d)^2 / N) / N.
    const A mean0 = v1[0] / static_cast<A>(a.N);
    A d1 = A(0), d2 = A(0);
    if (valid) {
      for_packs([&](const Pack<S, VEC>& v, int64_t) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const A d = to_acc<A>(v.v[j]) - mean0;
          d1 += d;
          d2 += d * d;
        }
      });
    }
    A v2[2] = {d1, d2};
    group_sum<A, 2>(v2, tpr, red + 32);
    const A inv_n = A(1) / static_cast<A>(a.N);
    mean = mean0 + v2[0] * inv_n;
    const A var_raw = (v2[1] - v2[0] * v2[0] * inv_n) * inv_n;
    const A var = var_raw < A(0) ? A(0) : var_raw;
    rstd = A(1) / sqrtf(var + a.eps);
  } else {
    rstd = A(1) / sqrtf(v1[0] / static_cast<A>(a.N) + a.eps);
  }

  // y of element j of pack pi, in fp32 (same order of operations as the plain kernels)
  auto y_of = [&](const Pack<S, VEC>& v, const Pack<W, VEC>& wv, const Pack<W, VEC>& bv,
                  int j) -> A {
    A y;
    if constexpr (KIND == NormKind::layer) {
      y = (to_acc<A>(v.v[j]) - mean) * rstd;
      if (has_w) y = y * to_acc<A>(wv.v[j]);
      if (has_b) y = y + to_acc<A>(bv.v[j]);
    } else {
      y = to_acc<A>(v.v[j]) * rstd;
      // offset 0 uses w itself: 0 + (-0) would turn a -0 weight's -0 output into +0.
      if (has_w) y = y * (a.offset != A(0) ? a.offset + to_acc<A>(wv.v[j]) : to_acc<A>(wv.v[j]));
    }
    return y;
  };
  auto load_params = [&](int64_t pi, Pack<W, VEC>& wv, Pack<W, VEC>& bv) {
    if (has_w) wv = load_pack<W, VEC>(a.w, pi);
    if (has_b) bv = load_pack<W, VEC>(a.b, pi);
  };

  // ---- pass 2 (dynamic scales): absmax of y per row or per group
  float* gmax = nullptr;  // per group of this row: absmax (bits of |y|, atomicMax), then s
  A inv = A(0);
  if (a.mode == Mode::per_group) {
    gmax = a.smem_amax ? amax_smem + static_cast<int64_t>(group) * a.groups
                       : a.scales + (valid ? row * a.groups : 0);
    if (valid) {
      for (int64_t k = t; k < a.groups; k += tpr) gmax[k] = 0.0f;
    }
    __syncthreads();
    if (valid) {
      for_packs([&](const Pack<S, VEC>& v, int64_t pi) {
        Pack<W, VEC> wv, bv;
        load_params(pi, wv, bv);
        float m = 0.0f;
#pragma unroll
        for (int j = 0; j < VEC; ++j) m = absmax2(m, fabsf(y_of(v, wv, bv, j)));
        // a pack lies in one group (the host vectorizes only when VEC divides the group)
        atomicMax(reinterpret_cast<unsigned*>(gmax) + (pi * VEC) / a.group, __float_as_uint(m));
      });
    }
    __syncthreads();
    // absmax -> scale, in place (and into the scales output when the scratch is shared)
    if (valid) {
      for (int64_t k = t; k < a.groups; k += tpr) {
        const float sc = dynamic_scale(gmax[k], a.scale_ub, a.qmax, a.min_scale);
        gmax[k] = sc;
        if (a.smem_amax) a.scales[row * a.groups + k] = sc;
      }
    }
    __syncthreads();
  } else if (a.mode == Mode::per_row) {
    float m = 0.0f;
    if (valid) {
      for_packs([&](const Pack<S, VEC>& v, int64_t pi) {
        Pack<W, VEC> wv, bv;
        load_params(pi, wv, bv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) m = absmax2(m, fabsf(y_of(v, wv, bv, j)));
      });
    }
    m = group_absmax(m, tpr, red + 3 * 32);
    const float s = dynamic_scale(m, a.scale_ub, a.qmax, a.min_scale);
    if (valid && t == 0) a.scales[row] = s;
    inv = A(1) / s;
  } else {
    inv = A(1) / *a.scale;
  }
  if (!valid) return;  // no block-wide sync below

  // ---- pass 3: y * (1 / s), converted, VEC bytes per store
  int64_t cur_group = -1;
  A cur_inv = inv;
  for_packs([&](const Pack<S, VEC>& v, int64_t pi) {
    Pack<W, VEC> wv, bv;
    load_params(pi, wv, bv);
    if (a.mode == Mode::per_group) {
      const int64_t gi = (pi * VEC) / a.group;
      if (gi != cur_group) {
        cur_group = gi;
        cur_inv = A(1) / gmax[gi];
      }
    }
    Pack<uint8_t, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = quantize(y_of(v, wv, bv, j) * cur_inv, a.q);
    store_pack<uint8_t, VEC>(a.out + off, pi, o);
  });
}

template <typename T, typename W, typename R, NormKind KIND>
cudaError_t launch_norm_quant(const NormQuantParams& p, cudaStream_t stream) {
  QArgs<T, W, R> a{};
  a.x = static_cast<const T*>(p.x);
  a.r = static_cast<const R*>(p.r_in);
  a.w = static_cast<const W*>(p.weight);
  a.b = static_cast<const W*>(p.bias);
  a.h = static_cast<R*>(p.h);
  a.out = static_cast<uint8_t*>(p.out);
  a.scales = p.scales;
  a.scale = p.scale;
  a.scale_ub = p.scale_ub;
  a.M = p.M;
  a.N = p.N;
  a.group = p.group;
  a.groups = p.N / p.group;
  a.eps = static_cast<float>(p.eps);
  a.offset = static_cast<float>(p.offset);
  a.qmax = quant_max(p.q);
  a.min_scale = quant_min_scale(p.q);
  a.q = p.q;
  a.mode = p.scale != nullptr ? Mode::static_scale
                              : (p.group == p.N ? Mode::per_row : Mode::per_group);

  // The fused form's statistics are those of h (dtype R): packs of h's width give it the
  // same thread layout and summation order as the unfused kernel run on h, so that
  // fused_add_rms_norm_quant(x, r) is bitwise rms_norm_quant(h) (tests/test_quant.py).
  constexpr int V = 16 / (KIND == NormKind::fused_add_rms && sizeof(R) > sizeof(T) ? sizeof(R) : sizeof(T));
  bool vec = a.N % V == 0 && is_aligned(a.x, V * sizeof(T)) && is_aligned(a.w, V * sizeof(W)) &&
             is_aligned(a.b, V * sizeof(W)) && is_aligned(a.out, V) &&
             (a.mode != Mode::per_group || a.group % V == 0);
  if constexpr (KIND == NormKind::fused_add_rms) {
    vec = vec && is_aligned(a.r, V * sizeof(R)) && is_aligned(a.h, V * sizeof(R));
  }
  const int64_t P = vec ? a.N / V : a.N;
  RowConfig c = pick_row_config(P, kQMaxThreads, kQItems, vec);
  size_t smem = 0;
  if (a.mode == Mode::per_group) {
    const size_t need = static_cast<size_t>(c.rpb) * static_cast<size_t>(a.groups) * sizeof(float);
    a.smem_amax = need <= kQSmemBytes;
    if (a.smem_amax) smem = need;
  }
  a.tpr = c.tpr;
  a.rpb = c.rpb;
  const int64_t blocks = ceil_div(a.M, c.rpb);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks));
  const dim3 block(c.threads());
  if (!vec) {
    norm_quant_kernel<T, W, R, KIND, 1, 0><<<grid, block, smem, stream>>>(a);
  } else if (c.items == 4) {
    norm_quant_kernel<T, W, R, KIND, V, kQItems><<<grid, block, smem, stream>>>(a);
  } else {
    norm_quant_kernel<T, W, R, KIND, V, 0><<<grid, block, smem, stream>>>(a);
  }
  cudaError_t err = cudaSuccess;
  RMSNORM_EXT_LAUNCH_CHECK(err);
  return err;
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
