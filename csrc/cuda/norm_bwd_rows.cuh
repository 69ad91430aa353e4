// The backward of a row norm, written once for RMSNorm and LayerNorm: the two kernels, the
// launch choice between them and the parameter-gradient reductions. A norm supplies a
// policy (rms_norm_bwd_kernels.cu, layer_norm_bwd_kernels.cu) with its per-element math:
//
//   kSums            per-row sums dx needs (RMS: sum(g x); LN: sum(g), sum(g xhat))
//   kPlanes          parameter-gradient planes (RMS: dw; LN: dw, db)
//   kCentered        saved mean (LN) or none (RMS)
//   kGradResidual    adds grad_residual to dx (RMS: fused_add_rms_norm)
//   weight(w, off)   the weight an element's g = dy * weight uses
//   row_sums(s, x, g, st)        adds one element to the row sums
//   param_terms(p, x, dy, st)    adds one element's dw (, db) terms
//   Coef coef(v, N, st)          what dx needs from the reduced sums
//   dx(x, g, c, st)              one element of dx (before the grad_residual add)
//
// with st = the row's saved statistics (Stats: mean, rstd; RMS has no mean). g is
// dy * weight rounded on its own (mul_rn) in both passes: contracted into an FMA in one
// pass and not the other, the row sums of pass 1 would not be those of the g pass 2 uses.
//
// X: dtype of x, dx and grad_residual; G: grad_out's (== X, or bf16/fp16 with fp32 X: the
// fp32 residual stream of fused_add_rms_norm); W: the weight's. Accumulation in acc_t<X>.
//
// Register kernel: each block loops over a contiguous chunk of rows, one row per thread
// group at a time, x and dy of the row in registers between the reduction and dx, and keeps
// the parameter gradients as cascaded sums (col_reduce.cuh: runs of kRunRows rows per group
// in shared memory, a tree over the groups, one partial row per block); col_reduce_kernel
// then adds the partial rows as a tree. Re-reading kernel (long or unaligned rows): dx
// only; the parameter gradients come from the column-parallel col_partials_kernel.
// Deterministic: every order of addition is fixed by the launch shape.
#pragma once

#include "col_reduce.cuh"
#include "cuda_utils.cuh"

