// The CUDA entries of the host layer's kernel table (csrc/host/devices.cpp): each runs
// one kernel entry of kernels_api.h on the current stream of the launch's device.
#pragma once

#include "../host/host.h"

namespace rmsnorm_ext::cuda {

void run_rms_fwd(const RmsFwdParams& p, const Launch& l);
void run_fused_add_rms_fwd(const RmsFwdParams& p, const Launch& l);
void run_rms_bwd(const RmsBwdParams& p, const Launch& l);
void run_ln_fwd(const LnFwdParams& p, const Launch& l);
void run_ln_bwd(const LnBwdParams& p, const Launch& l);
void run_norm_quant(const NormQuantParams& p, const Launch& l);
void run_gated_rms_fwd(const GatedRmsFwdParams& p, const Launch& l);
void run_gated_rms_bwd(const GatedRmsBwdParams& p, const Launch& l);
void run_qk_norm_rope_fwd(const QkNormRopeFwdParams& p, const Launch& l);
void run_qk_norm_rope_bwd(const QkNormRopeBwdParams& p, const Launch& l);
void run_norm_modulate_fwd(const NormModulateParams& p, const Launch& l);
void run_norm_modulate_bwd(const NormModulateBwdParams& p, const Launch& l);

}  // namespace rmsnorm_ext::cuda
