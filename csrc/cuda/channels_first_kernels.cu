// RMSNorm and LayerNorm, forward and backward, on the channels-first layout: rms_norm_2d /
// layer_norm_2d on a contiguous [B, C, *S] tensor (kernel_params.h, inner = S > 1). Row
// i = (o, s) of the M = B * S rows has its C elements at o * C * S + j * S + s: each row is
// strided, but neighbouring rows are neighbours in memory. So the rows go across the
// threads and the channels along each thread's loop:
//
//  - Block = bx row threads (threadIdx.x) x by channel slices (threadIdx.y). Block tile t
//    covers the row packs t * bx + [0, bx); a row pack is VEC consecutive rows (VEC = 4,
//    2 for fp64, when S % VEC == 0 and every streamed tensor is aligned to a pack; else 1),
//    one vector load per channel. Thread (tx, ty) owns channels ty, ty + by, ...: a warp
//    reads whole 32-byte sectors of consecutive s (bx * VEC * sizeof >= 32, see pick_shape).
//  - The per-row sums of the by slices meet in shared memory (block_col_sum, a tree).
//  - A thread keeps its first ITEMS channels in registers between the passes (32 registers
//    of cached x forward, 24 of x and dy backward), and the host makes by >= C / ITEMS
//    where a block of at most kMaxThreads allows it: C up to 2048 forward and 768 backward
//    (half that with scalar 16-bit loads) is read once. Further channels are streamed
//    again in each pass, mostly from L2.
//  - Where rows are few, C is split over more slices (more threads in all) and blocks get
//    narrower (more blocks), so that the GPU fills.
//
// Math as the row kernels (rms_norm_fwd_kernels.cuh, layer_norm_fwd_kernels.cu,
// rms_norm_bwd_kernels.cu, layer_norm_bwd_kernels.cu, which say why): acc_t accumulation,
// LayerNorm's corrected two-pass statistics (corrected_stats), g = dy * w rounded on its
// own (mul_rn) in both passes of the backward, the same grouping of dx, one rounding per
// output.
//
// Parameter gradients (backward): dweight[j] = sum over rows of dy * xhat, dbias[j] = sum
// of dy. Blocks loop over a chunk of at most kRunRows tiles. A thread adds each tile's
// VEC rows, then the tiles: in registers for its cached channels, in its block's workspace
// row for the streamed ones (each column owned by one thread, so the read-modify-write is
// ordered). The bx row threads of a slice are added by a butterfly (group_sum), and
// col_reduce_kernel adds the blocks' partial rows. No atomics: the order of every sum is
// fixed by the launch shape, so results are bitwise identical run to run.
//
// Not here: the fused residual forms and grad_residual (rows only, kernel_params.h), and
// a grad_out dtype other than the input's (rms_norm_2d_bwd has the input's).
#include "col_reduce.cuh"
#include "cuda_utils.cuh"

