// adaLN modulation kernels (kernel_params.h, NormModulateParams / NormModulateBwdParams):
//
//   y = yn * (1 + scale[b]) + shift[b],   yn = xhat * w (+ bias),   b = row / S
//   xhat = x * rstd (RMSNorm) or (x - mean) * rstd (LayerNorm)
//
// and the backward, with m = 1 + scale[b], dyn = dy * m, g = dyn * w:
//   dx = rstd * (g - [mean(g)] - xhat * mean(g * xhat))   ([..]: LayerNorm only)
//   dscale[b] = sum over the rows of sample b of dy * yn,  dshift[b] = sum of dy
//   dweight = sum over all rows of dyn * xhat,              dbias = sum of dyn
//
// T: x / y / dy / dx dtype; W: weight / bias (and dweight / dbias); Sc: scale / shift (and
// dscale / dshift). Math in acc_t<T>. The forward is the plain norms' row kernels
// (norm_fwd_rows.cuh) with the modulation as their output's operands: the same statistics,
// packed loads, the row in registers. The backward's dx kernel is deliberately plain:
// element-wise loads, one group of tpr threads per row re-reading the row for each pass
// (mostly from L1/L2).
//
// The sums over rows are column-parallel (as col_partials_kernel, col_reduce.cuh): a block
// of 32 columns x 8 row threads covers a split of a segment's rows, each row thread summing
// runs of kRunRows rows, then a tree over the 8 row threads; a segment is a sample (dscale,
// dshift: S rows) or all M rows (dweight, dbias). A segment of more rows than a split takes
// (kRunsPerPartial runs per row thread) or too few blocks to fill the GPU is cut into
// splits whose partial rows a second kernel adds in fixed order, in runs. No atomics: the
// order of every addition depends only on the shapes and the SM count, so the results are
// bitwise reproducible.
#include "col_reduce.cuh"
#include "cuda_utils.cuh"
#include "layer_norm_fwd_kernels.cuh"
#include "rms_norm_fwd_kernels.cuh"

