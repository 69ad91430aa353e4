// CPU kernels for RMSNorm: forward, backward and the fused residual add.
//
// Each row is read from memory once: the first pass (sum of squares) brings it into L1/L2
// and the second pass (scale and store) re-reads it from there. Rows run in parallel;
// nothing here calls ATen math.
#include "../common.h"
#include "param_rows.h"
#include "vec_io.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>

namespace rmsnorm_ext::cpu {
namespace {

template <typename T>
acc_t<T> row_sumsq(const T* x, int64_t N) {
  using IO = RowIO<T>;
  using V = typename IO::V;
  const auto t = blocked_row_sum<4, V>(N, 2 * IO::kStep, [&](int64_t j, int64_t n, auto& p) {
    V a, b, c, d;
    IO::load2_n(x + j, n, a, b, c, d);
    p[0] = at::vec::fmadd(a, a, p[0]);
    p[1] = at::vec::fmadd(b, b, p[1]);
    p[2] = at::vec::fmadd(c, c, p[2]);
    p[3] = at::vec::fmadd(d, d, p[3]);
  });
  return reduce_add((t[0] + t[1]) + (t[2] + t[3]));
}

template <typename A>
inline A rstd_from(A sumsq, int64_t N, double eps) {
  return A(1) / std::sqrt(sumsq / static_cast<A>(N) + static_cast<A>(eps));
}

// y = x * rstd * w  (w == nullptr: no weight). x and y may alias. `next` (may be null):
// the row the caller reads next, prefetched while this one is written, so its trip from
// memory overlaps this row's arithmetic and stores instead of following them.
template <typename T, typename Y>
void row_scale(const T* x, const acc_t<T>* w, acc_t<T> rstd, int64_t N, Y* y,
               const void* next = nullptr) {
  using IO = RowIO<T>;
  using OUT = RowIO<Y>;
  using A = acc_t<T>;
  using V = typename IO::V;
  using WIO = RowIO<A>;
  static_assert(std::is_same_v<A, acc_t<Y>>);
  const V r(rstd);
  V a, b, wa, wb;
  int64_t j = 0;
  const char* pf = static_cast<const char*>(next);
  constexpr int64_t kStepBytes = IO::kStep * static_cast<int64_t>(sizeof(T));
  for (; j + IO::kStep <= N; j += IO::kStep) {
    if (pf) {
      for (int64_t o = 0; o < kStepBytes; o += 64) __builtin_prefetch(pf + j * sizeof(T) + o, 0, 3);
    }
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
  if (j < N) {
    IO::load_tail(x + j, N - j, a, b);
    a = a * r;
    b = b * r;
    if (w) {
      WIO::load_tail(w + j, N - j, wa, wb);
      a = a * wa;
      b = b * wb;
    }
    OUT::store_tail(y + j, N - j, a, b);
  }
}

template <typename T>
void rms_fwd_rows(const T* x, T* y, acc_t<T>* rstd, const acc_t<T>* w, int64_t M, int64_t N,
                  double eps) {
  at::parallel_for(0, M, row_grain(N), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* xr = x + i * N;
      const auto r = rstd_from(row_sumsq(xr, N), N, eps);
      rstd[i] = r;
      row_scale(xr, w, r, N, y + i * N, i + 1 < e ? xr + N : nullptr);
    }
  });
}

// h = x + r (rounded to R), y = rms_norm(h) in T. h may alias r and y may alias x
// (the in-place variant): each row's reads of x and r finish before y is written.
template <typename T, typename R>
void fused_add_rows(const T* x, const R* r, R* h, T* y, acc_t<T>* rstd, const acc_t<T>* w,
                    int64_t M, int64_t N, double eps) {
  using XIO = RowIO<T>;
  using HIO = RowIO<R>;
  using A = acc_t<T>;
  using V = typename XIO::V;
  static_assert(std::is_same_v<A, acc_t<R>>);
  at::parallel_for(0, M, row_grain(N), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* xr = x + i * N;
      const R* rr = r + i * N;
      R* hr = h + i * N;
      // Sum of squares of h as stored (rounded to R), so the fused result equals the
      // unfused add-then-normalize exactly.
      // Same accumulation order as row_sumsq, so fused and unfused round alike.
      constexpr int64_t S = XIO::kStep;
      const auto t = blocked_row_sum<4, V>(N, 2 * S, [&](int64_t j, int64_t n, auto& p) {
        const int64_t n1 = std::min(n, S);
        V xa, xb, ra, rb, hc(0), hd(0);
        XIO::load_n(xr + j, n1, xa, xb);
        HIO::load_n(rr + j, n1, ra, rb);
        HIO::store_n(hr + j, n1, xa + ra, xb + rb);
        HIO::load_n(hr + j, n1, ra, rb);
        if (n > S) {
          XIO::load_n(xr + j + S, n - S, xa, xb);
          HIO::load_n(rr + j + S, n - S, hc, hd);
          HIO::store_n(hr + j + S, n - S, xa + hc, xb + hd);
          HIO::load_n(hr + j + S, n - S, hc, hd);
        }
        p[0] = at::vec::fmadd(ra, ra, p[0]);
        p[1] = at::vec::fmadd(rb, rb, p[1]);
        p[2] = at::vec::fmadd(hc, hc, p[2]);
        p[3] = at::vec::fmadd(hd, hd, p[3]);
      });
      const A rs = rstd_from(reduce_add((t[0] + t[1]) + (t[2] + t[3])), N, eps);
      rstd[i] = rs;
      row_scale(static_cast<const R*>(hr), w, rs, N, y + i * N);
    }
  });
}

