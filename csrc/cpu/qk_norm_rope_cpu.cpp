// CPU kernels of fused QK-norm + RoPE, forward and backward (see QkNormRopeFwdParams in
// ../kernel_params.h). A row is one head vector of D elements; math in acc_t<T> (fp32,
// fp64 for fp64 data); each output is rounded to T once.
//
// Head rows are short (D = 64..256), so a row's fixed costs and its conversions decide the
// speed, not its loop. The forward
//  - works position by position: the heads of a position share one row of cos/sin, which
//    is converted to A once per position, with the weight folded in (FwdTables: one per
//    q and k), instead of being loaded, converted and weighted again for every head;
//  - runs the q and k rows of a position in one parallel region over positions;
//  - takes a position's rows in groups (row_group_stats.h's rows_rstd, as rms_norm's short
//    rows): the rstd of every row of the group first, their reduction -> sqrt -> divide
//    chains finished together, keeping each row converted to A for its output pass, which
//    then converts nothing but its stores (where with_keep keeps rows: row_stats.h).
// So rstd is rms_norm's bit for bit (tests/test_qk_norm_rope.py checks this). The backward converts
// cos/sin once per position too (Tables) and keeps du and vhat between its two passes.
//
// The rotation pairs element a with element b:
//   rotate-half: a = j, b = j + D/2 (j < D/2): the loops walk the two halves in steps of
//                RowIO's kStep; y_a = u_a c_a - u_b s_a, y_b = u_b c_b + u_a s_b.
//   interleaved: a = 2i, b = 2i + 1: the loops walk the row in steps and swap adjacent
//                lanes (swap_pairs); with ts = s whose even entries are negated,
//                y = u c + swap(u) ts.
// Tail steps (D/2 or D not a multiple of kStep) are zero-padded by RowIO (D is even, so
// an interleaved pair never straddles a step).
//
// Forward, per row: r = rstd(v); u = (v * r) * w; y as above, computed as
// (v * r) * (w c) -/+ (v * r)[b] * (w[b] s) with the position's FwdTables.
// Backward, per row: du[a] = g[a] c[a] + g[b] s[b], du[b] = g[b] c[b] - g[a] s[a] (the
// transpose of the rotation); pass 1 caches du and vhat = v * r in a scratch row and sums
// m = mean(du * w * vhat); pass 2: dv = r * (du * w - vhat * m), and dw += du * vhat,
// summed over rows as a tree (param_rows.h).
#include "dispatch.h"
#include "kernels.h"
#include "param_rows.h"
#include "prefault.h"
#include "row_group_stats.h"
#include "row_stats.h"
#include "vec_io.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace rmsnorm_ext::cpu {
namespace {

// v with adjacent lanes swapped: (v1, v0, v3, v2, ...).
template <typename A>
inline Vectorized<A> swap_pairs(const Vectorized<A>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    return _mm512_permute_ps(v, 0xB1);
  } else {
    return _mm512_permute_pd(v, 0x55);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    return _mm256_permute_ps(v, 0xB1);
  } else {
    return _mm256_permute_pd(v, 0x5);
  }
#else
  constexpr int L = Vectorized<A>::size();
  __at_align__ A buf[L];
  v.store(buf);
  for (int i = 0; i + 1 < L; i += 2) std::swap(buf[i], buf[i + 1]);
  return Vectorized<A>::loadu(buf);
#endif
}

// cos and sin of one position in A (interleaved: sin with its even entries negated), each
// padded to whole steps. Where C is A and no sign is needed they are the caller's rows.
template <typename A, typename C, bool IL>
class Tables {
 public:
  explicit Tables(int64_t D) : D_(D) {
    if (!kInPlace) buf_.assign(static_cast<size_t>(2 * padded<A>(D)), A(0));
  }

