// CPU kernels for the channels-first norms: RMSNorm and LayerNorm, forward and backward, on a
// contiguous [B, C, S] tensor normalized over C (rms_norm_2d / layer_norm_2d; kernel_params.h,
// inner = S > 1). Row (o, s) has its C elements S apart, so a row-at-a-time kernel would
// gather every element; instead the vectors run ACROSS positions: a SIMD lane is one row,
// and channel j of a window of kStep consecutive positions is one contiguous vector load.
//
// Work unit: a tile, `width` consecutive positions of one batch item over all C channels,
// sized so the [C, width] block stays in L2 (kTileBytes). The statistics are computed two
// windows at a time (their passes over C re-read the windows from L1); the output pass walks
// the tile channel by channel (contiguous stores) from L2 while prefetching the next tile's
// rows, so its trip from memory overlaps this tile's arithmetic. Each lane sums over C with
// blocked_row_sum (blocks of channels added into a running total: the row kernels' cascade)
// and forms rstd / mean / dx with the row kernels' formulas and grouping, so a row here
// rounds like a row there; one rounding of each output.
//
// Parameter gradients: per tile, each channel's dy * xhat (and dy) is summed lane-wise over
// the tile, then across lanes, into a partial row of C; tiles are the "rows" of the
// param_rows.h tree (blocks of kBlockRows tiles, pairwise above), so dweight / dbias are
// deterministic for a given thread count and accurate over any number of positions.
#include "dispatch.h"
#include "kernels.h"
#include "param_rows.h"
#include "prefault.h"
#include "vec_io.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace rmsnorm_ext::cpu {
namespace {

// Bytes of input a tile may span (x, plus dy in the backward): its windows are re-read from
// L2 by the output pass, next to the prefetched next tile and the output lines being written.
constexpr int64_t kTileBytes = int64_t{64} << 10;
// At most this many positions per tile (small C), so the per-window scratch of the backward
// stays a few KiB on the stack.
constexpr int64_t kMaxTile = 512;

// The tiles of a [B, C, S] tensor. Unit u = (item o, tile k) covers positions [s0, s0 + n) of
// item o. An item has max(1, S / width) tiles and the last one takes the remainder too (n in
// [width, 2 * width)), so with S >= kStep every tile holds at least one whole step (Windows).
struct Tiles {
  struct Unit {
    int64_t o, s0, n;
  };
  int64_t C, S, width, per_item, count;

  // step: positions per vector window; elem_bytes: input bytes per element (summed over the
  // tensors a tile reads).
  Tiles(int64_t M, int64_t C_, int64_t S_, int64_t step, int64_t elem_bytes) : C(C_), S(S_) {
    const int64_t fit = kTileBytes / (C * elem_bytes) / step * step;
    width = std::clamp(fit, step, kMaxTile);
    per_item = std::max<int64_t>(1, S / width);
    count = M / S * per_item;
  }
  Unit unit(int64_t u) const {
    const int64_t o = u / per_item, k = u % per_item;
    return {o, k * width, k + 1 == per_item ? S - k * width : width};
  }
  int64_t data(const Unit& t) const { return t.o * C * S + t.s0; }  // element (o, 0, s0)
  int64_t stats(const Unit& t) const { return t.o * S + t.s0; }     // row (o, s0)
};

// The vector windows of a tile of n positions: window k covers kStep positions from
// min(k * kStep, n - kStep). Where n is not a whole number of steps the last window is
// shifted back to end at n, so it is a full-width load and store that stays inside the tile
// (no padding cost on every channel, e.g. 7 x 7 = 49 positions); its first dup(k) lanes
// repeat positions of the window before, recomputed to the same bits and stored again, and
// masked out of the parameter-gradient sums. A tile shorter than one step (S < kStep) is a
// single zero-padded window (RowIO::load_n / store_n).
template <int64_t kStep>
struct Windows {
  int64_t n, count, len;
  explicit Windows(int64_t n_) : n(n_), count((n_ + kStep - 1) / kStep), len(std::min(n_, kStep)) {}
  int64_t off(int64_t k) const { return std::min(k * kStep, n - len); }
  int64_t dup(int64_t k) const { return k * kStep - off(k); }
};

// Runs done(k0, k1, sums) for the windows of a tile two at a time (two windows' accumulator
// chains hide the FMA latency; k1 == k0 for an odd last window, computed and stored twice to
// the same values), sums[K] being what acc(j, k0, k1, part) adds over the channels in
// blocks of 32 (blocked_row_sum with a step of one channel).
template <int K, typename V, int64_t kStep, typename Acc, typename Done>
void window_pairs(const Windows<kStep>& win, int64_t C, Acc&& acc, Done&& done) {
  for (int64_t k0 = 0; k0 < win.count; k0 += 2) {
    const int64_t k1 = std::min(k0 + 1, win.count - 1);
    done(k0, k1, blocked_row_sum<K, V>(C, 1, [&](int64_t j, int64_t, auto& p) { acc(j, k0, k1, p); }));
  }
}

// Prefetches n elements from p into L2 (the current tile's traffic would evict them from L1
// before the next tile's statistics read them).
template <typename T>
inline void prefetch_run(const T* p, int64_t n) {
  const uintptr_t end = reinterpret_cast<uintptr_t>(p + n);
  for (uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63}; a < end; a += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(a), 0, 2);
  }
}

