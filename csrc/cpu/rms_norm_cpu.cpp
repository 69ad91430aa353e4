// CPU kernels for RMSNorm: forward, backward and the fused residual add.
//
// Each row is read from memory once: the first pass (sum of squares) brings it into L1/L2
// and the second pass (scale and store) re-reads it from there. Rows run in parallel;
// nothing here calls ATen math.
#include "dispatch.h"
#include "kernels.h"
#include "param_rows.h"
#include "prefault.h"
#include "row_group_stats.h"
#include "row_stats.h"
#include "vec_io.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <memory>

namespace rmsnorm_ext::cpu {
namespace {

// y = x * rstd * w  (w == nullptr: no weight). x and y may alias. `next` (may be null):
// the row the caller reads next, prefetched while this one is written, so its trip from
// memory overlaps this row's arithmetic and stores instead of following them.
// x may be the row kept as fp32 (T = float) while next is a row of the op's type NT.
template <typename T, typename Y, typename NT = T>
void row_scale(const T* x, const acc_t<T>* w, acc_t<T> rstd, int64_t N, Y* y,
               const NT* next = nullptr) {
  using IO = RowIO<T>;
  using OUT = RowIO<Y>;
  using A = acc_t<T>;
  using V = typename IO::V;
  using WIO = RowIO<A>;
  static_assert(std::is_same_v<A, acc_t<Y>>);
  const V r(rstd);
  V a, b, wa, wb;
  int64_t j = 0;
  for (; j + IO::kStep <= N; j += IO::kStep) {
    prefetch_step<NT, IO::kStep>(next, j);
    IO::load(x + j, a, b);
    a = a * r;
    b = b * r;
    if (w) {
      WIO::load(w + j, wa, wb);
      a = a * wa;
      b = b * wb;
    }
    OUT::store(y + j, a, b);
  }
  if (j < N) {  // load_part / store_part (row_group_stats.h): no memcpy call in this function
    load_part(x + j, N - j, a, b);
    a = a * r;
    b = b * r;
    if (w) {
      load_part(w + j, N - j, wa, wb);
      a = a * wa;
      b = b * wb;
    }
    store_part(y + j, N - j, a, b);
  }
}

// kKeep: bfloat16 / float16 rows converted to fp32 once, by the first pass (with_keep,
// row_stats.h).
template <typename T, bool kKeep>
void rms_fwd_rows(const T* x, T* y, acc_t<T>* rstd, const acc_t<T>* w, int64_t M, int64_t N,
                  double eps) {
  const OutputPrefault pf(y, M, N * static_cast<int64_t>(sizeof(T)));
  at::parallel_for(0, M, row_grain(N), [&](int64_t b, int64_t e) {
    // Short rows: the rstd of a group of rows at once (row_group_stats.h), then their
    // outputs; each output pass prefetches its row of the next group.
    const auto keep = group_keep_scratch<T, kKeep>(N);
    for_row_groups<T>(b, e, N, [&](int64_t i, auto rows) {
      constexpr int R = decltype(rows)::value;
      const T* xg = x + i * N;
      const auto rs = rows_rstd<R, T, kKeep>(xg, N, eps, keep.get());
      for (int r = 0; r < R; ++r) {
        pf.before_row(i + r, b, e);
        rstd[i + r] = rs[r];
        const T* next = i + R + r < e ? xg + (R + r) * N : nullptr;
        row_scale(group_row<kKeep>(xg, keep.get(), N, r), w, rs[r], N, y + (i + r) * N, next);
      }
    });
  });
}

// h = x + r (rounded to R), y = rms_norm(h) in T. h may alias r and y may alias x
// (the in-place variant): each row's reads of x and r finish before y is written.
template <typename T, typename R>
void fused_add_rows(const T* x, const R* r, R* h, T* y, acc_t<T>* rstd, const acc_t<T>* w,
                    int64_t M, int64_t N, double eps) {
  using A = acc_t<T>;
  static_assert(std::is_same_v<A, acc_t<R>>);
  // Fresh outputs only (the in-place variant writes its operands): prefault.h.
  const OutputPrefault pf_h(static_cast<const void*>(h) == r ? nullptr : h, M,
                            N * static_cast<int64_t>(sizeof(R)));
  const OutputPrefault pf_y(static_cast<const void*>(y) == x ? nullptr : y, M,
                            N * static_cast<int64_t>(sizeof(T)));
  at::parallel_for(0, M, row_grain(N), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      pf_h.before_row(i, b, e);
      pf_y.before_row(i, b, e);
      const T* xr = x + i * N;
      const R* rr = r + i * N;
      R* hr = h + i * N;
      const A rs = rstd_from(fused_add_row_sumsq<T, R>(xr, rr, hr, N), N, eps);
      rstd[i] = rs;
      row_scale(static_cast<const R*>(hr), w, rs, N, y + i * N);
    }
  });
}

