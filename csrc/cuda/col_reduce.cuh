// Parameter-gradient sums over rows (dweight, dbias) for the backward kernels: the
// cascade that keeps them accurate for many rows, the column-parallel kernel that forms
// them where the row kernel does not, and the final fixed-order column reduction.
//
// Accuracy. A plain running fp32 sum of n terms of random sign has a rounding error that
// grows like sqrt(n) * |sum| * eps; over M = 1M rows that is hundreds of ulps. Every sum
// here is cascaded instead: a running sum covers at most kRunRows terms ("a run"), runs
// are added into a second running sum of at most kRunsPerPartial runs (one "partial row"),
// and partial rows are added as trees (the groups of a block in shared memory, the
// partial rows of all blocks in col_reduce_kernel). The error then grows like
// sqrt(kRunRows + kRunsPerPartial + 2 * tree depth) instead of sqrt(M / blocks): within a
// small factor of a fully pairwise sum. No atomics anywhere: each order of addition is
// fixed by the launch shape, which depends only on (M, N, dtypes, alignment, device), so
// results are bitwise identical run to run.
#pragma once

#include "cuda_utils.cuh"

namespace rmsnorm_ext {
namespace cuda {

// Rows per running sum (level 0) and runs per partial row (level 1). 32 * 16 = 512 rows
// of one accumulator per partial row: the backward kernels cap their rows per block
// (times rows per block iteration) at that, so for huge M the workspace holds about
// M / 512 partial rows, under 1% of the input.
constexpr int kRunRows = 32;
constexpr int kRunsPerPartial = 16;

// ---------------------------------------------------------------------------------------
// Final reduction: ws holds `rows` fp32 (fp64) partial rows of N columns per plane;
// out[c] = their sum. Block (32 columns) x (32 row-threads): each row-thread takes a
// contiguous segment of rows, summed in runs of kRunRows, then the 32 segment sums are
// added as a halving tree in shared memory. blockIdx.y picks the plane (dweight, dbias).
template <typename A, typename W>
__global__ void __launch_bounds__(1024)
    col_reduce_kernel(const A* ws, int64_t rows, int64_t N, int64_t plane_stride, W* out0,
                      W* out1) {
  __shared__ A sm[32][33];
  const A* src = ws + blockIdx.y * plane_stride;
  W* out = blockIdx.y == 0 ? out0 : out1;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int ty = threadIdx.y;
  A s = A(0);
  if (col < N && out != nullptr) {
    const int64_t seg = (rows + 31) / 32;
    const int64_t rb = ty * seg;
    const int64_t re = rb + seg < rows ? rb + seg : rows;
    for (int64_t r0 = rb; r0 < re; r0 += kRunRows) {
      const int64_t r1 = r0 + kRunRows < re ? r0 + kRunRows : re;
      A run = A(0);
      int64_t r = r0;
      for (; r + 3 < r1; r += 4) {  // 4 independent loads in flight, added in row order
        const A a0 = src[r * N + col];
        const A a1 = src[(r + 1) * N + col];
        const A a2 = src[(r + 2) * N + col];
        const A a3 = src[(r + 3) * N + col];
        run += a0;
        run += a1;
        run += a2;
        run += a3;
      }
      for (; r < r1; ++r) run += src[r * N + col];
      s += run;
    }
  }
  sm[ty][threadIdx.x] = s;
#pragma unroll
  for (int h = 16; h > 0; h >>= 1) {
    __syncthreads();
    // Level h: threads [0, h) read [h, 2h) and write their own slot; disjoint sets.
    if (ty < h) {
      s += sm[ty + h][threadIdx.x];
      sm[ty][threadIdx.x] = s;
    }
  }
  if (ty == 0 && col < N && out != nullptr) out[col] = from_acc<W>(s);
}

// out0 / out1 may be nullptr (plane not wanted).
template <typename A, typename W>
inline cudaError_t launch_col_reduce(const A* ws, int64_t rows, int64_t N, int planes, W* out0,
                                     W* out1, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(N, 32)), planes);
  const dim3 block(32, 32);
  col_reduce_kernel<A, W><<<grid, block, 0, stream>>>(ws, rows, N, rows * N, out0, out1);
  cudaError_t err = cudaSuccess;
  RMSNORM_EXT_LAUNCH_CHECK(err);
  return err;
}

