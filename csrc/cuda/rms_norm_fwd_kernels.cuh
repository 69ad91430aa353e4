// RMSNorm forward kernels, plain and with the fused residual add, and their launcher.
//
//   plain:  y = x * rstd * (offset + w),              rstd = 1 / sqrt(mean(x^2) + eps)
//   fused:  h = round_R(x + r); y = h * rstd * (offset + w), rstd from h
//
// T: input/output dtype, W: weight dtype (T, or float for bf16/fp16), R: residual dtype
// (T, or float for bf16/fp16; equal to T and unused when !FUSED). Math in acc_t<T>.
//
// No __restrict__: fused_add_rms_norm_inplace passes y == x and h == r. Every element is
// read and written by the same thread (identical index mapping in every pass), so the
// in-place form is race free. Loads of a row are issued before any store so that the
// (possibly aliasing) stores do not serialize them.
#pragma once

#include "cuda_utils.cuh"

namespace rmsnorm_ext {
namespace cuda {

// Block size cap of the forward kernels. 512 (not 1024) so ptxas may use up to 128
// registers: with 1024 it had to squeeze the row cache into 64 and spilled.
constexpr int kFwdMaxThreads = 512;

template <typename T, typename W, typename R>
struct RmsFwdArgs {
  const T* x;
  const R* r;  // fused only
  const W* w;  // nullptr: no weight (offset ignored)
  T* y;
  R* h;        // fused only
  acc_t<T>* rstd;
  int64_t M;
  int64_t N;
  acc_t<T> eps;
  acc_t<T> offset;
  int tpr;
  int rpb;
};

// Loads pack `pi` of the row, and for the fused form also adds the residual, stores h and
// returns it (rounded to R: y is the norm of the h that is handed back).
template <typename T, typename W, typename R, bool FUSED, int VEC>
struct RmsFwdRow {
  using A = acc_t<T>;
  using SPack = Pack<R, VEC>;  // what the kernel keeps of the row: x, or h

  static __device__ __forceinline__ A sumsq(const SPack& s) {
    A acc = A(0);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A f = to_acc<A>(s.v[j]);
      acc += f * f;  // squares in fp32: fp16 values near 65504 do not overflow
    }
    return acc;
  }

  static __device__ __forceinline__ SPack add(const Pack<T, VEC>& xv, const Pack<R, VEC>& rv) {
    SPack s;
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      s.v[j] = from_acc<R>(to_acc<A>(xv.v[j]) + to_acc<A>(rv.v[j]));
    return s;
  }

  // y for one pack; wp is ignored when the kernel has no weight.
  static __device__ __forceinline__ Pack<T, VEC> out(const SPack& s, const Pack<W, VEC>& wp,
                                                      bool has_w, A rstd, A offset) {
    Pack<T, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A n = to_acc<A>(s.v[j]) * rstd;
      // offset 0 uses w itself: 0 + (-0) would give +0 where x * rstd * w is -0.
      const A wf = to_acc<A>(wp.v[j]);
      o.v[j] = from_acc<T>(has_w ? n * (offset != A(0) ? offset + wf : wf) : n);
    }
    return o;
  }
};