  // The tables of table row `crow` (cr, sr: its cos and sin); nothing to do for the row
  // already held.
  void set(const C* cr, const C* sr, int64_t crow) {
    if (crow == row_) return;
    row_ = crow;
    if constexpr (kInPlace) {
      c_ = cr;
      s_ = sr;
    } else {
      using CIO = RowIO<C>;
      using AIO = RowIO<A>;
      using V = Vectorized<A>;
      constexpr int64_t S = AIO::kStep;
      A* c = buf_.data();
      A* s = c + padded<A>(D_);
      V sign(A(1));
      if constexpr (IL) {
        __at_align__ A sg[V::size()];
        for (int64_t l = 0; l < V::size(); ++l) sg[l] = (l % 2 == 0) ? A(-1) : A(1);
        sign = V::loadu(sg);
      }
      V a, b;
      for (int64_t j = 0; j < D_; j += S) {
        const int64_t n = std::min(S, D_ - j);
        CIO::load_n(cr + j, n, a, b);
        AIO::store(c + j, a, b);
        CIO::load_n(sr + j, n, a, b);
        if constexpr (IL) {
          a = a * sign;
          b = b * sign;
        }
        AIO::store(s + j, a, b);
      }
      c_ = c;
      s_ = s;
    }
  }

  const A* c() const { return c_; }
  const A* s() const { return s_; }

 private:
  static constexpr bool kInPlace = std::is_same_v<A, C> && !IL;
  int64_t D_;
  int64_t row_ = -1;
  std::vector<A> buf_;
  const A* c_ = nullptr;
  const A* s_ = nullptr;
};

// ---------------------------------------------------------------------------------------
// Forward

// The forward's tables of one position for one of q and k: its weight folded into cos and
// sin, tc[e] = w[e] c[e] and ts[e] = w[partner(e)] s[e] (interleaved: negated at even e),
// so a row is y = xr tc -/+ xr[partner] ts with xr = x * r (rotate-half: minus for the
// first half; interleaved: the sign is in ts). Without a weight they are cos and sin;
// with cos = 1, sin = 0 a row is (x * r) * w, exactly rms_norm's.
template <typename A, typename C, bool IL>
class FwdTables {
 public:
  FwdTables(const A* w, int64_t D)
      : w_(w), D_(D), buf_(static_cast<size_t>(2 * padded<A>(D)), A(0)) {}

  void set(const C* cr, const C* sr, int64_t crow) {
    if (crow == row_) return;
    row_ = crow;
    using CIO = RowIO<C>;
    using AIO = RowIO<A>;
    using V = Vectorized<A>;
    constexpr int64_t S = AIO::kStep;
    A* tc = buf_.data();
    A* ts = tc + padded<A>(D_);
    const V one(A(1));
    V c0, c1, s0, s1, w0 = one, w1 = one;
    if constexpr (IL) {
      __at_align__ A sg[V::size()];
      for (int64_t l = 0; l < V::size(); ++l) sg[l] = (l % 2 == 0) ? A(-1) : A(1);
      const V sign = V::loadu(sg);
      for (int64_t j = 0; j < D_; j += S) {
        const int64_t n = std::min(S, D_ - j);
        CIO::load_n(cr + j, n, c0, c1);
        CIO::load_n(sr + j, n, s0, s1);
        if (w_ != nullptr) AIO::load_n(w_ + j, n, w0, w1);
        AIO::store(tc + j, c0 * w0, c1 * w1);
        AIO::store(ts + j, (s0 * swap_pairs(w0)) * sign, (s1 * swap_pairs(w1)) * sign);
      }
    } else {
      const int64_t h = D_ / 2;
      V c2, c3, s2, s3, w2 = one, w3 = one;
      for (int64_t j = 0; j < h; j += S) {
        const int64_t n = std::min(S, h - j);
        CIO::load_n(cr + j, n, c0, c1);
        CIO::load_n(sr + j, n, s0, s1);
        CIO::load_n(cr + h + j, n, c2, c3);
        CIO::load_n(sr + h + j, n, s2, s3);
        if (w_ != nullptr) {
          AIO::load_n(w_ + j, n, w0, w1);
          AIO::load_n(w_ + h + j, n, w2, w3);
        }
        AIO::store_n(tc + j, n, c0 * w0, c1 * w1);
        AIO::store_n(ts + j, n, s0 * w2, s1 * w3);
        AIO::store_n(tc + h + j, n, c2 * w2, c3 * w3);
        AIO::store_n(ts + h + j, n, s2 * w0, s3 * w1);
      }
    }
  }

