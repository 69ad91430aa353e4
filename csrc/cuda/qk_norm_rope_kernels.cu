// Fused QK-norm + RoPE kernels, forward and backward (see QkNormRopeFwdParams in
// ../kernel_params.h). q and k are two launches of one row kernel; a row is one head vector
// of D elements, handled by a thread group (cuda_utils.cuh's group_sum; launch shape from
// pick_row_config's re-reading configuration). Each thread takes pairs (a, b) of its row
// -- (p, p + D/2) for rotate-half, (2p, 2p + 1) interleaved -- one element at a time:
// pass 1 reduces over the row, pass 2 re-reads it (mostly from L1/L2) and writes the
// outputs. Math in acc_t<T>; one rounding per output.
//
// Forward:  u = v * r * w; out[a] = u[a] c[a] - u[b] s[a], out[b] = u[b] c[b] + u[a] s[b].
// Backward: du[a] = g[a] c[a] + g[b] s[b], du[b] = g[b] c[b] - g[a] s[a];
//           kc = r * mean(du * w * v), dv = r * (du * w - vhat * kc), vhat = v * r;
//           dw = sum over rows of du * vhat: the column-parallel pass of col_reduce.cuh with
//           QkDwTerm below, then its tree reduction. Deterministic (no atomics).
// The products both backward passes form (du's terms, du * w) are rounded on their own
// (mul_rn), so the two passes use the same values.
#include "col_reduce.cuh"
#include "cuda_utils.cuh"

