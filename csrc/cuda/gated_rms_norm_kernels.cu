// gated_rms_norm kernels, forward and backward (see GatedRmsFwdParams in
// ../kernel_params.h). A group of G elements of a row is normalized on its own, and the
// groups are contiguous: the tensors are M * (N / G) "segments" of G elements, segment s
// being group s % groups of row s / groups (its weights start at (s % groups) * G) with
// statistic rstd[s]. Forward: the shared row kernels (norm_fwd_rows.cuh) with segments as
// rows. Backward: one segment per thread group (cuda_utils.cuh's group_sum, launch shape
// from pick_row_config's re-reading configuration): pass 1 reduces over the segment, pass 2
// re-reads it (mostly from L1/L2) and writes the outputs. Math in acc_t<T>.
//
// With a = act(g), a' = act'(g), w = 1 without a weight:
//   norm_before_gate (NBG): xhat = x * r, y = xhat * w * a
//     u = dy * w * a, c = r * mean(u * x), dx = r * (u - xhat * c), dg = dy * w * xhat * a'
//   gate first (!NBG):      z = x * a, zhat = z * r, y = zhat * w
//     c = r * mean(dy * w * z), dz = r * (dy * w - zhat * c), dx = dz * a, dg = dz * x * a'
//   dw = sum over rows of dy * (x * a) * r (= dy * xhat * a, or dy * zhat): the
//        column-parallel pass of col_reduce.cuh with GatedDwTerm below, then its tree
//        reduction. Deterministic (no atomics).
// The products that pass 1 and pass 2 both form (dy * w, u, z) are rounded on their own
// (mul_rn), so that neither pass contracts them into an FMA and both use the same values.
#include "col_reduce.cuh"
#include "cuda_utils.cuh"
#include "rms_norm_fwd_kernels.cuh"

