// CPU kernels of the adaLN modulation: y = norm(x) * (1 + scale[b]) + shift[b] for RMSNorm
// and LayerNorm (kernel_params.h, NormModulateParams), forward and backward.
//
// Forward: the row statistics exactly as the plain norms compute them (row_group_stats.h), then
// one pass that normalizes and applies weight, bias, scale and shift folded per sample
// (fold_sample) and rounds once. Rows run in parallel; row i reads scale / shift row i / S.
//
// Backward: two passes per row (the row reductions, then dx and the sums), as the plain
// norms' backward. Two kinds of sums over rows, both deterministic for a given thread count
// and cascaded (param_rows.h) so that their error grows like log(rows), not like rows:
//  - dweight / dbias over all M rows: one PartialTree per chunk of rows (blocks of
//    kBlockRows rows, added pairwise), the chunks' sums added pairwise (sum_chunk_rows);
//  - dscale / dshift over the S rows of each sample: the same chunks, each cut at sample
//    boundaries into segments; a segment's pieces (its rows within one block of the chunk,
//    at most kBlockRows) are added pairwise in a second PartialTree. A sample that lies
//    within one chunk is stored from there; one that spans chunks leaves a partial sum per
//    chunk, and those are added pairwise after the parallel region.
#include "dispatch.h"
#include "kernels.h"
#include "param_rows.h"
#include "prefault.h"
#include "row_group_stats.h"
#include "row_stats.h"
#include "vec_io.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

