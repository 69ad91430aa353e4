// CPU kernels of gated RMSNorm, forward and backward (see GatedRmsFwdParams in
// ../kernel_params.h). Rows run in parallel; within a row, each group of G = p.group
// elements is normalized on its own (G == N: the whole row), in two passes over the group
// (a reduction, then the outputs), the second mostly from L1/L2. Math in acc_t<T> (fp32,
// fp64 for fp64 data); each output is rounded to T once.
//
// With a = act(g), a' = act'(g), w = 1 without a weight:
//   norm_before_gate (NBG):  xhat = x * r, y = xhat * w * a, r = rstd(x)
//     u  = dy * w * a                      (the gradient reaching xhat)
//     dx = r * (u - xhat * c),  c = r * mean_group(u * x)  (= mean_group(u * xhat))
//     dg = dy * w * xhat * a'
//     dw = sum over rows of dy * xhat * a
//   gate first (!NBG):       z = x * a, zhat = z * r, y = zhat * w, r = rstd(z)
//     dz = r * (dy * w - zhat * c),  c = r * mean_group(dy * w * z)
//     dx = dz * a,  dg = dz * x * a'
//     dw = sum over rows of dy * zhat
// (c grouped as in rms_norm_cpu.cpp, so no intermediate outgrows the result.)
#include "dispatch.h"
#include "kernels.h"
#include "param_rows.h"
#include "prefault.h"
#include "row_stats.h"
#include "vec_io.h"
#include "vec_math.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace rmsnorm_ext::cpu {
namespace {

// The gate activation and its derivative, elementwise. sigmoid(g) and 1 - sigmoid(g) both
// come from e = exp(-|g|) <= 1: for g >= 0, s = 1 / (1 + e) and 1 - s = e / (1 + e); for
// g < 0 the two swap. Nothing overflows for any |g|, and 1 - s keeps its relative accuracy
// where s rounds to 1. A NaN gate gives NaN. kFast (bfloat16 / float16 data): exp and the
// reciprocal from vec_math.h, accurate far beyond the output's rounding; the larger of the
// two is then 1 - q rather than the estimated reciprocal, so that it is exactly 1 where
// e = 0 (a +-inf or large gate), as with the division.
template <GateAct ACT, typename A, bool kFast>
struct Gate {
  using V = Vectorized<A>;

  // Forced inline: as a call (GCC's choice) its vectors went through the stack every step.
  C10_ALWAYS_INLINE static void sigmoid2(const V& g, V& s, V& sc) {
    const V one(A(1));
    const V e = exp_nonpos<kFast>(g.abs().neg());
    const V r = recip_of<kFast>(one + e);
    const V q = e * r;                      // min(s, 1 - s)
    const V big = kFast ? one - q : r;      // max(s, 1 - s)
    const V pos = g >= V(A(0));  // all-ones lanes where g >= 0 (false for NaN)
    s = V::blendv(q, big, pos);
    sc = V::blendv(big, q, pos);
  }

  C10_ALWAYS_INLINE static V act(const V& g) {
    V s, sc;
    sigmoid2(g, s, sc);
    if constexpr (ACT == GateAct::silu) {
      return g * s;
    } else {
      return s;
    }
  }