// dx of one row, the backward's second pass: dx = r * (g - xhat * c) (+ the residual's
// gradient gr, may be null), dwp += dy * xhat (may be null). next_dy / next_x (may be null):
// a row read soon, prefetched into L2 (this pass reads its row from L1/L2 and leaves memory
// idle; into L2: its own 5 rows of traffic would evict the row from L1). A function of its
// own: its pointers arrive as values, which GCC keeps in registers across the stores (a
// lambda's captures are reloaded after every store, the build not assuming strict aliasing:
// fp32 [512, 768] 145 -> 210 us).
template <typename X, typename G>
inline void rms_bwd_row_dx(const G* dyr, const X* xr, const acc_t<X>* w, const X* gr, X* dxr,
                           acc_t<X>* dwp, acc_t<X> rs, acc_t<X> c, int64_t N,
                           const G* next_dy, const X* next_x) {
  using XIO = RowIO<X>;
  using GIO = RowIO<G>;
  using AIO = RowIO<acc_t<X>>;
  using V = typename XIO::V;
  constexpr int64_t S = XIO::kStep;
  const V vr(rs), vc(c);
  for (int64_t j = 0; j < N; j += S) {
    const int64_t n = std::min(S, N - j);
    prefetch_step<G, S, 2>(next_dy, j);
    prefetch_step<X, S, 2>(next_x, j);
    V ga, gb, xa, xb, wa, wb;
    GIO::load_n(dyr + j, n, ga, gb);
    XIO::load_n(xr + j, n, xa, xb);
    xa = xa * vr;  // xhat
    xb = xb * vr;
    if (dwp) {  // dweight += dy * xhat (before dy is scaled by w)
      V pa, pb;
      AIO::load(dwp + j, pa, pb);  // dwp rows are padded to a whole step
      AIO::store(dwp + j, at::vec::fmadd(ga, xa, pa), at::vec::fmadd(gb, xb, pb));
    }
    if (w) {
      AIO::load_n(w + j, n, wa, wb);
      ga = ga * wa;
      gb = gb * wb;
    }
    V da = (ga - xa * vc) * vr;
    V db = (gb - xb * vc) * vr;
    if (gr) {
      V ra, rb;
      XIO::load_n(gr + j, n, ra, rb);
      da = da + ra;
      db = db + rb;
    }
    XIO::store_n(dxr + j, n, da, db);
  }
}