namespace rmsnorm_ext::cpu {
namespace {

// ---------------------------------------------------------------------------------------
// Forward

template <typename T, typename Sc>
struct FwdRows {
  using A = acc_t<T>;
  const T* x;
  T* y;
  A* mean;         // LN only
  A* rstd;
  const A* w;      // may be null
  const A* bias;   // LN only; may be null
  const Sc* scale;
  const Sc* shift;  // may be null
  int64_t N;
  int64_t S;
  double eps;
};

// Sample b's coefficients, folded: y = xhat * m + c with m = w * (1 + scale[b]) and
// c = bias * (1 + scale[b]) + shift[b] (absent operands drop out); one step (n elements at j).
template <bool LN, typename T, typename Sc>
C10_ALWAYS_INLINE void fold_step(const FwdRows<T, Sc>& a, int64_t b, int64_t j, int64_t n,
                                 Vectorized<acc_t<T>>& ma, Vectorized<acc_t<T>>& mb,
                                 Vectorized<acc_t<T>>& ca, Vectorized<acc_t<T>>& cb) {
  using SIO = RowIO<Sc>;
  using A = acc_t<T>;
  using AIO = RowIO<A>;
  using V = Vectorized<A>;
  const V one(A(1));
  V sa, sb, pa, pb;
  SIO::load_n(a.scale + b * a.N + j, n, sa, sb);
  sa = sa + one;  // 1 + scale
  sb = sb + one;
  ma = sa;
  mb = sb;
  if (a.w) {
    AIO::load_n(a.w + j, n, pa, pb);
    ma = pa * sa;
    mb = pb * sb;
  }
  ca = V(A(0));
  cb = V(A(0));
  if (a.shift) SIO::load_n(a.shift + b * a.N + j, n, ca, cb);
  if (LN && a.bias) {
    AIO::load_n(a.bias + j, n, pa, pb);
    ca = at::vec::fmadd(pa, sa, ca);
    cb = at::vec::fmadd(pb, sb, cb);
  }
}

// Sample b's m and c as two fp32 rows, built once per sample and thread where its rows share
// them (S > 1: each row used to convert scale and shift again and apply four operations; the
// output pass is then one FMA per element after xhat).
template <bool LN, typename T, typename Sc>
void fold_sample(const FwdRows<T, Sc>& a, int64_t b, acc_t<T>* m, acc_t<T>* c) {
  using AIO = RowIO<acc_t<T>>;
  using V = typename AIO::V;
  constexpr int64_t S = RowIO<T>::kStep;
  for (int64_t j = 0; j < a.N; j += S) {
    const int64_t n = std::min(S, a.N - j);
    V ma, mb, ca, cb;
    fold_step<LN>(a, b, j, n, ma, mb, ca, cb);
    AIO::store_n(m + j, n, ma, mb);
    AIO::store_n(c + j, n, ca, cb);
  }
}

// Row i: statistics, then y = xhat * m + c, m and c from its sample's folded rows
// (kFolded) or folded step by step here (S = 1: no other row shares them; or very long rows). `next`: the row
// the caller computes next (prefetched while this one is written), or null. keep: N floats
// of scratch for a bfloat16/float16 row converted once (row_stats.h), or null.
template <bool LN, bool kFolded, bool kKeep, typename T, typename Sc>
inline void mod_fwd_row(const FwdRows<T, Sc>& a, int64_t i, const void* next, const acc_t<T>* m,
                        const acc_t<T>* c, acc_t<T>* keep) {
  using A = acc_t<T>;
  using AIO = RowIO<A>;
  using V = typename AIO::V;
  constexpr int64_t S = RowIO<T>::kStep;
  const int64_t N = a.N;
  const T* xr = a.x + i * N;
  T* yr = a.y + i * N;
  A mean = A(0), rstd;
  if constexpr (LN) {
    const auto st = ln_row_stats<T, kKeep>(xr, N, a.eps, keep);
    mean = st.mean;
    rstd = st.rstd;
    a.mean[i] = mean;
  } else {
    rstd = rstd_from(row_sumsq<T, kKeep>(xr, N, keep), N, a.eps);
  }
  a.rstd[i] = rstd;
  const V vm(mean), vr(rstd);
  V xa, xb, pa, pb, qa, qb;
  for (int64_t j = 0; j < N; j += S) {
    const int64_t n = std::min(S, N - j);
    prefetch_step<T, S>(next, j);
    if constexpr (kKeep) {
      AIO::load_n(keep + j, n, xa, xb);
    } else {
      RowIO<T>::load_n(xr + j, n, xa, xb);
    }
    if constexpr (LN) {
      xa = (xa - vm) * vr;
      xb = (xb - vm) * vr;
    } else {
      xa = xa * vr;
      xb = xb * vr;
    }
    if constexpr (kFolded) {
      AIO::load_n(m + j, n, pa, pb);
      AIO::load_n(c + j, n, qa, qb);
    } else {
      fold_step<LN>(a, i / a.S, j, n, pa, pb, qa, qb);
    }
    RowIO<T>::store_n(yr + j, n, at::vec::fmadd(xa, pa, qa), at::vec::fmadd(xb, pb, qb));
  }
}

// kKeep: bfloat16 / float16 rows converted to fp32 once (with_keep, row_stats.h).
template <bool LN, bool kKeep, typename T, typename Sc>
void mod_fwd(const FwdRows<T, Sc>& a, int64_t M) {
  using A = acc_t<T>;
  const OutputPrefault pf(a.y, M, a.N * static_cast<int64_t>(sizeof(T)));
  at::parallel_for(0, M, row_grain(a.N), [&](int64_t b, int64_t e) {
    const int64_t N = a.N;
    // Folded rows where a sample's rows share them and they stay small (per-thread buffers).
    const bool fold = a.S > 1 && N <= kKeepMaxN;
    const int64_t rows = (fold ? 2 : 0) + (kKeep ? 1 : 0);
    const std::unique_ptr<A[]> buf(rows ? new A[rows * N] : nullptr);
    A* m = fold ? buf.get() : nullptr;
    A* c = fold ? m + N : nullptr;
    A* keep = kKeep ? buf.get() + (fold ? 2 * N : 0) : nullptr;
    int64_t folded = -1;
    for (int64_t i = b; i < e; ++i) {
      pf.before_row(i, b, e);
      const T* next = i + 1 < e ? a.x + (i + 1) * a.N : nullptr;
      if (!fold) {
        mod_fwd_row<LN, false, kKeep>(a, i, next, m, c, keep);
        continue;
      }
      if (i / a.S != folded) {
        folded = i / a.S;
        fold_sample<LN>(a, folded, m, c);
      }
      mod_fwd_row<LN, true, kKeep>(a, i, next, m, c, keep);
    }
  });
}

// ---------------------------------------------------------------------------------------
// Backward

template <typename T, typename Sc>
struct BwdRows {
  using A = acc_t<T>;
  const T* dy;
  const T* x;
  const A* mean;   // LN only
  const A* rstd;
  const A* w;      // may be null
  const A* bias;   // LN only; may be null
  const Sc* scale;
  T* dx;
  int64_t N;
  int64_t S;
};

// The partial rows that rows add into (each may be null: not wanted), each padded to a
// whole step: dweight, dbias (any rows), dscale, dshift (rows of one sample only).
template <typename A>
struct Partials {
  A* dw = nullptr;
  A* db = nullptr;
  A* ds = nullptr;
  A* dsh = nullptr;
};

template <typename A, typename V>
inline void add_into(A* p, const V& a, const V& b) {
  V pa, pb;
  RowIO<A>::load(p, pa, pb);
  RowIO<A>::store(p, pa + a, pb + b);
}

template <typename A, typename V>
inline void fma_into(A* p, const V& x, const V& y, const V& u, const V& v) {
  V pa, pb;
  RowIO<A>::load(p, pa, pb);
  RowIO<A>::store(p, at::vec::fmadd(x, y, pa), at::vec::fmadd(u, v, pb));
}

// Rows [row_begin, row_end): dx, and the sums into `part` (its dscale / dshift rows only
// when every row is of one sample). pf: backs dx's pages ahead of the stores, for a thread's
// rows [pf_begin, pf_end); rows below pf_end are prefetched.
template <bool LN, typename T, typename Sc>
void mod_bwd_rows(const BwdRows<T, Sc>& a, int64_t row_begin, int64_t row_end,
                  const Partials<acc_t<T>>& part, const OutputPrefault& pf, int64_t pf_begin,
                  int64_t pf_end) {
  using IO = RowIO<T>;
  using SIO = RowIO<Sc>;
  using A = acc_t<T>;
  using AIO = RowIO<A>;
  using V = typename IO::V;
  constexpr int64_t S = IO::kStep;
  const int64_t N = a.N;
  const V one(A(1));
  for (int64_t i = row_begin; i < row_end; ++i) {
    pf.before_row(i, pf_begin, pf_end);
    const T* dyr = a.dy + i * N;
    const T* xr = a.x + i * N;
    const Sc* sr = a.scale + (i / a.S) * N;
    const V vm(LN ? a.mean[i] : A(0)), vr(a.rstd[i]);
    V da, db, xa, xb, ma, mb, wa, wb;
    // dy, xhat, m = 1 + scale and dyn = dy * m of one step (n < S: the zero-padded tail,
    // where dy = 0 makes every product below 0).
    auto load = [&](int64_t j, int64_t n) {
      IO::load_n(dyr + j, n, da, db);
      IO::load_n(xr + j, n, xa, xb);
      SIO::load_n(sr + j, n, ma, mb);
      if constexpr (LN) {
        xa = (xa - vm) * vr;
        xb = (xb - vm) * vr;
      } else {
        xa = xa * vr;
        xb = xb * vr;
      }
      ma = ma + one;
      mb = mb + one;
      if (a.w) AIO::load_n(a.w + j, n, wa, wb);
    };
    // Pass 1: sum(g * xhat) and (LN) sum(g), g = dyn * w.
    const auto t = blocked_row_sum<4, V>(N, S, [&](int64_t j, int64_t n, auto& p) {
      load(j, n);
      V ga = da * ma, gb = db * mb;
      if (a.w) {
        ga = ga * wa;
        gb = gb * wb;
      }
      p[0] = at::vec::fmadd(ga, xa, p[0]);
      p[1] = at::vec::fmadd(gb, xb, p[1]);
      if constexpr (LN) {
        p[2] = p[2] + ga;
        p[3] = p[3] + gb;
      }
    });
    const A inv_n = A(1) / static_cast<A>(N);
    const V c2(reduce_add(t[0] + t[1]) * inv_n);
    const V c1(LN ? reduce_add(t[2] + t[3]) * inv_n : A(0));
    // Pass 2 (the row from L1/L2): prefetch the next row's dy and x into L2 meanwhile.
    const bool pf_next = i + 1 < pf_end;
    for (int64_t j = 0; j < N; j += S) {
      const int64_t n = std::min(S, N - j);
      if (pf_next) {
        prefetch_step<T, S, 2>(dyr + N, j);
        prefetch_step<T, S, 2>(xr + N, j);
      }
      load(j, n);
      if (part.ds) {  // dscale += dy * yn, yn = xhat * w + bias
        V ya = xa, yb = xb;
        if (a.w) {
          ya = ya * wa;
          yb = yb * wb;
        }
        if (LN && a.bias) {
          V ba, bb;
          AIO::load_n(a.bias + j, n, ba, bb);
          ya = ya + ba;
          yb = yb + bb;
        }
        fma_into(part.ds + j, da, ya, db, yb);
      }
      if (part.dsh) add_into(part.dsh + j, da, db);
      V ga = da * ma, gb = db * mb;  // dyn
      if (part.dw) fma_into(part.dw + j, ga, xa, gb, xb);
      if (part.db) add_into(part.db + j, ga, gb);
      if (a.w) {
        ga = ga * wa;
        gb = gb * wb;
      }
      if constexpr (LN) {
        IO::store_n(a.dx + i * N + j, n, (ga - c1 - xa * c2) * vr, (gb - c1 - xb * c2) * vr);
      } else {
        IO::store_n(a.dx + i * N + j, n, (ga - xa * c2) * vr, (gb - xb * c2) * vr);
      }
    }
  }
}

// Stores a sum row (fp32 / fp64) as `n` elements of the output dtype.
template <typename A, typename O>
inline void store_row(const A* src, int64_t n, O* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<O>(src[j]);
}

// The whole backward of one dtype combination: T data, W parameters, Sc scale / shift.
template <bool LN, typename T, typename W, typename Sc>
void mod_bwd(const NormModulateBwdParams& p, const BwdRows<T, Sc>& a, const Launch& l) {
  using A = acc_t<T>;
  const int64_t M = p.M;
  const int64_t N = p.N;
  const int64_t S = p.S;
  const OutputPrefault pf(a.dx, M, N * static_cast<int64_t>(sizeof(T)));
  const bool want_dw = p.dweight != nullptr;
  const bool want_db = p.dbias != nullptr;
  const bool want_ds = p.dscale != nullptr;
  const bool want_dsh = p.dshift != nullptr;
  const bool want_p = want_dw || want_db;
  const bool want_s = want_ds || want_dsh;
  if (!want_p && !want_s) {
    at::parallel_for(0, M, row_grain(N), [&](int64_t b, int64_t e) {
      mod_bwd_rows<LN>(a, b, e, Partials<A>{}, pf, b, e);
    });
    return;
  }
  const int64_t stride = padded<A>(N);
  const RowChunks chunks(M, N);
  // Parameter partial rows: [dweight | dbias] (the wanted ones); sample partial rows:
  // [dscale | dshift] (the wanted ones).
  const int64_t p_db = want_dw ? stride : 0;
  const int64_t p_width = (want_dw + want_db) * stride;
  const int64_t s_dsh = want_ds ? stride : 0;
  const int64_t s_width = (want_ds + want_dsh) * stride;
  const std::optional<TreeWorkspace<A>> pws =
      want_p ? std::optional<TreeWorkspace<A>>(std::in_place, l.ws, chunks, p_width) : std::nullopt;
  const std::optional<TreeWorkspace<A>> sws =
      want_s ? std::optional<TreeWorkspace<A>>(std::in_place, l.ws, chunks, s_width) : std::nullopt;
  // Per chunk, the partial sums of the samples it shares with other chunks: slot 0 for its
  // first sample, slot 1 for its last one.
  A* slots = want_s ? static_cast<A*>(l.ws.alloc(
                          l.ws.ctx, static_cast<size_t>(chunks.count * 2 * s_width) * sizeof(A)))
                    : nullptr;
  auto slot = [&](int64_t c, int64_t sample) {
    return slots + (c * 2 + (sample == chunks.begin(c) / S ? 0 : 1)) * s_width;
  };
  Sc* ds_out = static_cast<Sc*>(p.dscale);
  Sc* dsh_out = static_cast<Sc*>(p.dshift);
  auto store_sample = [&](const A* sum, int64_t sample) {
    if (want_ds) store_row(sum, N, ds_out + sample * N);
    if (want_dsh) store_row(sum + s_dsh, N, dsh_out + sample * N);
  };

  std::vector<A*> sums(static_cast<size_t>(chunks.count));
  for_each_chunk(chunks, [&](int64_t c) {
    const int64_t cb = chunks.begin(c);
    const int64_t ce = chunks.end(c);
    std::optional<PartialTree<A>> ptree, stree;
    if (want_p) ptree.emplace(pws->tree(c));
    if (want_s) stree.emplace(sws->tree(c));
    for (int64_t bb = cb; bb < ce; bb += kBlockRows) {
      const int64_t be = std::min(ce, bb + kBlockRows);
      Partials<A> part;
      if (want_p) {
        A* row = ptree->begin_block();
        part.dw = want_dw ? row : nullptr;
        part.db = want_db ? row + p_db : nullptr;
      }
      // The block's rows, cut at sample boundaries (each piece is one block of its
      // sample's tree).
      for (int64_t i = bb; i < be;) {
        const int64_t sample = i / S;
        const int64_t sample_end = (sample + 1) * S;
        const int64_t e = std::min(be, sample_end);
        if (want_s) {
          A* row = stree->begin_block();
          part.ds = want_ds ? row : nullptr;
          part.dsh = want_dsh ? row + s_dsh : nullptr;
        }
        mod_bwd_rows<LN>(a, i, e, part, pf, cb, ce);
        if (want_s) {
          stree->end_block();
          if (e == sample_end || e == ce) {  // the sample's rows in this chunk are done
            const A* sum = stree->finish();
            if (sample * S >= cb && sample_end <= ce) {
              store_sample(sum, sample);
            } else {
              std::copy(sum, sum + s_width, slot(c, sample));
            }
            stree->reset();
          }
        }
        i = e;
      }
      if (want_p) ptree->end_block();
    }
    if (want_p) sums[c] = ptree->finish();
  });

  if (want_dw) sum_chunk_rows<A, W>(sums, 0, N, static_cast<W*>(p.dweight));
  if (want_db) sum_chunk_rows<A, W>(sums, p_db, N, static_cast<W*>(p.dbias));
  if (!want_s) return;
  // Samples that span chunks: the chunks' partial sums, added pairwise in chunk order.
  std::vector<A*> parts;
  for (int64_t c = 0; c + 1 < chunks.count;) {
    const int64_t ce = chunks.end(c);
    if (ce % S == 0) {
      ++c;
      continue;
    }
    const int64_t sample = ce / S;  // the last sample of chunk c goes on in chunk c + 1
    const int64_t sample_end = (sample + 1) * S;
    parts.clear();
    int64_t last = c;
    for (int64_t k = c; k < chunks.count && chunks.begin(k) < sample_end; ++k) {
      parts.push_back(slot(k, sample));
      last = k;
    }
    for (size_t step = 1; step < parts.size(); step *= 2) {
      for (size_t k = 0; k + step < parts.size(); k += 2 * step) {
        add_row(parts[k], parts[k + step], s_width);
      }
    }
    store_sample(parts[0], sample);
    c = last;  // its last sample may span further chunks
  }
}

// Calls f(bool_constant<LN>) for the kind.
template <typename F>
void dispatch_kind(NormKind kind, F&& f) {
  if (kind == NormKind::layer) return f(std::true_type{});
  TORCH_CHECK(kind == NormKind::rms, "rmsnorm_ext: norm_modulate: unsupported norm kind ",
              static_cast<int>(kind));
  f(std::false_type{});
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Entries, registered below (RMSNORM_EXT_REGISTER_CPU_KERNEL, kernel_registry.h)

void norm_modulate_fwd(const NormModulateParams& p, const Launch&) {
  dispatch_pair(p.t, p.w, [&](auto t_tag, auto w_tag) {
    using T = typename decltype(t_tag)::type;
    using W = typename decltype(w_tag)::type;
    using A = acc_t<T>;
    EffectiveParam<A> wp(static_cast<const W*>(p.weight), p.N, 0.0);
    EffectiveParam<A> bp(static_cast<const W*>(p.bias), p.N, 0.0);
    dispatch_companion<T>(p.s, [&](auto s_tag) {
      using Sc = typename decltype(s_tag)::type;
      FwdRows<T, Sc> a{};
      a.x = static_cast<const T*>(p.x);
      a.y = static_cast<T*>(p.y);
      a.mean = static_cast<A*>(p.mean);
      a.rstd = static_cast<A*>(p.rstd);
      a.w = wp.get();
      a.bias = bp.get();
      a.scale = static_cast<const Sc*>(p.scale);
      a.shift = static_cast<const Sc*>(p.shift);
      a.N = p.N;
      a.S = p.S;
      a.eps = p.eps;
      dispatch_kind(p.kind, [&](auto ln) {
        // LayerNorm rereads a row for its variance and its output, RMSNorm for its output.
        with_keep<T>(p.N, decltype(ln)::value ? 2 : 1, [&](auto keep) {
          mod_fwd<decltype(ln)::value, decltype(keep)::value>(a, p.M);
        });
      });
    });
  });
}

void norm_modulate_bwd(const NormModulateBwdParams& p, const Launch& l) {
  dispatch_pair(p.t, p.w, [&](auto t_tag, auto w_tag) {
    using T = typename decltype(t_tag)::type;
    using W = typename decltype(w_tag)::type;
    using A = acc_t<T>;
    EffectiveParam<A> wp(static_cast<const W*>(p.weight), p.N, 0.0);
    EffectiveParam<A> bp(static_cast<const W*>(p.bias), p.N, 0.0);
    dispatch_companion<T>(p.s, [&](auto s_tag) {
      using Sc = typename decltype(s_tag)::type;
      BwdRows<T, Sc> a{};
      a.dy = static_cast<const T*>(p.dy);
      a.x = static_cast<const T*>(p.x);
      a.mean = static_cast<const A*>(p.mean);
      a.rstd = static_cast<const A*>(p.rstd);
      a.w = wp.get();
      a.bias = bp.get();
      a.scale = static_cast<const Sc*>(p.scale);
      a.dx = static_cast<T*>(p.dx);
      a.N = p.N;
      a.S = p.S;
      dispatch_kind(p.kind, [&](auto ln) { mod_bwd<decltype(ln)::value, T, W, Sc>(p, a, l); });
    });
  });
}

RMSNORM_EXT_REGISTER_CPU_KERNEL(NormModulateFwd, norm_modulate_fwd);
RMSNORM_EXT_REGISTER_CPU_KERNEL(NormModulateBwd, norm_modulate_bwd);

}  // namespace rmsnorm_ext::cpu