// ---------------------------------------------------------------------------------------
// Register kernels: each group of a block keeps its run sums in shared memory (rpb rows
// of N per plane, `sm`). Every kRunRows rows (and once at the end) the block calls
// flush_runs: the rpb run sums of each column are added as a tree (in place, by the one
// thread that owns the column in this step, so the tree levels need no sync), that sum
// is added to the block's partial row in the workspace (level 1: the same thread owns
// the same columns at every flush, so the read-modify-write is ordered and race free;
// `first` stores instead), and the run sums are cleared. Every thread of the block must
// call it (it syncs before, so all groups have finished their rows, and after, so no
// group starts the next run before its sums are cleared).
template <typename A>
__device__ __forceinline__ void flush_runs(A* sm, int rpb, int64_t N, int planes,
                                           int64_t splane, A* wsr, int64_t ws_plane,
                                           bool first) {
  __syncthreads();
  for (int64_t c = threadIdx.x; c < N; c += blockDim.x) {
    for (int p = 0; p < planes; ++p) {
      A* s = sm + p * splane + c;
      for (int h = 1; h < rpb; h <<= 1)
        for (int g = 0; g + h < rpb; g += 2 * h) s[g * N] += s[(g + h) * N];
      const A v = s[0];
      for (int g = 0; g < rpb; ++g) s[g * N] = A(0);
      A* o = wsr + p * ws_plane + c;
      *o = first ? v : *o + v;
    }
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------
// Column-parallel parameter gradients, for the re-reading backward kernels (rows too long
// to keep in registers). Those kernels used to accumulate one full fp32 row per thread
// group in the workspace, read-modify-written for every row: with few, long rows that
// was a workspace of up to 4x the input (one partial row per input row) and 8 bytes of
// extra traffic per element and plane. Here dweight (and dbias) need only x, dy and the
// saved statistics, not the row reductions of dx, so a separate pass reads x and dy once
// more (2-4 bytes per element) into a bounded workspace: splits x N per plane.
//
// Block: bx column threads (each VEC consecutive columns) x by row threads, bx * by =
// 256. Split s (blockIdx.y) covers rows [s * rows_per_split, ...); row thread ty takes
// rows ty, ty + by, ...: runs of kRunRows of them, at most kRunsPerPartial runs (the host
// sizes the splits so), then a tree over the by row threads.
//
// What one row adds to the planes of a column pack is a policy, Term:
//   using A;                        the accumulation type
//   static constexpr int kPlanes;   planes (partial rows per split) it produces
//   struct Args;                    its inputs (device pointers), passed to the kernel
//   template <int VEC> struct Row;  what it loads of one row at one column pack
//   template <int VEC> static Row<VEC> load(const Args&, int64_t row, int64_t N, int64_t cp);
//   template <int VEC> static void add(const Row<VEC>&, A (&s)[kPlanes][VEC]);
// Rows are loaded U at a time (all loads in flight) before they are added, in row order.
//   NormTerm<X, G, false> (RMSNorm): plane 0 = sum dy * (x * rstd).
//   NormTerm<X, G, true> (LayerNorm): plane 0 = sum dy * ((x - mean) * rstd), plane 1 = sum dy.
// (gated_rms_norm_kernels.cu has its own.)
template <typename X, typename G, bool LN>
struct NormTerm {
  using A = acc_t<X>;
  static constexpr int kPlanes = LN ? 2 : 1;
  struct Args {
    const X* x;
    const G* dy;
    const A* mean;  // LN only
    const A* rstd;
  };
  template <int VEC>
  struct Row {
    Pack<X, VEC> x;
    Pack<G, VEC> dy;
    A mean;
    A rstd;
  };
  template <int VEC>
  static __device__ __forceinline__ Row<VEC> load(const Args& a, int64_t row, int64_t N,
                                                  int64_t cp) {
    Row<VEC> r;
    r.x = load_pack<X, VEC>(a.x + row * N, cp);
    r.dy = load_pack<G, VEC>(a.dy + row * N, cp);
    r.rstd = a.rstd[row];
    r.mean = LN ? a.mean[row] : A(0);
    return r;
  }
  template <int VEC>
  static __device__ __forceinline__ void add(const Row<VEC>& r, A (&s0)[kPlanes][VEC]) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A dyf = to_acc<A>(r.dy.v[j]);
      if constexpr (LN) {
        s0[0][j] += dyf * ((to_acc<A>(r.x.v[j]) - r.mean) * r.rstd);
        s0[1][j] += dyf;
      } else {
        s0[0][j] += dyf * (to_acc<A>(r.x.v[j]) * r.rstd);
      }
    }
  }
};

