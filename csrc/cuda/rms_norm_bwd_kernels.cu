// rms_norm_bwd kernels.
//
//   g = dy * (offset + w)  (dy without a weight), rounded on its own (mul_rn) in both
//       passes: were it contracted into an FMA in one pass and not the other, the
//       mean(g * x) of pass 1 would not be that of the g pass 2 uses.
//   xhat = x * rstd, c = rstd * mean(g * x)
//   dx = rstd * (g - xhat * c)  [+ grad_residual, in fp32 before rounding]
//      (= rstd * (g - x * rstd^2 * mean(g * x)), grouped so that no intermediate is
//      larger than the result: rstd^2 alone overflows fp32 for rms < ~5e-20 with eps = 0,
//      and rstd^3 underflows for |x| >~ 1e13; xhat and c are O(|x| rstd) and O(|g|).)
//   dw[j] = sum over rows of dy * xhat
//
// X: dtype of x, dx and grad_residual; G: grad_out's (== X, or bf16/fp16 with fp32 X: the
// fp32 residual stream of fused_add_rms_norm); W: the weight's (G, or f32 next to a
// bf16/fp16 G). Accumulation in acc_t<X>.
//
// Register kernel: each block loops over a contiguous chunk of rows, one row per thread
// group at a time, and keeps dw as cascaded sums (col_reduce.cuh: runs of kRunRows rows
// per group in shared memory, a tree over the groups, one partial row per block);
// col_reduce_kernel then adds the partial rows as a tree. Re-reading kernel (long rows):
// dx only; dw comes from the column-parallel col_partials_kernel. Deterministic.
#include "col_reduce.cuh"
#include "cuda_utils.cuh"

namespace rmsnorm_ext {
namespace cuda {
namespace {

// 512 so that ptxas may use up to 128 registers (x and dy of the row live in registers).
constexpr int kBwdMaxThreads = 512;

template <typename X, typename G, typename W>
struct RmsBwdArgs {
  const X* x;
  const G* dy;
  const acc_t<X>* rstd;
  const W* w;       // never nullptr: ones (and offset 0) when the op has no weight
  const X* gres;    // nullptr: no grad_residual
  X* dx;
  acc_t<X>* ws;     // register kernel: partial dw rows, one per block; nullptr: not wanted
  int64_t M;
  int64_t N;
  int64_t chunk;    // rows per block (multiple of rpb)
  acc_t<X> offset;
  int tpr;
  int rpb;
};

template <typename A, typename W, int VEC>
__device__ __forceinline__ A weight_at(const Pack<W, VEC>& wp, int j, A offset) {
  return offset + to_acc<A>(wp.v[j]);
}

// Register kernel: rows of up to tpr * ITEMS packs; x and dy stay in registers between
// the row reduction and dx. The dw run sums live in shared memory (each thread only
// touches its own columns of its group's row, so no syncs until a flush): in registers
// they pushed the kernel past 128 registers and it spilled.
template <typename X, typename G, typename W, int VEC, int ITEMS>
__global__ void __launch_bounds__(kBwdMaxThreads)
    rms_bwd_reg_kernel(const RmsBwdArgs<X, G, W> a) {
  using A = acc_t<X>;
  __shared__ A red[2 * 32];
  extern __shared__ __align__(16) unsigned char dsmem[];

  const int tpr = a.tpr;
  const int group = threadIdx.x / tpr;
  const int t = threadIdx.x - group * tpr;
  const int P = static_cast<int>(a.N / VEC);
  const bool want_dw = a.ws != nullptr;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * a.chunk;
  const int64_t row_end = row_begin + a.chunk < a.M ? row_begin + a.chunk : a.M;
  // [rpb][N] accumulators; this thread's packs are pi = t + i * tpr of its group's row.
  A* dwsm = reinterpret_cast<A*>(dsmem) + static_cast<int64_t>(group) * a.N;

  if (want_dw) {
    Pack<A, VEC> z;
#pragma unroll
    for (int j = 0; j < VEC; ++j) z.v[j] = A(0);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int pi = t + i * tpr;
      if (pi < P) store_pack<A, VEC>(dwsm, pi, z);
    }
  }