namespace rmsnorm_ext {
namespace cuda {
namespace {

constexpr int kGatedMaxThreads = 512;

// sigmoid(g) and 1 - sigmoid(g), both from e = exp(-|g|) <= 1: for g >= 0, s = 1 / (1 + e)
// and 1 - s = e / (1 + e), swapped for g < 0. Nothing overflows for any |g|; a NaN gate
// gives NaN.
template <typename A>
__device__ __forceinline__ void sigmoid2(A g, A& s, A& sc) {
  A e;
  if constexpr (std::is_same_v<A, double>) {
    e = exp(-fabs(g));
  } else {
    e = expf(-fabsf(g));
  }
  const A r = A(1) / (A(1) + e);
  const A q = e * r;
  const bool pos = g >= A(0);
  s = pos ? r : q;
  sc = pos ? q : r;
}

template <GateAct ACT, typename A>
__device__ __forceinline__ A gate_act(A g) {
  A s, sc;
  sigmoid2(g, s, sc);
  return ACT == GateAct::silu ? g * s : s;
}

// a = act(g), da = act'(g): silu' = s (1 + g (1 - s)), sigmoid' = s (1 - s).
template <GateAct ACT, typename A>
__device__ __forceinline__ void gate_act_grad(A g, A& a, A& da) {
  A s, sc;
  sigmoid2(g, s, sc);
  if constexpr (ACT == GateAct::silu) {
    a = g * s;
    da = s * (A(1) + g * sc);
  } else {
    a = s;
    da = s * sc;
  }
}

// The thread group, segment and offsets of this thread.
struct Segment {
  int t;          // thread within the group
  int64_t seg;    // segment index
  bool valid;     // seg < number of segments
  int64_t off;    // first element of the segment
  int64_t woff;   // first weight of the segment
};

__device__ __forceinline__ Segment segment_of(int tpr, int rpb, int64_t S, int64_t G,
                                              int64_t groups) {
  Segment s;
  const int grp = threadIdx.x / tpr;
  s.t = threadIdx.x - grp * tpr;
  s.seg = static_cast<int64_t>(blockIdx.x) * rpb + grp;
  s.valid = s.seg < S;
  s.off = s.valid ? s.seg * G : 0;
  s.woff = s.valid ? (s.seg % groups) * G : 0;
  return s;
}

// ---------------------------------------------------------------------------------------
// Forward: the row kernels of norm_fwd_rows.cuh over segments (a row of G elements each,
// M * groups of them) with RMSNorm's statistics; the weight of a segment's group and the
// gate are this policy's operands. Gate first: the kept row is z = x * act(g) (acc_t),
// formed as it is loaded (and again in the re-reading kernel's output pass).

template <typename T, typename W, bool NBG>
struct GatedOperands {
  const T* g;
  const W* w;       // nullptr: no weight
  int64_t G;        // elements per segment
  int64_t groups;   // segments per row
  template <int VEC>
  struct Extra {
    Pack<T, VEC> g;  // norm first only (gate first has it in z)
    Pack<W, VEC> w;
    bool has_w;
  };
  template <int VEC, typename I>
  static __device__ __forceinline__ Extra<VEC> extra(const GatedOperands& o, int64_t seg, I pi) {
    Extra<VEC> e;
    if constexpr (NBG) e.g = load_pack<T, VEC>(o.g + seg * o.G, pi);
    e.has_w = o.w != nullptr;
    if (e.has_w) e.w = load_pack<W, VEC>(o.w + (seg % o.groups) * o.G, pi);
    return e;
  }
  static bool aligned(const GatedOperands& o, size_t vec) {
    return is_aligned(o.g, vec * sizeof(T)) && is_aligned(o.w, vec * sizeof(W));
  }
  static size_t prepare(GatedOperands&, int) { return 0; }
};

// y = xhat * w * act(g) (NBG), or zhat * w with z = x * act(g): RMSNorm's statistics (of x,
// or of z) and output, the group's weight and the gate applied here.
template <typename T, typename W, GateAct ACT, bool NBG>
struct GatedFwdNorm : RmsFwdNorm {
  using Ops = GatedOperands<T, W, NBG>;
  template <typename T2, typename R, bool FUSED>
  using Kept = std::conditional_t<NBG, T2, acc_t<T2>>;
  // Gate first: z = x * act(g), in acc_t, for the statistics and the output.
  template <int VEC, class Args>
  static __device__ __forceinline__ auto load(const Args& a, int64_t off, int64_t pi) {
    if constexpr (NBG) {
      return load_pack<T, VEC>(a.x + off, pi);
    } else {
      using A = acc_t<T>;
      const Pack<T, VEC> xv = load_pack<T, VEC>(a.x + off, pi);
      const Pack<T, VEC> gv = load_pack<T, VEC>(a.ops.g + off, pi);
      Pack<A, VEC> z;
#pragma unroll
      for (int j = 0; j < VEC; ++j) z.v[j] = to_acc<A>(xv.v[j]) * gate_act<ACT>(to_acc<A>(gv.v[j]));
      return z;
    }
  }
  template <int VEC, class Args, typename S>
  static __device__ __forceinline__ Pack<S, VEC> reload(const Args& a, int64_t off, const S* src, int64_t pi) {
    if constexpr (NBG) {
      return load_pack<S, VEC>(src, pi);
    } else {
      return load<VEC>(a, off, pi);
    }
  }
  template <typename A, typename W2, int VEC, class Ex>
  static __device__ __forceinline__ A out(A f, const Pack<W2, VEC>& wp, const Pack<W2, VEC>& bp,
                                          const Ex& e, int j, bool, bool, const FwdStats<A>& st, A) {
    A v = RmsFwdNorm::out(f, wp, bp, e, j, false, false, st, A(0));  // x (or z) * rstd
    if (e.has_w) v = v * to_acc<A>(e.w.v[j]);
    if constexpr (NBG) v = v * gate_act<ACT>(to_acc<A>(e.g.v[j]));
    return v;
  }
};

template <typename T, typename W, GateAct ACT, bool NBG>
cudaError_t launch_fwd(const GatedRmsFwdParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  NormFwdArgs<T, W, T, GatedOperands<T, W, NBG>> a{};
  const int64_t groups = p.N / p.group;
  a.x = static_cast<const T*>(p.x);
  a.y = static_cast<T*>(p.y);
  a.rstd = static_cast<A*>(p.rstd);
  a.M = p.M * groups;  // segments
  a.N = p.group;
  a.eps = static_cast<A>(p.eps);
  a.ops = {static_cast<const T*>(p.gate), static_cast<const W*>(p.weight), p.group, groups};
  return launch_norm_fwd<GatedFwdNorm<T, W, ACT, NBG>, T, W, T, false>(a, stream);
}

// ---------------------------------------------------------------------------------------
// Backward: dx and dgate

template <typename T, typename W>
struct GatedBwdArgs {
  const T* dy;
  const T* x;
  const T* g;
  const acc_t<T>* rstd;
  const W* w;  // nullptr: no weight
  T* dx;
  T* dg;
  int64_t S;
  int64_t G;
  int64_t groups;
  int tpr;
  int rpb;
};

template <typename T, typename W, GateAct ACT, bool NBG, int VEC>
__global__ void __launch_bounds__(kGatedMaxThreads)
    gated_bwd_kernel(const GatedBwdArgs<T, W> a) {
  using A = acc_t<T>;
  __shared__ A red[32];
  const Segment sg = segment_of(a.tpr, a.rpb, a.S, a.G, a.groups);
  const int64_t P = a.G / VEC;
  const T* dys = a.dy + sg.off;
  const T* xs = a.x + sg.off;
  const T* gs = a.g + sg.off;
  const W* ws = a.w != nullptr ? a.w + sg.woff : nullptr;
  const A r = sg.valid ? a.rstd[sg.seg] : A(0);

  // dy * w of element j of a pack (dy without a weight).
  auto dyw = [&](const Pack<T, VEC>& yv, const Pack<W, VEC>& wv, int j) -> A {
    const A d = to_acc<A>(yv.v[j]);
    return ws != nullptr ? mul_rn(d, to_acc<A>(wv.v[j])) : d;
  };

  A acc = A(0);
  if (sg.valid) {
    for (int64_t pi = sg.t; pi < P; pi += a.tpr) {
      const Pack<T, VEC> yv = load_pack<T, VEC>(dys, pi);
      const Pack<T, VEC> xv = load_pack<T, VEC>(xs, pi);
      const Pack<T, VEC> gv = load_pack<T, VEC>(gs, pi);
      Pack<W, VEC> wv;
      if (ws != nullptr) wv = load_pack<W, VEC>(ws, pi);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A act = gate_act<ACT>(to_acc<A>(gv.v[j]));
        const A xf = to_acc<A>(xv.v[j]);
        if constexpr (NBG) {
          acc += mul_rn(dyw(yv, wv, j), act) * xf;  // u * x
        } else {
          acc += dyw(yv, wv, j) * mul_rn(xf, act);  // dy * w * z
        }
      }
    }
  }
  A v[1] = {acc};
  group_sum<A, 1>(v, a.tpr, red);  // every thread of the block, once
  if (!sg.valid) return;
  const A c = r * (v[0] / static_cast<A>(a.G));

