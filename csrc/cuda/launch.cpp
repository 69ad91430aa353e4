// The CUDA side of run_kernel (launch.h): device guard, current stream, SM count and the
// launch-error check. Host code only, compiled once (not per CUDA arch).
#include "launch.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>

namespace rmsnorm_ext::cuda {

int sm_count(int device) {
  constexpr int kMax = 64;
  static std::atomic<int> cache[kMax] = {};
  if (device >= 0 && device < kMax) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  if (v <= 0) v = 1;
  if (device >= 0 && device < kMax) cache[device].store(v, std::memory_order_relaxed);
  return v;
}

void launch_on(int device, int (*call)(const void* ctx, void* stream),
               const void* ctx) {
  const auto index = static_cast<c10::DeviceIndex>(device);
  const c10::cuda::CUDAGuard guard(index);
  C10_CUDA_CHECK(static_cast<cudaError_t>(call(ctx, c10::cuda::getCurrentCUDAStream(index).stream())));
}

}  // namespace rmsnorm_ext::cuda
