// Which function runs a kernel on each device: one slot per (kernel, device type), filled
// by the device's own kernel file when the library loads, read by the host functions.
//
// A kernel is a tag in kernel_params.h (RMSNORM_EXT_KERNEL: its name and parameter struct).
// A device's kernel file fills the tag's slot beside the function that runs it
// (RMSNORM_EXT_REGISTER_CPU_KERNEL below; CUDA: csrc/cuda/register_kernel.cuh), and a host
// function runs it with run_kernel<Tag>(params, ...) (csrc/host/host.h). So a new kernel is
// one tag, one line per device, and no table kept by hand in other files: this header has
// no list of kernels. Plain C++, no torch or CUDA headers: the .cu files include it too.
//
// The slots are inline template statics, constant-initialized to null before any dynamic
// initializer runs; each registration is one store during the library's load, before any
// op can be called. A slot left null (a device without that kernel) is a clear error at the
// call (host.h), and build_info() lists the kernels each device has (registered_kernels).
#pragma once

#include <string>
#include <vector>

#include "kernel_params.h"

namespace rmsnorm_ext {

// What a kernel gets besides its parameters: the device it runs on (CUDA: the index whose
// current stream it uses) and a workspace allocator for partial sums.
struct Launch {
  int device_index;
  Workspace ws;
};

template <class Kernel>
struct KernelSlot {
  using Params = typename Kernel::Params;
  // CPU: runs to completion on the calling thread's ATen thread pool.
  using CpuFn = void (*)(const Params&, const Launch&);
  // CUDA: enqueues on `stream` (a cudaStream_t) and returns the first launch error as an int
  // (cudaSuccess = 0), never synchronizing; the host sets the device and checks the error.
  using CudaFn = int (*)(const Params&, Workspace ws, void* stream);
  static inline CpuFn cpu_fn = nullptr;
  static inline CudaFn cuda_fn = nullptr;
};

// "<kernel>:<device>" for every filled slot, in load order (for build_info and CI).
inline std::vector<std::string>& registered_kernels() {
  static std::vector<std::string> names;
  return names;
}

template <class Kernel>
struct RegisterKernel {
  explicit RegisterKernel(typename KernelSlot<Kernel>::CpuFn fn) {
    KernelSlot<Kernel>::cpu_fn = fn;
    registered_kernels().push_back(std::string(Kernel::name) + ":cpu");
  }
  explicit RegisterKernel(typename KernelSlot<Kernel>::CudaFn fn) {
    KernelSlot<Kernel>::cuda_fn = fn;
    registered_kernels().push_back(std::string(Kernel::name) + ":cuda");
  }
};

}  // namespace rmsnorm_ext

#define RMSNORM_EXT_KERNEL_CAT2(a, b) a##b
#define RMSNORM_EXT_KERNEL_CAT(a, b) RMSNORM_EXT_KERNEL_CAT2(a, b)

// In a CPU kernel file, at namespace scope: `fn` (void(const Params&, const Launch&)) runs
// the kernel tagged `Tag` on CPU tensors.
#define RMSNORM_EXT_REGISTER_CPU_KERNEL(Tag, fn)                                    \
  static const ::rmsnorm_ext::RegisterKernel<::rmsnorm_ext::Tag> RMSNORM_EXT_KERNEL_CAT( \
      rmsnorm_ext_cpu_kernel_, __LINE__){                                             \
      static_cast<::rmsnorm_ext::KernelSlot<::rmsnorm_ext::Tag>::CpuFn>(fn)}
