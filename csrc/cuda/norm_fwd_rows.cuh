// The forward of a row norm, written once for RMSNorm (plain and with the fused residual
// add) and LayerNorm: the register kernel, the re-reading kernel and the launch choice. A
// norm supplies a policy (rms_norm_fwd_kernels.cuh, layer_norm_fwd_kernels.cuh, and on them
// norm_modulate_kernels.cu, gated_rms_norm_kernels.cu, norm_quant_kernels.cu):
//
//   kTwoPass               LayerNorm's second pass over the row (the corrected two-pass
//                          variance, cuda_utils.cuh corrected_stats: d = x - mean0)
//   first(run, pack)       adds a pack to the first statistic (RMS: sum of squares; LN: sum)
//   after_first(v, N, eps) FwdStats from the reduced first statistic (RMS: rstd; LN: mean0,
//                          which the second pass finishes)
//   out(f, wp, bp, ex, j, has_w, has_b, st, offset)   element j of a pack of y, in acc_t<T>
//   Ops, Extra<VEC>, extra<VEC>(ops, row, pi), aligned(ops, bytes)
//                          the norm's own operands of the output (NoOperands for the plain
//                          norms; adaLN modulation: per-sample scale and shift), loaded a
//                          pack at a time beside the weight, whether they allow packs, and
//                          prepare(ops, rpb): the launch's dynamic shared memory
//   Kept<T, R, FUSED>, load<VEC>(a, off, pi), reload<VEC>(a, off, src, pi)
//                          what the kernels keep of a row and how a pack of it is formed
//                          (PlainRow: x, or h for the fused add; gated RMSNorm with the
//                          gate first: z = x * act(gate) in acc_t) in the first pass and in
//                          the re-reading kernel's later passes (src: x, or h as stored)
//   kCustomEpilogue, epilogue(a, row, valid, t, tpr, st, for_packs)
//                          a policy whose output is more than y (norm + quantize: absmax
//                          passes, then the conversion) takes over after the statistics,
//                          called by every thread of the block; for_packs(f) runs
//                          f(pack, pack index) over the thread's packs of the row (from the
//                          registers, or re-read)
//
//   fused (FUSED, RMSNorm only):  h = round_R(x + r); y = norm(h), statistics from h
//
// T: input/output dtype, W: weight (and bias) dtype (T, or float for bf16/fp16), R: residual
// dtype (T, or float for bf16/fp16; equal to T and unused when !FUSED). Math in acc_t<T>.
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

// The plain norms' (absent) operands of the output: an empty pack, nothing to load.
struct NoOperands {
  template <int VEC>
  struct Extra {};
  template <int VEC, typename I>
  static __device__ __forceinline__ Extra<VEC> extra(const NoOperands&, int64_t, I) {
    return {};
  }
  static bool aligned(const NoOperands&, size_t) { return true; }
  static size_t prepare(NoOperands&, int) { return 0; }
};

// The row as the plain norms keep it: x, or h (dtype R) for the fused add.
struct PlainRow {
  template <typename T, typename R, bool FUSED>
  using Kept = std::conditional_t<FUSED, R, T>;
  template <int VEC, class Args>
  static __device__ __forceinline__ auto load(const Args& a, int64_t off, int64_t pi) {
    return load_pack<std::remove_cv_t<std::remove_pointer_t<decltype(a.x)>>, VEC>(a.x + off, pi);
  }
  template <int VEC, class Args, typename S>
  static __device__ __forceinline__ Pack<S, VEC> reload(const Args&, int64_t, const S* src, int64_t pi) {
    return load_pack<S, VEC>(src, pi);
  }
};

// A policy with operands of its own streams two or more packs more per output pack: the
// kernels keep fewer packs in flight for it (ptxas spilled the full-size buckets).
template <class Norm>
inline constexpr bool has_operands_v = !std::is_same_v<typename Norm::Ops, NoOperands>;

template <typename T, typename W, typename R, class Ops = NoOperands>
struct NormFwdArgs {
  const T* x;
  const R* r;  // fused only
  const W* w;  // nullptr: no weight (offset ignored)
  const W* b;  // LayerNorm only; nullptr: no bias
  T* y;
  R* h;        // fused only
  acc_t<T>* mean;  // LayerNorm only
  acc_t<T>* rstd;
  int64_t M;
  int64_t N;
  acc_t<T> eps;
  acc_t<T> offset;  // RMSNorm only
  Ops ops;          // the policy's own operands (Norm::Ops)
  int tpr;
  int rpb;
};

