// launch.h for the CUDA emulation build (csrc/cuda/launch.cpp is the real one): the SM count
// the emulator reports, and a launch that runs the kernels on the calling thread (no device,
// no stream) with the same error check.
#include "../launch.h"

#include <c10/util/Exception.h>

namespace cuda_emu {
int sm_count();  // cuda_emulation.cpp (its header is for the kernel files only)
}

namespace rmsnorm_ext::cuda {

int sm_count(int) { return cuda_emu::sm_count(); }

void launch_on(int, int (*call)(const void* ctx, void* stream), const void* ctx) {
  const int err = call(ctx, nullptr);
  TORCH_CHECK(err == 0, "rmsnorm_ext (CUDA emulation): a kernel failed to launch: cudaError_t ", err);
}

}  // namespace rmsnorm_ext::cuda
