// layer_norm_bwd kernels.
//
//   xhat = (x - mean) * rstd, g = dy * w
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   dw[j] = sum over rows of dy * xhat, db[j] = sum over rows of dy
//
// T: x / dy / dx dtype; W: weight (and dw, db) dtype. Same structure as
// rms_norm_bwd_kernels.cu (see there for the why): blocks over contiguous row chunks;
// the register kernel keeps dw/db as cascaded sums (col_reduce.cuh: runs in shared
// memory, a tree over groups, one partial row per block), the re-reading kernel computes
// dx only and dw/db come from the column-parallel col_partials_kernel; then a tree column
// reduction. A missing weight runs as ones (runtime "has weight" branches made ptxas
// spill).
#include "col_reduce.cuh"
#include "cuda_utils.cuh"

namespace rmsnorm_ext {
namespace cuda {
namespace {

constexpr int kLnBwdMaxThreads = 512;
// Register kernel's shared accumulators (2 planes x rpb x N) above this use the
// re-reading kernel instead (bf16 rows of 16K with dw/db wanted would need 128 KB).
constexpr size_t kMaxAccSmem = 96 * 1024;

template <typename T, typename W>
struct LnBwdArgs {
  const T* x;
  const T* dy;
  const acc_t<T>* mean;
  const acc_t<T>* rstd;
  const W* w;      // never nullptr (ones when the op has no weight)
  T* dx;
  acc_t<T>* ws;    // register kernel's partial rows: plane 0 dw, plane 1 db; nullptr: neither wanted
  int64_t ws_plane;  // elements per plane
  int64_t M;
  int64_t N;
  int64_t chunk;
  int tpr;
  int rpb;
};

template <typename T, typename W, int VEC, int ITEMS>
__global__ void __launch_bounds__(kLnBwdMaxThreads) ln_bwd_reg_kernel(const LnBwdArgs<T, W> a) {
  using A = acc_t<T>;
  __shared__ A red[2 * 32 * 2];
  extern __shared__ __align__(16) unsigned char dsmem[];

  const int tpr = a.tpr;
  const int group = threadIdx.x / tpr;
  const int t = threadIdx.x - group * tpr;
  const int P = static_cast<int>(a.N / VEC);
  const bool want = a.ws != nullptr;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * a.chunk;
  const int64_t row_end = row_begin + a.chunk < a.M ? row_begin + a.chunk : a.M;
  const int64_t splane = static_cast<int64_t>(a.rpb) * a.N;
  A* dwsm = reinterpret_cast<A*>(dsmem) + static_cast<int64_t>(group) * a.N;
  A* dbsm = dwsm + splane;

  if (want) {
    Pack<A, VEC> z;
#pragma unroll
    for (int j = 0; j < VEC; ++j) z.v[j] = A(0);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int pi = t + i * tpr;
      if (pi < P) {
        store_pack<A, VEC>(dwsm, pi, z);
        store_pack<A, VEC>(dbsm, pi, z);
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
    const T* xr = a.x + off;
    const T* gr = a.dy + off;
    const A mean = valid ? a.mean[row] : A(0);
    const A rstd = valid ? a.rstd[row] : A(0);

    Pack<T, VEC> xv[ITEMS];
    Pack<T, VEC> gv[ITEMS];
    A sg = A(0), sgx = A(0);
    if (valid) {
      Pack<W, VEC> wv[ITEMS];
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int pi = t + i * tpr;
        if (pi < P) {
          xv[i] = load_pack<T, VEC>(xr, pi);
          gv[i] = load_pack<T, VEC>(gr, pi);
          wv[i] = load_pack<W, VEC>(a.w, pi);
        }
      }
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int pi = t + i * tpr;
        if (pi < P) {
          Pack<A, VEC> aw, ab;
          if (want) {
            aw = load_pack<A, VEC>(dwsm, pi);
            ab = load_pack<A, VEC>(dbsm, pi);
          }
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const A xh = (to_acc<A>(xv[i].v[j]) - mean) * rstd;
            const A dyf = to_acc<A>(gv[i].v[j]);
            const A g = mul_rn(dyf, to_acc<A>(wv[i].v[j]));
            sg += g;
            sgx += g * xh;
            if (want) {
              aw.v[j] += dyf * xh;
              ab.v[j] += dyf;
            }
          }
          if (want) {
            store_pack<A, VEC>(dwsm, pi, aw);
            store_pack<A, VEC>(dbsm, pi, ab);
          }
        }
      }
    }
    A v[2] = {sg, sgx};
    group_sum<A, 2>(v, tpr, red + parity * 64);
    parity ^= 1;

