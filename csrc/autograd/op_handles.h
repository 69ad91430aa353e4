// Typed dispatcher handles of the ops, for C++ code that calls them through the dispatcher
// (csrc/autograd/, csrc/python/python_fast.cpp). Looked up once: a lookup by name costs a
// hash-map probe per call otherwise.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace rmsnorm_ext::op_handles {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

using RmsFwd = std::tuple<Tensor, Tensor>(const Tensor&, c10::IntArrayRef, const OptTensor&,
                                          double, double);
using RmsBwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                          const OptTensor&, c10::IntArrayRef, double,
                                          const OptTensor&, bool);
using LnFwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, c10::IntArrayRef,
                                                 const OptTensor&, const OptTensor&, double);
using LnBwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                 const Tensor&, const OptTensor&,
                                                 c10::IntArrayRef, bool, bool);
using FusedFwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                    c10::IntArrayRef, const OptTensor&, double,
                                                    double);

using FusedInplace = void(const Tensor&, const Tensor&, c10::IntArrayRef, const OptTensor&, double,
                          double);

using RmsQuant = std::tuple<Tensor, Tensor>(const Tensor&, c10::IntArrayRef, const OptTensor&,
                                            double, double, const OptTensor&, at::ScalarType,
                                            std::optional<int64_t>, const OptTensor&);
using FusedQuant = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                      c10::IntArrayRef, const OptTensor&, double,
                                                      double, const OptTensor&, at::ScalarType,
                                                      std::optional<int64_t>, const OptTensor&);
using LnQuant = std::tuple<Tensor, Tensor>(const Tensor&, c10::IntArrayRef, const OptTensor&,
                                           const OptTensor&, double, const OptTensor&,
                                           at::ScalarType, std::optional<int64_t>,
                                           const OptTensor&);

template <typename Sig>
c10::TypedOperatorHandle<Sig> lookup(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

#define RMSNORM_EXT_OP_HANDLE(fn, Sig, name)                 \
  inline const c10::TypedOperatorHandle<Sig>& fn() {         \
    static const auto h = lookup<Sig>("rmsnorm_ext::" name); \
    return h;                                                \
  }
RMSNORM_EXT_OP_HANDLE(rms_norm_fwd, RmsFwd, "rms_norm_fwd")
RMSNORM_EXT_OP_HANDLE(rms_norm_bwd, RmsBwd, "rms_norm_bwd")
RMSNORM_EXT_OP_HANDLE(layer_norm_fwd, LnFwd, "layer_norm_fwd")
RMSNORM_EXT_OP_HANDLE(layer_norm_bwd, LnBwd, "layer_norm_bwd")
RMSNORM_EXT_OP_HANDLE(fused_add_rms_norm_fwd, FusedFwd, "fused_add_rms_norm_fwd")
RMSNORM_EXT_OP_HANDLE(fused_add_rms_norm_inplace, FusedInplace, "fused_add_rms_norm_inplace")
RMSNORM_EXT_OP_HANDLE(rms_norm_quant, RmsQuant, "rms_norm_quant")
RMSNORM_EXT_OP_HANDLE(fused_add_rms_norm_quant, FusedQuant, "fused_add_rms_norm_quant")
RMSNORM_EXT_OP_HANDLE(layer_norm_quant, LnQuant, "layer_norm_quant")
#undef RMSNORM_EXT_OP_HANDLE

}  // namespace rmsnorm_ext::op_handles
