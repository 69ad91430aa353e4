// The host layer: what every op does before and after its kernel, written once for every
// device. Each op's host function (csrc/host/*.cpp) checks its arguments (csrc/common.h),
// allocates the outputs, handles empty sizes, fills the kernel's parameter struct
// (csrc/kernel_params.h) and hands it to the input's device through the table below.
// Devices contribute kernels only: csrc/cpu/kernels.h and csrc/cuda/launch.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/ScalarType.h>

#include <limits>
#include <vector>

#include "../common.h"
#include "../kernel_params.h"

namespace rmsnorm_ext {

// What a kernel gets besides its parameters: the device it runs on (CUDA picks that
// device's current stream) and a workspace allocator for partial sums.
struct Launch {
  int device_index;
  Workspace ws;
};

// One device's kernels. A new kernel is one more entry here, filled by each device.
struct DeviceKernels {
  void (*rms_fwd)(const RmsFwdParams&, const Launch&);
  void (*fused_add_rms_fwd)(const RmsFwdParams&, const Launch&);
  void (*rms_bwd)(const RmsBwdParams&, const Launch&);
  void (*ln_fwd)(const LnFwdParams&, const Launch&);
  void (*ln_bwd)(const LnBwdParams&, const Launch&);
  void (*norm_quant)(const NormQuantParams&, const Launch&);
  void (*gated_rms_fwd)(const GatedRmsFwdParams&, const Launch&);
  void (*gated_rms_bwd)(const GatedRmsBwdParams&, const Launch&);
  void (*qk_norm_rope_fwd)(const QkNormRopeFwdParams&, const Launch&);
  void (*qk_norm_rope_bwd)(const QkNormRopeBwdParams&, const Launch&);
  void (*norm_modulate_fwd)(const NormModulateParams&, const Launch&);
  void (*norm_modulate_bwd)(const NormModulateBwdParams&, const Launch&);
};

// The kernels of a device type this build has kernels for (ops are registered only for
// those dispatch keys, so any other device never reaches the host layer).
const DeviceKernels& kernels_for(const Tensor& t);  // csrc/host/devices.cpp

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

}  // namespace rmsnorm_ext
