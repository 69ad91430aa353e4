// CPU kernels of fused QK-norm + RoPE, forward and backward (see QkNormRopeFwdParams in
// ../kernel_params.h). q and k are two passes of one row kernel; a row is one head vector
// of D elements, rows run in parallel. Math in acc_t<T> (fp32, fp64 for fp64 data); each
// output is rounded to T once.
//
// The rotation pairs element a with element b of a row. A "chunk" of a row holds two
// vectors (V0, V1) of a-elements and two of the matching b-elements:
//   rotate-half: a = j.., b = j + D/2.. (contiguous: plain loads at both offsets), chunks
//                of RowIO's step over the first half;
//   interleaved: a = 2i, b = 2i + 1 (adjacent: two steps are loaded and split into even
//                and odd lanes with at::vec::deinterleave2, stored back with interleave2),
//                chunks of two steps over the whole row.
// Tail chunks are zero-padded by RowIO (D is even, so a pair never straddles the tail).
//
// Forward, per row: r = rstd(v); u = v * r * w; out[a] = u[a] c[a] - u[b] s[a],
// out[b] = u[b] c[b] + u[a] s[b].
// Backward, per row: du[a] = g[a] c[a] + g[b] s[b], du[b] = g[b] c[b] - g[a] s[a];
// pass 1: k = r * mean(du * w * v); pass 2 (recomputing du): dv = r * (du * w - vhat * k),
// vhat = v * r, and dw += du * vhat, summed over rows as a tree (param_rows.h).
#include "dispatch.h"
#include "kernels.h"
#include "param_rows.h"
#include "prefault.h"
#include "row_stats.h"
#include "vec_io.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace rmsnorm_ext::cpu {
namespace {

// The a- and b-elements of one chunk of a row of U (converted to A = acc_t).
template <typename A>
struct Pairs {
  Vectorized<A> a0, a1, b0, b1;
};

template <typename A, bool IL>
struct Chunks {
  using V = Vectorized<A>;
  static constexpr int64_t S = RowIO<A>::kStep;
  // Elements a chunk covers, and the extent of the loop over chunk starts.
  static constexpr int64_t kChunk = IL ? 2 * S : S;
  static int64_t extent(int64_t D) { return IL ? D : D / 2; }

  // Chunk at j (n: its length, <= kChunk: a-elements for rotate-half, all for interleaved).
  template <typename U>
  static inline Pairs<A> load(const U* row, int64_t D, int64_t j, int64_t n) {
    using IO = RowIO<U>;
    static_assert(std::is_same_v<typename IO::V, V>);
    Pairs<A> p;
    if constexpr (!IL) {
      IO::load_n(row + j, n, p.a0, p.a1);
      IO::load_n(row + D / 2 + j, n, p.b0, p.b1);
    } else {
      V x0, x1, x2, x3;
      IO::load2_n(row + j, n, x0, x1, x2, x3);
      std::tie(p.a0, p.b0) = at::vec::deinterleave2(x0, x1);
      std::tie(p.a1, p.b1) = at::vec::deinterleave2(x2, x3);
    }
    return p;
  }

  // Ones where there is no weight.
  static inline Pairs<A> load_or_ones(const A* row, int64_t D, int64_t j, int64_t n) {
    if (row != nullptr) return load<A>(row, D, j, n);
    const V one(A(1));
    return {one, one, one, one};
  }