    if (valid) {
      const A mg = v[0] / static_cast<A>(a.N);
      const A mgx = v[1] / static_cast<A>(a.N);
      T* dxr = a.dx + off;
      constexpr int CH = ITEMS < 4 ? ITEMS : 4;
#pragma unroll
      for (int c0 = 0; c0 < ITEMS; c0 += CH) {
        Pack<W, VEC> wv[CH];
#pragma unroll
        for (int k = 0; k < CH; ++k) {
          const int pi = t + (c0 + k) * tpr;
          if (pi < P) wv[k] = load_pack<W, VEC>(a.w, pi);
        }
#pragma unroll
        for (int k = 0; k < CH; ++k) {
          const int i = c0 + k;
          const int pi = t + i * tpr;
          if (pi < P) {
            Pack<T, VEC> o;
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
              const A xh = (to_acc<A>(xv[i].v[j]) - mean) * rstd;
              const A g = mul_rn(to_acc<A>(gv[i].v[j]), to_acc<A>(wv[k].v[j]));
              o.v[j] = from_acc<T>(rstd * (g - mg - xh * mgx));
            }
            store_pack<T, VEC>(dxr, pi, o);
          }
        }
      }
    }
    if (want && ++run == kRunRows) {
      flush_runs<A>(reinterpret_cast<A*>(dsmem), a.rpb, a.N, 2, splane, wsr, a.ws_plane, first);
      first = false;
      run = 0;
    }
  }
  // The last, partial run (every block has at least one row, so its rows get written).
  if (want && run > 0)
    flush_runs<A>(reinterpret_cast<A*>(dsmem), a.rpb, a.N, 2, splane, wsr, a.ws_plane, first);
}