  T* dxs = a.dx + sg.off;
  T* dgs = a.dg + sg.off;
  for (int64_t pi = sg.t; pi < P; pi += a.tpr) {
    const Pack<T, VEC> yv = load_pack<T, VEC>(dys, pi);
    const Pack<T, VEC> xv = load_pack<T, VEC>(xs, pi);
    const Pack<T, VEC> gv = load_pack<T, VEC>(gs, pi);
    Pack<W, VEC> wv;
    if (ws != nullptr) wv = load_pack<W, VEC>(ws, pi);
    Pack<T, VEC> ox, og;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      A act, dact;
      gate_act_grad<ACT>(to_acc<A>(gv.v[j]), act, dact);
      const A xf = to_acc<A>(xv.v[j]);
      const A d = dyw(yv, wv, j);
      if constexpr (NBG) {
        const A xhat = xf * r;
        ox.v[j] = from_acc<T>(r * (mul_rn(d, act) - xhat * c));
        og.v[j] = from_acc<T>((d * xhat) * dact);
      } else {
        const A zhat = mul_rn(xf, act) * r;
        const A dz = r * (d - zhat * c);
        ox.v[j] = from_acc<T>(dz * act);
        og.v[j] = from_acc<T>((dz * xf) * dact);
      }
    }
    store_pack<T, VEC>(dxs, pi, ox);
    store_pack<T, VEC>(dgs, pi, og);
  }
}

// ---------------------------------------------------------------------------------------
// Backward: dweight, column-parallel (col_reduce.cuh). Term: dy * ((x * a) * r), r the
// statistic of the element's group. With packs, G is a multiple of the pack, so a pack's
// elements share one group.
template <typename T, GateAct ACT>
struct GatedDwTerm {
  using A = acc_t<T>;
  static constexpr int kPlanes = 1;
  struct Args {
    const T* x;
    const T* g;
    const T* dy;
    const A* rstd;  // [M][groups]
    int64_t G;
    int64_t groups;
  };
  template <int VEC>
  struct Row {
    Pack<T, VEC> x;
    Pack<T, VEC> g;
    Pack<T, VEC> dy;
    A rstd;
  };
  template <int VEC>
  static __device__ __forceinline__ Row<VEC> load(const Args& a, int64_t row, int64_t N,
                                                  int64_t cp) {
    Row<VEC> r;
    r.x = load_pack<T, VEC>(a.x + row * N, cp);
    r.g = load_pack<T, VEC>(a.g + row * N, cp);
    r.dy = load_pack<T, VEC>(a.dy + row * N, cp);
    r.rstd = a.rstd[row * a.groups + (cp * VEC) / a.G];
    return r;
  }
  template <int VEC>
  static __device__ __forceinline__ void add(const Row<VEC>& r, A (&s0)[1][VEC]) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A z = to_acc<A>(r.x.v[j]) * gate_act<ACT>(to_acc<A>(r.g.v[j]));
      s0[0][j] += to_acc<A>(r.dy.v[j]) * (z * r.rstd);
    }
  }
};