  template <typename U>
  static inline void store(U* row, int64_t D, int64_t j, int64_t n, const Pairs<A>& p) {
    using IO = RowIO<U>;
    if constexpr (!IL) {
      IO::store_n(row + j, n, p.a0, p.a1);
      IO::store_n(row + D / 2 + j, n, p.b0, p.b1);
    } else {
      auto [x0, x1] = at::vec::interleave2(p.a0, p.b0);
      IO::store_n(row + j, std::min(n, S), x0, x1);
      if (n > S) {
        auto [x2, x3] = at::vec::interleave2(p.a1, p.b1);
        IO::store_n(row + j + S, n - S, x2, x3);
      }
    }
  }
};

// One pass (q or k) of the forward.
template <typename T, typename C, bool IL>
void fwd_pass(const T* x, const acc_t<T>* w, const C* cos, const C* sin, T* y, acc_t<T>* rstd,
              int64_t rows, int64_t H, int64_t S, bool cs_per_batch, int64_t D, double eps) {
  using A = acc_t<T>;
  using CH = Chunks<A, IL>;
  const OutputPrefault pf(y, rows, D * static_cast<int64_t>(sizeof(T)));
  at::parallel_for(0, rows, row_grain(D), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      pf.before_row(i, b, e);
      const T* xr = x + i * D;
      const int64_t pos = i / H;
      const int64_t crow = cs_per_batch ? pos : pos % S;
      const C* cr = cos + crow * D;
      const C* sr = sin + crow * D;
      T* yr = y + i * D;
      const A r = rstd_from(row_sumsq(xr, D), D, eps);
      rstd[i] = r;
      const Vectorized<A> vr(r);
      const int64_t ext = CH::extent(D);
      for (int64_t j = 0; j < ext; j += CH::kChunk) {
        const int64_t n = std::min(CH::kChunk, ext - j);
        const Pairs<A> v = CH::load(xr, D, j, n);
        const Pairs<A> ww = CH::load_or_ones(w, D, j, n);
        const Pairs<A> c = CH::load(cr, D, j, n);
        const Pairs<A> s = CH::load(sr, D, j, n);
        const auto ua0 = (v.a0 * vr) * ww.a0, ua1 = (v.a1 * vr) * ww.a1;
        const auto ub0 = (v.b0 * vr) * ww.b0, ub1 = (v.b1 * vr) * ww.b1;
        Pairs<A> o;
        o.a0 = ua0 * c.a0 - ub0 * s.a0;
        o.a1 = ua1 * c.a1 - ub1 * s.a1;
        o.b0 = ub0 * c.b0 + ua0 * s.b0;
        o.b1 = ub1 * c.b1 + ua1 * s.b1;
        CH::store(yr, D, j, n, o);
      }
    }
  });
}

// The input gradient of one chunk before the weight: du = R^T (g), the inverse rotation.
template <typename A>
inline Pairs<A> unrotate(const Pairs<A>& g, const Pairs<A>& c, const Pairs<A>& s) {
  Pairs<A> d;
  d.a0 = g.a0 * c.a0 + g.b0 * s.b0;
  d.a1 = g.a1 * c.a1 + g.b1 * s.b1;
  d.b0 = g.b0 * c.b0 - g.a0 * s.a0;
  d.b1 = g.b1 * c.b1 - g.a1 * s.a1;
  return d;
}

