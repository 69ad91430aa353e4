// The host layer: what every op does before and after its kernel, written once for every
// device. Each op's host function (csrc/host/*.cpp) checks its arguments (checks.h),
// allocates the outputs, handles empty sizes, fills the kernel's parameter struct
// (csrc/kernel_params.h) and runs it on the input's device with run_kernel<Tag> (below;
// devices fill the slots in their kernel files: csrc/kernel_registry.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/ScalarType.h>

#include <limits>
#include <vector>

#include "checks.h"
#include "../kernel_params.h"
#include "../kernel_registry.h"
#if defined(RMSNORM_EXT_WITH_CUDA) || defined(RMSNORM_EXT_CUDA_EMULATION)
#include "../cuda/launch.h"
#endif

namespace rmsnorm_ext {

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::f32;
    case at::kDouble:
      return DType::f64;
    case at::kBFloat16:
      return DType::bf16;
    case at::kHalf:
      return DType::f16;
    default:
      TORCH_CHECK_TYPE(false, "rmsnorm_ext: unsupported dtype ", t);
  }
}

// Workspace buffers from the tensor's allocator (for CUDA the caching allocator: no
// cudaMalloc, CUDA-graph safe). They live until the host function returns, after the
// kernels that use them are enqueued on the current stream, which is what the caching
// allocator's stream semantics require.
class WorkspaceHolder {
 public:
  explicit WorkspaceHolder(const Tensor& like) : opts_(like.options().dtype(at::kByte)) {}
  Launch launch(const Tensor& like) {
    return Launch{like.is_cpu() ? -1 : like.get_device(), Workspace{&WorkspaceHolder::alloc, this}};
  }

 private:
  static void* alloc(void* ctx, size_t bytes) {
    auto* self = static_cast<WorkspaceHolder*>(ctx);
    self->bufs_.push_back(at::empty({static_cast<int64_t>(bytes)}, self->opts_));
    return self->bufs_.back().data_ptr();
  }
  at::TensorOptions opts_;
  std::vector<Tensor> bufs_;
};

inline at::TensorOptions stats_options(const Tensor& input) {
  return input.options().dtype(stats_dtype(input.scalar_type()));
}

// Per-row statistics, allocated before the kernel (or instead of it).
inline Tensor new_row_stats(const Tensor& input, at::IntArrayRef normalized_shape) {
  return at::empty_symint(stats_shape(input, normalized_shape), stats_options(input));
}

// An output shaped like `like` (contiguous), symbolic sizes allowed.
inline Tensor new_like(const Tensor& like, at::TensorOptions opts) {
  return at::empty_symint(like.sym_sizes(), opts);
}
inline Tensor new_like(const Tensor& like) { return new_like(like, like.options()); }

// Rows of length 0 have mean 0/0 = NaN (as torch.mean gives): their statistics when no
// kernel runs.
inline void fill_nan(Tensor& stats) { stats.fill_(std::numeric_limits<double>::quiet_NaN()); }

// Meta tensors, and the fake tensors torch.compile traces with (they are meta inside the
// kernel call), go through the same host function as real ones -- the same checks and
// output shapes -- and stop here, before any data is touched.
inline bool shapes_only(const Tensor& t) { return t.is_meta(); }

inline const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }
inline void* mut_ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// Runs the kernel tagged Kernel on `like`'s device: the slot its device's kernel file filled
// (kernel_registry.h), with workspace from `ws`. CUDA: on `like`'s device and its current
// stream, with the SM count set for the kernels whose parameters carry one, and the launch
// error raised. Ops are registered only for the dispatch keys of the devices this build has
// kernels for, so no other device reaches here.
// Whether `like` runs the CUDA kernels: CUDA tensors; in the CUDA emulation build
// (csrc/cuda/emulation, .ci/cuda_emulation.sh) CPU tensors, on the emulator, so that the CPU
// test suite tests the CUDA code (its launch.h functions are emulation/launch_emulated.cpp).
inline bool runs_cuda_kernels(const Tensor& like) {
#if defined(RMSNORM_EXT_CUDA_EMULATION)
  return like.is_cpu();
#else
  return like.is_cuda();
#endif
}

template <class Kernel>
void run_kernel(typename Kernel::Params p, const Tensor& like, WorkspaceHolder& ws) {
  const Launch l = ws.launch(like);
#if defined(RMSNORM_EXT_WITH_CUDA) || defined(RMSNORM_EXT_CUDA_EMULATION)
  if (runs_cuda_kernels(like)) {
    using Slot = KernelSlot<Kernel>;
    TORCH_CHECK(Slot::cuda_fn != nullptr, "rmsnorm_ext: this build has no CUDA kernel ",
                Kernel::name);
    if constexpr (cuda::has_sm_count<typename Kernel::Params>::value) {
      p.sm_count = cuda::sm_count(l.device_index);
    }
    struct Call {
      const typename Kernel::Params* p;
      Workspace ws;
    } call{&p, l.ws};
    cuda::launch_on(
        l.device_index,
        [](const void* ctx, void* stream) {
          const auto* c = static_cast<const Call*>(ctx);
          return Slot::cuda_fn(*c->p, c->ws, stream);
        },
        &call);
    return;
  }
#endif
  TORCH_CHECK(like.is_cpu(), "rmsnorm_ext: no kernels for device ", like.device());
  const auto fn = KernelSlot<Kernel>::cpu_fn;
  TORCH_CHECK(fn != nullptr, "rmsnorm_ext: this build has no CPU kernel ", Kernel::name);
  fn(p, l);
}

}  // namespace rmsnorm_ext
