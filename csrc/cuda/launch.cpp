// The CUDA side of the host layer: device guard, current stream, SM count and launch-error
// check around each kernel entry. Host code only, compiled once (not per CUDA arch).
#include "launch.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>

#include "kernels_api.h"

namespace rmsnorm_ext::cuda {
namespace {

// SM count per device, cached (the backward launches size their grids by it).
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

template <typename F>
void on_device(const Launch& l, F&& f) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(l.device_index));
  C10_CUDA_CHECK(f(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(l.device_index))));
}

}  // namespace

void run_rms_fwd(const RmsFwdParams& p, const Launch& l) {
  on_device(l, [&](cudaStream_t s) {
    return p.inner > 1 ? rms_fwd_channels_first(p, s) : rms_fwd(p, s);
  });
}

void run_fused_add_rms_fwd(const RmsFwdParams& p, const Launch& l) {
  on_device(l, [&](cudaStream_t s) { return fused_add_rms_fwd(p, s); });
}

void run_rms_bwd(const RmsBwdParams& p, const Launch& l) {
  RmsBwdParams q = p;
  q.sm_count = sm_count(l.device_index);
  on_device(l, [&](cudaStream_t s) {
    return q.inner > 1 ? rms_bwd_channels_first(q, l.ws, s) : rms_bwd(q, l.ws, s);
  });
}

void run_ln_fwd(const LnFwdParams& p, const Launch& l) {
  on_device(l, [&](cudaStream_t s) {
    return p.inner > 1 ? ln_fwd_channels_first(p, s) : ln_fwd(p, s);
  });
}

void run_ln_bwd(const LnBwdParams& p, const Launch& l) {
  LnBwdParams q = p;
  q.sm_count = sm_count(l.device_index);
  on_device(l, [&](cudaStream_t s) {
    return q.inner > 1 ? ln_bwd_channels_first(q, l.ws, s) : ln_bwd(q, l.ws, s);
  });
}

void run_norm_quant(const NormQuantParams& p, const Launch& l) {
  on_device(l, [&](cudaStream_t s) { return norm_quant(p, s); });
}

void run_gated_rms_fwd(const GatedRmsFwdParams& p, const Launch& l) {
  on_device(l, [&](cudaStream_t s) { return gated_rms_fwd(p, s); });
}

void run_gated_rms_bwd(const GatedRmsBwdParams& p, const Launch& l) {
  GatedRmsBwdParams q = p;
  q.sm_count = sm_count(l.device_index);
  on_device(l, [&](cudaStream_t s) { return gated_rms_bwd(q, l.ws, s); });
}

void run_qk_norm_rope_fwd(const QkNormRopeFwdParams& p, const Launch& l) {
  on_device(l, [&](cudaStream_t s) { return qk_norm_rope_fwd(p, s); });
}

void run_qk_norm_rope_bwd(const QkNormRopeBwdParams& p, const Launch& l) {
  QkNormRopeBwdParams q = p;
  q.sm_count = sm_count(l.device_index);
  on_device(l, [&](cudaStream_t s) { return qk_norm_rope_bwd(q, l.ws, s); });
}

void run_norm_modulate_fwd(const NormModulateParams& p, const Launch& l) {
  on_device(l, [&](cudaStream_t s) { return norm_modulate_fwd(p, s); });
}

void run_norm_modulate_bwd(const NormModulateBwdParams& p, const Launch& l) {
  NormModulateBwdParams q = p;
  q.sm_count = sm_count(l.device_index);
  on_device(l, [&](cudaStream_t s) { return norm_modulate_bwd(q, l.ws, s); });
}

}  // namespace rmsnorm_ext::cuda