template <typename Term>
struct ColPartialArgs {
  typename Term::Args t;
  typename Term::A* ws;  // [planes][splits][N]
  int64_t M;
  int64_t N;
  int64_t rows_per_split;
  int64_t ws_plane;      // splits * N
};

constexpr int kColThreads = 256;

template <typename Term, int VEC>
__global__ void __launch_bounds__(kColThreads)
    col_partials_kernel(const ColPartialArgs<Term> a) {
  using A = typename Term::A;
  using Row = typename Term::template Row<VEC>;
  constexpr int PL = Term::kPlanes;
  constexpr int U = 4;  // rows in flight per thread
  __shared__ A sm[kColThreads * VEC * PL];

  const int bx = blockDim.x;
  const int by = blockDim.y;
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t packs = a.N / VEC;
  const int64_t cp = static_cast<int64_t>(blockIdx.x) * bx + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * a.rows_per_split;
  const int64_t r1 = r0 + a.rows_per_split < a.M ? r0 + a.rows_per_split : a.M;

  A s1[PL][VEC];
#pragma unroll
  for (int p = 0; p < PL; ++p)
#pragma unroll
    for (int j = 0; j < VEC; ++j) s1[p][j] = A(0);

  if (cp < packs) {
    const int64_t run_step = static_cast<int64_t>(by) * kRunRows;
    for (int64_t rb = r0 + ty; rb < r1; rb += run_step) {
      const int64_t re = rb + run_step < r1 ? rb + run_step : r1;
      A s0[PL][VEC];
#pragma unroll
      for (int p = 0; p < PL; ++p)
#pragma unroll
        for (int j = 0; j < VEC; ++j) s0[p][j] = A(0);
      int64_t r = rb;
      for (; r + (U - 1) * by < re; r += U * by) {
        Row rv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          rv[u] = Term::template load<VEC>(a.t, r + static_cast<int64_t>(u) * by, a.N, cp);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) Term::template add<VEC>(rv[u], s0);
      }
      for (; r < re; r += by) {
        Term::template add<VEC>(Term::template load<VEC>(a.t, r, a.N, cp), s0);
      }
#pragma unroll
      for (int p = 0; p < PL; ++p)
#pragma unroll
        for (int j = 0; j < VEC; ++j) s1[p][j] += s0[p][j];
    }
  }

  // Tree over the row threads: level h adds slot ty + h into slot ty (ty a multiple of
  // 2h); readers and writers of one level are disjoint, levels are separated by syncs.
  A* mine = sm + (static_cast<int>(ty) * bx + tx) * (VEC * PL);
#pragma unroll
  for (int p = 0; p < PL; ++p)