template <typename A>
struct FwdStats {
  A mean;  // LayerNorm (RMSNorm: 0); after the first pass: mean0
  A rstd;
};

// h = x + r rounded to R, for one pack (y is the norm of the h that is handed back).
template <typename T, typename R, int VEC>
__device__ __forceinline__ Pack<R, VEC> add_pack(const Pack<T, VEC>& xv, const Pack<R, VEC>& rv) {
  using A = acc_t<T>;
  Pack<R, VEC> s;
#pragma unroll
  for (int j = 0; j < VEC; ++j) s.v[j] = from_acc<R>(to_acc<A>(xv.v[j]) + to_acc<A>(rv.v[j]));
  return s;
}

// LayerNorm's second pass: sums of d = x - mean0 and d^2 over one pack.
template <typename A, typename S, int VEC>
__device__ __forceinline__ void centered_sums(const Pack<S, VEC>& p, A mean0, A (&s2)[2]) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const A d = to_acc<A>(p.v[j]) - mean0;
    s2[0] += d * d;
    s2[1] += d;
  }
}

// LayerNorm's statistics from mean0 and the second pass's sums (cuda_utils.cuh).
template <typename A>
__device__ __forceinline__ FwdStats<A> finish_two_pass(A mean0, A (&s2)[2], int tpr, A* red2,
                                                        int64_t N, A eps) {
  group_sum<A, 2>(s2, tpr, red2);
  FwdStats<A> st;
  corrected_stats<A>(mean0, s2, N, eps, st.mean, st.rstd);
  return st;
}

// One pack of y from a kept pack, the parameters and the policy's operands.
template <class Norm, typename T, typename S, typename W, typename A, int VEC, class Ex>
__device__ __forceinline__ Pack<T, VEC> out_pack(const Pack<S, VEC>& s, const Pack<W, VEC>& wv,
                                                 const Pack<W, VEC>& bv, const Ex& ex, bool has_w,
                                                 bool has_b, const FwdStats<A>& st, A offset) {
  Pack<T, VEC> o;
#pragma unroll
  for (int j = 0; j < VEC; ++j)
    o.v[j] = from_acc<T>(Norm::out(to_acc<A>(s.v[j]), wv, bv, ex, j, has_w, has_b, st, offset));
  return o;
}

// Register kernel: the row stays in registers between the reduction and the output.
// Pack indices are 32-bit here (a row has at most kFwdMaxThreads * 8 packs).
template <class Norm, typename T, typename W, typename R, bool FUSED, int VEC, int ITEMS>
__global__ void __launch_bounds__(kFwdMaxThreads) norm_fwd_reg_kernel(const NormFwdArgs<T, W, R, typename Norm::Ops> a) {
  using A = acc_t<T>;
  using S = typename Norm::template Kept<T, R, FUSED>;  // what the kernel keeps of the row
  __shared__ A red[Norm::kTwoPass ? 32 + 2 * 32 : 32];

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
  const bool has_b = a.b != nullptr;

  Pack<S, VEC> s[ITEMS];
  // Runs f(pack, pack index) over this thread's packs of the row, from the registers.
  auto for_kept = [&](auto&& f) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int pi = t + i * tpr;
      if (pi < P) f(s[i], static_cast<int64_t>(pi));
    }
  };
  A s1 = A(0);
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
          s[i] = add_pack<T, R, VEC>(xv[i], rv[i]);
          store_pack<R, VEC>(hr, pi, s[i]);
          Norm::first(s1, s[i]);
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int pi = t + i * tpr;
        if (pi < P) s[i] = Norm::template load<VEC>(a, off, pi);
      }
      for_kept([&](const Pack<S, VEC>& p, int64_t) { Norm::first(s1, p); });
    }
  }

  A v[1] = {s1};
  group_sum<A, 1>(v, tpr, red);
  FwdStats<A> st = Norm::after_first(v[0], a.N, a.eps);
  if constexpr (Norm::kTwoPass) {
    A s2[2] = {A(0), A(0)};
    if (valid) for_kept([&](const Pack<S, VEC>& p, int64_t) { centered_sums<A>(p, st.mean, s2); });
    st = finish_two_pass<A>(st.mean, s2, tpr, red + 32, a.N, a.eps);
  }
  if constexpr (Norm::kCustomEpilogue) {
    Norm::epilogue(a, row, valid, t, tpr, st, for_kept);
    return;
  }
  if (!valid) return;  // no block-wide sync below
  if (t == 0) {
    if constexpr (Norm::kTwoPass) a.mean[row] = st.mean;
    a.rstd[row] = st.rstd;
  }

  // Parameters in chunks of 4 packs (2 with the policy's operands), loaded before the stores
  // that use them (the stores may alias as far as the compiler knows, so it would not hoist
  // the loads itself).
  constexpr int kChunk = has_operands_v<Norm> ? 2 : 4;
  constexpr int CH = ITEMS < kChunk ? ITEMS : kChunk;
