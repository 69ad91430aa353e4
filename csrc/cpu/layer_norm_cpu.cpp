// CPU kernels for LayerNorm: forward and backward.
//
// Forward reads a row from memory once and makes three passes over it while it sits in
// L1/L2: the mean, then the variance as sum((x - mean)^2) (two-pass, so a large mean does
// not cancel the variance away as E[x^2] - E[x]^2 would), then the output.
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

template <typename T, typename V>
inline void load_step(const T* p, int64_t j, int64_t n, V& a, V& b) {
  RowIO<T>::load_n(p + j, n, a, b);
}

template <typename T, typename V>
inline void store_step(T* p, int64_t j, int64_t n, const V& a, const V& b) {
  RowIO<T>::store_n(p + j, n, a, b);
}

// y = (x - mean) * rstd * w + bias of one row (w, bias may be null). `next` (may be null):
// a row read soon, prefetched while this one is written (as rms_norm's row_scale). The whole
// steps loop on their own and the partial last step goes through load_part / store_part
// (row_group_stats.h): no call in the loop, so its vectors stay in registers.
// xr: the row as T, or as fp32 where ln_row_stats kept it so (X = float).
template <typename X, typename T>
inline void ln_out_row(const X* xr, T* yr, acc_t<T> mean, acc_t<T> rstd, const acc_t<T>* w,
                       const acc_t<T>* bias, int64_t N, const T* next) {
  using IO = RowIO<T>;
  using A = acc_t<T>;
  using V = typename IO::V;
  constexpr int64_t S = IO::kStep;
  const V vm(mean), vr(rstd);
  auto step = [&](int64_t j, int64_t n) {
    V a, b, wa(A(1)), wb(A(1)), ba(A(0)), bb(A(0));
    load_part(xr + j, n, a, b);
    if (w) load_part<A>(w + j, n, wa, wb);
    if (bias) load_part<A>(bias + j, n, ba, bb);
    a = affine_out(a - vm, vr, w != nullptr, wa, bias != nullptr, ba);
    b = affine_out(b - vm, vr, w != nullptr, wb, bias != nullptr, bb);
    store_part(yr + j, n, a, b);
  };
  int64_t j = 0;
  for (; j + S <= N; j += S) {
    prefetch_step<T, S>(next, j);
    step(j, S);
  }
  if (j < N) {
    prefetch_step<T, S>(next, j);
    step(j, N - j);
  }
}

// kKeep: bfloat16 / float16 rows converted to fp32 once, by the first pass (with_keep,
// row_stats.h).
template <typename T, bool kKeep>
void ln_fwd_rows(const T* x, T* y, acc_t<T>* mean_out, acc_t<T>* rstd_out, const acc_t<T>* w,
                 const acc_t<T>* bias, int64_t M, int64_t N, double eps) {
  const OutputPrefault pf(y, M, N * static_cast<int64_t>(sizeof(T)));
  at::parallel_for(0, M, row_grain(N), [&](int64_t rb, int64_t re) {
    // Short rows: the statistics of a group of rows at once (row_group_stats.h), then
    // their outputs; each output pass prefetches its row of the next group.
    const auto keep = group_keep_scratch<T, kKeep>(N);
    for_row_groups<T>(rb, re, N, [&](int64_t i, auto rows) {
      constexpr int R = decltype(rows)::value;
      const T* xg = x + i * N;
      const auto st = ln_rows_stats<R, T, kKeep>(xg, N, eps, keep.get());
      for (int r = 0; r < R; ++r) {
        pf.before_row(i + r, rb, re);
        mean_out[i + r] = st[r].mean;
        rstd_out[i + r] = st[r].rstd;
        const T* next = i + R + r < re ? xg + (R + r) * N : nullptr;
        ln_out_row(group_row<kKeep>(xg, keep.get(), N, r), y + (i + r) * N, st[r].mean,
                   st[r].rstd, w, bias, N, next);
      }
    });
  });
}

