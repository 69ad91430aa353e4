// CPU kernels for LayerNorm: forward and backward.
//
// Forward reads a row from memory once and makes three passes over it while it sits in
// L1/L2: the mean, then the variance as sum((x - mean)^2) (two-pass, so a large mean does
// not cancel the variance away as E[x^2] - E[x]^2 would), then the output.
#include "../common.h"
#include "param_rows.h"
#include "vec_io.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

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

template <typename T>
void ln_fwd_rows(const T* x, T* y, acc_t<T>* mean_out, acc_t<T>* rstd_out, const acc_t<T>* w,
                 const acc_t<T>* bias, int64_t M, int64_t N, double eps) {
  using IO = RowIO<T>;
  using A = acc_t<T>;
  using V = typename IO::V;
  constexpr int64_t S = IO::kStep;
  at::parallel_for(0, M, row_grain(N), [&](int64_t rb, int64_t re) {
    for (int64_t i = rb; i < re; ++i) {
      const T* xr = x + i * N;
      V a, b;
      const auto ts = blocked_row_sum<4, V>(N, 2 * S, [&](int64_t j, int64_t n, auto& p) {
        V c, d;
        IO::load2_n(xr + j, n, a, b, c, d);
        p[0] = p[0] + a;
        p[1] = p[1] + b;
        p[2] = p[2] + c;
        p[3] = p[3] + d;
      });
      const A mean0 = reduce_add((ts[0] + ts[1]) + (ts[2] + ts[3])) / static_cast<A>(N);
      const V vm0(mean0);
      // Corrected two-pass (Bjorck): with d = x - mean0, sum(d) is the rounding error of
      // mean0 times N. mean = mean0 + sum(d)/N is accurate to about an ulp, and
      // var = (sum(d^2) - sum(d)^2/N) / N removes that error from the variance, so rows
      // with |mean| >> std (where (x - mean) * rstd amplifies an error in the mean) stay
      // accurate, at no extra pass.
      const auto tv = blocked_row_sum<4, V>(N, S, [&](int64_t j, int64_t n, auto& p) {
        load_step(xr, j, n, a, b);
        a = a - vm0;
        b = b - vm0;
        if (n < S) zero_tail(a, b, n);
        p[0] = at::vec::fmadd(a, a, p[0]);
        p[1] = at::vec::fmadd(b, b, p[1]);
        p[2] = p[2] + a;
        p[3] = p[3] + b;
      });
      const A inv_n = A(1) / static_cast<A>(N);
      const A sd = reduce_add(tv[2] + tv[3]);
      const A mean = mean0 + sd * inv_n;
      const V vm(mean);
      const A var_raw = (reduce_add(tv[0] + tv[1]) - sd * sd * inv_n) * inv_n;
      const A var = var_raw < A(0) ? A(0) : var_raw;  // keeps NaN (std::max would drop it)
      const A rstd = A(1) / std::sqrt(var + static_cast<A>(eps));
      mean_out[i] = mean;
      rstd_out[i] = rstd;
      const V vr(rstd);
      V wa, wb;
      for (int64_t j = 0; j < N; j += S) {
        const int64_t n = std::min(S, N - j);
        load_step(xr, j, n, a, b);
        a = (a - vm) * vr;
        b = (b - vm) * vr;
        if (w) {
          load_step(w, j, n, wa, wb);
          a = a * wa;
          b = b * wb;
        }
        if (bias) {
          load_step(bias, j, n, wa, wb);
          a = a + wa;
          b = b + wb;
        }
        store_step(y + i * N, j, n, a, b);
      }
    }
  });
}