// Register kernel: the row stays in registers between the reduction and the output.
// Pack indices are 32-bit here (a row has at most kFwdMaxThreads * 8 packs).
template <typename T, typename W, typename R, bool FUSED, int VEC, int ITEMS>
__global__ void __launch_bounds__(kFwdMaxThreads)
    rms_fwd_reg_kernel(const RmsFwdArgs<T, W, R> a) {
  using A = acc_t<T>;
  using Row = RmsFwdRow<T, W, R, FUSED, VEC>;
  __shared__ A red[32];

  const int tpr = a.tpr;
  const int group = threadIdx.x / tpr;
  const int t = threadIdx.x - group * tpr;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * a.rpb + group;
  const bool valid = row < a.M;
  const int P = static_cast<int>(a.N / VEC);
  const int64_t off = valid ? row * a.N : 0;
  const T* xr = a.x + off;
  T* yr = a.y + off;
  const bool has_w = a.w != nullptr;

  typename Row::SPack s[ITEMS];
  A ss = A(0);
  if (valid) {
    if constexpr (FUSED) {
      const R* rr = a.r + off;
      R* hr = a.h + off;
      Pack<T, VEC> xv[ITEMS];
      Pack<R, VEC> rv[ITEMS];
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int pi = t + i * tpr;
        if (pi < P) {
          xv[i] = load_pack<T, VEC>(xr, pi);
          rv[i] = load_pack<R, VEC>(rr, pi);
        }
      }
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int pi = t + i * tpr;
        if (pi < P) {
          s[i] = Row::add(xv[i], rv[i]);
          store_pack<R, VEC>(hr, pi, s[i]);
          ss += Row::sumsq(s[i]);
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int pi = t + i * tpr;
        if (pi < P) s[i] = load_pack<T, VEC>(xr, pi);
      }
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int pi = t + i * tpr;
        if (pi < P) ss += Row::sumsq(s[i]);
      }
    }
  }

  A v[1] = {ss};
  group_sum<A, 1>(v, tpr, red);
  const A rstd = A(1) / sqrt(v[0] / static_cast<A>(a.N) + a.eps);
  if (!valid) return;  // no block-wide sync below
  if (t == 0) a.rstd[row] = rstd;

  // Weights in chunks of 4 packs, loaded before the stores that use them (the stores may
  // alias as far as the compiler knows, so it would not hoist the loads itself).
  constexpr int CH = ITEMS < 4 ? ITEMS : 4;
#pragma unroll
  for (int c = 0; c < ITEMS; c += CH) {
    Pack<W, VEC> wv[CH];
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      const int pi = t + (c + k) * tpr;
      if (has_w && pi < P) wv[k] = load_pack<W, VEC>(a.w, pi);
    }
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      const int pi = t + (c + k) * tpr;
      if (pi < P) store_pack<T, VEC>(yr, pi, Row::out(s[c + k], wv[k], has_w, rstd, a.offset));
    }
  }
}

// Re-reading kernel: any row length. Pass 1 streams the row (fused: computes and writes h)
// and reduces; pass 2 re-reads x (fused: the h this same thread wrote) -- mostly from
// L1/L2 -- and writes y. Also the only kernel for rows that cannot be vectorized (VEC=1).
template <typename T, typename W, typename R, bool FUSED, int VEC>
__global__ void __launch_bounds__(kFwdMaxThreads)
    rms_fwd_reread_kernel(const RmsFwdArgs<T, W, R> a) {
  using A = acc_t<T>;
  using Row = RmsFwdRow<T, W, R, FUSED, VEC>;
  constexpr int U = 4;  // packs in flight per thread
  __shared__ A red[32];

  const int tpr = a.tpr;
  const int group = threadIdx.x / tpr;
  const int t = threadIdx.x - group * tpr;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * a.rpb + group;
  const bool valid = row < a.M;
  const int64_t P = a.N / VEC;
  const int64_t off = valid ? row * a.N : 0;
  const bool has_w = a.w != nullptr;

  A ss = A(0);
  if (valid) {
    for (int64_t base = t; base < P; base += static_cast<int64_t>(U) * tpr) {
      if constexpr (FUSED) {
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
          if (pi < P) {
            const auto s = Row::add(xv[u], rv[u]);
            store_pack<R, VEC>(a.h + off, pi, s);
            ss += Row::sumsq(s);
          }
        }
      } else {
        Pack<T, VEC> xv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t pi = base + static_cast<int64_t>(u) * tpr;
          if (pi < P) xv[u] = load_pack<T, VEC>(a.x + off, pi);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t pi = base + static_cast<int64_t>(u) * tpr;
          if (pi < P) ss += Row::sumsq(xv[u]);
        }
      }
    }
  }

  A v[1] = {ss};
  group_sum<A, 1>(v, tpr, red);
  const A rstd = A(1) / sqrt(v[0] / static_cast<A>(a.N) + a.eps);
  if (!valid) return;
  if (t == 0) a.rstd[row] = rstd;

  // Pass 2. For the fused form the source is h (already rounded to R), as written above.
  const R* src = FUSED ? static_cast<const R*>(a.h) : reinterpret_cast<const R*>(a.x);
  for (int64_t base = t; base < P; base += static_cast<int64_t>(U) * tpr) {
    Pack<R, VEC> sv[U];
    Pack<W, VEC> wv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t pi = base + static_cast<int64_t>(u) * tpr;
      if (pi < P) {
        sv[u] = load_pack<R, VEC>(src + off, pi);
        if (has_w) wv[u] = load_pack<W, VEC>(a.w, pi);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t pi = base + static_cast<int64_t>(u) * tpr;
      if (pi < P) store_pack<T, VEC>(a.y + off, pi, Row::out(sv[u], wv[u], has_w, rstd, a.offset));
    }
  }
}