  const A* c() const { return buf_.data(); }
  const A* s() const { return buf_.data() + padded<A>(D_); }

 private:
  const A* w_;
  int64_t D_;
  int64_t row_ = -1;
  std::vector<A> buf_;
};

// One output row from its values xa (in A where the row is kept, else the row itself), rstd r
// and the position's tables.
template <bool IL, typename X, typename T, typename A>
inline void fwd_row(const X* xa, const A* tc, const A* ts, A r, T* y, int64_t D) {
  using IO = RowIO<T>;
  using AIO = RowIO<A>;
  using XIO = RowIO<X>;
  using V = Vectorized<A>;
  constexpr int64_t S = IO::kStep;
  const V vr(r);
  if constexpr (!IL) {
    const int64_t h = D / 2;
    auto step = [&](int64_t j, int64_t n) {
      V a0, a1, b0, b1, c0, c1, s0, s1;
      XIO::load_n(xa + j, n, a0, a1);
      XIO::load_n(xa + h + j, n, b0, b1);
      a0 = a0 * vr;
      a1 = a1 * vr;
      b0 = b0 * vr;
      b1 = b1 * vr;
      AIO::load_n(tc + j, n, c0, c1);
      AIO::load_n(ts + j, n, s0, s1);
      IO::store_n(y + j, n, at::vec::fnmadd(b0, s0, a0 * c0), at::vec::fnmadd(b1, s1, a1 * c1));
      AIO::load_n(tc + h + j, n, c0, c1);
      AIO::load_n(ts + h + j, n, s0, s1);
      IO::store_n(y + h + j, n, at::vec::fmadd(a0, s0, b0 * c0), at::vec::fmadd(a1, s1, b1 * c1));
    };
    int64_t j = 0;
    for (; j + S <= h; j += S) step(j, S);
    if (j < h) step(j, h - j);
  } else {
    auto step = [&](int64_t j, int64_t n) {
      V a0, a1, c0, c1, s0, s1;
      XIO::load_n(xa + j, n, a0, a1);
      a0 = a0 * vr;
      a1 = a1 * vr;
      AIO::load_n(tc + j, n, c0, c1);
      AIO::load_n(ts + j, n, s0, s1);
      IO::store_n(y + j, n, at::vec::fmadd(swap_pairs(a0), s0, a0 * c0),
                  at::vec::fmadd(swap_pairs(a1), s1, a1 * c1));
    };
    int64_t j = 0;
    for (; j + S <= D; j += S) step(j, S);
    if (j < D) step(j, D - j);
  }
}

// One of q and k.
template <typename T>
struct FwdSide {
  using A = acc_t<T>;
  const T* x;
  const A* w;  // may be null
  T* y;
  A* rstd;
  int64_t H;
};


