// The CPU entries of the host layer's kernel table (csrc/host/devices.cpp). Each takes the
// parameter struct, dispatches on its dtype tags and runs rows in parallel with ATen's
// thread pool; the workspace holds the parameter-gradient partial rows (param_rows.h).
#pragma once

#include "../host/host.h"

namespace rmsnorm_ext::cpu {

void rms_fwd(const RmsFwdParams& p, const Launch& l);            // rms_norm_cpu.cpp
void fused_add_rms_fwd(const RmsFwdParams& p, const Launch& l);  // rms_norm_cpu.cpp
void rms_bwd(const RmsBwdParams& p, const Launch& l);            // rms_norm_cpu.cpp
void ln_fwd(const LnFwdParams& p, const Launch& l);              // layer_norm_cpu.cpp
void ln_bwd(const LnBwdParams& p, const Launch& l);              // layer_norm_cpu.cpp
void norm_quant(const NormQuantParams& p, const Launch& l);      // norm_quant_cpu.cpp
void gated_rms_fwd(const GatedRmsFwdParams& p, const Launch& l);  // gated_rms_norm_cpu.cpp
void gated_rms_bwd(const GatedRmsBwdParams& p, const Launch& l);  // gated_rms_norm_cpu.cpp
void qk_norm_rope_fwd(const QkNormRopeFwdParams& p, const Launch& l);  // qk_norm_rope_cpu.cpp
void qk_norm_rope_bwd(const QkNormRopeBwdParams& p, const Launch& l);  // qk_norm_rope_cpu.cpp
void norm_modulate_fwd(const NormModulateParams& p, const Launch& l);     // norm_modulate_cpu.cpp
void norm_modulate_bwd(const NormModulateBwdParams& p, const Launch& l);  // norm_modulate_cpu.cpp

// Channels-first variants (kernel_params.h: [B, C, S] with C strided by inner = S), called by
// the entries above when inner > 1: channels_first_cpu.cpp.
void rms_fwd_channels_first(const RmsFwdParams& p, const Launch& l);
void rms_bwd_channels_first(const RmsBwdParams& p, const Launch& l);
void ln_fwd_channels_first(const LnFwdParams& p, const Launch& l);
void ln_bwd_channels_first(const LnBwdParams& p, const Launch& l);

}  // namespace rmsnorm_ext::cpu