namespace rmsnorm_ext {
namespace cuda {
namespace {

// 512 so that ptxas may use up to 128 registers (the cached channels live in registers).
constexpr int kMaxThreads = 512;

// Rows per vector load: 4 (8-byte bf16/fp16, 16-byte fp32 loads) or 2 (16-byte fp64
// loads). 4 rather than 8 for 16-bit data: S % 8 fails for 14 x 14, S % 4 holds.
template <typename T>
constexpr int vec_rows() {
  return sizeof(T) == 8 ? 2 : 4;
}

// Channels a thread caches: ITEMS packs of each of the TENSORS streamed tensors (x; x and
// dy) in REGS registers (a 16-bit element alone still takes a whole register).
template <typename T, int VEC, int TENSORS, int REGS>
constexpr int cached_items() {
  return REGS / (TENSORS * ((VEC * static_cast<int>(sizeof(T)) + 3) / 4));
}

// Where things are: row pack p starts at row i = p * VEC = o * S + s, whose element j is
// at o * C * S + s + j * S = i + o * skip + j * S, skip = (C - 1) * S. The VEC rows of a
// pack share o (S % VEC == 0), so they are consecutive at every j.
struct Geom {
  int64_t P;     // row packs: M / VEC
  int64_t C;     // channels
  int64_t S;     // inner: the distance between channels
  int64_t skip;  // (C - 1) * S
  int64_t kmax;  // channel steps per slice: ceil(C / by)
};

__device__ __forceinline__ int64_t pack_offset(const Geom& g, int64_t i0) {
  return i0 + (i0 / g.S) * g.skip;
}

// Adds v over the by channel slices of the block; every thread ends with the totals of its
// own rows. A tree in shared memory (level h adds slot ty + h into slot ty for ty a multiple
// of 2h; a level's readers and writers are disjoint), fixed by the launch shape. buf holds
// bx * by * NV * VEC accumulators; consecutive calls must alternate between two buffers
// (slice 0 of a fast warp would otherwise overwrite totals a slow warp has yet to read).
// Every thread of the block must call it.
template <typename A, int NV, int VEC>
__device__ __forceinline__ void block_col_sum(A (&v)[NV][VEC], A* buf) {
  const int bx = blockDim.x;
  const int by = blockDim.y;
  const int ty = threadIdx.y;
  const int slice = bx * NV * VEC;
  // Value (n, e) of thread tx at (n * VEC + e) * bx + tx: consecutive threads, consecutive
  // banks.
  A* mine = buf + ty * slice + threadIdx.x;
#pragma unroll
  for (int n = 0; n < NV; ++n)
#pragma unroll
    for (int e = 0; e < VEC; ++e) mine[(n * VEC + e) * bx] = v[n][e];
  for (int h = 1; h < by; h <<= 1) {
    __syncthreads();
    if ((ty & (2 * h - 1)) == 0 && ty + h < by) {
      const A* other = mine + h * slice;
#pragma unroll
      for (int n = 0; n < NV; ++n)
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          v[n][e] += other[(n * VEC + e) * bx];
          mine[(n * VEC + e) * bx] = v[n][e];
        }
    }
  }
  __syncthreads();
  const A* total = buf + threadIdx.x;
#pragma unroll
  for (int n = 0; n < NV; ++n)
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[n][e] = total[(n * VEC + e) * bx];
}

// Channel j's weight as the math uses it: w (+ offset for RMSNorm), 1 without a weight.
template <typename A, typename W, bool LN>
__device__ __forceinline__ A weight_of(const W* w, int64_t j, A offset) {
  if (w == nullptr) return A(1);
  return LN ? to_acc<A>(w[j]) : offset + to_acc<A>(w[j]);
}

// ---------------------------------------------------------------------------------------
// Forward.
//   RMSNorm:   rstd = 1 / sqrt(mean(x^2) + eps), y = x * rstd * (offset + w)
//   LayerNorm: corrected two-pass mean / rstd, y = (x - mean) * rstd * w + b
template <typename T, typename W>
struct FwdArgs {
  const T* x;
  const W* w;  // nullptr: no weight
  const W* b;  // LayerNorm only; nullptr: no bias
  T* y;
  acc_t<T>* mean;  // LayerNorm only
  acc_t<T>* rstd;
  Geom g;
  acc_t<T> eps;
  acc_t<T> offset;  // RMSNorm only
};

template <typename A, bool LN>
__device__ __forceinline__ A norm_out(A x, A mean, A rstd, A w, A b, bool has_w, bool has_b) {
  if constexpr (LN) {
    A v = (x - mean) * rstd;
    if (has_w) v = v * w;
    if (has_b) v = v + b;
    return v;
  } else {
    const A n = x * rstd;
    return has_w ? n * w : n;
  }
}

template <typename T, typename W, bool LN, int VEC, int ITEMS>
__global__ void __launch_bounds__(kMaxThreads) fwd_kernel(const FwdArgs<T, W> a) {
  using A = acc_t<T>;
  using TP = Pack<T, VEC>;
  constexpr int U = 4;  // streamed packs in flight
  constexpr int CH = ITEMS < 4 ? ITEMS : 4;  // cached channels per weight chunk
  extern __shared__ __align__(16) unsigned char dsmem[];
  A* red = reinterpret_cast<A*>(dsmem);  // LayerNorm: the second sums follow the first

  const int by = blockDim.y;
  const int ty = threadIdx.y;
  const int64_t C = a.g.C;
  const int64_t S = a.g.S;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool valid = p < a.g.P;
  const int64_t i0 = valid ? p * VEC : 0;
  const int64_t off = pack_offset(a.g, i0);
  const T* xr = a.x + off;
  const bool has_w = a.w != nullptr;
  const bool has_b = LN && a.b != nullptr;

  // Pass 1: sum of x (LayerNorm) or of x^2 (RMSNorm; squares in fp32, so fp16 near its
  // range limit does not overflow).
  TP xc[ITEMS];
  A s1[1][VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) s1[0][e] = A(0);
  if (valid) {
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t j = ty + static_cast<int64_t>(k) * by;
      if (j < C) xc[k] = load_pack<T, VEC>(xr + j * S, 0);
    }
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t j = ty + static_cast<int64_t>(k) * by;
      if (j < C) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const A f = to_acc<A>(xc[k].v[e]);
          s1[0][e] += LN ? f : f * f;
        }
      }
    }
    for (int64_t k = ITEMS; k < a.g.kmax; k += U) {
      TP xv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t j = ty + (k + u) * by;
        if (j < C) xv[u] = load_pack<T, VEC>(xr + j * S, 0);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t j = ty + (k + u) * by;
        if (j < C) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const A f = to_acc<A>(xv[u].v[e]);
            s1[0][e] += LN ? f : f * f;
          }
        }
      }
    }
  }
  block_col_sum<A, 1, VEC>(s1, red);

  A mean[VEC], rstd[VEC];
  if constexpr (!LN) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      mean[e] = A(0);
      rstd[e] = A(1) / sqrt(s1[0][e] / static_cast<A>(C) + a.eps);
    }
  } else {
    // Pass 2: sums of d = x - mean0 and d^2.
    A mean0[VEC];
    A s2[2][VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      mean0[e] = s1[0][e] / static_cast<A>(C);
      s2[0][e] = A(0);
      s2[1][e] = A(0);
    }
    if (valid) {
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        const int64_t j = ty + static_cast<int64_t>(k) * by;
        if (j < C) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const A d = to_acc<A>(xc[k].v[e]) - mean0[e];
            s2[0][e] += d * d;
            s2[1][e] += d;
          }
        }
      }
      for (int64_t k = ITEMS; k < a.g.kmax; k += U) {
        TP xv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t j = ty + (k + u) * by;
          if (j < C) xv[u] = load_pack<T, VEC>(xr + j * S, 0);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t j = ty + (k + u) * by;
          if (j < C) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const A d = to_acc<A>(xv[u].v[e]) - mean0[e];
              s2[0][e] += d * d;
              s2[1][e] += d;
            }
          }
        }
      }
    }
    block_col_sum<A, 2, VEC>(s2, red + static_cast<int64_t>(blockDim.x) * blockDim.y * VEC);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const A s[2] = {s2[0][e], s2[1][e]};
      corrected_stats<A>(mean0[e], s, C, a.eps, mean[e], rstd[e]);
    }
  }
  if (!valid) return;  // no block-wide sync below
  if (ty == 0) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      a.rstd[i0 + e] = rstd[e];
      if constexpr (LN) a.mean[i0 + e] = mean[e];
    }
  }

  // Output. Weights and biases of a chunk are loaded before the chunk's stores (which may
  // alias them as far as the compiler knows, so it would not hoist the loads itself).
  T* yr = a.y + off;