namespace rmsnorm_ext {
namespace cuda {

// 512 so that ptxas may use up to 128 registers (x and dy of the row live in registers).
constexpr int kBwdMaxThreads = 512;
// Register kernel's shared accumulators (kPlanes x rpb x N) above this use the re-reading
// kernel instead (LayerNorm bf16 rows of 16K with dw and db would need 128 KB).
constexpr size_t kBwdMaxAccSmem = 96 * 1024;

template <typename X, typename G, typename W>
struct NormBwdArgs {
  const X* x;
  const G* dy;
  const acc_t<X>* mean;  // LayerNorm only
  const acc_t<X>* rstd;
  const W* w;            // never nullptr: ones (and offset 0) when the op has no weight
  const X* gres;         // nullptr: no grad_residual
  X* dx;
  acc_t<X>* ws;          // register kernel: partial rows, one per block and plane; nullptr: none wanted
  int64_t ws_plane;      // elements per plane of ws
  int64_t M;
  int64_t N;
  int64_t chunk;         // rows per block (multiple of rpb)
  acc_t<X> offset;
  int tpr;
  int rpb;
};

template <typename A>
struct RowStats {
  A mean;
  A rstd;
};

template <class Norm, typename A, typename X, typename G, typename W>
__device__ __forceinline__ RowStats<A> row_stats(const NormBwdArgs<X, G, W>& a, int64_t row,
                                                 bool valid) {
  if constexpr (Norm::kCentered) return {valid ? a.mean[row] : A(0), valid ? a.rstd[row] : A(0)};
  return {A(0), valid ? a.rstd[row] : A(0)};
}

// grad_residual (fused_add_rms_norm's gradient to the residual stream), added to dx in fp32;
// compiled only into the norms that have one.
template <class Norm, typename X, typename G, typename W>
__device__ __forceinline__ const X* gres_row(const NormBwdArgs<X, G, W>& a, int64_t off) {
  if constexpr (Norm::kGradResidual) return a.gres != nullptr ? a.gres + off : nullptr;
  return nullptr;
}

// g = dy * weight of element j, rounded on its own: the one formula both passes use.
template <class Norm, typename A, typename G, typename W, int VEC>
__device__ __forceinline__ A g_at(const Pack<G, VEC>& gv, const Pack<W, VEC>& wv, int j, A offset) {
  return mul_rn(to_acc<A>(gv.v[j]), Norm::weight(to_acc<A>(wv.v[j]), offset));
}

// One pack of dx (+ grad_residual where has_r), from x, dy and the weight.
template <class Norm, typename X, typename G, typename W, typename A, int VEC, class Coef>
__device__ __forceinline__ Pack<X, VEC> dx_pack(const Pack<X, VEC>& xv, const Pack<G, VEC>& gv,
                                                const Pack<W, VEC>& wv, const Pack<X, VEC>& rv,
                                                bool has_r, const Coef& c, const RowStats<A>& st,
                                                A offset) {
  Pack<X, VEC> o;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    A d = Norm::dx(to_acc<A>(xv.v[j]), g_at<Norm>(gv, wv, j, offset), c, st);
    if (has_r) d += to_acc<A>(rv.v[j]);
    o.v[j] = from_acc<X>(d);
  }
  return o;
}

template <class Norm, typename X, typename G, typename W, int VEC, int ITEMS>
__global__ void __launch_bounds__(kBwdMaxThreads) norm_bwd_reg_kernel(const NormBwdArgs<X, G, W> a) {
  using A = acc_t<X>;
  constexpr int S = Norm::kSums;
  constexpr int PL = Norm::kPlanes;
  __shared__ A red[2 * 32 * S];
  extern __shared__ __align__(16) unsigned char dsmem[];

  const int tpr = a.tpr;
  const int group = threadIdx.x / tpr;
  const int t = threadIdx.x - group * tpr;
  const int P = static_cast<int>(a.N / VEC);
  const bool want = a.ws != nullptr;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * a.chunk;
  const int64_t row_end = row_begin + a.chunk < a.M ? row_begin + a.chunk : a.M;
  // [PL][rpb][N] accumulators; this thread's packs are pi = t + i * tpr of its group's row.
  const int64_t splane = static_cast<int64_t>(a.rpb) * a.N;
  A* accsm = reinterpret_cast<A*>(dsmem) + static_cast<int64_t>(group) * a.N;

  if (want) {
    Pack<A, VEC> z;
#pragma unroll
    for (int j = 0; j < VEC; ++j) z.v[j] = A(0);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int pi = t + i * tpr;
      if (pi < P) {
#pragma unroll
        for (int q = 0; q < PL; ++q) store_pack<A, VEC>(accsm + q * splane, pi, z);
      }
    }
  }

