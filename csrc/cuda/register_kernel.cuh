// Registration of a CUDA kernel entry in its tag's slot (csrc/kernel_registry.h), in the .cu
// file that defines it:
//   RMSNORM_EXT_REGISTER_CUDA_KERNEL(GatedRmsFwd, gated_rms_fwd);
// The entry is `cudaError_t f(const Params&, cudaStream_t)` or, for kernels with partial
// sums, `cudaError_t f(const Params&, Workspace, cudaStream_t)`; the slot's uniform form
// (params, workspace, stream as void*, error as int) is adapted here at compile time.
#pragma once

#include <cuda_runtime_api.h>

#include <type_traits>

#include "../kernel_registry.h"

namespace rmsnorm_ext::cuda {

template <class Kernel, auto Entry>
int call_entry(const typename Kernel::Params& p, Workspace ws, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  using P = const typename Kernel::Params&;
  if constexpr (std::is_invocable_v<decltype(Entry), P, Workspace, cudaStream_t>) {
    return static_cast<int>(Entry(p, ws, s));
  } else {
    (void)ws;
    return static_cast<int>(Entry(p, s));
  }
}

}  // namespace rmsnorm_ext::cuda

#define RMSNORM_EXT_REGISTER_CUDA_KERNEL(Tag, entry)                                   \
  static const ::rmsnorm_ext::RegisterKernel<::rmsnorm_ext::Tag> RMSNORM_EXT_KERNEL_CAT(  \
      rmsnorm_ext_cuda_kernel_, __LINE__){                                               \
      static_cast<::rmsnorm_ext::KernelSlot<::rmsnorm_ext::Tag>::CudaFn>(                \
          &::rmsnorm_ext::cuda::call_entry<::rmsnorm_ext::Tag, &entry>)}