namespace rmsnorm_ext {
namespace cuda {
namespace {

constexpr int kModMaxThreads = 512;

// ---------------------------------------------------------------------------------------
// Forward: the row kernels of norm_fwd_rows.cuh with the plain norm's policy, and the
// modulation as the output's own operands: scale and shift of the row's sample, loaded a
// pack at a time beside the weight.

template <typename Sc>
struct ModOperands {
  const Sc* scale;  // Bs x N
  const Sc* shift;  // Bs x N; nullptr: no shift
  int64_t S;        // rows per sample
  int64_t N;
  template <int VEC>
  struct Extra {
    Pack<Sc, VEC> scale, shift;
    bool has_shift;
  };
  template <int VEC, typename I>
  static __device__ __forceinline__ Extra<VEC> extra(const ModOperands& o, int64_t row, I pi) {
    const int64_t sb = (row / o.S) * o.N;  // the sample's scale / shift row
    Extra<VEC> e;
    e.scale = load_pack<Sc, VEC>(o.scale + sb, pi);
    e.has_shift = o.shift != nullptr;
    if (e.has_shift) e.shift = load_pack<Sc, VEC>(o.shift + sb, pi);
    return e;
  }
  static bool aligned(const ModOperands& o, size_t vec) {
    return is_aligned(o.scale, vec * sizeof(Sc)) && is_aligned(o.shift, vec * sizeof(Sc));
  }
  static size_t prepare(ModOperands&, int) { return 0; }
};

// y = yn * (1 + scale) + shift, yn the plain norm's output (Base: RmsFwdNorm, LnFwdNorm).
template <class Base, typename Sc>
struct ModFwdNorm : Base {
  using Ops = ModOperands<Sc>;
  template <typename A, typename W, int VEC, class Ex>
  static __device__ __forceinline__ A out(A f, const Pack<W, VEC>& wp, const Pack<W, VEC>& bp,
                                          const Ex& e, int j, bool has_w, bool has_b,
                                          const FwdStats<A>& st, A offset) {
    const A v = Base::out(f, wp, bp, e, j, has_w, has_b, st, offset);
    const A m = A(1) + to_acc<A>(e.scale.v[j]);
    return e.has_shift ? v * m + to_acc<A>(e.shift.v[j]) : v * m;
  }
};

template <typename T, typename W, typename Sc, bool LN>
cudaError_t launch_fwd(const NormModulateParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  using Norm = ModFwdNorm<std::conditional_t<LN, LnFwdNorm, RmsFwdNorm>, Sc>;
  NormFwdArgs<T, W, T, ModOperands<Sc>> a{};
  a.x = static_cast<const T*>(p.x);
  a.w = static_cast<const W*>(p.weight);
  a.b = LN ? static_cast<const W*>(p.bias) : nullptr;
  a.y = static_cast<T*>(p.y);
  a.mean = static_cast<A*>(p.mean);
  a.rstd = static_cast<A*>(p.rstd);
  a.M = p.M;
  a.N = p.N;
  a.eps = static_cast<A>(p.eps);
  a.offset = A(0);
  a.ops = {static_cast<const Sc*>(p.scale), static_cast<const Sc*>(p.shift), p.S, p.N};
  return launch_norm_fwd<Norm, T, W, T, false>(a, stream);
}

// ---------------------------------------------------------------------------------------
// Backward: dx

template <typename T, typename W, typename Sc>
struct ModBwdArgs {
  const T* x;
  const T* dy;
  const acc_t<T>* mean;  // LayerNorm only
  const acc_t<T>* rstd;
  const W* w;            // nullptr: no weight
  const W* b;            // LayerNorm only; nullptr: no bias
  const Sc* scale;
  T* dx;
  int64_t M;
  int64_t N;
  int64_t S;
  int tpr;
  int rpb;
};

// g = dy * (1 + scale) * w, each product rounded on its own (mul_rn): pass 1 sums g and
// pass 2 subtracts its mean, which must cancel exactly where it should (a LayerNorm row
// of one element); an FMA contracted in one pass and not the other would not.
template <typename A, typename T, typename W, typename Sc>
__device__ __forceinline__ A mod_g(const ModBwdArgs<T, W, Sc>& a, int64_t off, int64_t sb,
                                   int64_t j) {
  A g = mul_rn(to_acc<A>(a.dy[off + j]), A(1) + to_acc<A>(a.scale[sb + j]));
  if (a.w != nullptr) g = mul_rn(g, to_acc<A>(a.w[j]));
  return g;
}

template <typename T, typename W, typename Sc, bool LN>
__global__ void __launch_bounds__(kModMaxThreads)
    mod_bwd_dx_kernel(const ModBwdArgs<T, W, Sc> a) {
  using A = acc_t<T>;
  __shared__ A red[2 * 32];

  const int tpr = a.tpr;
  const int group = threadIdx.x / tpr;
  const int t = threadIdx.x - group * tpr;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * a.rpb + group;
  const bool valid = row < a.M;
  const int64_t N = a.N;
  const int64_t off = valid ? row * N : 0;
  const int64_t sb = valid ? (row / a.S) * N : 0;
  const A mean = (LN && valid) ? a.mean[row] : A(0);
  const A rstd = valid ? a.rstd[row] : A(0);

  A s[2] = {A(0), A(0)};  // sum(g), sum(g * xhat)
  if (valid) {
    for (int64_t j = t; j < N; j += tpr) {
      const A x = to_acc<A>(a.x[off + j]);
      const A xh = LN ? (x - mean) * rstd : x * rstd;
      const A g = mod_g<A>(a, off, sb, j);
      s[0] += g;
      s[1] += g * xh;
    }
  }
  group_sum<A, 2>(s, tpr, red);
  if (!valid) return;
  const A c1 = LN ? s[0] / static_cast<A>(N) : A(0);
  const A c2 = s[1] / static_cast<A>(N);
  for (int64_t j = t; j < N; j += tpr) {
    const A x = to_acc<A>(a.x[off + j]);
    const A xh = LN ? (x - mean) * rstd : x * rstd;
    const A g = mod_g<A>(a, off, sb, j);
    a.dx[off + j] = from_acc<T>(rstd * (g - c1 - xh * c2));
  }
}

// ---------------------------------------------------------------------------------------
// Backward: sums over rows, column-parallel.
//   PARAM = false: segments are samples (S rows each); plane 0 dy * yn (dscale), plane 1 dy
//                  (dshift); outputs of dtype Sc, Bs x N.
//   PARAM = true:  one segment of all M rows; plane 0 dyn * xhat (dweight), plane 1 dyn
//                  (dbias); outputs of dtype W, N.

constexpr int kColX = 32;  // columns per block
constexpr int kColY = 8;   // row threads per block

template <typename T, typename W, typename Sc>
struct ModColArgs {
  const T* x;
  const T* dy;
  const acc_t<T>* mean;  // LayerNorm only
  const acc_t<T>* rstd;
  const W* w;
  const W* b;
  const Sc* scale;
  int64_t N;
  int64_t S;
  int64_t seg_rows;        // rows per segment
  int64_t splits;          // splits per segment
  int64_t rows_per_split;
  acc_t<T>* ws;            // splits > 1: [segments][splits][2][N] partial sums
  void* out0;              // splits == 1: the outputs (nullptr: plane not wanted)
  void* out1;
};

template <typename T, typename W, typename Sc, bool LN, bool PARAM>
__global__ void __launch_bounds__(kColX * kColY) mod_col_kernel(const ModColArgs<T, W, Sc> a) {
  using A = acc_t<T>;
  using O = std::conditional_t<PARAM, W, Sc>;
  __shared__ A sm[2][kColY * kColX];

  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t seg = static_cast<int64_t>(blockIdx.x) / a.splits;
  const int64_t split = static_cast<int64_t>(blockIdx.x) - seg * a.splits;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kColX + tx;
  const int64_t N = a.N;
  const int64_t seg_end = (seg + 1) * a.seg_rows;
  const int64_t r0 = seg * a.seg_rows + split * a.rows_per_split;
  const int64_t r1 = r0 + a.rows_per_split < seg_end ? r0 + a.rows_per_split : seg_end;

  A s[2] = {A(0), A(0)};
  if (col < N) {
    const A wv = a.w != nullptr ? to_acc<A>(a.w[col]) : A(1);
    const A bv = (LN && a.b != nullptr) ? to_acc<A>(a.b[col]) : A(0);
    const int64_t run_step = static_cast<int64_t>(kColY) * kRunRows;
    for (int64_t rb = r0 + ty; rb < r1; rb += run_step) {
      const int64_t re = rb + run_step < r1 ? rb + run_step : r1;
      A run[2] = {A(0), A(0)};
      for (int64_t r = rb; r < re; r += kColY) {
        const A x = to_acc<A>(a.x[r * N + col]);
        const A xh = LN ? (x - a.mean[r]) * a.rstd[r] : x * a.rstd[r];
        const A d = to_acc<A>(a.dy[r * N + col]);
        if constexpr (PARAM) {
          const A dyn = d * (A(1) + to_acc<A>(a.scale[(r / a.S) * N + col]));
          run[0] += dyn * xh;
          run[1] += dyn;
        } else {
          run[0] += d * (xh * wv + bv);
          run[1] += d;
        }
      }
      s[0] += run[0];
      s[1] += run[1];
    }
  }

  // Tree over the row threads: level h adds slot ty + h into slot ty (ty a multiple of 2h);
  // the readers and writers of a level are disjoint, levels are separated by syncs.
  sm[0][ty * kColX + tx] = s[0];
  sm[1][ty * kColX + tx] = s[1];
#pragma unroll
  for (int h = 1; h < kColY; h <<= 1) {
    __syncthreads();
    if ((ty & (2 * h - 1)) == 0) {
      s[0] += sm[0][(ty + h) * kColX + tx];
      s[1] += sm[1][(ty + h) * kColX + tx];
      sm[0][ty * kColX + tx] = s[0];
      sm[1][ty * kColX + tx] = s[1];
    }
  }
  if (ty != 0 || col >= N) return;
  if (a.splits == 1) {
    if (a.out0 != nullptr) static_cast<O*>(a.out0)[seg * N + col] = from_acc<O>(s[0]);
    if (a.out1 != nullptr) static_cast<O*>(a.out1)[seg * N + col] = from_acc<O>(s[1]);
  } else {
    A* o = a.ws + ((seg * a.splits + split) * 2) * N + col;
    o[0] = s[0];
    o[N] = s[1];
  }
}

// out[seg][col] = the sum over the splits of the segment's partial sums, in split order, in
// runs of kRunRows. One thread per (segment, plane, column).
template <typename A, typename O>
__global__ void mod_split_reduce_kernel(const A* ws, int64_t segments, int64_t splits, int64_t N,
                                        O* out0, O* out1) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= segments * 2 * N) return;
  const int64_t seg = idx / (2 * N);
  const int64_t rem = idx - seg * 2 * N;
  const int plane = rem < N ? 0 : 1;
  const int64_t col = rem - plane * N;
  O* out = plane == 0 ? out0 : out1;
  if (out == nullptr) return;
  const A* src = ws + (seg * splits * 2 + plane) * N + col;
  A s = A(0);
  for (int64_t k0 = 0; k0 < splits; k0 += kRunRows) {
    const int64_t k1 = k0 + kRunRows < splits ? k0 + kRunRows : splits;
    A run = A(0);
    for (int64_t k = k0; k < k1; ++k) run += src[k * 2 * N];
    s += run;
  }
  out[seg * N + col] = from_acc<O>(s);
}

template <typename T, typename W, typename Sc, bool LN, bool PARAM>
cudaError_t launch_col(ModColArgs<T, W, Sc> a, int64_t segments, int sm_count, Workspace ws,
                       cudaStream_t stream) {
  using A = acc_t<T>;
  using O = std::conditional_t<PARAM, W, Sc>;
  const int64_t col_tiles = ceil_div(a.N, kColX);
  if (col_tiles > 65535) return cudaErrorInvalidConfiguration;
  // Splits: enough to keep each row thread to kRunsPerPartial runs and to fill the GPU a
  // few times over, no more than one per kColY rows.
  const int64_t per_split = static_cast<int64_t>(kColY) * kRunRows * kRunsPerPartial;
  const int64_t want_acc = ceil_div(a.seg_rows, per_split);
  const int64_t want_par =
      ceil_div(static_cast<int64_t>(std::max(sm_count, 1)) * 8, col_tiles * segments);
  int64_t splits = std::max<int64_t>(
      1, std::min(std::max(want_acc, want_par), ceil_div(a.seg_rows, kColY)));
  a.rows_per_split = ceil_div(a.seg_rows, splits);
  splits = ceil_div(a.seg_rows, a.rows_per_split);  // no empty split
  a.splits = splits;
  if (segments * splits > 0x7fffffff) return cudaErrorInvalidConfiguration;
  if (splits > 1) {
    a.ws = static_cast<A*>(
        ws.alloc(ws.ctx, static_cast<size_t>(segments * splits * 2 * a.N) * sizeof(A)));
    if (a.ws == nullptr) return cudaErrorMemoryAllocation;
  }
  const dim3 grid(static_cast<unsigned>(segments * splits), static_cast<unsigned>(col_tiles));
  const dim3 block(kColX, kColY);
  mod_col_kernel<T, W, Sc, LN, PARAM><<<grid, block, 0, stream>>>(a);
  cudaError_t err = cudaSuccess;
  RMSNORM_EXT_LAUNCH_CHECK(err);
  if (err != cudaSuccess || splits == 1) return err;
  const int64_t threads = segments * 2 * a.N;
  const int64_t blocks = ceil_div(threads, 256);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  mod_split_reduce_kernel<A, O><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      a.ws, segments, splits, a.N, static_cast<O*>(a.out0), static_cast<O*>(a.out1));
  RMSNORM_EXT_LAUNCH_CHECK(err);
  return err;
}

