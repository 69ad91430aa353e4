// Dtype dispatch of the CPU kernels on the dtype tags of csrc/kernel_params.h.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "../kernel_params.h"

namespace rmsnorm_ext::cpu {

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with the storage type of a dtype tag.
template <typename F>
void dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::f32:
      return f(TypeTag<float>{});
    case DType::f64:
      return f(TypeTag<double>{});
    case DType::bf16:
      return f(TypeTag<c10::BFloat16>{});
    case DType::f16:
      return f(TypeTag<c10::Half>{});
  }
  TORCH_CHECK(false, "rmsnorm_ext: unknown dtype tag ", static_cast<int>(d));
}

// Calls f(TypeTag<P>{}) for a companion dtype p of the data type T: T itself or, next to
// bfloat16/float16, float32.
template <typename T, typename F>
void dispatch_companion(DType p, F&& f) {
  if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
    if (p == DType::f32) return f(TypeTag<float>{});
  }
  f(TypeTag<T>{});
}

// Calls f(TypeTag<T>{}, TypeTag<P>{}) for a data dtype t and a companion dtype p (weight,
// residual, grad_out) that is either t or, next to bfloat16/float16, float32. The host
// layer has refused every other combination.
template <typename F>
void dispatch_pair(DType t, DType p, F&& f) {
  dispatch_dtype(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_companion<T>(p, [&](auto p_tag) { f(tag, p_tag); });
  });
}

}  // namespace rmsnorm_ext::cpu