// Picks the kernel for the row shape and alignment and launches it on `stream`.
// Register buckets (rows of P packs, tpr <= 512): ITEMS=4 for P <= 2048, ITEMS=8 for
// P <= 4096, i.e. bf16/fp16 N <= 16384 / 32768, fp32 8192 / 16384, fp64 4096 / 8192.
// The fused form with an fp32 residual under bf16/fp16 stops at ITEMS=4 (the h it keeps
// is twice as wide). Longer rows, and rows that are not 16-byte aligned or whose length
// is not a multiple of the pack, use the re-reading kernel.
template <typename T, typename W, typename R, bool FUSED>
cudaError_t launch_rms_fwd(const RmsFwdParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  RmsFwdArgs<T, W, R> a{};
  a.x = static_cast<const T*>(p.x);
  a.r = static_cast<const R*>(p.r_in);
  a.w = static_cast<const W*>(p.weight);
  a.y = static_cast<T*>(p.y);
  a.h = static_cast<R*>(p.h);
  a.rstd = static_cast<A*>(p.rstd);
  a.M = p.M;
  a.N = p.N;
  a.eps = static_cast<A>(p.eps);
  a.offset = static_cast<A>(p.offset);

  constexpr int V = 16 / sizeof(T);
  bool vec = a.N % V == 0 && is_aligned(a.x, V * sizeof(T)) && is_aligned(a.y, V * sizeof(T)) &&
             is_aligned(a.w, V * sizeof(W));
  if constexpr (FUSED) {
    vec = vec && is_aligned(a.r, V * sizeof(R)) && is_aligned(a.h, V * sizeof(R));
  }
  constexpr int max_items = (FUSED && sizeof(R) > sizeof(T)) ? 4 : 8;
  const int64_t P = vec ? a.N / V : a.N;
  const RowConfig c = pick_row_config(P, kFwdMaxThreads, max_items, vec);
  a.tpr = c.tpr;
  a.rpb = c.rpb;
  const int64_t blocks = ceil_div(a.M, c.rpb);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks));
  const dim3 block(c.threads());
  if (!vec) {
    rms_fwd_reread_kernel<T, W, R, FUSED, 1><<<grid, block, 0, stream>>>(a);
  } else if (c.items == 4) {
    rms_fwd_reg_kernel<T, W, R, FUSED, V, 4><<<grid, block, 0, stream>>>(a);
  } else if (c.items == 8) {
    if constexpr (max_items >= 8) {
      rms_fwd_reg_kernel<T, W, R, FUSED, V, 8><<<grid, block, 0, stream>>>(a);
    }
  } else {
    rms_fwd_reread_kernel<T, W, R, FUSED, V><<<grid, block, 0, stream>>>(a);
  }
  cudaError_t err = cudaSuccess;
  RMSNORM_EXT_LAUNCH_CHECK(err);
  return err;
}

}  // namespace cuda
}  // namespace rmsnorm_ext