#pragma unroll
  for (int c = 0; c < ITEMS; c += CH) {
    Pack<W, VEC> wv[CH];
    Pack<W, VEC> bv[CH];
    typename Norm::Ops::template Extra<VEC> ex[CH];
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      const int pi = t + (c + k) * tpr;
      if (pi < P) {
        if (has_w) wv[k] = load_pack<W, VEC>(a.w, pi);
        if (has_b) bv[k] = load_pack<W, VEC>(a.b, pi);
        ex[k] = Norm::Ops::template extra<VEC>(a.ops, row, pi);
      }
    }
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      const int pi = t + (c + k) * tpr;
      if (pi < P) {
        store_pack<T, VEC>(yr, pi, out_pack<Norm, T>(s[c + k], wv[k], bv[k], ex[k], has_w, has_b, st, a.offset));
      }
    }
  }
}

// Re-reading kernel: any row length. Pass 1 streams the row (fused: computes and writes h)
// and reduces; LayerNorm's second pass and the output pass re-read x (fused: the h this
// same thread wrote) -- mostly from L1/L2. Also the only kernel for rows that cannot be
// vectorized (VEC=1).
template <class Norm, typename T, typename W, typename R, bool FUSED, int VEC>
__global__ void __launch_bounds__(kFwdMaxThreads) norm_fwd_reread_kernel(const NormFwdArgs<T, W, R, typename Norm::Ops> a) {
  using A = acc_t<T>;
  using S = typename Norm::template Kept<T, R, FUSED>;
  constexpr int U = has_operands_v<Norm> ? 2 : 4;  // packs in flight per thread
  __shared__ A red[Norm::kTwoPass ? 32 + 2 * 32 : 32];

  const int tpr = a.tpr;
  const int group = threadIdx.x / tpr;
  const int t = threadIdx.x - group * tpr;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * a.rpb + group;
  const bool valid = row < a.M;
  const int64_t P = a.N / VEC;
  const int64_t step = static_cast<int64_t>(U) * tpr;
  const int64_t off = valid ? row * a.N : 0;
  const bool has_w = a.w != nullptr;
  const bool has_b = a.b != nullptr;
  // What the later passes read: x, or (fused) h, already rounded to R, as written in pass 1
  // (a policy that keeps something else forms it again in reload).
  const S* src = FUSED ? reinterpret_cast<const S*>(a.h + off) : reinterpret_cast<const S*>(a.x + off);
  // Runs f(pack, pack index) over this thread's packs of the row, re-read U at a time (the
  // passes after the first).
  auto for_reread = [&](auto&& f) {
    for (int64_t base = t; base < P; base += step) {
      Pack<S, VEC> sv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t pi = base + static_cast<int64_t>(u) * tpr;
        if (pi < P) sv[u] = Norm::template reload<VEC>(a, off, src, pi);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t pi = base + static_cast<int64_t>(u) * tpr;
        if (pi < P) f(sv[u], pi);
      }
    }
  };

  A s1 = A(0);
  if (valid) {
    for (int64_t base = t; base < P; base += step) {
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
            const auto hv = add_pack<T, R, VEC>(xv[u], rv[u]);
            store_pack<R, VEC>(a.h + off, pi, hv);
            Norm::first(s1, hv);
          }
        }
      } else {
        Pack<S, VEC> xv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t pi = base + static_cast<int64_t>(u) * tpr;
          if (pi < P) xv[u] = Norm::template load<VEC>(a, off, pi);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t pi = base + static_cast<int64_t>(u) * tpr;
          if (pi < P) Norm::first(s1, xv[u]);
        }
      }
    }
  }

  A v[1] = {s1};
  group_sum<A, 1>(v, tpr, red);
  FwdStats<A> st = Norm::after_first(v[0], a.N, a.eps);
  if constexpr (Norm::kTwoPass) {
    A s2[2] = {A(0), A(0)};
    if (valid) for_reread([&](const Pack<S, VEC>& p, int64_t) { centered_sums<A>(p, st.mean, s2); });
    st = finish_two_pass<A>(st.mean, s2, tpr, red + 32, a.N, a.eps);
  }
  if constexpr (Norm::kCustomEpilogue) {
    Norm::epilogue(a, row, valid, t, tpr, st, for_reread);
    return;
  }
  if (!valid) return;
  if (t == 0) {
    if constexpr (Norm::kTwoPass) a.mean[row] = st.mean;
    a.rstd[row] = st.rstd;
  }

  // Output pass.
  for (int64_t base = t; base < P; base += step) {
    Pack<S, VEC> sv[U];
    Pack<W, VEC> wv[U];
    Pack<W, VEC> bv[U];
    typename Norm::Ops::template Extra<VEC> ex[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t pi = base + static_cast<int64_t>(u) * tpr;
      if (pi < P) {
        sv[u] = Norm::template reload<VEC>(a, off, src, pi);
        if (has_w) wv[u] = load_pack<W, VEC>(a.w, pi);
        if (has_b) bv[u] = load_pack<W, VEC>(a.b, pi);
        ex[u] = Norm::Ops::template extra<VEC>(a.ops, row, pi);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t pi = base + static_cast<int64_t>(u) * tpr;
      if (pi < P) {
        store_pack<T, VEC>(a.y + off, pi, out_pack<Norm, T>(sv[u], wv[u], bv[u], ex[u], has_w, has_b, st, a.offset));
      }
    }
  }
}