  A* wsr = want ? a.ws + static_cast<int64_t>(blockIdx.x) * a.N : nullptr;
  int run = 0;        // rows of the current run (per group)
  bool first = true;  // the block's partial rows are not yet written
  int parity = 0;
  // Uniform trip count for the whole block: group_sum and flush_runs __syncthreads.
  for (int64_t base = row_begin; base < row_end; base += a.rpb) {
    const int64_t row = base + group;
    const bool valid = row < row_end;
    const int64_t off = valid ? row * a.N : 0;
    const X* xr = a.x + off;
    const G* gr = a.dy + off;
    const RowStats<A> st = row_stats<Norm, A>(a, row, valid);

    Pack<X, VEC> xv[ITEMS];
    Pack<G, VEC> gv[ITEMS];
    A sums[S] = {};
    if (valid) {
      Pack<W, VEC> wv[ITEMS];
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int pi = t + i * tpr;
        if (pi < P) {
          xv[i] = load_pack<X, VEC>(xr, pi);
          gv[i] = load_pack<G, VEC>(gr, pi);
          wv[i] = load_pack<W, VEC>(a.w, pi);
        }
      }
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int pi = t + i * tpr;
        if (pi < P) {
          Pack<A, VEC> acc[PL];
          if (want) {
#pragma unroll
            for (int q = 0; q < PL; ++q) acc[q] = load_pack<A, VEC>(accsm + q * splane, pi);
          }
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const A xf = to_acc<A>(xv[i].v[j]);
            const A dyf = to_acc<A>(gv[i].v[j]);
            Norm::row_sums(sums, xf, g_at<Norm>(gv[i], wv[i], j, a.offset), st);
            if (want) {
              A terms[PL];
              Norm::param_terms(terms, xf, dyf, st);
#pragma unroll
              for (int q = 0; q < PL; ++q) acc[q].v[j] += terms[q];
            }
          }
          if (want) {
#pragma unroll
            for (int q = 0; q < PL; ++q) store_pack<A, VEC>(accsm + q * splane, pi, acc[q]);
          }
        }
      }
    }
    group_sum<A, S>(sums, tpr, red + parity * 32 * S);
    parity ^= 1;

    if (valid) {
      const auto c = Norm::coef(sums, a.N, st);
      X* dxr = a.dx + off;
      const X* rr = gres_row<Norm>(a, off);
      constexpr int CH = ITEMS < 4 ? ITEMS : 4;
#pragma unroll
      for (int c0 = 0; c0 < ITEMS; c0 += CH) {
        Pack<W, VEC> wv[CH];
        Pack<X, VEC> rv[CH];
#pragma unroll
        for (int k = 0; k < CH; ++k) {
          const int pi = t + (c0 + k) * tpr;
          if (pi < P) {
            wv[k] = load_pack<W, VEC>(a.w, pi);
            if (rr != nullptr) rv[k] = load_pack<X, VEC>(rr, pi);
          }
        }
#pragma unroll
        for (int k = 0; k < CH; ++k) {
          const int i = c0 + k;
          const int pi = t + i * tpr;
          if (pi < P) {
            store_pack<X, VEC>(dxr, pi, dx_pack<Norm>(xv[i], gv[i], wv[k], rv[k], rr != nullptr, c, st, a.offset));
          }
        }
      }
    }
    if (want && ++run == kRunRows) {
      flush_runs<A>(reinterpret_cast<A*>(dsmem), a.rpb, a.N, PL, splane, wsr, a.ws_plane, first);
      first = false;
      run = 0;
    }
  }
  // The last, partial run (every block has at least one row, so its rows get written).
  if (want && run > 0)
    flush_runs<A>(reinterpret_cast<A*>(dsmem), a.rpb, a.N, PL, splane, wsr, a.ws_plane, first);
}