namespace rmsnorm_ext {
namespace cuda {
namespace {

constexpr int kQkMaxThreads = 512;

// The pair p of a row: elements a and b.
template <bool IL>
__device__ __forceinline__ void pair_of(int64_t p, int64_t D, int64_t& a, int64_t& b) {
  a = IL ? 2 * p : p;
  b = IL ? 2 * p + 1 : p + D / 2;
}

// The cos/sin row of head row i.
__device__ __forceinline__ int64_t table_row(int64_t i, int64_t H, int64_t S, bool per_batch) {
  const int64_t pos = i / H;
  return per_batch ? pos : pos % S;
}

// The thread group of this thread: its row and its index within the group.
struct RowSlot {
  int t;
  int64_t row;
  bool valid;
};

__device__ __forceinline__ RowSlot row_slot(int tpr, int rpb, int64_t rows) {
  RowSlot s;
  const int grp = threadIdx.x / tpr;
  s.t = threadIdx.x - grp * tpr;
  s.row = static_cast<int64_t>(blockIdx.x) * rpb + grp;
  s.valid = s.row < rows;
  return s;
}

// ---------------------------------------------------------------------------------------
// Forward

template <typename T, typename W, typename C>
struct QkFwdArgs {
  const T* x;
  const W* w;  // nullptr: no weight
  const C* cos;
  const C* sin;
  T* y;
  acc_t<T>* rstd;
  int64_t rows;
  int64_t H;
  int64_t S;
  int64_t D;
  bool per_batch;
  acc_t<T> eps;
  int tpr;
  int rpb;
};

template <typename T, typename W, typename C, bool IL>
__global__ void __launch_bounds__(kQkMaxThreads) qk_fwd_kernel(const QkFwdArgs<T, W, C> a) {
  using A = acc_t<T>;
  __shared__ A red[32];
  const RowSlot sl = row_slot(a.tpr, a.rpb, a.rows);
  const int64_t half = a.D / 2;
  const T* xr = a.x + (sl.valid ? sl.row : 0) * a.D;

  A ss = A(0);
  if (sl.valid) {
    for (int64_t p = sl.t; p < half; p += a.tpr) {
      int64_t ia, ib;
      pair_of<IL>(p, a.D, ia, ib);
      const A xa = to_acc<A>(xr[ia]);
      const A xb = to_acc<A>(xr[ib]);
      ss += xa * xa + xb * xb;
    }
  }
  A v[1] = {ss};
  group_sum<A, 1>(v, a.tpr, red);  // every thread of the block, once
  const A r = A(1) / sqrt(v[0] / static_cast<A>(a.D) + a.eps);
  if (!sl.valid) return;
  if (sl.t == 0) a.rstd[sl.row] = r;

  const int64_t crow = table_row(sl.row, a.H, a.S, a.per_batch);
  const C* cr = a.cos + crow * a.D;
  const C* sr = a.sin + crow * a.D;
  T* yr = a.y + sl.row * a.D;
  for (int64_t p = sl.t; p < half; p += a.tpr) {
    int64_t ia, ib;
    pair_of<IL>(p, a.D, ia, ib);
    A ua = to_acc<A>(xr[ia]) * r;
    A ub = to_acc<A>(xr[ib]) * r;
    if (a.w != nullptr) {
      ua = ua * to_acc<A>(a.w[ia]);
      ub = ub * to_acc<A>(a.w[ib]);
    }
    yr[ia] = from_acc<T>(ua * to_acc<A>(cr[ia]) - ub * to_acc<A>(sr[ia]));
    yr[ib] = from_acc<T>(ub * to_acc<A>(cr[ib]) + ua * to_acc<A>(sr[ib]));
  }
}

inline RowConfig qk_row_config(int64_t D) {
  return pick_row_config(D / 2, kQkMaxThreads, 4, false);
}

template <typename T, typename W, typename C, bool IL>
cudaError_t launch_fwd_pass(const QkNormRopeFwdParams& p, const T* x, const void* w, T* y,
                            void* rstd, int64_t H, cudaStream_t stream) {
  using A = acc_t<T>;
  QkFwdArgs<T, W, C> a{};
  a.x = x;
  a.w = static_cast<const W*>(w);
  a.cos = static_cast<const C*>(p.cos);
  a.sin = static_cast<const C*>(p.sin);
  a.y = y;
  a.rstd = static_cast<A*>(rstd);
  a.rows = p.P * H;
  a.H = H;
  a.S = p.S;
  a.D = p.D;
  a.per_batch = p.cs_per_batch;
  a.eps = static_cast<A>(p.eps);
  if (a.rows == 0) return cudaSuccess;
  const RowConfig c = qk_row_config(p.D);
  a.tpr = c.tpr;
  a.rpb = c.rpb;
  const int64_t blocks = ceil_div(a.rows, c.rpb);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  qk_fwd_kernel<T, W, C, IL><<<static_cast<unsigned>(blocks), c.threads(), 0, stream>>>(a);
  cudaError_t err = cudaSuccess;
  RMSNORM_EXT_LAUNCH_CHECK(err);
  return err;
}

// ---------------------------------------------------------------------------------------
// Backward: dq, dk

template <typename T, typename W, typename C>
struct QkBwdArgs {
  const T* dy;
  const T* x;
  const W* w;  // nullptr: no weight
  const C* cos;
  const C* sin;
  const acc_t<T>* rstd;
  T* dx;
  int64_t rows;
  int64_t H;
  int64_t S;
  int64_t D;
  bool per_batch;
  int tpr;
  int rpb;
};

// du * w at elements a and b of a row (du without a weight): the inverse rotation of the
// output gradient, then the weight.
template <typename A, typename T, typename W, typename C>
__device__ __forceinline__ void du_pair(const T* gr, const C* cr, const C* sr, const W* w,
                                        int64_t ia, int64_t ib, A& da, A& db) {
  const A ga = to_acc<A>(gr[ia]);
  const A gb = to_acc<A>(gr[ib]);
  da = mul_rn(ga, to_acc<A>(cr[ia])) + mul_rn(gb, to_acc<A>(sr[ib]));
  db = mul_rn(gb, to_acc<A>(cr[ib])) - mul_rn(ga, to_acc<A>(sr[ia]));
  if (w != nullptr) {
    da = mul_rn(da, to_acc<A>(w[ia]));
    db = mul_rn(db, to_acc<A>(w[ib]));
  }
}

template <typename T, typename W, typename C, bool IL>
__global__ void __launch_bounds__(kQkMaxThreads) qk_bwd_kernel(const QkBwdArgs<T, W, C> a) {
  using A = acc_t<T>;
  __shared__ A red[32];
  const RowSlot sl = row_slot(a.tpr, a.rpb, a.rows);
  const int64_t half = a.D / 2;
  const int64_t row = sl.valid ? sl.row : 0;
  const T* xr = a.x + row * a.D;
  const T* gr = a.dy + row * a.D;
  const int64_t crow = table_row(row, a.H, a.S, a.per_batch);
  const C* cr = a.cos + crow * a.D;
  const C* sr = a.sin + crow * a.D;
  const A r = sl.valid ? a.rstd[row] : A(0);

  A acc = A(0);
  if (sl.valid) {
    for (int64_t p = sl.t; p < half; p += a.tpr) {
      int64_t ia, ib;
      pair_of<IL>(p, a.D, ia, ib);
      A da, db;
      du_pair<A>(gr, cr, sr, a.w, ia, ib, da, db);
      acc += da * to_acc<A>(xr[ia]) + db * to_acc<A>(xr[ib]);
    }
  }
  A v[1] = {acc};
  group_sum<A, 1>(v, a.tpr, red);  // every thread of the block, once
  if (!sl.valid) return;
  const A kc = r * (v[0] / static_cast<A>(a.D));

  T* dxr = a.dx + row * a.D;
  for (int64_t p = sl.t; p < half; p += a.tpr) {
    int64_t ia, ib;
    pair_of<IL>(p, a.D, ia, ib);
    A da, db;
    du_pair<A>(gr, cr, sr, a.w, ia, ib, da, db);
    const A ha = to_acc<A>(xr[ia]) * r;
    const A hb = to_acc<A>(xr[ib]) * r;
    dxr[ia] = from_acc<T>((da - ha * kc) * r);
    dxr[ib] = from_acc<T>((db - hb * kc) * r);
  }
}

// ---------------------------------------------------------------------------------------
// Backward: the weight gradient, column-parallel (col_reduce.cuh), one column at a time
// (VEC = 1): du of column e needs its partner column's gradient and table entries.
// Term: du[e] * (x[e] * r).
template <typename T, typename C, bool IL>
struct QkDwTerm {
  using A = acc_t<T>;
  static constexpr int kPlanes = 1;
  struct Args {
    const T* x;
    const T* dy;
    const C* cos;
    const C* sin;
    const A* rstd;
    int64_t H;
    int64_t S;
    bool per_batch;
  };
  template <int VEC>
  struct Row {
    A du;
    A x;
    A rstd;
  };
  template <int VEC>
  static __device__ __forceinline__ Row<VEC> load(const Args& a, int64_t row, int64_t N,
                                                  int64_t cp) {
    static_assert(VEC == 1, "one column at a time");
    const int64_t half = N / 2;
    // Element e = cp is the a-element of its pair (sign +) or the b-element (sign -).
    const bool is_a = IL ? (cp % 2 == 0) : (cp < half);
    const int64_t partner = IL ? (is_a ? cp + 1 : cp - 1) : (is_a ? cp + half : cp - half);
    const int64_t crow = table_row(row, a.H, a.S, a.per_batch);
    const T* gr = a.dy + row * N;
    const A g = to_acc<A>(gr[cp]);
    const A gp = to_acc<A>(gr[partner]);
    const A c = to_acc<A>(a.cos[crow * N + cp]);
    const A sp = to_acc<A>(a.sin[crow * N + partner]);  // s[b] for a, s[a] for b
    // du[a] = g[a] c[a] + g[b] s[b]; du[b] = g[b] c[b] - g[a] s[a].
    Row<VEC> r;
    r.du = is_a ? mul_rn(g, c) + mul_rn(gp, sp) : mul_rn(g, c) - mul_rn(gp, sp);
    r.x = to_acc<A>(a.x[row * N + cp]);
    r.rstd = a.rstd[row];
    return r;
  }
  template <int VEC>
  static __device__ __forceinline__ void add(const Row<VEC>& r, A (&s0)[1][VEC]) {
    s0[0][0] += r.du * (r.x * r.rstd);
  }
};

template <typename T, typename W, typename C, bool IL>
cudaError_t launch_bwd_pass(const QkNormRopeBwdParams& p, const T* dy, const T* x,
                            const void* w, const void* rstd, T* dx, void* dw, int64_t H,
                            Workspace ws, cudaStream_t stream) {
  using A = acc_t<T>;
  QkBwdArgs<T, W, C> a{};
  a.dy = dy;
  a.x = x;
  a.w = static_cast<const W*>(w);
  a.cos = static_cast<const C*>(p.cos);
  a.sin = static_cast<const C*>(p.sin);
  a.rstd = static_cast<const A*>(rstd);
  a.dx = dx;
  a.rows = p.P * H;
  a.H = H;
  a.S = p.S;
  a.D = p.D;
  a.per_batch = p.cs_per_batch;
  if (a.rows == 0) {
    // No rows: a zero weight gradient.
    if (dw != nullptr) return cudaMemsetAsync(dw, 0, static_cast<size_t>(p.D) * sizeof(W), stream);
    return cudaSuccess;
  }
  const RowConfig c = qk_row_config(p.D);
  a.tpr = c.tpr;
  a.rpb = c.rpb;
  const int64_t blocks = ceil_div(a.rows, c.rpb);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  qk_bwd_kernel<T, W, C, IL><<<static_cast<unsigned>(blocks), c.threads(), 0, stream>>>(a);
  cudaError_t err = cudaSuccess;
  RMSNORM_EXT_LAUNCH_CHECK(err);
  if (err != cudaSuccess || dw == nullptr) return err;

  using Term = QkDwTerm<T, C, IL>;
  const typename Term::Args t{x, dy, a.cos, a.sin, a.rstd, H, p.S, p.cs_per_batch};
  return launch_term_col_partials<Term, 1, W>(t, a.rows, p.D, false, p.sm_count, ws,
                                              static_cast<W*>(dw), nullptr, stream);
}

template <typename F>
cudaError_t with_interleaved(bool interleaved, F&& f) {
  return interleaved ? f(std::true_type{}) : f(std::false_type{});
}

}  // namespace

cudaError_t qk_norm_rope_fwd(const QkNormRopeFwdParams& p, cudaStream_t stream) {
  return with_dtype_pair(p.t, p.cs, [&](auto t_tag, auto c_tag) -> cudaError_t {
    using T = decltype(t_tag);
    using C = decltype(c_tag);
    return with_interleaved(p.interleaved, [&](auto il) -> cudaError_t {
      constexpr bool IL = decltype(il)::value;
      cudaError_t err = with_dtype_pair(p.t, p.wq, [&](auto, auto w_tag) -> cudaError_t {
        return launch_fwd_pass<T, decltype(w_tag), C, IL>(
            p, static_cast<const T*>(p.q), p.q_weight, static_cast<T*>(p.q_out), p.q_rstd, p.Hq,
            stream);
      });
      if (err != cudaSuccess) return err;
      return with_dtype_pair(p.t, p.wk, [&](auto, auto w_tag) -> cudaError_t {
        return launch_fwd_pass<T, decltype(w_tag), C, IL>(
            p, static_cast<const T*>(p.k), p.k_weight, static_cast<T*>(p.k_out), p.k_rstd, p.Hk,
            stream);
      });
    });
  });
}

cudaError_t qk_norm_rope_bwd(const QkNormRopeBwdParams& p, Workspace ws, cudaStream_t stream) {
  return with_dtype_pair(p.t, p.cs, [&](auto t_tag, auto c_tag) -> cudaError_t {
    using T = decltype(t_tag);
    using C = decltype(c_tag);
    return with_interleaved(p.interleaved, [&](auto il) -> cudaError_t {
      constexpr bool IL = decltype(il)::value;
      cudaError_t err = with_dtype_pair(p.t, p.wq, [&](auto, auto w_tag) -> cudaError_t {
        return launch_bwd_pass<T, decltype(w_tag), C, IL>(
            p, static_cast<const T*>(p.dq_out), static_cast<const T*>(p.q), p.q_weight,
            p.q_rstd, static_cast<T*>(p.dq), p.dwq, p.Hq, ws, stream);
      });
      if (err != cudaSuccess) return err;
      return with_dtype_pair(p.t, p.wk, [&](auto, auto w_tag) -> cudaError_t {
        return launch_bwd_pass<T, decltype(w_tag), C, IL>(
            p, static_cast<const T*>(p.dk_out), static_cast<const T*>(p.k), p.k_weight,
            p.k_rstd, static_cast<T*>(p.dk), p.dwk, p.Hk, ws, stream);
      });
    });
  });
}

RMSNORM_EXT_REGISTER_CUDA_KERNEL(QkNormRopeFwd, qk_norm_rope_fwd);
RMSNORM_EXT_REGISTER_CUDA_KERNEL(QkNormRopeBwd, qk_norm_rope_bwd);

}  // namespace cuda
}  // namespace rmsnorm_ext