// Zero the first k lanes of a step (a, b): the repeated lanes of a shifted window.
template <typename A>
inline void zero_head(Vectorized<A>& a, Vectorized<A>& b, int64_t k) {
  constexpr int64_t L = Vectorized<A>::size();
  const Vectorized<A> z(A(0));
  if (k >= L) {
    a = z;
    b = Vectorized<A>::set(b, z, k - L);
  } else {
    a = Vectorized<A>::set(a, z, k);
  }
}

// Runs f(t, next) for the units [from, to) of a thread's contiguous range [b, e) (next: the
// unit after t if it is in the range, for prefetching, else null), backing the output's
// pages (prefault.h) one batch item at a time before the item's first tile in the range: an
// item's channels span all of its memory, so the item, not the tile, is the unit of
// prefaulting.
template <typename F>
void for_each_unit(const Tiles& tl, const OutputPrefault& pf, int64_t b, int64_t e, int64_t from,
                   int64_t to, F&& f) {
  const int64_t ob = b / tl.per_item, oe = (e - 1) / tl.per_item + 1;
  for (int64_t u = from; u < to; ++u) {
    const Tiles::Unit t = tl.unit(u);
    if (u == b || t.s0 == 0) pf.before_row(t.o, ob, oe);
    const Tiles::Unit next = u + 1 < e ? tl.unit(u + 1) : Tiles::Unit{0, 0, 0};
    f(t, u + 1 < e ? &next : nullptr);
  }
}

// ---------------------------------------------------------------------------------------
// Forward

template <typename T>
struct FwdArgs {
  const T* x;
  T* y;
  acc_t<T>* mean;  // layer norm only
  acc_t<T>* rstd;
  const acc_t<T>* w;     // may be null
  const acc_t<T>* bias;  // layer norm only; may be null
  double eps;
};

// y = (x - mean) * rstd * w + bias over a tile (mean, bias null: RMSNorm), the statistics
// read back from the windows the statistics pass just stored (L1). Prefetches the next tile.
template <typename T>
void fwd_output(const FwdArgs<T>& a, const Tiles& tl, const Tiles::Unit& t,
                const Tiles::Unit* next) {
  using IO = RowIO<T>;
  using A = acc_t<T>;
  using SIO = RowIO<A>;
  using V = typename IO::V;
  const Windows<IO::kStep> win(t.n);
  const T* x = a.x + tl.data(t);
  T* y = a.y + tl.data(t);
  const A* mean = a.mean ? a.mean + tl.stats(t) : nullptr;
  const A* rstd = a.rstd + tl.stats(t);
  for (int64_t j = 0; j < tl.C; ++j) {
    if (next) prefetch_run(a.x + tl.data(*next) + j * tl.S, next->n);
    const T* xj = x + j * tl.S;
    T* yj = y + j * tl.S;
    const V wj(a.w ? a.w[j] : A(1)), bj(a.bias ? a.bias[j] : A(0));
    for (int64_t k = 0; k < win.count; ++k) {
      const int64_t o = win.off(k);
      V xa, xb, ra, rb;
      IO::load_n(xj + o, win.len, xa, xb);
      if (mean) {
        SIO::load_n(mean + o, win.len, ra, rb);
        xa = xa - ra;
        xb = xb - rb;
      }
      SIO::load_n(rstd + o, win.len, ra, rb);
      xa = xa * ra;
      xb = xb * rb;
      if (a.w) {
        xa = xa * wj;
        xb = xb * wj;
      }
      if (a.bias) {
        xa = xa + bj;
        xb = xb + bj;
      }
      IO::store_n(yj + o, win.len, xa, xb);
    }
  }
}