// Re-reading kernel: any row length and alignment. Pass 1 reduces the row sums; pass 2
// re-reads the row (mostly from L1/L2) and writes dx. No parameter gradients here.
template <class Norm, typename X, typename G, typename W, int VEC>
__global__ void __launch_bounds__(kBwdMaxThreads)
    norm_bwd_reread_kernel(const NormBwdArgs<X, G, W> a) {
  using A = acc_t<X>;
  constexpr int S = Norm::kSums;
  constexpr int U = 2;  // packs in flight per stream (4-5 streams); 4 spilled
  __shared__ A red[2 * 32 * S];

  const int tpr = a.tpr;
  const int group = threadIdx.x / tpr;
  const int t = threadIdx.x - group * tpr;
  const int64_t P = a.N / VEC;
  const int64_t step = static_cast<int64_t>(U) * tpr;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * a.chunk;
  const int64_t row_end = row_begin + a.chunk < a.M ? row_begin + a.chunk : a.M;

  int parity = 0;
  for (int64_t base = row_begin; base < row_end; base += a.rpb) {
    const int64_t row = base + group;
    const bool valid = row < row_end;
    const int64_t off = valid ? row * a.N : 0;
    const X* xr = a.x + off;
    const G* gr = a.dy + off;
    const RowStats<A> st = row_stats<Norm, A>(a, row, valid);

    A sums[S] = {};
    if (valid) {
      for (int64_t b = t; b < P; b += step) {
        Pack<X, VEC> xv[U];
        Pack<G, VEC> gv[U];
        Pack<W, VEC> wv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t pi = b + static_cast<int64_t>(u) * tpr;
          if (pi < P) {
            xv[u] = load_pack<X, VEC>(xr, pi);
            gv[u] = load_pack<G, VEC>(gr, pi);
            wv[u] = load_pack<W, VEC>(a.w, pi);
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t pi = b + static_cast<int64_t>(u) * tpr;
          if (pi < P) {
#pragma unroll
            for (int j = 0; j < VEC; ++j)
              Norm::row_sums(sums, to_acc<A>(xv[u].v[j]), g_at<Norm>(gv[u], wv[u], j, a.offset), st);
          }
        }
      }
    }
    group_sum<A, S>(sums, tpr, red + parity * 32 * S);
    parity ^= 1;
    if (!valid) continue;  // the trip count stays uniform: `base` does not depend on it

    const auto c = Norm::coef(sums, a.N, st);
    X* dxr = a.dx + off;
    const X* rr = gres_row<Norm>(a, off);
    for (int64_t b = t; b < P; b += step) {
      Pack<X, VEC> xv[U];
      Pack<G, VEC> gv[U];
      Pack<W, VEC> wv[U];
      Pack<X, VEC> rv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t pi = b + static_cast<int64_t>(u) * tpr;
        if (pi < P) {
          xv[u] = load_pack<X, VEC>(xr, pi);
          gv[u] = load_pack<G, VEC>(gr, pi);
          wv[u] = load_pack<W, VEC>(a.w, pi);
          if (rr != nullptr) rv[u] = load_pack<X, VEC>(rr, pi);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t pi = b + static_cast<int64_t>(u) * tpr;
        if (pi < P) {
          store_pack<X, VEC>(dxr, pi, dx_pack<Norm>(xv[u], gv[u], wv[u], rv[u], rr != nullptr, c, st, a.offset));
        }
      }
    }
  }
}

template <typename W>
__global__ void fill_ones_kernel(W* w, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) w[i] = from_acc<W>(1.0f);
}