#pragma unroll
  for (int c = 0; c < ITEMS; c += CH) {
    A wv[CH], bv[CH];
#pragma unroll
    for (int q = 0; q < CH; ++q) {
      const int64_t j = ty + static_cast<int64_t>(c + q) * by;
      const bool in = c + q < ITEMS && j < C;
      wv[q] = in ? weight_of<A, W, LN>(a.w, j, a.offset) : A(1);
      bv[q] = in && has_b ? to_acc<A>(a.b[j]) : A(0);
    }
#pragma unroll
    for (int q = 0; q < CH; ++q) {
      const int64_t j = ty + static_cast<int64_t>(c + q) * by;
      if (c + q < ITEMS && j < C) {
        TP o;
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          o.v[e] = from_acc<T>(norm_out<A, LN>(to_acc<A>(xc[c + q].v[e]), mean[e], rstd[e],
                                               wv[q], bv[q], has_w, has_b));
        store_pack<T, VEC>(yr + j * S, 0, o);
      }
    }
  }
  for (int64_t k = ITEMS; k < a.g.kmax; k += U) {
    TP xv[U];
    A wv[U], bv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = ty + (k + u) * by;
      if (j < C) {
        xv[u] = load_pack<T, VEC>(xr + j * S, 0);
        wv[u] = weight_of<A, W, LN>(a.w, j, a.offset);
        bv[u] = has_b ? to_acc<A>(a.b[j]) : A(0);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = ty + (k + u) * by;
      if (j < C) {
        TP o;
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          o.v[e] = from_acc<T>(norm_out<A, LN>(to_acc<A>(xv[u].v[e]), mean[e], rstd[e], wv[u],
                                               bv[u], has_w, has_b));
        store_pack<T, VEC>(yr + j * S, 0, o);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward, with w the channel's weight (+ offset for RMSNorm; 1 without a weight):
//   RMSNorm:   g = dy * w, c = rstd * mean(g * x), dx = rstd * (g - (x * rstd) * c)
//   LayerNorm: xh = (x - mean) * rstd, g = dy * w, dx = rstd * (g - mean(g) - xh * mean(g * xh))
//   dweight[j] = sum over rows of dy * xhat (xhat = x * rstd, resp. xh); dbias[j] = sum of dy
template <typename T, typename W>
struct BwdArgs {
  const T* x;
  const T* dy;
  const acc_t<T>* mean;  // LayerNorm only
  const acc_t<T>* rstd;
  const W* w;            // nullptr: ones
  T* dx;
  acc_t<T>* ws;          // [planes][blocks][C] partial parameter gradients; nullptr: none wanted
  int64_t ws_plane;      // blocks * C
  int64_t tiles;         // ceil(P / bx)
  int64_t chunk;         // tiles per block, at most kRunRows
  Geom g;
  acc_t<T> offset;       // RMSNorm only
};

// Element e's share of its row's sums: LayerNorm (g, g * xh), RMSNorm (g * x).
template <typename A, bool LN, int VEC>
__device__ __forceinline__ void add_row_sums(A x, A dy, A w, A mean, A rstd,
                                             A (&s)[LN ? 2 : 1][VEC], int e) {
  const A g = mul_rn(dy, w);
  if constexpr (LN) {
    const A xh = (x - mean) * rstd;
    s[0][e] += g;
    s[1][e] += g * xh;
  } else {
    s[0][e] += g * x;
  }
}

// dx from the row's coefficients: LayerNorm c0 = mean(g), c1 = mean(g * xh); RMSNorm
// c0 = rstd * mean(g * x).
template <typename A, bool LN>
__device__ __forceinline__ A grad_in(A x, A dy, A w, A mean, A rstd, A c0, A c1) {
  const A g = mul_rn(dy, w);
  if constexpr (LN) {
    const A xh = (x - mean) * rstd;
    return rstd * (g - c0 - xh * c1);
  } else {
    return rstd * (g - (x * rstd) * c0);
  }
}

// One element's parameter-gradient terms: dy * xhat (and dy).
template <typename A, bool LN>
__device__ __forceinline__ void add_param_terms(A x, A dy, A mean, A rstd, A (&p)[LN ? 2 : 1]) {
  if constexpr (LN) {
    p[0] += dy * ((x - mean) * rstd);
    p[1] += dy;
  } else {
    p[0] += dy * (x * rstd);
  }
}

template <typename T, typename W, bool LN, int VEC, int ITEMS>
__global__ void __launch_bounds__(kMaxThreads) bwd_kernel(const BwdArgs<T, W> a) {
  using A = acc_t<T>;
  using TP = Pack<T, VEC>;
  constexpr int NS = LN ? 2 : 1;  // row sums
  constexpr int PL = LN ? 2 : 1;  // parameter-gradient planes
  // Streamed channels per step (x and dy each): 2 made ptxas spill next to the cached ones.
  constexpr int U = 1;
  constexpr int CH = ITEMS < 4 ? ITEMS : 4;
  extern __shared__ __align__(16) unsigned char dsmem[];
  A* red = reinterpret_cast<A*>(dsmem);
  const int64_t buf = static_cast<int64_t>(blockDim.x) * blockDim.y * NS * VEC;

  const int bx = blockDim.x;
  const int by = blockDim.y;
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t C = a.g.C;
  const int64_t S = a.g.S;
  const bool want = a.ws != nullptr;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.x) * a.chunk;
  const int64_t t_end = t_begin + a.chunk < a.tiles ? t_begin + a.chunk : a.tiles;
  A* wsr = want ? a.ws + static_cast<int64_t>(blockIdx.x) * C : nullptr;

  // Parameter-gradient sums of the cached channels over the block's tiles: [PL][ITEMS].
  A acc[PL * ITEMS];
#pragma unroll
  for (int i = 0; i < PL * ITEMS; ++i) acc[i] = A(0);

  int parity = 0;
  // Uniform trip counts (tiles, streamed channel steps) for the whole block: block_col_sum
  // syncs, group_sum shuffles over whole warps.
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t p = t * bx + tx;
    const bool valid = p < a.g.P;
    const int64_t i0 = valid ? p * VEC : 0;
    const int64_t off = pack_offset(a.g, i0);
    const T* xr = a.x + off;
    const T* gr = a.dy + off;
    A mean[VEC], rstd[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      rstd[e] = valid ? a.rstd[i0 + e] : A(0);
      mean[e] = LN && valid ? a.mean[i0 + e] : A(0);
    }

    // Pass 1: the row sums.
    TP xc[ITEMS], gc[ITEMS];
    A s[NS][VEC];
#pragma unroll
    for (int n = 0; n < NS; ++n)
#pragma unroll
      for (int e = 0; e < VEC; ++e) s[n][e] = A(0);
    if (valid) {
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        const int64_t j = ty + static_cast<int64_t>(k) * by;
        if (j < C) {
          xc[k] = load_pack<T, VEC>(xr + j * S, 0);
          gc[k] = load_pack<T, VEC>(gr + j * S, 0);
        }
      }
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        const int64_t j = ty + static_cast<int64_t>(k) * by;
        if (j < C) {
          const A w = weight_of<A, W, LN>(a.w, j, a.offset);
#pragma unroll
          for (int e = 0; e < VEC; ++e)
            add_row_sums<A, LN, VEC>(to_acc<A>(xc[k].v[e]), to_acc<A>(gc[k].v[e]), w, mean[e],
                                     rstd[e], s, e);
        }
      }
      for (int64_t k = ITEMS; k < a.g.kmax; k += U) {
        TP xv[U], gv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t j = ty + (k + u) * by;
          if (j < C) {
            xv[u] = load_pack<T, VEC>(xr + j * S, 0);
            gv[u] = load_pack<T, VEC>(gr + j * S, 0);
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t j = ty + (k + u) * by;
          if (j < C) {
            const A w = weight_of<A, W, LN>(a.w, j, a.offset);
#pragma unroll
            for (int e = 0; e < VEC; ++e)
              add_row_sums<A, LN, VEC>(to_acc<A>(xv[u].v[e]), to_acc<A>(gv[u].v[e]), w,
                                       mean[e], rstd[e], s, e);
          }
        }
      }
    }
    block_col_sum<A, NS, VEC>(s, red + parity * buf);
    parity ^= 1;
    A c0[VEC], c1[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if constexpr (LN) {
        c0[e] = s[0][e] / static_cast<A>(C);
        c1[e] = s[NS - 1][e] / static_cast<A>(C);
      } else {
        c0[e] = rstd[e] * (s[0][e] / static_cast<A>(C));
        c1[e] = A(0);
      }
    }

    // Pass 2: dx, and the parameter-gradient terms of the tile.
    T* dxr = a.dx + off;
    if (valid) {
#pragma unroll
      for (int c = 0; c < ITEMS; c += CH) {
        A wv[CH];
#pragma unroll
        for (int q = 0; q < CH; ++q) {
          const int64_t j = ty + static_cast<int64_t>(c + q) * by;
          wv[q] = c + q < ITEMS && j < C ? weight_of<A, W, LN>(a.w, j, a.offset) : A(1);
        }
#pragma unroll
        for (int q = 0; q < CH; ++q) {
          const int k = c + q;
          const int64_t j = ty + static_cast<int64_t>(k) * by;
          if (k < ITEMS && j < C) {
            TP o;
            A pt[PL] = {};
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const A xf = to_acc<A>(xc[k].v[e]);
              const A dyf = to_acc<A>(gc[k].v[e]);
              o.v[e] = from_acc<T>(grad_in<A, LN>(xf, dyf, wv[q], mean[e], rstd[e], c0[e], c1[e]));
              add_param_terms<A, LN>(xf, dyf, mean[e], rstd[e], pt);
            }
            store_pack<T, VEC>(dxr + j * S, 0, o);
#pragma unroll
            for (int pl = 0; pl < PL; ++pl) acc[pl * ITEMS + k] += pt[pl];
          }
        }
      }
    }
    // Streamed channels: their terms go to the block's workspace row, one tile at a time
    // (the bx row threads added first).
    for (int64_t k = ITEMS; k < a.g.kmax; k += U) {
      A q[PL * U];
#pragma unroll
      for (int i = 0; i < PL * U; ++i) q[i] = A(0);
      if (valid) {
        TP xv[U], gv[U];
        A wv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t j = ty + (k + u) * by;
          if (j < C) {
            xv[u] = load_pack<T, VEC>(xr + j * S, 0);
            gv[u] = load_pack<T, VEC>(gr + j * S, 0);
            wv[u] = weight_of<A, W, LN>(a.w, j, a.offset);
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t j = ty + (k + u) * by;
          if (j < C) {
            TP o;
            A pt[PL] = {};
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const A xf = to_acc<A>(xv[u].v[e]);
              const A dyf = to_acc<A>(gv[u].v[e]);
              o.v[e] = from_acc<T>(grad_in<A, LN>(xf, dyf, wv[u], mean[e], rstd[e], c0[e], c1[e]));
              add_param_terms<A, LN>(xf, dyf, mean[e], rstd[e], pt);
            }
            store_pack<T, VEC>(dxr + j * S, 0, o);
#pragma unroll
            for (int pl = 0; pl < PL; ++pl) q[pl * U + u] = pt[pl];
          }
        }
      }
      if (want) {
        group_sum<A, PL * U>(q, bx, nullptr);
        if (tx == 0) {
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int64_t j = ty + (k + u) * by;
            if (j < C) {
#pragma unroll
              for (int pl = 0; pl < PL; ++pl) {
                A* o = wsr + pl * a.ws_plane + j;
                *o = t == t_begin ? q[pl * U + u] : *o + q[pl * U + u];
              }
            }
          }
        }
      }
    }
  }
  if (!want) return;
  group_sum<A, PL * ITEMS>(acc, bx, nullptr);
  if (tx != 0) return;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t j = ty + static_cast<int64_t>(k) * by;
    if (j < C) {
#pragma unroll
      for (int pl = 0; pl < PL; ++pl) wsr[pl * a.ws_plane + j] = acc[pl * ITEMS + k];
    }
  }
}