template <typename T>
void rms_fwd_tile(const FwdArgs<T>& a, const Tiles& tl, const Tiles::Unit& t,
                  const Tiles::Unit* next) {
  using IO = RowIO<T>;
  using A = acc_t<T>;
  using SIO = RowIO<A>;
  using V = typename IO::V;
  const Windows<IO::kStep> win(t.n);
  const T* x = a.x + tl.data(t);
  A* rstd = a.rstd + tl.stats(t);
  const V vn(static_cast<A>(tl.C)), ve(static_cast<A>(a.eps)), one(A(1));
  window_pairs<4, V>(
      win, tl.C,
      [&](int64_t j, int64_t k0, int64_t k1, auto& p) {
        V a0, b0, a1, b1;
        IO::load_n(x + j * tl.S + win.off(k0), win.len, a0, b0);
        IO::load_n(x + j * tl.S + win.off(k1), win.len, a1, b1);
        p[0] = at::vec::fmadd(a0, a0, p[0]);
        p[1] = at::vec::fmadd(b0, b0, p[1]);
        p[2] = at::vec::fmadd(a1, a1, p[2]);
        p[3] = at::vec::fmadd(b1, b1, p[3]);
      },
      [&](int64_t k0, int64_t k1, const auto& s) {  // rstd_from, lane-wise
        SIO::store_n(rstd + win.off(k0), win.len, one / (s[0] / vn + ve).sqrt(),
                     one / (s[1] / vn + ve).sqrt());
        SIO::store_n(rstd + win.off(k1), win.len, one / (s[2] / vn + ve).sqrt(),
                     one / (s[3] / vn + ve).sqrt());
      });
  fwd_output(a, tl, t, next);
}

// LayerNorm's statistics as ln_row_stats (row_stats.h), lane-wise: the mean, then the
// corrected two-pass variance (sum(d^2) - sum(d)^2 / C with d = x - mean0).
template <typename T>
void ln_fwd_tile(const FwdArgs<T>& a, const Tiles& tl, const Tiles::Unit& t,
                 const Tiles::Unit* next) {
  using IO = RowIO<T>;
  using A = acc_t<T>;
  using SIO = RowIO<A>;
  using V = typename IO::V;
  const Windows<IO::kStep> win(t.n);
  const T* x = a.x + tl.data(t);
  A* mean = a.mean + tl.stats(t);
  A* rstd = a.rstd + tl.stats(t);
  const A inv_n = A(1) / static_cast<A>(tl.C);
  const V vn(static_cast<A>(tl.C)), vinv(inv_n), ve(static_cast<A>(a.eps)), one(A(1)), zero(A(0));
  auto load2 = [&](int64_t j, int64_t k0, int64_t k1, V (&v)[4]) {
    IO::load_n(x + j * tl.S + win.off(k0), win.len, v[0], v[1]);
    IO::load_n(x + j * tl.S + win.off(k1), win.len, v[2], v[3]);
  };
  window_pairs<4, V>(
      win, tl.C,
      [&](int64_t j, int64_t k0, int64_t k1, auto& p) {
        V v[4];
        load2(j, k0, k1, v);
        for (int i = 0; i < 4; ++i) p[i] = p[i] + v[i];
      },
      [&](int64_t k0, int64_t k1, const auto& s) {
        V m0[4];
        for (int i = 0; i < 4; ++i) m0[i] = s[i] / vn;
        // The second pass over the same two windows, from L1.
        const auto tv = blocked_row_sum<8, V>(tl.C, 1, [&](int64_t j, int64_t, auto& p) {
          V v[4];
          load2(j, k0, k1, v);
          for (int i = 0; i < 4; ++i) {
            const V d = v[i] - m0[i];
            p[i] = at::vec::fmadd(d, d, p[i]);
            p[4 + i] = p[4 + i] + d;
          }
        });
        V mu[4], rs[4];
        for (int i = 0; i < 4; ++i) {
          const V sd = tv[4 + i];
          mu[i] = m0[i] + sd * vinv;
          const V var = (tv[i] - sd * sd * vinv) * vinv;
          // var < 0 ? 0 : var, as ln_row_stats (keeps NaN)
          rs[i] = one / (V::blendv(var, zero, var < zero) + ve).sqrt();
        }
        SIO::store_n(mean + win.off(k0), win.len, mu[0], mu[1]);
        SIO::store_n(mean + win.off(k1), win.len, mu[2], mu[3]);
        SIO::store_n(rstd + win.off(k0), win.len, rs[0], rs[1]);
        SIO::store_n(rstd + win.off(k1), win.len, rs[2], rs[3]);
      });
  fwd_output(a, tl, t, next);
}