// dx of one row, the backward's second pass: dx = rstd * (g - c1 - xhat * c2); dwp += dy *
// xhat, dbp += dy (each may be null). next_dy / next_x: as rms_bwd_row_dx's (a function of
// its own for the same reason: its pointers stay in registers).
template <typename T>
inline void ln_bwd_row_dx(const T* dyr, const T* xr, const acc_t<T>* w, T* dxr, acc_t<T>* dwp,
                          acc_t<T>* dbp, acc_t<T> mean, acc_t<T> rstd, acc_t<T> c1,
                          acc_t<T> c2, int64_t N, const T* next_dy, const T* next_x) {
  using A = acc_t<T>;
  using V = typename RowIO<T>::V;
  constexpr int64_t S = RowIO<T>::kStep;
  const V vm(mean), vr(rstd), vc1(c1), vc2(c2);
  for (int64_t j = 0; j < N; j += S) {
    const int64_t n = std::min(S, N - j);
    prefetch_step<T, S, 2>(next_dy, j);
    prefetch_step<T, S, 2>(next_x, j);
    V ga, gb, xa, xb, wa, wb;
    load_step(dyr, j, n, ga, gb);
    load_step(xr, j, n, xa, xb);
    xa = (xa - vm) * vr;  // xhat
    xb = (xb - vm) * vr;
    if (dwp) {
      V pa, pb;
      RowIO<A>::load(dwp + j, pa, pb);
      RowIO<A>::store(dwp + j, at::vec::fmadd(ga, xa, pa), at::vec::fmadd(gb, xb, pb));
    }
    if (dbp) {
      V pa, pb;
      RowIO<A>::load(dbp + j, pa, pb);
      RowIO<A>::store(dbp + j, pa + ga, pb + gb);
    }
    if (w) {
      load_step(w, j, n, wa, wb);
      ga = ga * wa;
      gb = gb * wb;
    }
    store_step(dxr, j, n, (ga - vc1 - xa * vc2) * vr, (gb - vc1 - xb * vc2) * vr);
  }
}