// ---------------------------------------------------------------------------------------
// Launch shape.
struct Shape {
  int bx;
  int by;
  int64_t tiles;
  int64_t kmax;
  size_t smem;
};

// P row packs of pack_bytes each (the streamed dtype), C channels, `items` of them cached
// per thread; red_bytes: the shared memory one thread's row sums take (all buffers).
inline Shape pick_shape(int64_t P, int64_t C, int pack_bytes, int items, size_t red_bytes,
                        int sm_count) {
  // Row threads per 32-byte sector: a warp's loads at one channel cover whole sectors.
  const int seg = std::max(1, 32 / pack_bytes);
  const int64_t by_max = kMaxThreads / seg;
  // Slices so that all channels fit in registers, and so that about 1024 threads per SM run
  // (P * by threads in all): few rows get more, thinner slices.
  const int64_t by_regs = ceil_div(C, items);
  const int64_t by_fill = ceil_div(static_cast<int64_t>(sm_count) * 1024, P);
  int64_t by = std::min(std::min(std::max(by_regs, by_fill), C), by_max);
  by = ceil_div(C, ceil_div(C, by));  // the same steps per slice, with the slices balanced
  // Row threads: a warp's worth, fewer while the block would be too large -- at most 256
  // threads where the channels allow, so that several blocks share an SM and one's
  // reductions overlap another's loads -- or while there would be under two blocks per SM
  // (not below whole warps of busy slices, though: tiny C keeps bx).
  const int64_t cap = by * seg <= 256 ? 256 : kMaxThreads;
  int bx = 32;
  while (bx > seg && (bx * by > cap || (ceil_div(P, bx) < 2 * static_cast<int64_t>(sm_count) &&
                                        (bx / 2) * by >= 32)))
    bx >>= 1;
  // Whole warps: group_sum shuffles across them.
  const int64_t per_warp = 32 / bx;
  by = ceil_div(by, per_warp) * per_warp;
  Shape s{};
  s.bx = bx;
  s.by = static_cast<int>(by);
  s.tiles = ceil_div(P, bx);
  s.kmax = ceil_div(C, by);
  s.smem = static_cast<size_t>(bx) * static_cast<size_t>(by) * red_bytes;
  return s;
}