// Picks the kernel for the row shape and alignment and launches it on `stream`.
// Register buckets (rows of P packs, tpr <= 512): ITEMS=4 for P <= 2048, ITEMS=8 for
// P <= 4096, i.e. bf16/fp16 N <= 16384 / 32768, fp32 8192 / 16384, fp64 4096 / 8192.
// The fused form with an fp32 residual under bf16/fp16 stops at ITEMS=4 (the h it keeps
// is twice as wide), and so do policies with operands of their own. Longer rows, and rows
// that are not 16-byte aligned or whose length is not a multiple of the pack, use the
// re-reading kernel.
// VT: the type whose 16-byte packs set VEC (T; norm + quantize's fused form: h's R, so that
// it sums h in the same order as the unfused op run on h).
template <class Norm, typename T, typename W, typename R, bool FUSED, typename VT = T>
cudaError_t launch_norm_fwd(const NormFwdArgs<T, W, R, typename Norm::Ops>& args, cudaStream_t stream) {
  auto a = args;
  constexpr int V = 16 / sizeof(VT);
  bool vec = a.N % V == 0 && is_aligned(a.x, V * sizeof(T)) && is_aligned(a.y, V * sizeof(T)) &&
             is_aligned(a.w, V * sizeof(W)) && is_aligned(a.b, V * sizeof(W)) &&
             Norm::Ops::aligned(a.ops, V);
  if constexpr (FUSED) {
    vec = vec && is_aligned(a.r, V * sizeof(R)) && is_aligned(a.h, V * sizeof(R));
  }
  constexpr int max_items = ((FUSED && sizeof(R) > sizeof(T)) || has_operands_v<Norm>) ? 4 : 8;
  const int64_t P = vec ? a.N / V : a.N;
  const RowConfig c = pick_row_config(P, kFwdMaxThreads, max_items, vec);
  a.tpr = c.tpr;
  a.rpb = c.rpb;
  const size_t smem = Norm::Ops::prepare(a.ops, c.rpb);
  const int64_t blocks = ceil_div(a.M, c.rpb);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks));
  const dim3 block(c.threads());
  if (!vec) {
    norm_fwd_reread_kernel<Norm, T, W, R, FUSED, 1><<<grid, block, smem, stream>>>(a);
  } else if (c.items == 4) {
    norm_fwd_reg_kernel<Norm, T, W, R, FUSED, V, 4><<<grid, block, smem, stream>>>(a);
  } else if (c.items == 8) {
    if constexpr (max_items >= 8) {
      norm_fwd_reg_kernel<Norm, T, W, R, FUSED, V, 8><<<grid, block, smem, stream>>>(a);
    }
  } else {
    norm_fwd_reread_kernel<Norm, T, W, R, FUSED, V><<<grid, block, smem, stream>>>(a);
  }
  cudaError_t err = cudaSuccess;
  RMSNORM_EXT_LAUNCH_CHECK(err);
  return err;
}

}  // namespace cuda
}  // namespace rmsnorm_ext