template <typename T, typename Tile>
void fwd_units(const FwdArgs<T>& a, int64_t M, int64_t C, int64_t S, Tile&& tile) {
  const Tiles tl(M, C, S, RowIO<T>::kStep, sizeof(T));
  const OutputPrefault pf(a.y, M / S, C * S * static_cast<int64_t>(sizeof(T)));
  at::parallel_for(0, tl.count, row_grain(C * tl.width), [&](int64_t b, int64_t e) {
    for_each_unit(tl, pf, b, e, b, e, [&](const Tiles::Unit& t, const Tiles::Unit* next) {
      tile(a, tl, t, next);
    });
  });
}

// ---------------------------------------------------------------------------------------
// Backward

template <typename T>
struct BwdArgs {
  const T* dy;
  const T* x;
  const acc_t<T>* mean;  // layer norm only
  const acc_t<T>* rstd;
  const acc_t<T>* w;  // may be null
  T* dx;
};

// Per-window scratch of a tile: C1 and C2 of dx = rstd * (g - C1 - xhat * C2) (C1 = 0 for
// RMSNorm), indexed by window (k * kStep), not by position.
template <typename A>
struct BwdScratch {
  alignas(64) A c1[2 * kMaxTile];
  alignas(64) A c2[2 * kMaxTile];
};

// The output pass of a tile: dx from the scratch, and each channel's dy * xhat and dy summed
// over the tile into dwp[j] / dbp[j] (may be null). Prefetches the next tile's x and dy.
template <typename T>
void bwd_output(const BwdArgs<T>& a, const Tiles& tl, const Tiles::Unit& t,
                const Tiles::Unit* next, const BwdScratch<acc_t<T>>& sc, acc_t<T>* dwp,
                acc_t<T>* dbp) {
  using IO = RowIO<T>;
  using A = acc_t<T>;
  using SIO = RowIO<A>;
  using V = typename IO::V;
  constexpr int64_t kStep = IO::kStep;
  const Windows<kStep> win(t.n);
  const int64_t base = tl.data(t);
  const A* mean = a.mean ? a.mean + tl.stats(t) : nullptr;
  const A* rstd = a.rstd + tl.stats(t);
  for (int64_t j = 0; j < tl.C; ++j) {
    if (next) {
      prefetch_run(a.x + tl.data(*next) + j * tl.S, next->n);
      prefetch_run(a.dy + tl.data(*next) + j * tl.S, next->n);
    }
    const T* dyj = a.dy + base + j * tl.S;
    const T* xj = a.x + base + j * tl.S;
    T* dxj = a.dx + base + j * tl.S;
    const V wj(a.w ? a.w[j] : A(1));
    V dwa(A(0)), dwb(A(0)), dba(A(0)), dbb(A(0));
    for (int64_t k = 0; k < win.count; ++k) {
      const int64_t o = win.off(k);
      V ga, gb, xa, xb, ra, rb, ca, cb;
      IO::load_n(dyj + o, win.len, ga, gb);
      IO::load_n(xj + o, win.len, xa, xb);
      if (mean) {
        SIO::load_n(mean + o, win.len, ra, rb);
        xa = xa - ra;
        xb = xb - rb;
      }
      SIO::load_n(rstd + o, win.len, ra, rb);
      xa = xa * ra;  // xhat
      xb = xb * rb;
      if (dwp || dbp) {  // before dy is scaled by w
        V pa = ga, pb = gb;
        if (const int64_t d = win.dup(k)) zero_head(pa, pb, d);
        dwa = at::vec::fmadd(pa, xa, dwa);
        dwb = at::vec::fmadd(pb, xb, dwb);
        dba = dba + pa;
        dbb = dbb + pb;
      }
      if (a.w) {
        ga = ga * wj;
        gb = gb * wj;
      }
      if (mean) {  // g - C1 first, as ln_bwd_rows: (g - c1 - xhat * c2) * rstd
        SIO::load(sc.c1 + k * kStep, ca, cb);
        ga = ga - ca;
        gb = gb - cb;
      }
      SIO::load(sc.c2 + k * kStep, ca, cb);
      IO::store_n(dxj + o, win.len, (ga - xa * ca) * ra, (gb - xb * cb) * rb);
    }
    if (dwp) dwp[j] += reduce_add(dwa + dwb);
    if (dbp) dbp[j] += reduce_add(dba + dbb);
  }
}