inline cudaError_t current_sm_count(int* n) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(n, cudaDevAttrMultiProcessorCount, dev);
  if (*n < 1) *n = 1;
  return err;
}

inline Geom make_geom(int64_t M, int64_t C, int64_t S, int vec) {
  return Geom{M / vec, C, S, (C - 1) * S, 0};
}

template <typename T, typename W, bool LN, int VEC>
cudaError_t launch_fwd(FwdArgs<T, W> a, int64_t M, int sm_count, cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int ITEMS = cached_items<T, VEC, 1, 32>();
  a.g = make_geom(M, a.g.C, a.g.S, VEC);
  // Row sums: one per row (LayerNorm: then two more, in a second buffer).
  const Shape sh = pick_shape(a.g.P, a.g.C, static_cast<int>(VEC * sizeof(T)), ITEMS,
                              (LN ? 3 : 1) * VEC * sizeof(A), sm_count);
  a.g.kmax = sh.kmax;
  if (sh.tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
  fwd_kernel<T, W, LN, VEC, ITEMS>
      <<<static_cast<unsigned>(sh.tiles), dim3(sh.bx, sh.by), sh.smem, stream>>>(a);
  cudaError_t err = cudaSuccess;
  RMSNORM_EXT_LAUNCH_CHECK(err);
  return err;
}

template <typename T, typename W, bool LN>
cudaError_t launch_fwd(FwdArgs<T, W> a, int64_t M, cudaStream_t stream) {
  int sm_count = 1;
  cudaError_t err = current_sm_count(&sm_count);
  if (err != cudaSuccess) return err;
  constexpr int V = vec_rows<T>();
  const bool vec = a.g.S % V == 0 && is_aligned(a.x, V * sizeof(T)) &&
                   is_aligned(a.y, V * sizeof(T));
  return vec ? launch_fwd<T, W, LN, V>(a, M, sm_count, stream)
             : launch_fwd<T, W, LN, 1>(a, M, sm_count, stream);
}

// dw / db: plane 0 / 1 of the workspace, either may be nullptr (LayerNorm) when not wanted.
template <typename T, typename W, bool LN, int VEC>
cudaError_t launch_bwd(BwdArgs<T, W> a, int64_t M, W* dw, W* db, int sm_count, Workspace ws,
                       cudaStream_t stream) {
  using A = acc_t<T>;
  // 24 registers of x and dy: with the parameter-gradient sums (PL * ITEMS) and the
  // per-row values, 32 pushed ptxas past 128 registers and it spilled.
  constexpr int ITEMS = cached_items<T, VEC, 2, 24>();
  constexpr int PL = LN ? 2 : 1;
  const bool want = dw != nullptr || db != nullptr;
  a.g = make_geom(M, a.g.C, a.g.S, VEC);
  // Row sums: NS per row, in two alternating buffers (block_col_sum).
  const Shape sh = pick_shape(a.g.P, a.g.C, static_cast<int>(VEC * sizeof(T)), ITEMS,
                              2 * (LN ? 2 : 1) * VEC * sizeof(A), sm_count);
  a.g.kmax = sh.kmax;
  a.tiles = sh.tiles;
  auto kernel = bwd_kernel<T, W, LN, VEC, ITEMS>;
  // With parameter gradients, at most kRunRows tiles per block: a thread's sums stay short
  // (see col_reduce.cuh); for many rows that means more blocks than fit at once.
  const PersistentGrid pg = persistent_grid(kernel, sh.bx * sh.by, sh.smem, sh.tiles, 1, sm_count,
                                            want ? static_cast<int64_t>(kRunRows) : INT64_MAX);
  if (pg.blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  a.chunk = pg.chunk;
  if (want) {
    a.ws_plane = pg.blocks * a.g.C;
    a.ws = static_cast<A*>(ws.alloc(ws.ctx, PL * static_cast<size_t>(a.ws_plane) * sizeof(A)));
    if (a.ws == nullptr) return cudaErrorMemoryAllocation;
  }
  kernel<<<static_cast<unsigned>(pg.blocks), dim3(sh.bx, sh.by), sh.smem, stream>>>(a);
  cudaError_t err = cudaSuccess;
  RMSNORM_EXT_LAUNCH_CHECK(err);
  if (err != cudaSuccess || !want) return err;
  return launch_col_reduce<A, W>(a.ws, pg.blocks, a.g.C, PL, dw, db, stream);
}

template <typename T, typename W, bool LN>
cudaError_t launch_bwd(const BwdArgs<T, W>& a, int64_t M, W* dw, W* db, int sm_count,
                       Workspace ws, cudaStream_t stream) {
  constexpr int V = vec_rows<T>();
  const bool vec = a.g.S % V == 0 && is_aligned(a.x, V * sizeof(T)) &&
                   is_aligned(a.dy, V * sizeof(T)) && is_aligned(a.dx, V * sizeof(T));
  return vec ? launch_bwd<T, W, LN, V>(a, M, dw, db, sm_count, ws, stream)
             : launch_bwd<T, W, LN, 1>(a, M, dw, db, sm_count, ws, stream);
}

}  // namespace

cudaError_t rms_fwd_channels_first(const RmsFwdParams& p, cudaStream_t stream) {
  if (p.r_in != nullptr || p.inner < 2) return cudaErrorInvalidValue;  // fused form: rows only
  return with_dtype_pair(p.t, p.w, [&](auto t_tag, auto w_tag) -> cudaError_t {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    using A = acc_t<T>;
    FwdArgs<T, W> a{};
    a.x = static_cast<const T*>(p.x);
    a.w = static_cast<const W*>(p.weight);
    a.y = static_cast<T*>(p.y);
    a.rstd = static_cast<A*>(p.rstd);
    a.g.C = p.N;
    a.g.S = p.inner;
    a.eps = static_cast<A>(p.eps);
    a.offset = static_cast<A>(p.offset);
    return launch_fwd<T, W, false>(a, p.M, stream);
  });
}

cudaError_t ln_fwd_channels_first(const LnFwdParams& p, cudaStream_t stream) {
  if (p.inner < 2) return cudaErrorInvalidValue;
  return with_dtype_pair(p.t, p.w, [&](auto t_tag, auto w_tag) -> cudaError_t {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    using A = acc_t<T>;
    FwdArgs<T, W> a{};
    a.x = static_cast<const T*>(p.x);
    a.w = static_cast<const W*>(p.weight);
    a.b = static_cast<const W*>(p.bias);
    a.y = static_cast<T*>(p.y);
    a.mean = static_cast<A*>(p.mean);
    a.rstd = static_cast<A*>(p.rstd);
    a.g.C = p.N;
    a.g.S = p.inner;
    a.eps = static_cast<A>(p.eps);
    return launch_fwd<T, W, true>(a, p.M, stream);
  });
}

cudaError_t rms_bwd_channels_first(const RmsBwdParams& p, Workspace ws, cudaStream_t stream) {
  // grad_residual and a grad_out dtype other than x's: rows only.
  if (p.gres != nullptr || p.x != p.g || p.inner < 2) return cudaErrorInvalidValue;
  return with_dtype_pair(p.g, p.w, [&](auto t_tag, auto w_tag) -> cudaError_t {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    using A = acc_t<T>;
    BwdArgs<T, W> a{};
    a.x = static_cast<const T*>(p.x_in);
    a.dy = static_cast<const T*>(p.dy);
    a.rstd = static_cast<const A*>(p.rstd);
    a.w = static_cast<const W*>(p.weight);
    a.dx = static_cast<T*>(p.dx);
    a.g.C = p.N;
    a.g.S = p.inner;
    a.offset = static_cast<A>(p.offset);
    W* dw = p.weight != nullptr ? static_cast<W*>(p.dw) : nullptr;
    return launch_bwd<T, W, false>(a, p.M, dw, nullptr, p.sm_count, ws, stream);
  });
}

cudaError_t ln_bwd_channels_first(const LnBwdParams& p, Workspace ws, cudaStream_t stream) {
  if (p.inner < 2) return cudaErrorInvalidValue;
  return with_dtype_pair(p.t, p.w, [&](auto t_tag, auto w_tag) -> cudaError_t {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    using A = acc_t<T>;
    BwdArgs<T, W> a{};
    a.x = static_cast<const T*>(p.x);
    a.dy = static_cast<const T*>(p.dy);
    a.mean = static_cast<const A*>(p.mean);
    a.rstd = static_cast<const A*>(p.rstd);
    a.w = static_cast<const W*>(p.weight);
    a.dx = static_cast<T*>(p.dx);
    a.g.C = p.N;
    a.g.S = p.inner;
    return launch_bwd<T, W, true>(a, p.M, static_cast<W*>(p.dw), static_cast<W*>(p.db),
                                  p.sm_count, ws, stream);
  });
}

}  // namespace cuda
}  // namespace rmsnorm_ext