// xhat = (x - mean) * rstd, g = dy * w:
// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
// dwp / dbp (may be null): this chunk's partial rows of sum(dy * xhat) and sum(dy).
template <typename T>
void ln_bwd_rows(const T* dy, const T* x, const acc_t<T>* mean, const acc_t<T>* rstd,
                 const acc_t<T>* w, T* dx, acc_t<T>* dwp, acc_t<T>* dbp, int64_t row_begin,
                 int64_t row_end, int64_t N) {
  using IO = RowIO<T>;
  using A = acc_t<T>;
  using V = typename IO::V;
  constexpr int64_t S = IO::kStep;
  for (int64_t i = row_begin; i < row_end; ++i) {
    const T* dyr = dy + i * N;
    const T* xr = x + i * N;
    const V vm(mean[i]), vr(rstd[i]);
    V ga, gb, xa, xb, wa, wb;
    // Padded tail lanes: dy = 0 there, so g = 0 and every product below is 0.
    const auto t = blocked_row_sum<4, V>(N, S, [&](int64_t j, int64_t n, auto& p) {
      load_step(dyr, j, n, ga, gb);
      load_step(xr, j, n, xa, xb);
      if (w) {
        load_step(w, j, n, wa, wb);
        ga = ga * wa;
        gb = gb * wb;
      }
      p[0] = p[0] + ga;
      p[1] = p[1] + gb;
      p[2] = at::vec::fmadd(ga, (xa - vm) * vr, p[2]);
      p[3] = at::vec::fmadd(gb, (xb - vm) * vr, p[3]);
    });
    const A inv_n = A(1) / static_cast<A>(N);
    const V c1(reduce_add(t[0] + t[1]) * inv_n), c2(reduce_add(t[2] + t[3]) * inv_n);
    for (int64_t j = 0; j < N; j += S) {
      const int64_t n = std::min(S, N - j);
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
      store_step(dx + i * N, j, n, (ga - c1 - xa * c2) * vr, (gb - c1 - xb * c2) * vr);
    }
  }
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& input,
                                                  at::IntArrayRef normalized_shape,
                                                  const std::optional<Tensor>& weight,
                                                  const std::optional<Tensor>& bias, double eps) {
  check_input(input, "input");
  check_cpu(input, "input");
  const auto rs = check_normalized_shape(input, normalized_shape);
  check_param(weight, "weight", input, normalized_shape);
  check_param(bias, "bias", input, normalized_shape);
  check_eps(eps);
  const Tensor x = input.contiguous();
  const Tensor w = contiguous_or_empty(weight);
  const Tensor bi = contiguous_or_empty(bias);
  Tensor y = at::empty(input.sizes(), x.options());
  const auto sopt = x.options().dtype(stats_dtype(x.scalar_type()));
  Tensor mean = at::empty(stats_shape(input, normalized_shape), sopt);
  Tensor rstd = at::empty(stats_shape(input, normalized_shape), sopt);
  if (rs.M == 0) return {y, mean, rstd};
  if (w.defined() && bi.defined()) {
    TORCH_CHECK_TYPE(w.scalar_type() == bi.scalar_type(), "rmsnorm_ext: weight dtype ",
                     w.scalar_type(), " and bias dtype ", bi.scalar_type(), " must match");
  }
  RMSNORM_EXT_DISPATCH_TW(x.scalar_type(), param_dtype(x, w, bi), "layer_norm_fwd", [&] {
    using A = acc_t<scalar_t>;
    EffectiveParam<A> wp(data_or_null<param_t>(w), rs.N, 0.0);
    EffectiveParam<A> bp(data_or_null<param_t>(bi), rs.N, 0.0);
    ln_fwd_rows<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                          mean.mutable_data_ptr<A>(), rstd.mutable_data_ptr<A>(), wp.get(),
                          bp.get(), rs.M, rs.N, eps);
  });
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& grad_out, const Tensor& input,
                                                  const Tensor& mean, const Tensor& rstd,
                                                  const std::optional<Tensor>& weight,
                                                  at::IntArrayRef normalized_shape,
                                                  bool compute_weight_grad,
                                                  bool compute_bias_grad) {
  check_input(input, "input");
  check_cpu(input, "input");
  const auto rs = check_normalized_shape(input, normalized_shape);
  check_ln_grad(grad_out, input);
  check_param(weight, "weight", input, normalized_shape);
  check_stats(mean, "mean", input, rs.M);
  check_stats(rstd, "rstd", input, rs.M);
  const Tensor x = input.contiguous();
  const Tensor dy = grad_out.contiguous();
  const Tensor mt = mean.contiguous();
  const Tensor rt = rstd.contiguous();
  const Tensor w = contiguous_or_empty(weight);
  const bool want_dw = compute_weight_grad && w.defined();
  const bool want_db = compute_bias_grad;
  // dbias takes the parameters' dtype: the weight's when there is one, else the input's.
  const auto popt = w.defined() ? w.options() : x.options();
  Tensor dx = at::empty(input.sizes(), x.options());
  Tensor dw = want_dw ? at::empty(normalized_shape, popt) : empty_grad(x);
  Tensor db = want_db ? at::empty(normalized_shape, popt) : empty_grad(x);
  if (rs.M == 0 || rs.N == 0) {
    if (want_dw) dw.zero_();
    if (want_db) db.zero_();
    return {dx, dw, db};
  }
  RMSNORM_EXT_DISPATCH_TW(x.scalar_type(), param_dtype(x, w, Tensor()), "layer_norm_bwd", [&] {
    using A = acc_t<scalar_t>;
    EffectiveParam<A> wp(data_or_null<param_t>(w), rs.N, 0.0);
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const A* mp = mt.const_data_ptr<A>();
    const A* rp = rt.const_data_ptr<A>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    if (!want_dw && !want_db) {
      at::parallel_for(0, rs.M, row_grain(rs.N), [&](int64_t b, int64_t e) {
        ln_bwd_rows<scalar_t>(dyp, xp, mp, rp, wp.get(), dxp, nullptr, nullptr, b, e, rs.N);
      });
      return;
    }
    const RowChunks chunks(rs.M);
    const int64_t stride = padded<A>(rs.N);
    // Per chunk: [dweight partial | dbias partial], each padded to a whole step.
    std::vector<A> partial(static_cast<size_t>(chunks.count * 2 * stride));
    for_each_chunk(chunks, [&](int64_t c) {
      A* p = partial.data() + c * 2 * stride;
      std::fill(p, p + 2 * stride, A(0));
      ln_bwd_rows<scalar_t>(dyp, xp, mp, rp, wp.get(), dxp, want_dw ? p : nullptr,
                            want_db ? p + stride : nullptr, chunks.begin(c), chunks.end(c), rs.N);
    });
    if (want_dw) {
      sum_partials<A, param_t>(partial.data(), chunks.count, 2 * stride, rs.N,
                               dw.mutable_data_ptr<param_t>());
    }
    if (want_db) {
      if (w.defined()) {
        sum_partials<A, param_t>(partial.data() + stride, chunks.count, 2 * stride, rs.N,
                                 db.mutable_data_ptr<param_t>());
      } else {
        sum_partials<A, scalar_t>(partial.data() + stride, chunks.count, 2 * stride, rs.N,
                                  db.mutable_data_ptr<scalar_t>());
      }
    }
  });
  return {dx, dw, db};
}

}  // namespace
}  // namespace rmsnorm_ext::cpu

TORCH_LIBRARY_IMPL(rmsnorm_ext, CPU, m) {
  m.impl("layer_norm_fwd", &rmsnorm_ext::cpu::layer_norm_fwd);
  m.impl("layer_norm_bwd", &rmsnorm_ext::cpu::layer_norm_bwd);
}