// dx = rstd * (g - x * rstd^2 * mean(g * x)) (+ grad_residual), g = dy * w.
// dwp (may be null): this chunk's partial row of sum(dy * x * rstd).
template <typename X, typename G>
void rms_bwd_rows(const G* dy, const X* x, const acc_t<X>* rstd, const acc_t<X>* w,
                  const X* gres, X* dx, acc_t<X>* dwp, int64_t row_begin, int64_t row_end,
                  int64_t N) {
  using XIO = RowIO<X>;
  using GIO = RowIO<G>;
  using A = acc_t<X>;
  using AIO = RowIO<A>;
  using V = typename XIO::V;
  static_assert(std::is_same_v<A, acc_t<G>>);
  constexpr int64_t S = XIO::kStep;
  for (int64_t i = row_begin; i < row_end; ++i) {
    const G* dyr = dy + i * N;
    const X* xr = x + i * N;
    const A r = rstd[i];
    V ga, gb, xa, xb, wa, wb;
    auto load_g = [&](int64_t j, int64_t n) {  // dy, x and w of one step (n < S: tail)
      GIO::load_n(dyr + j, n, ga, gb);
      XIO::load_n(xr + j, n, xa, xb);
      if (w) AIO::load_n(w + j, n, wa, wb);
    };
    const auto t = blocked_row_sum<2, V>(N, S, [&](int64_t j, int64_t n, auto& p) {
      load_g(j, n);
      if (w) {
        ga = ga * wa;
        gb = gb * wb;
      }
      p[0] = at::vec::fmadd(ga, xa, p[0]);
      p[1] = at::vec::fmadd(gb, xb, p[1]);
    });
    // (r^2 * mean(g*x)) * r: r^3 alone underflows to a denormal for |x| >~ 1e13 in fp32.
    const A k = (r * r * (reduce_add(t[0] + t[1]) / static_cast<A>(N))) * r;
    const V vr(r), vk(k);
    for (int64_t j = 0; j < N; j += S) {
      const int64_t n = std::min(S, N - j);
      load_g(j, n);
      if (dwp) {  // dweight += dy * x * rstd (before dy is scaled by w)
        V pa, pb;
        AIO::load(dwp + j, pa, pb);  // dwp rows are padded to a whole step
        pa = at::vec::fmadd(ga * xa, vr, pa);
        pb = at::vec::fmadd(gb * xb, vr, pb);
        AIO::store(dwp + j, pa, pb);
      }
      if (w) {
        ga = ga * wa;
        gb = gb * wb;
      }
      V da = ga * vr - xa * vk;
      V db = gb * vr - xb * vk;
      if (gres) {
        V ra, rb;
        XIO::load_n(gres + i * N + j, n, ra, rb);
        da = da + ra;
        db = db + rb;
      }
      XIO::store_n(dx + i * N + j, n, da, db);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Ops

std::tuple<Tensor, Tensor> rms_norm_fwd(const Tensor& input, at::IntArrayRef normalized_shape,
                                        const std::optional<Tensor>& weight, double eps,
                                        double weight_offset) {
  check_input(input, "input");
  check_cpu(input, "input");
  const auto rs = check_normalized_shape(input, normalized_shape);
  check_param(weight, "weight", input, normalized_shape);
  check_eps(eps);
  check_offset(weight_offset);
  const Tensor x = input.contiguous();
  const Tensor w = contiguous_or_empty(weight);
  Tensor y = at::empty(input.sizes(), x.options());
  Tensor rstd = at::empty(stats_shape(input, normalized_shape),
                          x.options().dtype(stats_dtype(x.scalar_type())));
  if (rs.M == 0) return {y, rstd};
  RMSNORM_EXT_DISPATCH_TW(x.scalar_type(), param_dtype(x, w, Tensor()), "rms_norm_fwd", [&] {
    using A = acc_t<scalar_t>;
    EffectiveParam<A> wp(data_or_null<param_t>(w), rs.N, weight_offset);
    rms_fwd_rows<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                           rstd.mutable_data_ptr<A>(), wp.get(), rs.M, rs.N, eps);
  });
  return {y, rstd};
}

// Runs the fused kernel; x/y may alias and r/h may alias (in-place variant).
void fused_add_dispatch(const Tensor& x, const Tensor& r, const Tensor& h, const Tensor& y,
                        const Tensor& rstd, const Tensor& w, RowShape rs, double eps,
                        double weight_offset) {
  RMSNORM_EXT_DISPATCH_TW(x.scalar_type(), param_dtype(x, w, Tensor()), "fused_add_rms_norm", [&] {
    using A = acc_t<scalar_t>;
    EffectiveParam<A> wp(data_or_null<param_t>(w), rs.N, weight_offset);
    dispatch_same_or_float<scalar_t>(r.scalar_type(), [&](auto tag) {
      using R = typename decltype(tag)::type;
      fused_add_rows<scalar_t, R>(x.const_data_ptr<scalar_t>(), r.const_data_ptr<R>(),
                                  h.mutable_data_ptr<R>(), y.mutable_data_ptr<scalar_t>(),
                                  rstd.mutable_data_ptr<A>(), wp.get(), rs.M, rs.N, eps);
    });
  });
}

std::tuple<Tensor, Tensor, Tensor> fused_add_rms_norm_fwd(
    const Tensor& input, const Tensor& residual, at::IntArrayRef normalized_shape,
    const std::optional<Tensor>& weight, double eps, double weight_offset) {
  check_cpu(input, "input");
  const auto rs = check_fused(input, residual, normalized_shape, weight, eps, weight_offset);
  const Tensor x = input.contiguous();
  const Tensor r = residual.contiguous();
  const Tensor w = contiguous_or_empty(weight);
  Tensor y = at::empty(input.sizes(), x.options());
  Tensor h = at::empty(input.sizes(), r.options());
  Tensor rstd = at::empty(stats_shape(input, normalized_shape),
                          x.options().dtype(stats_dtype(x.scalar_type())));
  if (rs.M > 0) fused_add_dispatch(x, r, h, y, rstd, w, rs, eps, weight_offset);
  return {y, h, rstd};
}

void fused_add_rms_norm_inplace(const Tensor& input, const Tensor& residual,
                                at::IntArrayRef normalized_shape,
                                const std::optional<Tensor>& weight, double eps,
                                double weight_offset) {
  check_cpu(input, "input");
  const auto rs = check_fused(input, residual, normalized_shape, weight, eps, weight_offset);
  // Refuse, before writing anything, arguments whose elements share memory: the kernel
  // would write one location twice (an expanded tensor) or read what it already wrote.
  TORCH_CHECK_VALUE(at::has_internal_overlap(input) != at::MemOverlap::Yes,
                    "rmsnorm_ext: fused_add_rms_norm_: input has elements that share memory "
                    "(expanded or overlapping); it cannot be written in place");
  TORCH_CHECK_VALUE(at::has_internal_overlap(residual) != at::MemOverlap::Yes,
                    "rmsnorm_ext: fused_add_rms_norm_: residual has elements that share memory "
                    "(expanded or overlapping); it cannot be written in place");
  TORCH_CHECK_VALUE(!input.is_same(residual) && (input.numel() == 0 || !(
                        input.storage().is_alias_of(residual.storage()))),
                    "rmsnorm_ext: fused_add_rms_norm_: input and residual must not share memory");
  if (rs.M == 0 || rs.N == 0) return;
  const Tensor w = contiguous_or_empty(weight);
  const Tensor x = input.contiguous();
  const Tensor r = residual.contiguous();
  Tensor rstd = at::empty({rs.M}, x.options().dtype(stats_dtype(x.scalar_type())));
  fused_add_dispatch(x, r, r, x, rstd, w, rs, eps, weight_offset);
  // Non-contiguous arguments were computed in contiguous copies: write them back.
  if (!x.is_same(input)) input.copy_(x);
  if (!r.is_same(residual)) residual.copy_(r);
}

std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& grad_out, const Tensor& input,
                                        const Tensor& rstd, const std::optional<Tensor>& weight,
                                        at::IntArrayRef normalized_shape, double weight_offset,
                                        const std::optional<Tensor>& grad_residual,
                                        bool compute_weight_grad) {
  check_input(input, "input");
  check_cpu(input, "input");
  const auto rs = check_normalized_shape(input, normalized_shape);
  check_grad(grad_out, input);
  // The weight goes with the activation dtype, which is grad_out's.
  check_param(weight, "weight", grad_out, normalized_shape);
  check_stats(rstd, "rstd", input, rs.M);
  check_offset(weight_offset);
  if (grad_residual.has_value() && grad_residual->defined()) {
    TORCH_CHECK_VALUE(grad_residual->sizes().equals(input.sizes()) &&
                          grad_residual->scalar_type() == input.scalar_type(),
                      "rmsnorm_ext: grad_residual must match the input's shape and dtype");
    check_same_device(*grad_residual, "grad_residual", input, "the input");
  }
  const Tensor x = input.contiguous();
  const Tensor dy = grad_out.contiguous();
  const Tensor rs_t = rstd.contiguous();
  const Tensor w = contiguous_or_empty(weight);
  const Tensor gres = contiguous_or_empty(grad_residual);
  const bool want_dw = compute_weight_grad && w.defined();
  Tensor dx = at::empty(input.sizes(), x.options());
  Tensor dw = want_dw ? at::empty(w.sizes(), w.options()) : empty_grad(x);
  if (rs.M == 0 || rs.N == 0) {
    if (want_dw) dw.zero_();
    return {dx, dw};
  }
  RMSNORM_EXT_DISPATCH_TW(dy.scalar_type(), param_dtype(dy, w, Tensor()), "rms_norm_bwd", [&] {
    using G = scalar_t;
    using A = acc_t<G>;
    EffectiveParam<A> wp(data_or_null<param_t>(w), rs.N, weight_offset);
    dispatch_same_or_float<G>(x.scalar_type(), [&](auto tag) {
      using X = typename decltype(tag)::type;
      const X* xptr = x.const_data_ptr<X>();
      const G* dyp = dy.const_data_ptr<G>();
      const A* rp = rs_t.const_data_ptr<A>();
      const X* gp = data_or_null<X>(gres);
      X* dxp = dx.mutable_data_ptr<X>();
      if (!want_dw) {
        at::parallel_for(0, rs.M, row_grain(rs.N), [&](int64_t b, int64_t e) {
          rms_bwd_rows<X, G>(dyp, xptr, rp, wp.get(), gp, dxp, nullptr, b, e, rs.N);
        });
        return;
      }
      const RowChunks chunks(rs.M);
      const int64_t stride = padded<A>(rs.N);
      std::vector<A> partial(static_cast<size_t>(chunks.count * stride));
      for_each_chunk(chunks, [&](int64_t c) {
        A* p = partial.data() + c * stride;
        std::fill(p, p + stride, A(0));
        rms_bwd_rows<X, G>(dyp, xptr, rp, wp.get(), gp, dxp, p, chunks.begin(c), chunks.end(c),
                           rs.N);
      });
      sum_partials<A, param_t>(partial.data(), chunks.count, stride, rs.N,
                               dw.mutable_data_ptr<param_t>());
    });
  });
  return {dx, dw};
}

}  // namespace
}  // namespace rmsnorm_ext::cpu

TORCH_LIBRARY_IMPL(rmsnorm_ext, CPU, m) {
  m.impl("rms_norm_fwd", &rmsnorm_ext::cpu::rms_norm_fwd);
  m.impl("rms_norm_bwd", &rmsnorm_ext::cpu::rms_norm_bwd);
  m.impl("fused_add_rms_norm_fwd", &rmsnorm_ext::cpu::fused_add_rms_norm_fwd);
  m.impl("fused_add_rms_norm_inplace", &rmsnorm_ext::cpu::fused_add_rms_norm_inplace);
}