// dx = rstd * (g - xhat * c), g = dy * w, xhat = x * rstd, c = rstd * mean(g * x): the row
// kernel's grouping (rms_norm_cpu.cpp: no intermediate outgrows |dx|).
template <typename T>
void rms_bwd_tile(const BwdArgs<T>& a, const Tiles& tl, const Tiles::Unit& t,
                  const Tiles::Unit* next, acc_t<T>* dwp) {
  using IO = RowIO<T>;
  using A = acc_t<T>;
  using SIO = RowIO<A>;
  using V = typename IO::V;
  constexpr int64_t kStep = IO::kStep;
  const Windows<kStep> win(t.n);
  const T* dy = a.dy + tl.data(t);
  const T* x = a.x + tl.data(t);
  const A* rstd = a.rstd + tl.stats(t);
  const V vn(static_cast<A>(tl.C));
  BwdScratch<A> sc;
  window_pairs<4, V>(
      win, tl.C,
      [&](int64_t j, int64_t k0, int64_t k1, auto& p) {
        const V wj(a.w ? a.w[j] : A(1));
        const int64_t r = j * tl.S;
        V g[4], v[4];
        IO::load_n(dy + r + win.off(k0), win.len, g[0], g[1]);
        IO::load_n(dy + r + win.off(k1), win.len, g[2], g[3]);
        IO::load_n(x + r + win.off(k0), win.len, v[0], v[1]);
        IO::load_n(x + r + win.off(k1), win.len, v[2], v[3]);
        for (int i = 0; i < 4; ++i) p[i] = at::vec::fmadd(a.w ? g[i] * wj : g[i], v[i], p[i]);
      },
      [&](int64_t k0, int64_t k1, const auto& s) {
        V ra, rb;
        SIO::load_n(rstd + win.off(k0), win.len, ra, rb);
        SIO::store(sc.c2 + k0 * kStep, ra * (s[0] / vn), rb * (s[1] / vn));
        SIO::load_n(rstd + win.off(k1), win.len, ra, rb);
        SIO::store(sc.c2 + k1 * kStep, ra * (s[2] / vn), rb * (s[3] / vn));
      });
  bwd_output(a, tl, t, next, sc, dwp, nullptr);
}