// dx = rstd * (g - xhat * rstd * mean(g * x)) (+ grad_residual), g = dy * w, xhat = x * rstd.
// dwp (may be null): the partial row of sum(dy * xhat) that rows [row_begin, row_end) add to.
// pf: backs dx's pages ahead of the stores (prefault.h). Rows below prefetch_end are
// prefetched, so a block's last row prefetches the next block's first.
template <typename X, typename G>
void rms_bwd_rows(const G* dy, const X* x, const acc_t<X>* rstd, const acc_t<X>* w,
                  const X* gres, X* dx, acc_t<X>* dwp, int64_t row_begin, int64_t row_end,
                  int64_t N, const OutputPrefault& pf, int64_t prefetch_end) {
  using XIO = RowIO<X>;
  using GIO = RowIO<G>;
  using A = acc_t<X>;
  using AIO = RowIO<A>;
  using V = typename XIO::V;
  static_assert(std::is_same_v<A, acc_t<G>>);
  constexpr int64_t S = XIO::kStep;
  // Short rows in groups (row_group_stats.h): every row's sum(g * x), their horizontal
  // reductions at once, then every row's dx; a row's arithmetic is the same in a group.
  for_row_groups<X>(row_begin, row_end, N, [&](int64_t i0, auto rows) {
    constexpr int R = decltype(rows)::value;
    RowVecs<V, R> sgx;
    group_pass<R, S, V>(
        N,
        [&](int r, int64_t j, int64_t n, Acc4<V>& p) {
          V ga, gb, xa, xb, wa, wb;
          GIO::load_n(dy + (i0 + r) * N + j, n, ga, gb);
          XIO::load_n(x + (i0 + r) * N + j, n, xa, xb);
          if (w) {
            AIO::load_n(w + j, n, wa, wb);
            ga = ga * wa;
            gb = gb * wb;
          }
          p.p0 = at::vec::fmadd(ga, xa, p.p0);
          p.p1 = at::vec::fmadd(gb, xb, p.p1);
        },
        [&](int r, const Acc4<V>& t) { sgx.set(r, t.p0 + t.p1); });
    alignas(64) A means[V::size()];
    (hsum_rows<R>(sgx) / V(static_cast<A>(N))).store(means);
    for (int r = 0; r < R; ++r) {
      const int64_t i = i0 + r;
      pf.before_row(i, row_begin, row_end);
      const A rs = rstd[i];
      // c = r * mean(g * x): dx = r * (g - xhat * c) with xhat = x * r is the same value as
      // r * (g - x * r^2 * mean(g * x)), grouped so that no intermediate outgrows |dx|:
      // r^2 overflows fp32 for rms < ~5e-20 (eps = 0) and r^3 underflows for |x| >~ 1e13,
      // while xhat is O(1) and c is O(|g|). Same grouping as the CUDA kernel, so the two
      // agree.
      const bool pf_next = i + R < prefetch_end;  // the row a pass R rows on reads
      rms_bwd_row_dx<X, G>(dy + i * N, x + i * N, w, gres ? gres + i * N : nullptr, dx + i * N,
                           dwp, rs, rs * means[r], N, pf_next ? dy + (i + R) * N : nullptr,
                           pf_next ? x + (i + R) * N : nullptr);
    }
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Entries, registered below (RMSNORM_EXT_REGISTER_CPU_KERNEL, kernel_registry.h)

void rms_fwd(const RmsFwdParams& p, const Launch& l) {
  if (p.inner > 1) return rms_fwd_channels_first(p, l);
  dispatch_pair(p.t, p.w, [&](auto t_tag, auto w_tag) {
    using T = typename decltype(t_tag)::type;
    using W = typename decltype(w_tag)::type;
    using A = acc_t<T>;
    EffectiveParam<A> wp(static_cast<const W*>(p.weight), p.N, p.offset);
    with_keep<T>(p.N, 1, [&](auto keep) {  // the output pass
      rms_fwd_rows<T, decltype(keep)::value>(static_cast<const T*>(p.x), static_cast<T*>(p.y),
                                             static_cast<A*>(p.rstd), wp.get(), p.M, p.N, p.eps);
    });
  });
}

// x/y may alias and r/h may alias (the in-place variant).
void fused_add_rms_fwd(const RmsFwdParams& p, const Launch&) {
  dispatch_pair(p.t, p.w, [&](auto t_tag, auto w_tag) {
    using T = typename decltype(t_tag)::type;
    using W = typename decltype(w_tag)::type;
    using A = acc_t<T>;
    EffectiveParam<A> wp(static_cast<const W*>(p.weight), p.N, p.offset);
    dispatch_companion<T>(p.r, [&](auto r_tag) {
      using R = typename decltype(r_tag)::type;
      fused_add_rows<T, R>(static_cast<const T*>(p.x), static_cast<const R*>(p.r_in),
                           static_cast<R*>(p.h), static_cast<T*>(p.y), static_cast<A*>(p.rstd),
                           wp.get(), p.M, p.N, p.eps);
    });
  });
}

void rms_bwd(const RmsBwdParams& p, const Launch& l) {
  if (p.inner > 1) return rms_bwd_channels_first(p, l);
  // The weight goes with grad_out's dtype G; x is G, or float32 next to a half G.
  dispatch_pair(p.g, p.w, [&](auto g_tag, auto w_tag) {
    using G = typename decltype(g_tag)::type;
    using W = typename decltype(w_tag)::type;
    using A = acc_t<G>;
    EffectiveParam<A> wp(static_cast<const W*>(p.weight), p.N, p.offset);
    dispatch_companion<G>(p.x, [&](auto x_tag) {
      using X = typename decltype(x_tag)::type;
      const X* xptr = static_cast<const X*>(p.x_in);
      const G* dyp = static_cast<const G*>(p.dy);
      const A* rp = static_cast<const A*>(p.rstd);
      const X* gp = static_cast<const X*>(p.gres);
      X* dxp = static_cast<X*>(p.dx);
      const OutputPrefault pf(dxp, p.M, p.N * static_cast<int64_t>(sizeof(X)));
      if (p.dw == nullptr) {
        at::parallel_for(0, p.M, row_grain(p.N), [&](int64_t b, int64_t e) {
          rms_bwd_rows<X, G>(dyp, xptr, rp, wp.get(), gp, dxp, nullptr, b, e, p.N, pf, e);
        });
        return;
      }
      const RowChunks chunks(p.M, p.N);
      const TreeWorkspace<A> ws(l.ws, chunks, padded<A>(p.N));
      std::vector<A*> sums(static_cast<size_t>(chunks.count));
      for_each_chunk(chunks, [&](int64_t c) {
        PartialTree<A> tree = ws.tree(c);
        for_each_block(tree, chunks.begin(c), chunks.end(c), [&](int64_t b, int64_t e, A* part) {
          rms_bwd_rows<X, G>(dyp, xptr, rp, wp.get(), gp, dxp, part, b, e, p.N, pf,
                             chunks.end(c));
        });
        sums[c] = tree.finish();
      });
      sum_chunk_rows<A, W>(sums, 0, p.N, static_cast<W*>(p.dw));
    });
  });
}

RMSNORM_EXT_REGISTER_CPU_KERNEL(RmsFwd, rms_fwd);
RMSNORM_EXT_REGISTER_CPU_KERNEL(FusedAddRmsFwd, fused_add_rms_fwd);
RMSNORM_EXT_REGISTER_CPU_KERNEL(RmsBwd, rms_bwd);

}  // namespace rmsnorm_ext::cpu