#pragma unroll
    for (int j = 0; j < VEC; ++j) mine[p * VEC + j] = s1[p][j];
  for (int h = 1; h < by; h <<= 1) {
    __syncthreads();
    if ((ty & (2 * h - 1)) == 0 && ty + h < by) {
      const A* other = mine + h * bx * (VEC * PL);
#pragma unroll
      for (int p = 0; p < PL; ++p)
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          s1[p][j] += other[p * VEC + j];
          mine[p * VEC + j] = s1[p][j];
        }
    }
  }
  if (ty != 0 || cp >= packs) return;
  A* out = a.ws + static_cast<int64_t>(blockIdx.y) * a.N + cp * VEC;
#pragma unroll
  for (int p = 0; p < PL; ++p)
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[p * a.ws_plane + j] = s1[p][j];
}

// Launches col_partials_kernel for Term and the final reduction into out0 / out1 (planes 0
// and 1; either may be nullptr). vec: the kernel may read packs of V elements (every row
// of every tensor Term reads is aligned to a pack and N is a multiple of V); else 1.
template <typename Term, int V, typename W>
inline cudaError_t launch_term_col_partials(const typename Term::Args& t, int64_t M, int64_t N,
                                            bool vec, int sm_count, Workspace ws, W* out0,
                                            W* out1, cudaStream_t stream) {
  using A = typename Term::A;
  constexpr int PL = Term::kPlanes;
  const int VEC = vec ? V : 1;
  const int64_t packs = N / VEC;
  int bx = 1;
  while (bx < 32 && bx < packs) bx <<= 1;
  const int by = kColThreads / bx;
  const int64_t col_tiles = ceil_div(packs, bx);
  // Enough splits to fill the GPU a few times over and to keep every row thread's sum to
  // kRunsPerPartial runs; no more (each split is a partial row of the workspace).
  const int64_t want_par = ceil_div(static_cast<int64_t>(std::max(sm_count, 1)) * 8, col_tiles);
  const int64_t want_acc = ceil_div(M, static_cast<int64_t>(by) * kRunRows * kRunsPerPartial);
  int64_t splits = std::max<int64_t>(1, std::min(std::max(want_par, want_acc), ceil_div(M, by)));
  if (splits > 65535) splits = 65535;  // grid.y limit; only reached for M > ~2.1e9 rows
  const int64_t rows_per_split = ceil_div(M, splits);
  splits = ceil_div(M, rows_per_split);  // no empty split

  ColPartialArgs<Term> a{};
  a.t = t;
  a.M = M;
  a.N = N;
  a.rows_per_split = rows_per_split;
  a.ws_plane = splits * N;
  a.ws = static_cast<A*>(ws.alloc(ws.ctx, static_cast<size_t>(PL * a.ws_plane) * sizeof(A)));
  if (a.ws == nullptr) return cudaErrorMemoryAllocation;
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(splits));
  const dim3 block(bx, by);
  if (vec) {
    col_partials_kernel<Term, V><<<grid, block, 0, stream>>>(a);
  } else {
    col_partials_kernel<Term, 1><<<grid, block, 0, stream>>>(a);
  }
  cudaError_t err = cudaSuccess;
  RMSNORM_EXT_LAUNCH_CHECK(err);
  if (err != cudaSuccess) return err;
  return launch_col_reduce<A, W>(a.ws, splits, N, PL, out0, out1, stream);
}

// RMSNorm / LayerNorm: out0 = dweight, out1 = dbias (LN only); either may be nullptr.
// vec: every row of x and dy is aligned to a pack of 16 / sizeof(G) elements (and N a
// multiple of it), as the caller checked for its own packed path.
template <typename X, typename G, typename W, bool LN>
inline cudaError_t launch_col_partials(const X* x, const G* dy, const acc_t<X>* mean,
                                       const acc_t<X>* rstd, int64_t M, int64_t N, bool vec,
                                       int sm_count, Workspace ws, W* out0, W* out1,
                                       cudaStream_t stream) {
  using Term = NormTerm<X, G, LN>;
  return launch_term_col_partials<Term, 16 / sizeof(G), W>(
      typename Term::Args{x, dy, mean, rstd}, M, N, vec, sm_count, ws, out0, out1, stream);
}

}  // namespace cuda
}  // namespace rmsnorm_ext