// xhat = (x - mean) * rstd, g = dy * w: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
// as ln_bwd_rows.
template <typename T>
void ln_bwd_tile(const BwdArgs<T>& a, const Tiles& tl, const Tiles::Unit& t,
                 const Tiles::Unit* next, acc_t<T>* dwp, acc_t<T>* dbp) {
  using IO = RowIO<T>;
  using A = acc_t<T>;
  using SIO = RowIO<A>;
  using V = typename IO::V;
  constexpr int64_t kStep = IO::kStep;
  const Windows<kStep> win(t.n);
  const T* dy = a.dy + tl.data(t);
  const T* x = a.x + tl.data(t);
  const A* mean = a.mean + tl.stats(t);
  const A* rstd = a.rstd + tl.stats(t);
  const V vinv(A(1) / static_cast<A>(tl.C));
  BwdScratch<A> sc;
  for (int64_t k0 = 0; k0 < win.count; k0 += 2) {
    const int64_t k1 = std::min(k0 + 1, win.count - 1);
    V m[4], r[4];
    SIO::load_n(mean + win.off(k0), win.len, m[0], m[1]);
    SIO::load_n(mean + win.off(k1), win.len, m[2], m[3]);
    SIO::load_n(rstd + win.off(k0), win.len, r[0], r[1]);
    SIO::load_n(rstd + win.off(k1), win.len, r[2], r[3]);
    // Padded lanes (S < kStep): dy = 0, so g = 0 and both sums stay 0 there.
    const auto s = blocked_row_sum<8, V>(tl.C, 1, [&](int64_t j, int64_t, auto& p) {
      const V wj(a.w ? a.w[j] : A(1));
      const int64_t rj = j * tl.S;
      V g[4], v[4];
      IO::load_n(dy + rj + win.off(k0), win.len, g[0], g[1]);
      IO::load_n(dy + rj + win.off(k1), win.len, g[2], g[3]);
      IO::load_n(x + rj + win.off(k0), win.len, v[0], v[1]);
      IO::load_n(x + rj + win.off(k1), win.len, v[2], v[3]);
      for (int i = 0; i < 4; ++i) {
        if (a.w) g[i] = g[i] * wj;
        p[i] = p[i] + g[i];
        p[4 + i] = at::vec::fmadd(g[i], (v[i] - m[i]) * r[i], p[4 + i]);
      }
    });
    SIO::store(sc.c1 + k0 * kStep, s[0] * vinv, s[1] * vinv);
    SIO::store(sc.c1 + k1 * kStep, s[2] * vinv, s[3] * vinv);
    SIO::store(sc.c2 + k0 * kStep, s[4] * vinv, s[5] * vinv);
    SIO::store(sc.c2 + k1 * kStep, s[6] * vinv, s[7] * vinv);
  }
  bwd_output(a, tl, t, next, sc, dwp, dbp);
}