template <typename T, typename W, typename Sc, bool LN>
cudaError_t launch_bwd(const NormModulateBwdParams& p, Workspace ws, cudaStream_t stream) {
  using A = acc_t<T>;
  ModBwdArgs<T, W, Sc> a{};
  a.x = static_cast<const T*>(p.x);
  a.dy = static_cast<const T*>(p.dy);
  a.mean = static_cast<const A*>(p.mean);
  a.rstd = static_cast<const A*>(p.rstd);
  a.w = static_cast<const W*>(p.weight);
  a.b = static_cast<const W*>(p.bias);
  a.scale = static_cast<const Sc*>(p.scale);
  a.dx = static_cast<T*>(p.dx);
  a.M = p.M;
  a.N = p.N;
  a.S = p.S;
  const RowConfig c = pick_row_config(a.N, kModMaxThreads, 4, false);
  a.tpr = c.tpr;
  a.rpb = c.rpb;
  const int64_t blocks = ceil_div(a.M, c.rpb);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  mod_bwd_dx_kernel<T, W, Sc, LN><<<static_cast<unsigned>(blocks), c.threads(), 0, stream>>>(a);
  cudaError_t err = cudaSuccess;
  RMSNORM_EXT_LAUNCH_CHECK(err);
  if (err != cudaSuccess) return err;

  ModColArgs<T, W, Sc> ca{};
  ca.x = a.x;
  ca.dy = a.dy;
  ca.mean = a.mean;
  ca.rstd = a.rstd;
  ca.w = a.w;
  ca.b = a.b;
  ca.scale = a.scale;
  ca.N = a.N;
  ca.S = a.S;
  if (p.dscale != nullptr || p.dshift != nullptr) {
    ModColArgs<T, W, Sc> sa = ca;
    sa.seg_rows = a.S;
    sa.out0 = p.dscale;
    sa.out1 = p.dshift;
    err = launch_col<T, W, Sc, LN, false>(sa, a.M / a.S, p.sm_count, ws, stream);
    if (err != cudaSuccess) return err;
  }
  if (p.dweight != nullptr || p.dbias != nullptr) {
    ModColArgs<T, W, Sc> pa = ca;
    pa.seg_rows = a.M;
    pa.out0 = p.dweight;
    pa.out1 = p.dbias;
    err = launch_col<T, W, Sc, LN, true>(pa, 1, p.sm_count, ws, stream);
  }
  return err;
}