// Rows [row_begin, row_end) of one pass of the backward; dwp (may be null): the partial
// row of the weight gradient they add to.
template <typename T, typename C, bool IL>
void bwd_rows(const T* dy, const T* x, const acc_t<T>* w, const C* cos, const C* sin,
              const acc_t<T>* rstd, T* dx, acc_t<T>* dwp, int64_t row_begin, int64_t row_end,
              int64_t H, int64_t S, bool cs_per_batch, int64_t D, const OutputPrefault& pf) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  using CH = Chunks<A, IL>;
  const int64_t ext = CH::extent(D);
  for (int64_t i = row_begin; i < row_end; ++i) {
    pf.before_row(i, row_begin, row_end);
    const T* xr = x + i * D;
    const T* gr = dy + i * D;
    const int64_t pos = i / H;
    const int64_t crow = cs_per_batch ? pos : pos % S;
    const C* cr = cos + crow * D;
    const C* sr = sin + crow * D;
    const A r = rstd[i];
    // du * w of a chunk (du without a weight), and x.
    auto load = [&](int64_t j, int64_t n, Pairs<A>& duw, Pairs<A>& du, Pairs<A>& v) {
      du = unrotate(CH::load(gr, D, j, n), CH::load(cr, D, j, n), CH::load(sr, D, j, n));
      v = CH::load(xr, D, j, n);
      duw = du;
      if (w != nullptr) {
        const Pairs<A> ww = CH::load(w, D, j, n);
        duw.a0 = du.a0 * ww.a0;
        duw.a1 = du.a1 * ww.a1;
        duw.b0 = du.b0 * ww.b0;
        duw.b1 = du.b1 * ww.b1;
      }
    };
    // Pass 1: sum(du * w * v).
    const auto t = blocked_row_sum<4, V>(ext, CH::kChunk, [&](int64_t j, int64_t n, auto& p) {
      Pairs<A> duw, du, v;
      load(j, n, duw, du, v);
      p[0] = at::vec::fmadd(duw.a0, v.a0, p[0]);
      p[1] = at::vec::fmadd(duw.a1, v.a1, p[1]);
      p[2] = at::vec::fmadd(duw.b0, v.b0, p[2]);
      p[3] = at::vec::fmadd(duw.b1, v.b1, p[3]);
    });
    const A kc = r * (reduce_add((t[0] + t[1]) + (t[2] + t[3])) / static_cast<A>(D));
    const V vr(r), vk(kc);
    // Pass 2: dx and the weight-gradient terms.
    T* dxr = dx + i * D;
    for (int64_t j = 0; j < ext; j += CH::kChunk) {
      const int64_t n = std::min(CH::kChunk, ext - j);
      Pairs<A> duw, du, v;
      load(j, n, duw, du, v);
      const V ha0 = v.a0 * vr, ha1 = v.a1 * vr, hb0 = v.b0 * vr, hb1 = v.b1 * vr;  // vhat
      Pairs<A> o;
      o.a0 = (duw.a0 - ha0 * vk) * vr;
      o.a1 = (duw.a1 - ha1 * vk) * vr;
      o.b0 = (duw.b0 - hb0 * vk) * vr;
      o.b1 = (duw.b1 - hb1 * vk) * vr;
      CH::store(dxr, D, j, n, o);
      if (dwp != nullptr) {
        Pairs<A> pw = CH::load(static_cast<const A*>(dwp), D, j, n);
        pw.a0 = at::vec::fmadd(du.a0, ha0, pw.a0);
        pw.a1 = at::vec::fmadd(du.a1, ha1, pw.a1);
        pw.b0 = at::vec::fmadd(du.b0, hb0, pw.b0);
        pw.b1 = at::vec::fmadd(du.b1, hb1, pw.b1);
        CH::store(dwp, D, j, n, pw);
      }
    }
  }
}

// One pass (q or k) of the backward; dw (dtype W, may be null): the weight gradient.
template <typename T, typename C, typename W, bool IL>
void bwd_pass(const T* dy, const T* x, const acc_t<T>* w, const C* cos, const C* sin,
              const acc_t<T>* rstd, T* dx, W* dw, int64_t rows, int64_t H, int64_t S,
              bool cs_per_batch, int64_t D, const Launch& l) {
  using A = acc_t<T>;
  const OutputPrefault pf(dx, rows, D * static_cast<int64_t>(sizeof(T)));
  if (dw == nullptr) {
    at::parallel_for(0, rows, row_grain(D), [&](int64_t b, int64_t e) {
      bwd_rows<T, C, IL>(dy, x, w, cos, sin, rstd, dx, nullptr, b, e, H, S, cs_per_batch, D, pf);
    });
    return;
  }
  // The weight gradient as a tree of sums over all head rows (param_rows.h), as rms_bwd
  // does: deterministic for a given thread count.
  const RowChunks chunks(rows, D);
  const TreeWorkspace<A> ws(l.ws, chunks, padded<A>(D));
  std::vector<A*> sums(static_cast<size_t>(chunks.count));
  for_each_chunk(chunks, [&](int64_t c) {
    PartialTree<A> tree = ws.tree(c);
    for_each_block(tree, chunks.begin(c), chunks.end(c), [&](int64_t b, int64_t e, A* part) {
      bwd_rows<T, C, IL>(dy, x, w, cos, sin, rstd, dx, part, b, e, H, S, cs_per_batch, D, pf);
    });
    sums[c] = tree.finish();
  });
  sum_chunk_rows<A, W>(sums, 0, D, dw);
}

