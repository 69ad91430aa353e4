// The CUDA side of run_kernel (csrc/host/host.h): what every CUDA launch needs from the host,
// whatever the kernel -- the device set for the launch (c10::cuda::CUDAGuard), its current
// stream, the SM count (the backward launches size their grids by it) and the launch error
// raised as a torch error. Host code, compiled once (launch.cpp); the kernels register
// themselves (register_kernel.cuh).
#pragma once

#include <type_traits>
#include <utility>

namespace rmsnorm_ext::cuda {

// SM count of a device, cached per device.
int sm_count(int device);

// With `device` current (restored after), calls call(ctx, stream) with that device's current
// stream (a cudaStream_t) and raises the cudaError_t it returns (0: success) as torch's
// C10_CUDA_CHECK does.
void launch_on(int device, int (*call)(const void* ctx, void* stream), const void* ctx);

// Whether a parameter struct has an sm_count field for the host to fill.
template <class P, class = void>
struct has_sm_count : std::false_type {};
template <class P>
struct has_sm_count<P, std::void_t<decltype(std::declval<P&>().sm_count)>> : std::true_type {};

}  // namespace rmsnorm_ext::cuda