  A* wsr = want_dw ? a.ws + static_cast<int64_t>(blockIdx.x) * a.N : nullptr;
  int run = 0;        // rows of the current run (per group)
  bool first = true;  // the block's partial row is not yet written
  int parity = 0;
  // Uniform trip count for the whole block: group_sum and flush_runs __syncthreads.
  for (int64_t base = row_begin; base < row_end; base += a.rpb) {
    const int64_t row = base + group;
    const bool valid = row < row_end;
    const int64_t off = valid ? row * a.N : 0;
    const X* xr = a.x + off;
    const G* gr = a.dy + off;
    const A rstd = valid ? a.rstd[row] : A(0);

    Pack<X, VEC> xv[ITEMS];
    Pack<G, VEC> gv[ITEMS];
    A sgx = A(0);
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
          Pack<A, VEC> acc;
          if (want_dw) acc = load_pack<A, VEC>(dwsm, pi);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const A xf = to_acc<A>(xv[i].v[j]);
            const A dyf = to_acc<A>(gv[i].v[j]);
            sgx += mul_rn(dyf, weight_at<A>(wv[i], j, a.offset)) * xf;
            if (want_dw) acc.v[j] += dyf * (xf * rstd);
          }
          if (want_dw) store_pack<A, VEC>(dwsm, pi, acc);
        }
      }
    }
    A v[1] = {sgx};
    group_sum<A, 1>(v, tpr, red + parity * 32);
    parity ^= 1;

    if (valid) {
      const A c = rstd * (v[0] / static_cast<A>(a.N));
      X* dxr = a.dx + off;
      const X* rr = a.gres != nullptr ? a.gres + off : nullptr;
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
            Pack<X, VEC> o;
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
              const A g = mul_rn(to_acc<A>(gv[i].v[j]), weight_at<A>(wv[k], j, a.offset));
              A d = rstd * (g - (to_acc<A>(xv[i].v[j]) * rstd) * c);
              if (rr != nullptr) d += to_acc<A>(rv[k].v[j]);
              o.v[j] = from_acc<X>(d);
            }
            store_pack<X, VEC>(dxr, pi, o);
          }
        }
      }
    }
    if (want_dw && ++run == kRunRows) {
      flush_runs<A>(reinterpret_cast<A*>(dsmem), a.rpb, a.N, 1, 0, wsr, 0, first);
      first = false;
      run = 0;
    }
  }
  // The last, partial run (every block has at least one row, so its row gets written).
  if (want_dw && run > 0) flush_runs<A>(reinterpret_cast<A*>(dsmem), a.rpb, a.N, 1, 0, wsr, 0, first);
}

// Re-reading kernel: any row length and alignment. Pass 1 reduces sum(g * x); pass 2
// re-reads the row (mostly from L1/L2) and writes dx. No dw here (see launch).
template <typename X, typename G, typename W, int VEC>
__global__ void __launch_bounds__(kBwdMaxThreads)
    rms_bwd_reread_kernel(const RmsBwdArgs<X, G, W> a) {
  using A = acc_t<X>;
  constexpr int U = 2;  // packs in flight per stream (4-5 streams); 4 spilled
  __shared__ A red[2 * 32];

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
    const A rstd = valid ? a.rstd[row] : A(0);

    A sgx = A(0);
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
              sgx += mul_rn(to_acc<A>(gv[u].v[j]), weight_at<A>(wv[u], j, a.offset)) *
                     to_acc<A>(xv[u].v[j]);
          }
        }
      }
    }
    A v[1] = {sgx};
    group_sum<A, 1>(v, tpr, red + parity * 32);
    parity ^= 1;
    if (!valid) continue;  // the trip count stays uniform: `base` does not depend on it

    const A c = rstd * (v[0] / static_cast<A>(a.N));
    X* dxr = a.dx + off;
    const X* rr = a.gres != nullptr ? a.gres + off : nullptr;
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
          Pack<X, VEC> o;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const A g = mul_rn(to_acc<A>(gv[u].v[j]), weight_at<A>(wv[u], j, a.offset));
            A d = rstd * (g - (to_acc<A>(xv[u].v[j]) * rstd) * c);
            if (rr != nullptr) d += to_acc<A>(rv[u].v[j]);
            o.v[j] = from_acc<X>(d);
          }
          store_pack<X, VEC>(dxr, pi, o);
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