// kKeep: bfloat16 / float16 rows converted to fp32 once (with_keep, row_stats.h).
template <typename T, typename C, bool IL, bool kKeep>
void fwd(const QkNormRopeFwdParams& p, const FwdSide<T>& q, const FwdSide<T>& k) {
  using A = acc_t<T>;
  const int64_t D = p.D;
  const C* cos = static_cast<const C*>(p.cos);
  const C* sin = static_cast<const C*>(p.sin);
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  const OutputPrefault pfq(q.y, p.P * q.H, row_bytes);
  const OutputPrefault pfk(k.y, p.P * k.H, row_bytes);
  const int64_t grain = std::max<int64_t>(1, row_grain(D) / std::max<int64_t>(1, q.H + k.H));
  at::parallel_for(0, p.P, grain, [&](int64_t pb, int64_t pe) {
    FwdTables<A, C, IL> tq(q.w, D), tk(k.w, D);
    const auto keep = group_keep_scratch<T, kKeep>(D);
    for (int64_t pos = pb; pos < pe; ++pos) {
      const int64_t crow = p.cs_per_batch ? pos : pos % p.S;
      for (int side = 0; side < 2; ++side) {
        const FwdSide<T>& sd = side == 0 ? q : k;
        if (sd.H == 0) continue;
        FwdTables<A, C, IL>& tb = side == 0 ? tq : tk;
        const OutputPrefault& pf = side == 0 ? pfq : pfk;
        tb.set(cos + crow * D, sin + crow * D, crow);
        // The position's heads in groups (row_group_stats.h): every row's rstd, the groups'
        // chains finished together, each row kept in A for its output pass.
        for_row_groups<T>(pos * sd.H, (pos + 1) * sd.H, D, [&](int64_t i0, auto rows) {
          constexpr int R = decltype(rows)::value;
          const T* xg = sd.x + i0 * D;
          const auto rs = rows_rstd<R, T, kKeep>(xg, D, p.eps, keep.get());
          for (int r = 0; r < R; ++r) {
            const int64_t i = i0 + r;
            sd.rstd[i] = rs[r];
            pf.before_row(i, pb * sd.H, pe * sd.H);
            fwd_row<IL>(group_row<kKeep>(xg, keep.get(), D, r), tb.c(), tb.s(), rs[r],
                        sd.y + i * D, D);
          }
        });
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Backward

// Rows [row_begin, row_end) of one pass (q or k) of the backward; dwp (may be null): the
// partial row of the weight gradient they add to; tb, scratch (4 * padded(D / 2 or D)
// elements): the calling thread's.
template <bool IL, bool W, typename T, typename C>
void bwd_rows(const T* dy, const T* x, const acc_t<T>* w, const C* cos, const C* sin,
              const acc_t<T>* rstd, T* dx, acc_t<T>* dwp, int64_t row_begin, int64_t row_end,
              int64_t H, int64_t S_len, bool cs_per_batch, int64_t D, const OutputPrefault& pf,
              int64_t pf_begin, int64_t pf_end, Tables<acc_t<T>, C, IL>& tb, acc_t<T>* scratch) {
  using A = acc_t<T>;
  using IO = RowIO<T>;
  using AIO = RowIO<A>;
  using V = Vectorized<A>;
  constexpr int64_t S = IO::kStep;
  constexpr int64_t kBlock = 32 * S;  // steps per block of the row sum (see blocked_row_sum)
  // Scratch layout: du then vhat, each of two halves of hp elements (interleaved: one of
  // hp = padded(D)), so every step stores and loads whole vectors.
  const int64_t h = IL ? D : D / 2;
  const int64_t hp = padded<A>(h);
  A* du_s = scratch;
  A* vh_s = scratch + 2 * hp;
  for (int64_t i = row_begin; i < row_end; ++i) {
    pf.before_row(i, pf_begin, pf_end);
    const T* xr = x + i * D;
    const T* gr = dy + i * D;
    const int64_t pos = i / H;
    const int64_t crow = cs_per_batch ? pos : pos % S_len;
    tb.set(cos + crow * D, sin + crow * D, crow);
    const A* c = tb.c();
    const A* s = tb.s();
    const V vr(A(rstd[i]));
    // Pass 1: du and vhat into the scratch row, and sum(du * w * vhat).
    V t0(A(0)), t1(A(0)), t2(A(0)), t3(A(0));
    for (int64_t j0 = 0; j0 < h; j0 += kBlock) {
      const int64_t end = std::min(h, j0 + kBlock);
      V p0(A(0)), p1(A(0)), p2(A(0)), p3(A(0));
      for (int64_t j = j0; j < end; j += S) {
        const int64_t n = std::min(S, end - j);
        V g0, g1, v0, v1, c0, c1, s0, s1, d0, d1, e0, e1;
        if constexpr (!IL) {
          V f0, f1, u0, u1;
          IO::load_n(gr + j, n, g0, g1);      // g_a
          IO::load_n(gr + h + j, n, f0, f1);  // g_b
          AIO::load_n(c + j, n, c0, c1);
          AIO::load_n(s + h + j, n, s0, s1);
          d0 = at::vec::fmadd(f0, s0, g0 * c0);  // du_a = g_a c_a + g_b s_b
          d1 = at::vec::fmadd(f1, s1, g1 * c1);
          AIO::load_n(c + h + j, n, c0, c1);
          AIO::load_n(s + j, n, s0, s1);
          e0 = at::vec::fnmadd(g0, s0, f0 * c0);  // du_b = g_b c_b - g_a s_a
          e1 = at::vec::fnmadd(g1, s1, f1 * c1);
          IO::load_n(xr + j, n, v0, v1);
          IO::load_n(xr + h + j, n, u0, u1);
          v0 = v0 * vr;
          v1 = v1 * vr;
          u0 = u0 * vr;
          u1 = u1 * vr;
          AIO::store(du_s + j, d0, d1);
          AIO::store(du_s + hp + j, e0, e1);
          AIO::store(vh_s + j, v0, v1);
          AIO::store(vh_s + hp + j, u0, u1);
          if constexpr (W) {
            V w0, w1;
            AIO::load_n(w + j, n, w0, w1);
            d0 = d0 * w0;
            d1 = d1 * w1;
            AIO::load_n(w + h + j, n, w0, w1);
            e0 = e0 * w0;
            e1 = e1 * w1;
          }
          p0 = at::vec::fmadd(d0, v0, p0);
          p1 = at::vec::fmadd(d1, v1, p1);
          p2 = at::vec::fmadd(e0, u0, p2);
          p3 = at::vec::fmadd(e1, u1, p3);
        } else {
          IO::load_n(gr + j, n, g0, g1);
          AIO::load_n(c + j, n, c0, c1);
          AIO::load_n(s + j, n, s0, s1);
          // du = g c + swap(g ts): du[2i] = g[2i] c[2i] + g[2i+1] s[2i+1], du[2i+1] =
          // g[2i+1] c[2i+1] - g[2i] s[2i].
          d0 = at::vec::fmadd(g0, c0, swap_pairs(g0 * s0));
          d1 = at::vec::fmadd(g1, c1, swap_pairs(g1 * s1));
          IO::load_n(xr + j, n, v0, v1);
          v0 = v0 * vr;
          v1 = v1 * vr;
          AIO::store(du_s + j, d0, d1);
          AIO::store(vh_s + j, v0, v1);
          if constexpr (W) {
            V w0, w1;
            AIO::load_n(w + j, n, w0, w1);
            d0 = d0 * w0;
            d1 = d1 * w1;
          }
          if (((j - j0) / S) % 2 == 0) {
            p0 = at::vec::fmadd(d0, v0, p0);
            p1 = at::vec::fmadd(d1, v1, p1);
          } else {
            p2 = at::vec::fmadd(d0, v0, p2);
            p3 = at::vec::fmadd(d1, v1, p3);
          }
        }
      }
      t0 = t0 + p0;
      t1 = t1 + p1;
      t2 = t2 + p2;
      t3 = t3 + p3;
    }
    const V vm(reduce_add((t0 + t1) + (t2 + t3)) / static_cast<A>(D));
    // Pass 2: dx = (du * w - vhat * m) * r, and dw += du * vhat.
    T* dxr = dx + i * D;
    for (int64_t half = 0; half < (IL ? 1 : 2); ++half) {
      const int64_t off = half * h;  // element offset of the half in the row
      const A* dus = du_s + half * hp;
      const A* vhs = vh_s + half * hp;
      for (int64_t j = 0; j < h; j += S) {
        const int64_t n = std::min(S, h - j);
        V d0, d1, v0, v1, w0, w1;
        AIO::load(dus + j, d0, d1);
        AIO::load(vhs + j, v0, v1);
        if (dwp != nullptr) {
          V q0, q1;
          AIO::load_n(dwp + off + j, n, q0, q1);
          AIO::store_n(dwp + off + j, n, at::vec::fmadd(d0, v0, q0), at::vec::fmadd(d1, v1, q1));
        }
        if constexpr (W) {
          AIO::load_n(w + off + j, n, w0, w1);
          d0 = d0 * w0;
          d1 = d1 * w1;
        }
        IO::store_n(dxr + off + j, n, at::vec::fnmadd(v0, vm, d0) * vr,
                    at::vec::fnmadd(v1, vm, d1) * vr);
      }
    }
  }
}

// One pass (q or k) of the backward; dw (dtype W, may be null): the weight gradient.
template <typename T, typename C, typename Wt, bool IL>
void bwd_pass(const T* dy, const T* x, const acc_t<T>* w, const C* cos, const C* sin,
              const acc_t<T>* rstd, T* dx, Wt* dw, int64_t rows, int64_t H, int64_t S,
              bool cs_per_batch, int64_t D, const Launch& l) {
  using A = acc_t<T>;
  const OutputPrefault pf(dx, rows, D * static_cast<int64_t>(sizeof(T)));
  const int64_t scratch_len = 4 * padded<A>(IL ? D : D / 2);
  auto run = [&](int64_t b, int64_t e, A* part, int64_t pf_b, int64_t pf_e,
                 Tables<A, C, IL>& tb, A* scratch) {
    if (w != nullptr) {
      bwd_rows<IL, true>(dy, x, w, cos, sin, rstd, dx, part, b, e, H, S, cs_per_batch, D, pf,
                         pf_b, pf_e, tb, scratch);
    } else {
      bwd_rows<IL, false>(dy, x, w, cos, sin, rstd, dx, part, b, e, H, S, cs_per_batch, D, pf,
                          pf_b, pf_e, tb, scratch);
    }
  };
  if (dw == nullptr) {
    at::parallel_for(0, rows, row_grain(D), [&](int64_t b, int64_t e) {
      Tables<A, C, IL> tb(D);
      std::vector<A> scratch(static_cast<size_t>(scratch_len));
      run(b, e, nullptr, b, e, tb, scratch.data());
    });
    return;
  }
  // The weight gradient as a tree of sums over all head rows (param_rows.h), as rms_bwd
  // does: deterministic for a given thread count.
  const RowChunks chunks(rows, D);
  const TreeWorkspace<A> ws(l.ws, chunks, padded<A>(D));
  std::vector<A*> sums(static_cast<size_t>(chunks.count));
  for_each_chunk(chunks, [&](int64_t c) {
    Tables<A, C, IL> tb(D);
    std::vector<A> scratch(static_cast<size_t>(scratch_len));
    PartialTree<A> tree = ws.tree(c);
    const int64_t cb = chunks.begin(c), ce = chunks.end(c);
    for_each_block(tree, cb, ce, [&](int64_t b, int64_t e, A* part) {
      run(b, e, part, cb, ce, tb, scratch.data());
    });
    sums[c] = tree.finish();
  });
  sum_chunk_rows<A, Wt>(sums, 0, D, dw);
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
    // The weights as rows of A (each with its own dtype), then one kernel for q and k.
    dispatch_companion<T>(p.wq, [&](auto wq_tag) {
      using WQ = typename decltype(wq_tag)::type;
      EffectiveParam<A> wq(static_cast<const WQ*>(p.q_weight), p.D, 0.0);
      dispatch_companion<T>(p.wk, [&](auto wk_tag) {
        using WK = typename decltype(wk_tag)::type;
        EffectiveParam<A> wk(static_cast<const WK*>(p.k_weight), p.D, 0.0);
        const FwdSide<T> q{static_cast<const T*>(p.q), wq.get(), static_cast<T*>(p.q_out),
                           static_cast<A*>(p.q_rstd), p.Hq};
        const FwdSide<T> k{static_cast<const T*>(p.k), wk.get(), static_cast<T*>(p.k_out),
                           static_cast<A*>(p.k_rstd), p.Hk};
        if (p.P == 0 || p.D == 0) return;
        dispatch_interleaved(p.interleaved, [&](auto il) {
          // The output pass reads each element twice (as itself and as its partner).
          with_keep<T>(p.D, 2, [&](auto keep) {
            fwd<T, C, decltype(il)::value, decltype(keep)::value>(p, q, k);
          });
        });
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