// xhat = (x - mean) * rstd, g = dy * w:
// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
// dwp / dbp (may be null): the partial rows of sum(dy * xhat) and sum(dy) that rows
// [row_begin, row_end) add to. pf: backs dx's pages ahead of the stores (prefault.h). Rows
// below prefetch_end are prefetched (as rms_bwd_rows).
template <typename T>
void ln_bwd_rows(const T* dy, const T* x, const acc_t<T>* mean, const acc_t<T>* rstd,
                 const acc_t<T>* w, T* dx, acc_t<T>* dwp, acc_t<T>* dbp, int64_t row_begin,
                 int64_t row_end, int64_t N, const OutputPrefault& pf, int64_t prefetch_end) {
  using IO = RowIO<T>;
  using A = acc_t<T>;
  using V = typename IO::V;
  constexpr int64_t S = IO::kStep;
  const A inv_n = A(1) / static_cast<A>(N);
  // Short rows in groups (row_group_stats.h): every row's sums, then their horizontal
  // reductions at once, then every row's dx; a row's arithmetic is the same in a group.
  for_row_groups<T>(row_begin, row_end, N, [&](int64_t i0, auto rows) {
    constexpr int R = decltype(rows)::value;
    RowVecs<V, R> sg, sgx;  // per row: sum(g), sum(g * xhat) lane-wise
    // Padded tail lanes: dy = 0 there, so g = 0 and every product below is 0.
    group_pass<R, S, V>(
        N,
        [&](int r, int64_t j, int64_t n, Acc4<V>& p) {
          const int64_t i = i0 + r;
          const V vm(mean[i]), vr(rstd[i]);
          V ga, gb, xa, xb, wa, wb;
          load_step(dy + i * N, j, n, ga, gb);
          load_step(x + i * N, j, n, xa, xb);
          if (w) {
            load_step(w, j, n, wa, wb);
            ga = ga * wa;
            gb = gb * wb;
          }
          p.p0 = p.p0 + ga;
          p.p1 = p.p1 + gb;
          p.p2 = at::vec::fmadd(ga, (xa - vm) * vr, p.p2);
          p.p3 = at::vec::fmadd(gb, (xb - vm) * vr, p.p3);
        },
        [&](int r, const Acc4<V>& t) {
          sg.set(r, t.p0 + t.p1);
          sgx.set(r, t.p2 + t.p3);
        });
    alignas(64) A c1s[V::size()], c2s[V::size()];
    (hsum_rows<R>(sg) * V(inv_n)).store(c1s);
    (hsum_rows<R>(sgx) * V(inv_n)).store(c2s);
    for (int r = 0; r < R; ++r) {
      const int64_t i = i0 + r;
      pf.before_row(i, row_begin, row_end);
      const bool pf_next = i + R < prefetch_end;  // the row a pass R rows on reads
      ln_bwd_row_dx<T>(dy + i * N, x + i * N, w, dx + i * N, dwp, dbp, mean[i], rstd[i], c1s[r],
                       c2s[r], N, pf_next ? dy + (i + R) * N : nullptr,
                       pf_next ? x + (i + R) * N : nullptr);
    }
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Entries, registered below (RMSNORM_EXT_REGISTER_CPU_KERNEL, kernel_registry.h)

void ln_fwd(const LnFwdParams& p, const Launch& l) {
  if (p.inner > 1) return ln_fwd_channels_first(p, l);
  dispatch_pair(p.t, p.w, [&](auto t_tag, auto w_tag) {
    using T = typename decltype(t_tag)::type;
    using W = typename decltype(w_tag)::type;
    using A = acc_t<T>;
    EffectiveParam<A> wp(static_cast<const W*>(p.weight), p.N, 0.0);
    EffectiveParam<A> bp(static_cast<const W*>(p.bias), p.N, 0.0);
    with_keep<T>(p.N, 2, [&](auto keep) {  // the variance and the output pass
      ln_fwd_rows<T, decltype(keep)::value>(static_cast<const T*>(p.x), static_cast<T*>(p.y),
                                            static_cast<A*>(p.mean), static_cast<A*>(p.rstd),
                                            wp.get(), bp.get(), p.M, p.N, p.eps);
    });
  });
}

void ln_bwd(const LnBwdParams& p, const Launch& l) {
  if (p.inner > 1) return ln_bwd_channels_first(p, l);
  dispatch_pair(p.t, p.w, [&](auto t_tag, auto w_tag) {
    using T = typename decltype(t_tag)::type;
    using W = typename decltype(w_tag)::type;
    using A = acc_t<T>;
    EffectiveParam<A> wp(static_cast<const W*>(p.weight), p.N, 0.0);
    const T* dyp = static_cast<const T*>(p.dy);
    const T* xp = static_cast<const T*>(p.x);
    const A* mp = static_cast<const A*>(p.mean);
    const A* rp = static_cast<const A*>(p.rstd);
    T* dxp = static_cast<T*>(p.dx);
    const OutputPrefault pf(dxp, p.M, p.N * static_cast<int64_t>(sizeof(T)));
    const bool want_dw = p.dw != nullptr;
    const bool want_db = p.db != nullptr;
    if (!want_dw && !want_db) {
      at::parallel_for(0, p.M, row_grain(p.N), [&](int64_t b, int64_t e) {
        ln_bwd_rows<T>(dyp, xp, mp, rp, wp.get(), dxp, nullptr, nullptr, b, e, p.N, pf, e);
      });
      return;
    }
    const RowChunks chunks(p.M, p.N);
    const int64_t stride = padded<A>(p.N);
    // Each partial row: [dweight | dbias] (only the wanted ones), each padded to a whole step.
    const int64_t db_off = want_dw ? stride : 0;
    const TreeWorkspace<A> ws(l.ws, chunks, (want_dw + want_db) * stride);
    std::vector<A*> sums(static_cast<size_t>(chunks.count));
    for_each_chunk(chunks, [&](int64_t c) {
      PartialTree<A> tree = ws.tree(c);
      for_each_block(tree, chunks.begin(c), chunks.end(c), [&](int64_t b, int64_t e, A* part) {
        ln_bwd_rows<T>(dyp, xp, mp, rp, wp.get(), dxp, want_dw ? part : nullptr,
                       want_db ? part + db_off : nullptr, b, e, p.N, pf, chunks.end(c));
      });
      sums[c] = tree.finish();
    });
    // dw and db have dtype W (the weight's, or T without a weight: then W == T).
    if (want_dw) sum_chunk_rows<A, W>(sums, 0, p.N, static_cast<W*>(p.dw));
    if (want_db) sum_chunk_rows<A, W>(sums, db_off, p.N, static_cast<W*>(p.db));
  });
}

RMSNORM_EXT_REGISTER_CPU_KERNEL(LnFwd, ln_fwd);
RMSNORM_EXT_REGISTER_CPU_KERNEL(LnBwd, ln_bwd);

}  // namespace rmsnorm_ext::cpu