template <typename F>
void dispatch_interleaved(bool interleaved, F&& f) {
  if (interleaved) return f(std::true_type{});
  f(std::false_type{});
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Entries, registered below (RMSNORM_EXT_REGISTER_CPU_KERNEL, kernel_registry.h)

void qk_norm_rope_fwd(const QkNormRopeFwdParams& p, const Launch&) {
  dispatch_pair(p.t, p.cs, [&](auto t_tag, auto c_tag) {
    using T = typename decltype(t_tag)::type;
    using C = typename decltype(c_tag)::type;
    using A = acc_t<T>;
    const C* cos = static_cast<const C*>(p.cos);
    const C* sin = static_cast<const C*>(p.sin);
    dispatch_interleaved(p.interleaved, [&](auto il) {
      constexpr bool IL = decltype(il)::value;
      // q, then k; each with its own weight dtype.
      dispatch_companion<T>(p.wq, [&](auto w_tag) {
        using W = typename decltype(w_tag)::type;
        EffectiveParam<A> w(static_cast<const W*>(p.q_weight), p.D, 0.0);
        if (p.P * p.Hq > 0) {
          fwd_pass<T, C, IL>(static_cast<const T*>(p.q), w.get(), cos, sin,
                             static_cast<T*>(p.q_out), static_cast<A*>(p.q_rstd), p.P * p.Hq,
                             p.Hq, p.S, p.cs_per_batch, p.D, p.eps);
        }
      });
      dispatch_companion<T>(p.wk, [&](auto w_tag) {
        using W = typename decltype(w_tag)::type;
        EffectiveParam<A> w(static_cast<const W*>(p.k_weight), p.D, 0.0);
        if (p.P * p.Hk > 0) {
          fwd_pass<T, C, IL>(static_cast<const T*>(p.k), w.get(), cos, sin,
                             static_cast<T*>(p.k_out), static_cast<A*>(p.k_rstd), p.P * p.Hk,
                             p.Hk, p.S, p.cs_per_batch, p.D, p.eps);
        }
      });
    });
  });
}

void qk_norm_rope_bwd(const QkNormRopeBwdParams& p, const Launch& l) {
  dispatch_pair(p.t, p.cs, [&](auto t_tag, auto c_tag) {
    using T = typename decltype(t_tag)::type;
    using C = typename decltype(c_tag)::type;
    using A = acc_t<T>;
    const C* cos = static_cast<const C*>(p.cos);
    const C* sin = static_cast<const C*>(p.sin);
    dispatch_interleaved(p.interleaved, [&](auto il) {
      constexpr bool IL = decltype(il)::value;
      dispatch_companion<T>(p.wq, [&](auto w_tag) {
        using W = typename decltype(w_tag)::type;
        EffectiveParam<A> w(static_cast<const W*>(p.q_weight), p.D, 0.0);
        if (p.P * p.Hq > 0) {
          bwd_pass<T, C, W, IL>(static_cast<const T*>(p.dq_out), static_cast<const T*>(p.q),
                                w.get(), cos, sin, static_cast<const A*>(p.q_rstd),
                                static_cast<T*>(p.dq), static_cast<W*>(p.dwq), p.P * p.Hq, p.Hq,
                                p.S, p.cs_per_batch, p.D, l);
        } else if (p.dwq != nullptr) {
          std::fill_n(static_cast<W*>(p.dwq), p.D, W(0));
        }
      });
      dispatch_companion<T>(p.wk, [&](auto w_tag) {
        using W = typename decltype(w_tag)::type;
        EffectiveParam<A> w(static_cast<const W*>(p.k_weight), p.D, 0.0);
        if (p.P * p.Hk > 0) {
          bwd_pass<T, C, W, IL>(static_cast<const T*>(p.dk_out), static_cast<const T*>(p.k),
                                w.get(), cos, sin, static_cast<const A*>(p.k_rstd),
                                static_cast<T*>(p.dk), static_cast<W*>(p.dwk), p.P * p.Hk, p.Hk,
                                p.S, p.cs_per_batch, p.D, l);
        } else if (p.dwk != nullptr) {
          std::fill_n(static_cast<W*>(p.dwk), p.D, W(0));
        }
      });
    });
  });
}

RMSNORM_EXT_REGISTER_CPU_KERNEL(QkNormRopeFwd, qk_norm_rope_fwd);
RMSNORM_EXT_REGISTER_CPU_KERNEL(QkNormRopeBwd, qk_norm_rope_bwd);

}  // namespace rmsnorm_ext::cpu