// Calls f(T{}, W{}, Sc{}, bool_constant<LN>) for the dtype tags and the norm kind.
template <typename F>
cudaError_t with_modulate_types(DType t, DType w, DType s, NormKind kind, F&& f) {
  if (kind != NormKind::rms && kind != NormKind::layer) return cudaErrorInvalidValue;
  return with_dtype_pair(t, w, [&](auto t_tag, auto w_tag) -> cudaError_t {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    return with_dtype(s, [&](auto s_tag) -> cudaError_t {
      using Sc = decltype(s_tag);
      if constexpr (allowed_pair_v<T, Sc>) {
        if (kind == NormKind::layer) return f(T{}, W{}, Sc{}, std::true_type{});
        return f(T{}, W{}, Sc{}, std::false_type{});
      } else {
        return cudaErrorInvalidValue;
      }
    });
  });
}

}  // namespace

cudaError_t norm_modulate_fwd(const NormModulateParams& p, cudaStream_t stream) {
  return with_modulate_types(p.t, p.w, p.s, p.kind,
                             [&](auto t, auto w, auto s, auto ln) -> cudaError_t {
                               return launch_fwd<decltype(t), decltype(w), decltype(s),
                                                 decltype(ln)::value>(p, stream);
                             });
}

cudaError_t norm_modulate_bwd(const NormModulateBwdParams& p, Workspace ws, cudaStream_t stream) {
  return with_modulate_types(p.t, p.w, p.s, p.kind,
                             [&](auto t, auto w, auto s, auto ln) -> cudaError_t {
                               return launch_bwd<decltype(t), decltype(w), decltype(s),
                                                 decltype(ln)::value>(p, ws, stream);
                             });
}

RMSNORM_EXT_REGISTER_CUDA_KERNEL(NormModulateFwd, norm_modulate_fwd);
RMSNORM_EXT_REGISTER_CUDA_KERNEL(NormModulateBwd, norm_modulate_bwd);

}  // namespace cuda
}  // namespace rmsnorm_ext
