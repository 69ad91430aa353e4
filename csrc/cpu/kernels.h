// What the CPU kernel files share: the host layer's types (Launch, the parameter structs, the
// kernel registry: each file registers its entries in their tags' slots with
// RMSNORM_EXT_REGISTER_CPU_KERNEL, csrc/kernel_registry.h) and the entries one kernel file
// calls in another. Each entry takes the parameter struct, dispatches on its dtype tags and
// runs rows in parallel with ATen's thread pool; the workspace holds the parameter-gradient
// partial rows (param_rows.h).
#pragma once

#include "../host/host.h"

namespace rmsnorm_ext::cpu {

// Channels-first variants (kernel_params.h: [B, C, S] with C strided by inner = S), called by
// the plain norms' entries (rms_norm_cpu.cpp, layer_norm_cpu.cpp) when inner > 1:
// channels_first_cpu.cpp.
void rms_fwd_channels_first(const RmsFwdParams& p, const Launch& l);
void rms_bwd_channels_first(const RmsBwdParams& p, const Launch& l);
void ln_fwd_channels_first(const LnFwdParams& p, const Launch& l);
void ln_bwd_channels_first(const LnBwdParams& p, const Launch& l);

}  // namespace rmsnorm_ext::cpu