// Re-reading kernel: dx only (dw / db: see launch).
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kLnBwdMaxThreads)
    ln_bwd_reread_kernel(const LnBwdArgs<T, W> a) {
  using A = acc_t<T>;
  constexpr int U = 2;
  __shared__ A red[2 * 32 * 2];

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
    const T* xr = a.x + off;
    const T* gr = a.dy + off;
    const A mean = valid ? a.mean[row] : A(0);
    const A rstd = valid ? a.rstd[row] : A(0);

    A sg = A(0), sgx = A(0);
    if (valid) {
      for (int64_t b = t; b < P; b += step) {
        Pack<T, VEC> xv[U];
        Pack<T, VEC> gv[U];
        Pack<W, VEC> wv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t pi = b + static_cast<int64_t>(u) * tpr;
          if (pi < P) {
            xv[u] = load_pack<T, VEC>(xr, pi);
            gv[u] = load_pack<T, VEC>(gr, pi);
            wv[u] = load_pack<W, VEC>(a.w, pi);
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t pi = b + static_cast<int64_t>(u) * tpr;
          if (pi < P) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
              const A xh = (to_acc<A>(xv[u].v[j]) - mean) * rstd;
              const A g = mul_rn(to_acc<A>(gv[u].v[j]), to_acc<A>(wv[u].v[j]));
              sg += g;
              sgx += g * xh;
            }
          }
        }
      }
    }
    A v[2] = {sg, sgx};
    group_sum<A, 2>(v, tpr, red + parity * 64);
    parity ^= 1;
    if (!valid) continue;  // trip count stays uniform

    const A mg = v[0] / static_cast<A>(a.N);
    const A mgx = v[1] / static_cast<A>(a.N);
    T* dxr = a.dx + off;
    for (int64_t b = t; b < P; b += step) {
      Pack<T, VEC> xv[U];
      Pack<T, VEC> gv[U];
      Pack<W, VEC> wv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t pi = b + static_cast<int64_t>(u) * tpr;
        if (pi < P) {
          xv[u] = load_pack<T, VEC>(xr, pi);
          gv[u] = load_pack<T, VEC>(gr, pi);
          wv[u] = load_pack<W, VEC>(a.w, pi);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t pi = b + static_cast<int64_t>(u) * tpr;
        if (pi < P) {
          Pack<T, VEC> o;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const A xh = (to_acc<A>(xv[u].v[j]) - mean) * rstd;
            const A g = mul_rn(to_acc<A>(gv[u].v[j]), to_acc<A>(wv[u].v[j]));
            o.v[j] = from_acc<T>(rstd * (g - mg - xh * mgx));
          }
          store_pack<T, VEC>(dxr, pi, o);
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

template <typename T, typename W>
cudaError_t launch(const LnBwdParams& p, Workspace ws, cudaStream_t stream) {
  using A = acc_t<T>;
  LnBwdArgs<T, W> a{};
  a.x = static_cast<const T*>(p.x);
  a.dy = static_cast<const T*>(p.dy);
  a.mean = static_cast<const A*>(p.mean);
  a.rstd = static_cast<const A*>(p.rstd);
  a.w = static_cast<const W*>(p.weight);
  a.dx = static_cast<T*>(p.dx);
  a.M = p.M;
  a.N = p.N;
  const bool want = p.dw != nullptr || p.db != nullptr;
  cudaError_t err = cudaSuccess;
  if (a.w == nullptr) {
    W* ones = static_cast<W*>(ws.alloc(ws.ctx, static_cast<size_t>(a.N) * sizeof(W)));
    if (ones == nullptr) return cudaErrorMemoryAllocation;
    fill_ones_kernel<W><<<static_cast<unsigned>(ceil_div(a.N, 256)), 256, 0, stream>>>(ones, a.N);
    RMSNORM_EXT_LAUNCH_CHECK(err);
    if (err != cudaSuccess) return err;
    a.w = ones;
  }

  constexpr int V = 16 / sizeof(T);
  const bool vec = a.N % V == 0 && is_aligned(a.x, V * sizeof(T)) &&
                   is_aligned(a.dy, V * sizeof(T)) && is_aligned(a.w, V * sizeof(W)) &&
                   is_aligned(a.dx, V * sizeof(T));
  const int64_t P = vec ? a.N / V : a.N;
  RowConfig c = pick_row_config(P, kLnBwdMaxThreads, 4, vec);
  const size_t acc_smem = want ? 2 * static_cast<size_t>(c.rpb) * a.N * sizeof(A) : 0;
  bool reg = vec && c.items == 4 && acc_smem <= kMaxAccSmem;
  if (reg && acc_smem > 0) {
    // e.g. bf16 N = 768 asks for exactly 48 KB on top of the 512-byte static `red`: above
    // the default limit, so it must opt in (ensure_dynamic_smem); where the device cannot
    // give it, the re-reading kernel takes over.
    bool fits = false;
    err = ensure_dynamic_smem(reinterpret_cast<const void*>(ln_bwd_reg_kernel<T, W, V, 4>),
                              acc_smem, &fits);
    if (err != cudaSuccess) return err;
    reg = fits;
  }
  if (!reg && vec && c.items == 4) c = pick_row_config(P, kLnBwdMaxThreads, 4, false);
  a.tpr = c.tpr;
  a.rpb = c.rpb;
  auto kernel = reg ? ln_bwd_reg_kernel<T, W, V, 4>
                    : (vec ? ln_bwd_reread_kernel<T, W, V> : ln_bwd_reread_kernel<T, W, 1>);
  const size_t smem = reg ? acc_smem : 0;
  // Register kernel with dw/db: at most kRunsPerPartial runs per block (col_reduce.cuh).
  const int64_t max_chunk =
      (reg && want) ? static_cast<int64_t>(kRunRows) * kRunsPerPartial * c.rpb : INT64_MAX;
  const PersistentGrid pg =
      persistent_grid(kernel, c.threads(), smem, a.M, c.rpb, p.sm_count, max_chunk);
  a.chunk = pg.chunk;
  if (reg && want) {
    a.ws_plane = pg.blocks * a.N;
    a.ws = static_cast<A*>(ws.alloc(ws.ctx, 2 * static_cast<size_t>(a.ws_plane) * sizeof(A)));
    if (a.ws == nullptr) return cudaErrorMemoryAllocation;
  }
  kernel<<<static_cast<unsigned>(pg.blocks), c.threads(), smem, stream>>>(a);
  RMSNORM_EXT_LAUNCH_CHECK(err);
  if (err != cudaSuccess || !want) return err;
  if (reg) {
    return launch_col_reduce<A, W>(a.ws, pg.blocks, a.N, 2, static_cast<W*>(p.dw),
                                   static_cast<W*>(p.db), stream);
  }
  // Long (or unaligned) rows: dw / db from a column-parallel pass over x and dy, with a
  // workspace of a few partial rows instead of one per thread group.
  return launch_col_partials<T, T, W, true>(a.x, a.dy, a.mean, a.rstd, a.M, a.N, vec,
                                            p.sm_count, ws, static_cast<W*>(p.dw),
                                            static_cast<W*>(p.db), stream);
}

}  // namespace

cudaError_t ln_bwd(const LnBwdParams& p, Workspace ws, cudaStream_t stream) {
  if (p.inner > 1) return ln_bwd_channels_first(p, ws, stream);  // channels_first_kernels.cu
  return with_dtype_pair(p.t, p.w, [&](auto t_tag, auto w_tag) -> cudaError_t {
    return launch<decltype(t_tag), decltype(w_tag)>(p, ws, stream);
  });
}

RMSNORM_EXT_REGISTER_CUDA_KERNEL(LnBwd, ln_bwd);

}  // namespace cuda
}  // namespace rmsnorm_ext