// Runs tile(tl, t, next, dwp, dbp) over every unit: without parameter gradients in plain
// parallel ranges, otherwise in RowChunks of units with a PartialTree each (param_rows.h),
// the partial row [dweight | dbias] (each padded to a whole step) shared by a block of
// kBlockRows tiles; then dw / db (dtype W) = the chunks' sums added pairwise.
template <typename T, typename W, typename Tile>
void bwd_units(const BwdArgs<T>& a, const Launch& l, int64_t M, int64_t C, int64_t S, W* dw,
               W* db, Tile&& tile) {
  using A = acc_t<T>;
  const Tiles tl(M, C, S, RowIO<T>::kStep, 2 * sizeof(T));
  const OutputPrefault pf(a.dx, M / S, C * S * static_cast<int64_t>(sizeof(T)));
  if (dw == nullptr && db == nullptr) {
    at::parallel_for(0, tl.count, row_grain(C * tl.width), [&](int64_t b, int64_t e) {
      for_each_unit(tl, pf, b, e, b, e, [&](const Tiles::Unit& t, const Tiles::Unit* next) {
        tile(tl, t, next, nullptr, nullptr);
      });
    });
    return;
  }
  const RowChunks chunks(tl.count, C * tl.width);
  const int64_t stride = padded<A>(C);
  const int64_t db_off = dw ? stride : 0;
  const TreeWorkspace<A> ws(l.ws, chunks, ((dw != nullptr) + (db != nullptr)) * stride);
  std::vector<A*> sums(static_cast<size_t>(chunks.count));
  for_each_chunk(chunks, [&](int64_t c) {
    PartialTree<A> tree = ws.tree(c);
    const int64_t cb = chunks.begin(c), ce = chunks.end(c);
    for_each_block(tree, cb, ce, [&](int64_t b, int64_t e, A* part) {
      // The chunk, not the block, is the thread's range (prefetching crosses blocks).
      for_each_unit(tl, pf, cb, ce, b, e, [&](const Tiles::Unit& t, const Tiles::Unit* next) {
        tile(tl, t, next, dw ? part : nullptr, db ? part + db_off : nullptr);
      });
    });
    sums[c] = tree.finish();
  });
  if (dw) sum_chunk_rows<A, W>(sums, 0, C, dw);
  if (db) sum_chunk_rows<A, W>(sums, db_off, C, db);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Entries (kernels.h), called by rms_fwd / rms_bwd / ln_fwd / ln_bwd when p.inner > 1.
// M = B * S rows of N = C channels; S = p.inner.

void rms_fwd_channels_first(const RmsFwdParams& p, const Launch&) {
  dispatch_pair(p.t, p.w, [&](auto t_tag, auto w_tag) {
    using T = typename decltype(t_tag)::type;
    using W = typename decltype(w_tag)::type;
    using A = acc_t<T>;
    EffectiveParam<A> wp(static_cast<const W*>(p.weight), p.N, p.offset);
    const FwdArgs<T> a{static_cast<const T*>(p.x), static_cast<T*>(p.y), nullptr,
                       static_cast<A*>(p.rstd), wp.get(), nullptr, p.eps};
    fwd_units(a, p.M, p.N, p.inner, rms_fwd_tile<T>);
  });
}

void ln_fwd_channels_first(const LnFwdParams& p, const Launch&) {
  dispatch_pair(p.t, p.w, [&](auto t_tag, auto w_tag) {
    using T = typename decltype(t_tag)::type;
    using W = typename decltype(w_tag)::type;
    using A = acc_t<T>;
    EffectiveParam<A> wp(static_cast<const W*>(p.weight), p.N, 0.0);
    EffectiveParam<A> bp(static_cast<const W*>(p.bias), p.N, 0.0);
    const FwdArgs<T> a{static_cast<const T*>(p.x), static_cast<T*>(p.y), static_cast<A*>(p.mean),
                       static_cast<A*>(p.rstd), wp.get(), bp.get(), p.eps};
    fwd_units(a, p.M, p.N, p.inner, ln_fwd_tile<T>);
  });
}

void rms_bwd_channels_first(const RmsBwdParams& p, const Launch& l) {
  // The channels-first host (norm_2d.cpp) passes dy in x's dtype and no grad_residual.
  TORCH_CHECK(p.x == p.g && p.gres == nullptr,
              "rmsnorm_ext: channels-first rms backward takes dy in x's dtype, no grad_residual");
  dispatch_pair(p.g, p.w, [&](auto t_tag, auto w_tag) {
    using T = typename decltype(t_tag)::type;
    using W = typename decltype(w_tag)::type;
    using A = acc_t<T>;
    EffectiveParam<A> wp(static_cast<const W*>(p.weight), p.N, p.offset);
    const BwdArgs<T> a{static_cast<const T*>(p.dy), static_cast<const T*>(p.x_in), nullptr,
                       static_cast<const A*>(p.rstd), wp.get(), static_cast<T*>(p.dx)};
    bwd_units(a, l, p.M, p.N, p.inner, static_cast<W*>(p.dw), static_cast<W*>(nullptr),
              [&](const Tiles& tl, const Tiles::Unit& t, const Tiles::Unit* next, A* dwp, A*) {
                rms_bwd_tile(a, tl, t, next, dwp);
              });
  });
}

void ln_bwd_channels_first(const LnBwdParams& p, const Launch& l) {
  dispatch_pair(p.t, p.w, [&](auto t_tag, auto w_tag) {
    using T = typename decltype(t_tag)::type;
    using W = typename decltype(w_tag)::type;
    using A = acc_t<T>;
    EffectiveParam<A> wp(static_cast<const W*>(p.weight), p.N, 0.0);
    const BwdArgs<T> a{static_cast<const T*>(p.dy), static_cast<const T*>(p.x),
                       static_cast<const A*>(p.mean), static_cast<const A*>(p.rstd), wp.get(),
                       static_cast<T*>(p.dx)};
    // dw and db have dtype W (the weight's, or the statistics' without a weight).
    bwd_units(a, l, p.M, p.N, p.inner, static_cast<W*>(p.dw), static_cast<W*>(p.db),
              [&](const Tiles& tl, const Tiles::Unit& t, const Tiles::Unit* next, A* dwp,
                  A* dbp) { ln_bwd_tile(a, tl, t, next, dwp, dbp); });
  });
}

}  // namespace rmsnorm_ext::cpu