// Runs the backward of `a` (x, dy, statistics, weight, gres, dx, M, N, offset set by the
// caller; a.w may be nullptr) and the parameter gradients into out[0..kPlanes) (each may be
// nullptr: not wanted).
template <class Norm, typename X, typename G, typename W>
cudaError_t launch_norm_bwd(NormBwdArgs<X, G, W> a, W* const (&out)[Norm::kPlanes], int sm_count,
                            Workspace ws, cudaStream_t stream) {
  using A = acc_t<X>;
  constexpr int PL = Norm::kPlanes;
  bool want = false;
  for (int q = 0; q < PL; ++q) want = want || out[q] != nullptr;
  cudaError_t err = cudaSuccess;
  if (a.w == nullptr) {
    // No weight: run with w = 1, offset 0. A branch on a runtime "has weight" flag made
    // ptxas spill these kernels heavily; the rare weightless backward pays one tiny fill.
    W* ones = static_cast<W*>(ws.alloc(ws.ctx, static_cast<size_t>(a.N) * sizeof(W)));
    if (ones == nullptr) return cudaErrorMemoryAllocation;
    fill_ones_kernel<W><<<static_cast<unsigned>(ceil_div(a.N, 256)), 256, 0, stream>>>(ones, a.N);
    RMSNORM_EXT_LAUNCH_CHECK(err);
    if (err != cudaSuccess) return err;
    a.w = ones;
    a.offset = A(0);
  }

  constexpr int V = 16 / sizeof(G);  // G is the narrowest streamed type
  const bool vec = a.N % V == 0 && is_aligned(a.x, V * sizeof(X)) &&
                   is_aligned(a.dy, V * sizeof(G)) && is_aligned(a.w, V * sizeof(W)) &&
                   is_aligned(a.gres, V * sizeof(X)) && is_aligned(a.dx, V * sizeof(X));
  const int64_t P = vec ? a.N / V : a.N;
  RowConfig c = pick_row_config(P, kBwdMaxThreads, 4, vec);
  // Parameter-gradient run sums of the register kernel: PL x rpb x N accumulators (RMSNorm
  // at most 64 KB: fp32, 512 threads, bf16 packs), on top of the static `red`. Where the
  // device cannot give that much, the re-reading kernel (no dynamic shared memory) takes over.
  const size_t acc_smem = want ? PL * static_cast<size_t>(c.rpb) * a.N * sizeof(A) : 0;
  bool reg = vec && c.items == 4 && acc_smem <= kBwdMaxAccSmem;
  if (reg && acc_smem > 0) {
    // e.g. LayerNorm bf16 N = 768 asks for exactly 48 KB: above the default limit, so the
    // kernel must opt in (ensure_dynamic_smem).
    bool fits = false;
    err = ensure_dynamic_smem(
        reinterpret_cast<const void*>(norm_bwd_reg_kernel<Norm, X, G, W, V, 4>), acc_smem, &fits);
    if (err != cudaSuccess) return err;
    reg = fits;
  }
  if (!reg && vec && c.items == 4) c = pick_row_config(P, kBwdMaxThreads, 4, false);
  a.tpr = c.tpr;
  a.rpb = c.rpb;
  auto kernel = reg ? norm_bwd_reg_kernel<Norm, X, G, W, V, 4>
                    : (vec ? norm_bwd_reread_kernel<Norm, X, G, W, V>
                           : norm_bwd_reread_kernel<Norm, X, G, W, 1>);
  const size_t smem = reg ? acc_smem : 0;
  // Register kernel with parameter gradients: at most kRunsPerPartial runs per block
  // (col_reduce.cuh); for huge M that means more blocks than fit at once, not longer sums.
  const int64_t max_chunk =
      (reg && want) ? static_cast<int64_t>(kRunRows) * kRunsPerPartial * c.rpb : INT64_MAX;
  const PersistentGrid pg = persistent_grid(kernel, c.threads(), smem, a.M, c.rpb, sm_count, max_chunk);
  a.chunk = pg.chunk;
  if (reg && want) {
    // One partial row per block and plane: at most ~(SMs x blocks per SM) or M / 512 rows.
    a.ws_plane = pg.blocks * a.N;
    a.ws = static_cast<A*>(ws.alloc(ws.ctx, PL * static_cast<size_t>(a.ws_plane) * sizeof(A)));
    if (a.ws == nullptr) return cudaErrorMemoryAllocation;
  }
  kernel<<<static_cast<unsigned>(pg.blocks), c.threads(), smem, stream>>>(a);
  RMSNORM_EXT_LAUNCH_CHECK(err);
  if (err != cudaSuccess || !want) return err;
  W* out1 = PL > 1 ? out[PL - 1] : nullptr;
  if (reg) return launch_col_reduce<A, W>(a.ws, pg.blocks, a.N, PL, out[0], out1, stream);
  // Long (or unaligned) rows: the parameter gradients from a column-parallel pass over x and
  // dy, with a workspace of a few partial rows instead of one per thread group.
  return launch_col_partials<X, G, W, Norm::kCentered>(a.x, a.dy, a.mean, a.rstd, a.M, a.N, vec,
                                                       sm_count, ws, out[0], out1, stream);
}

}  // namespace cuda
}  // namespace rmsnorm_ext