template <typename X, typename G, typename W>
cudaError_t launch(const RmsBwdParams& p, Workspace ws, cudaStream_t stream) {
  using A = acc_t<X>;
  RmsBwdArgs<X, G, W> a{};
  a.x = static_cast<const X*>(p.x_in);
  a.dy = static_cast<const G*>(p.dy);
  a.rstd = static_cast<const A*>(p.rstd);
  a.w = static_cast<const W*>(p.weight);
  a.gres = static_cast<const X*>(p.gres);
  a.dx = static_cast<X*>(p.dx);
  a.M = p.M;
  a.N = p.N;
  a.offset = static_cast<A>(p.offset);
  const bool want_dw = p.dw != nullptr && p.weight != nullptr;
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
  bool reg = vec && c.items == 4;
  // dw run sums of the register kernel: rpb * N <= threads * 4 * V accumulators, at most
  // 64 KB (fp32, 512 threads, bf16 packs), on top of the static `red`. Where the device
  // cannot give that much, the re-reading kernel (no dynamic shared memory) takes over.
  const size_t smem = (reg && want_dw) ? static_cast<size_t>(c.rpb) * a.N * sizeof(A) : 0;
  if (smem > 0) {
    bool fits = false;
    err = ensure_dynamic_smem(reinterpret_cast<const void*>(rms_bwd_reg_kernel<X, G, W, V, 4>),
                              smem, &fits);
    if (err != cudaSuccess) return err;
    if (!fits) {
      reg = false;
      c = pick_row_config(P, kBwdMaxThreads, 4, false);
    }
  }
  a.tpr = c.tpr;
  a.rpb = c.rpb;
  auto kernel = reg ? rms_bwd_reg_kernel<X, G, W, V, 4>
                    : (vec ? rms_bwd_reread_kernel<X, G, W, V> : rms_bwd_reread_kernel<X, G, W, 1>);
  const size_t dyn = reg ? smem : 0;
  // Register kernel with dw: at most kRunsPerPartial runs per block (see col_reduce.cuh);
  // for huge M that means more blocks than fit at once, not longer sums.
  const int64_t max_chunk =
      (reg && want_dw) ? static_cast<int64_t>(kRunRows) * kRunsPerPartial * c.rpb : INT64_MAX;
  const PersistentGrid pg =
      persistent_grid(kernel, c.threads(), dyn, a.M, c.rpb, p.sm_count, max_chunk);
  a.chunk = pg.chunk;
  if (reg && want_dw) {
    // One partial row per block: at most ~(SMs x blocks per SM) or M / 512 rows of N.
    a.ws = static_cast<A*>(ws.alloc(ws.ctx, static_cast<size_t>(pg.blocks * a.N) * sizeof(A)));
    if (a.ws == nullptr) return cudaErrorMemoryAllocation;
  }
  kernel<<<static_cast<unsigned>(pg.blocks), c.threads(), dyn, stream>>>(a);
  RMSNORM_EXT_LAUNCH_CHECK(err);
  if (err != cudaSuccess || !want_dw) return err;
  if (reg) {
    return launch_col_reduce<A, W>(a.ws, pg.blocks, a.N, 1, static_cast<W*>(p.dw), nullptr,
                                   stream);
  }
  // Long (or unaligned) rows: dw from a column-parallel pass over x and dy.
  return launch_col_partials<X, G, W, false>(a.x, a.dy, nullptr, a.rstd, a.M, a.N, vec,
                                             p.sm_count, ws, static_cast<W*>(p.dw), nullptr,
                                             stream);
}

}  // namespace

cudaError_t rms_bwd(const RmsBwdParams& p, Workspace ws, cudaStream_t stream) {
  if (p.inner > 1) return rms_bwd_channels_first(p, ws, stream);  // channels_first_kernels.cu
  return with_dtype_pair(p.g, p.w, [&](auto g_tag, auto w_tag) -> cudaError_t {
    using G = decltype(g_tag);
    using W = decltype(w_tag);
    if (p.x == p.g) return launch<G, G, W>(p, ws, stream);
    if constexpr (is_reduced_v<G>) {
      if (p.x == DType::f32) return launch<float, G, W>(p, ws, stream);
    }
    return cudaErrorInvalidValue;
  });
}

RMSNORM_EXT_REGISTER_CUDA_KERNEL(RmsBwd, rms_bwd);

}  // namespace cuda
}  // namespace rmsnorm_ext