template <typename T, typename W, GateAct ACT, bool NBG>
cudaError_t launch_bwd(const GatedRmsBwdParams& p, Workspace ws, cudaStream_t stream) {
  using A = acc_t<T>;
  GatedBwdArgs<T, W> a{};
  a.dy = static_cast<const T*>(p.dy);
  a.x = static_cast<const T*>(p.x);
  a.g = static_cast<const T*>(p.gate);
  a.rstd = static_cast<const A*>(p.rstd);
  a.w = static_cast<const W*>(p.weight);
  a.dx = static_cast<T*>(p.dx);
  a.dg = static_cast<T*>(p.dgate);
  a.groups = p.N / p.group;
  a.S = p.M * a.groups;
  a.G = p.group;

  constexpr int V = 16 / sizeof(T);
  const bool vec_in = a.G % V == 0 && is_aligned(a.x, V * sizeof(T)) &&
                      is_aligned(a.g, V * sizeof(T)) && is_aligned(a.dy, V * sizeof(T));
  const bool vec = vec_in && is_aligned(a.w, V * sizeof(W)) && is_aligned(a.dx, V * sizeof(T)) &&
                   is_aligned(a.dg, V * sizeof(T));
  const RowConfig c = pick_row_config(vec ? a.G / V : a.G, kGatedMaxThreads, 4, false);
  a.tpr = c.tpr;
  a.rpb = c.rpb;
  const int64_t blocks = ceil_div(a.S, c.rpb);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks));
  if (vec) {
    gated_bwd_kernel<T, W, ACT, NBG, V><<<grid, c.threads(), 0, stream>>>(a);
  } else {
    gated_bwd_kernel<T, W, ACT, NBG, 1><<<grid, c.threads(), 0, stream>>>(a);
  }
  cudaError_t err = cudaSuccess;
  RMSNORM_EXT_LAUNCH_CHECK(err);
  if (err != cudaSuccess || p.dw == nullptr || p.weight == nullptr) return err;

  using Term = GatedDwTerm<T, ACT>;
  const typename Term::Args t{a.x, a.g, a.dy, a.rstd, a.G, a.groups};
  return launch_term_col_partials<Term, V, W>(t, p.M, p.N, vec_in, p.sm_count, ws,
                                              static_cast<W*>(p.dw), nullptr, stream);
}

// Calls f(std::integral_constant<GateAct, ACT>{}, std::bool_constant<NBG>{}).
template <typename F>
cudaError_t with_gate(GateAct act, bool norm_before_gate, F&& f) {
  auto with_act = [&](auto act_c) -> cudaError_t {
    return norm_before_gate ? f(act_c, std::true_type{}) : f(act_c, std::false_type{});
  };
  switch (act) {
    case GateAct::silu:
      return with_act(std::integral_constant<GateAct, GateAct::silu>{});
    case GateAct::sigmoid:
      return with_act(std::integral_constant<GateAct, GateAct::sigmoid>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t gated_rms_fwd(const GatedRmsFwdParams& p, cudaStream_t stream) {
  return with_dtype_pair(p.t, p.w, [&](auto t_tag, auto w_tag) -> cudaError_t {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    return with_gate(p.act, p.norm_before_gate, [&](auto act_c, auto nbg_c) -> cudaError_t {
      return launch_fwd<T, W, decltype(act_c)::value, decltype(nbg_c)::value>(p, stream);
    });
  });
}

cudaError_t gated_rms_bwd(const GatedRmsBwdParams& p, Workspace ws, cudaStream_t stream) {
  return with_dtype_pair(p.t, p.w, [&](auto t_tag, auto w_tag) -> cudaError_t {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    return with_gate(p.act, p.norm_before_gate, [&](auto act_c, auto nbg_c) -> cudaError_t {
      return launch_bwd<T, W, decltype(act_c)::value, decltype(nbg_c)::value>(p, ws, stream);
    });
  });
}

RMSNORM_EXT_REGISTER_CUDA_KERNEL(GatedRmsFwd, gated_rms_fwd);
RMSNORM_EXT_REGISTER_CUDA_KERNEL(GatedRmsBwd, gated_rms_bwd);

}  // namespace cuda
}  // namespace rmsnorm_ext