  // a = act(g), da = act'(g): silu' = s (1 + g (1 - s)), sigmoid' = s (1 - s).
  C10_ALWAYS_INLINE static void act_grad(const V& g, V& a, V& da) {
    V s, sc;
    sigmoid2(g, s, sc);
    if constexpr (ACT == GateAct::silu) {
      a = g * s;
      da = s * (V(A(1)) + g * sc);
    } else {
      a = s;
      da = s * sc;
    }
  }
};

// Pass 1 of the forward over one group of n elements: the sum of squares that gives rstd and,
// into s (n floats), what pass 2 needs of the gate: NBG: s = act(g) and the sum is over x
// (row_sumsq's accumulation order, so rstd equals rms_norm's); gate first: s = z = x * act(g)
// and the sum is over z. The activation, the longest chain of the op, is computed once per
// element, in the pass whose other work (an FMA per vector) is short. The zero-padded tail
// lanes have x = 0, so z = 0 there.
template <typename T, GateAct ACT, bool NBG>
acc_t<T> gated_pass1(const T* x, const T* g, int64_t n, acc_t<T>* s) {
  using IO = RowIO<T>;
  using A = acc_t<T>;
  using AIO = RowIO<A>;
  using V = typename IO::V;
  using GA = Gate<ACT, A, kReducedPrecision<T>>;
  constexpr int64_t S = IO::kStep;
  const auto t = blocked_row_sum<4, V>(n, 2 * S, [&](int64_t j, int64_t m, auto& p) {
    V a, b, c, d, ga, gb, gc, gd;
    IO::load2_n(x + j, m, a, b, c, d);
    IO::load2_n(g + j, m, ga, gb, gc, gd);
    ga = GA::act(ga);
    gb = GA::act(gb);
    gc = GA::act(gc);
    gd = GA::act(gd);
    if constexpr (!NBG) {
      a = a * ga;
      b = b * gb;
      c = c * gc;
      d = d * gd;
    }
    const V& sa = NBG ? ga : a;
    const V& sb = NBG ? gb : b;
    AIO::store_n(s + j, std::min(m, S), sa, sb);
    if (m > S) AIO::store_n(s + j + S, m - S, NBG ? gc : c, NBG ? gd : d);
    p[0] = at::vec::fmadd(a, a, p[0]);
    p[1] = at::vec::fmadd(b, b, p[1]);
    p[2] = at::vec::fmadd(c, c, p[2]);
    p[3] = at::vec::fmadd(d, d, p[3]);
  });
  return reduce_add((t[0] + t[1]) + (t[2] + t[3]));
}

// Pass 2: y of one group of n elements from pass 1's s (w: the group's weights, or null).
// NBG: y = ((x * r) * w) * act(g); gate first: y = (z * r) * w.
template <typename T, bool NBG>
void gated_group_out(const T* x, const acc_t<T>* s, const acc_t<T>* w, acc_t<T> r, int64_t n,
                     T* y) {
  using IO = RowIO<T>;
  using A = acc_t<T>;
  using AIO = RowIO<A>;
  using V = typename IO::V;
  constexpr int64_t S = IO::kStep;
  const V vr(r);
  for (int64_t j = 0; j < n; j += S) {
    const int64_t m = std::min(S, n - j);
    V xa, xb, sa, sb, wa, wb;
    AIO::load_n(s + j, m, sa, sb);
    if constexpr (NBG) {
      IO::load_n(x + j, m, xa, xb);
      xa = xa * vr;
      xb = xb * vr;
    } else {
      xa = sa * vr;
      xb = sb * vr;
    }
    if (w) {
      AIO::load_n(w + j, m, wa, wb);
      xa = xa * wa;
      xb = xb * wb;
    }
    if constexpr (NBG) {
      xa = xa * sa;
      xb = xb * sb;
    }
    IO::store_n(y + j, m, xa, xb);
  }
}

template <typename T, GateAct ACT, bool NBG>
void gated_fwd_rows(const GatedRmsFwdParams& p, const acc_t<T>* w) {
  using A = acc_t<T>;
  const T* x = static_cast<const T*>(p.x);
  const T* g = static_cast<const T*>(p.gate);
  T* y = static_cast<T*>(p.y);
  A* rstd = static_cast<A*>(p.rstd);
  const int64_t N = p.N;
  const int64_t G = p.group;
  const int64_t groups = N / G;
  const OutputPrefault pf(y, p.M, N * static_cast<int64_t>(sizeof(T)));
  at::parallel_for(0, p.M, row_grain(N), [&](int64_t b, int64_t e) {
    std::vector<A> s(static_cast<size_t>(G));  // pass 1 -> pass 2, one group at a time
    for (int64_t i = b; i < e; ++i) {
      pf.before_row(i, b, e);
      for (int64_t k = 0; k < groups; ++k) {
        const int64_t off = i * N + k * G;
        const A ss = gated_pass1<T, ACT, NBG>(x + off, g + off, G, s.data());
        const A r = rstd_from(ss, G, p.eps);
        rstd[i * groups + k] = r;
        gated_group_out<T, NBG>(x + off, s.data(), w ? w + k * G : nullptr, r, G, y + off);
      }
    }
  });
}

// The backward of one group of n elements: dx, dg and, when dwp is not null, dwp += the
// group's weight-gradient terms. w: the group's weights, or null. sa, sd: 2 x n floats of
// scratch, where pass 1 leaves act(g) and act'(g) for pass 2 (computed once per element).
template <typename T, GateAct ACT, bool NBG>
void gated_group_bwd(const T* dy, const T* x, const T* g, const acc_t<T>* w, acc_t<T> r,
                     int64_t n, T* dx, T* dg, acc_t<T>* dwp, acc_t<T>* sa, acc_t<T>* sd) {
  using IO = RowIO<T>;
  using A = acc_t<T>;
  using AIO = RowIO<A>;
  using V = typename IO::V;
  using GA = Gate<ACT, A, kReducedPrecision<T>>;
  constexpr int64_t S = IO::kStep;
  V ya, yb, xa, xb, ga, gb, wa, wb;
  // dy * w (dy without a weight) of one step (m < S: a zero-padded tail) into ya, yb.
  auto load = [&](int64_t j, int64_t m) {
    IO::load_n(dy + j, m, ya, yb);
    IO::load_n(x + j, m, xa, xb);
    if (w) {
      AIO::load_n(w + j, m, wa, wb);
      ya = ya * wa;
      yb = yb * wb;
    }
  };
  // Pass 1: sum(u * x) (NBG, u = dy * w * a) or sum(dy * w * z) (z = x * a).
  const auto t = blocked_row_sum<2, V>(n, S, [&](int64_t j, int64_t m, auto& p) {
    load(j, m);
    IO::load_n(g + j, m, ga, gb);
    V aa, ab, da, db;
    GA::act_grad(ga, aa, da);
    GA::act_grad(gb, ab, db);
    AIO::store_n(sa + j, m, aa, ab);
    AIO::store_n(sd + j, m, da, db);
    if constexpr (NBG) {
      p[0] = at::vec::fmadd(ya * aa, xa, p[0]);
      p[1] = at::vec::fmadd(yb * ab, xb, p[1]);
    } else {
      p[0] = at::vec::fmadd(ya, xa * aa, p[0]);
      p[1] = at::vec::fmadd(yb, xb * ab, p[1]);
    }
  });
  const A c = r * (reduce_add(t[0] + t[1]) / static_cast<A>(n));
  const V vr(r), vc(c);
  // Pass 2: the same products as pass 1 (act, act' from the scratch), then the outputs.
  for (int64_t j = 0; j < n; j += S) {
    const int64_t m = std::min(S, n - j);
    load(j, m);
    V aa, ab, da, db;
    AIO::load_n(sa + j, m, aa, ab);
    AIO::load_n(sd + j, m, da, db);
    V ox_a, ox_b, og_a, og_b, tw_a, tw_b;  // dx, dg, the dw term over dy
    if constexpr (NBG) {
      const V ha = xa * vr;  // xhat
      const V hb = xb * vr;
      ox_a = (ya * aa - ha * vc) * vr;
      ox_b = (yb * ab - hb * vc) * vr;
      og_a = (ya * ha) * da;
      og_b = (yb * hb) * db;
      tw_a = ha * aa;
      tw_b = hb * ab;
    } else {
      const V za = xa * aa;
      const V zb = xb * ab;
      const V ha = za * vr;  // zhat
      const V hb = zb * vr;
      const V dza = (ya - ha * vc) * vr;
      const V dzb = (yb - hb * vc) * vr;
      ox_a = dza * aa;
      ox_b = dzb * ab;
      og_a = (dza * xa) * da;
      og_b = (dzb * xb) * db;
      tw_a = ha;
      tw_b = hb;
    }
    IO::store_n(dx + j, m, ox_a, ox_b);
    IO::store_n(dg + j, m, og_a, og_b);
    if (dwp) {  // dweight += dy * (xhat * a) or dy * zhat, with dy before the weight
      V dya, dyb, pa, pb;
      IO::load_n(dy + j, m, dya, dyb);
      AIO::load_n(dwp + j, m, pa, pb);
      AIO::store_n(dwp + j, m, at::vec::fmadd(dya, tw_a, pa), at::vec::fmadd(dyb, tw_b, pb));
    }
  }
}

// Rows [row_begin, row_end) of the backward; dwp (may be null): the partial row of the
// weight gradient that they add to.
template <typename T, GateAct ACT, bool NBG>
void gated_bwd_rows(const GatedRmsBwdParams& p, const acc_t<T>* w, acc_t<T>* dwp,
                    int64_t row_begin, int64_t row_end, const OutputPrefault& pf_dx,
                    const OutputPrefault& pf_dg) {
  using A = acc_t<T>;
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  const T* g = static_cast<const T*>(p.gate);
  const A* rstd = static_cast<const A*>(p.rstd);
  T* dx = static_cast<T*>(p.dx);
  T* dg = static_cast<T*>(p.dgate);
  const int64_t N = p.N;
  const int64_t G = p.group;
  const int64_t groups = N / G;
  std::vector<A> scratch(2 * static_cast<size_t>(G));  // act(g), act'(g): pass 1 -> pass 2
  for (int64_t i = row_begin; i < row_end; ++i) {
    pf_dx.before_row(i, row_begin, row_end);
    pf_dg.before_row(i, row_begin, row_end);
    for (int64_t k = 0; k < groups; ++k) {
      const int64_t off = i * N + k * G;
      gated_group_bwd<T, ACT, NBG>(dy + off, x + off, g + off, w ? w + k * G : nullptr,
                                   rstd[i * groups + k], G, dx + off, dg + off,
                                   dwp ? dwp + k * G : nullptr, scratch.data(),
                                   scratch.data() + G);
    }
  }
}

template <typename T, GateAct ACT, bool NBG, typename W>
void gated_bwd_impl(const GatedRmsBwdParams& p, const Launch& l, const acc_t<T>* w) {
  using A = acc_t<T>;
  const int64_t bytes = p.N * static_cast<int64_t>(sizeof(T));
  const OutputPrefault pf_dx(p.dx, p.M, bytes);
  const OutputPrefault pf_dg(p.dgate, p.M, bytes);
  if (p.dw == nullptr) {
    at::parallel_for(0, p.M, row_grain(p.N), [&](int64_t b, int64_t e) {
      gated_bwd_rows<T, ACT, NBG>(p, w, nullptr, b, e, pf_dx, pf_dg);
    });
    return;
  }
  // The weight gradient as a tree of sums over rows (param_rows.h), as rms_bwd does:
  // deterministic for a given thread count.
  const RowChunks chunks(p.M, p.N);
  const TreeWorkspace<A> ws(l.ws, chunks, padded<A>(p.N));
  std::vector<A*> sums(static_cast<size_t>(chunks.count));
  for_each_chunk(chunks, [&](int64_t c) {
    PartialTree<A> tree = ws.tree(c);
    for_each_block(tree, chunks.begin(c), chunks.end(c), [&](int64_t b, int64_t e, A* part) {
      gated_bwd_rows<T, ACT, NBG>(p, w, part, b, e, pf_dx, pf_dg);
    });
    sums[c] = tree.finish();
  });
  sum_chunk_rows<A, W>(sums, 0, p.N, static_cast<W*>(p.dw));
}

// Calls f(std::integral_constant<GateAct, ACT>{}, std::bool_constant<NBG>{}).
template <typename F>
void dispatch_gate(GateAct act, bool norm_before_gate, F&& f) {
  auto with_act = [&](auto act_c) {
    if (norm_before_gate) return f(act_c, std::true_type{});
    f(act_c, std::false_type{});
  };
  switch (act) {
    case GateAct::silu:
      return with_act(std::integral_constant<GateAct, GateAct::silu>{});
    case GateAct::sigmoid:
      return with_act(std::integral_constant<GateAct, GateAct::sigmoid>{});
  }
  TORCH_CHECK(false, "rmsnorm_ext: unknown gate activation tag ", static_cast<int>(act));
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Entries, registered below (RMSNORM_EXT_REGISTER_CPU_KERNEL, kernel_registry.h)

void gated_rms_fwd(const GatedRmsFwdParams& p, const Launch&) {
  dispatch_pair(p.t, p.w, [&](auto t_tag, auto w_tag) {
    using T = typename decltype(t_tag)::type;
    using W = typename decltype(w_tag)::type;
    EffectiveParam<acc_t<T>> wp(static_cast<const W*>(p.weight), p.N, 0.0);
    dispatch_gate(p.act, p.norm_before_gate, [&](auto act_c, auto nbg_c) {
      gated_fwd_rows<T, decltype(act_c)::value, decltype(nbg_c)::value>(p, wp.get());
    });
  });
}

void gated_rms_bwd(const GatedRmsBwdParams& p, const Launch& l) {
  dispatch_pair(p.t, p.w, [&](auto t_tag, auto w_tag) {
    using T = typename decltype(t_tag)::type;
    using W = typename decltype(w_tag)::type;
    EffectiveParam<acc_t<T>> wp(static_cast<const W*>(p.weight), p.N, 0.0);
    dispatch_gate(p.act, p.norm_before_gate, [&](auto act_c, auto nbg_c) {
      gated_bwd_impl<T, decltype(act_c)::value, decltype(nbg_c)::value, W>(p, l, wp.get());
    });
  });
}

RMSNORM_EXT_REGISTER_CPU_KERNEL(GatedRmsFwd, gated_rms_fwd);
RMSNORM_EXT_REGISTER_CPU_KERNEL(GatedRmsBwd, gated_rms_bwd);

}  // namespace rmsnorm_ext::cpu
