// The kernel parameter structs: the one interface between the device-independent host
// layer (csrc/host/: checks, allocation, empty sizes, filling these structs) and the
// kernels of every device (csrc/cpu/, csrc/cuda/). Plain pointers and dtype tags only,
// so kernel files compile without the torch headers.
//
// Kernels receive contiguous [M, N] rows with M, N > 0; the host has validated shapes
// and dtype combinations before any kernel runs.
//
// Channels-first layout (the rms_norm_2d / layer_norm_2d ops on a contiguous [B, C, *S]
// tensor): the plain norms' structs carry `inner` = prod(S). inner > 1 means the M rows are
// M / inner blocks of an [N, inner] matrix: row i = (o, s) = (i / inner, i % inner) has its
// element j at offset o * N * inner + j * inner + s, and its statistics at index i (the
// [B, *S] order). inner 0 or 1: contiguous rows. rms_fwd, rms_bwd, ln_fwd and ln_bwd serve
// both layouts (the fused residual forms and grad_residual: rows only); a channels_last
// [B, C, *S] tensor is contiguous rows (inner 1) and never reaches the strided kernels.
#pragma once

#include <cstddef>
#include <cstdint>

namespace rmsnorm_ext {

enum class DType : int { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };

// A kernel's tag: its name (errors, build_info) and its parameter struct. Each device fills
// the tag's slot in its own kernel file; host functions call run_kernel<Tag>
// (kernel_registry.h, host/host.h).
#define RMSNORM_EXT_KERNEL(Tag, ParamsType)        \
  struct Tag {                                     \
    using Params = ParamsType;                     \
    static constexpr const char* name = #Tag;      \
  }

// Workspace for the backward partial sums, from the caching allocator (graph-capture
// safe); the host keeps it alive until the launches are enqueued.
struct Workspace {
  void* (*alloc)(void* ctx, size_t bytes);
  void* ctx;
};

// rms_norm_fwd and fused_add_rms_norm_fwd/_inplace. Stats (rstd) are float, or double
// for f64 data. For the fused form y may equal x and h may equal r (in place).
struct RmsFwdParams {
  DType t;  // x and y
  DType w;  // weight (== t when there is none)
  DType r;  // residual and h (fused only; == t otherwise)
  const void* x;
  const void* r_in;    // fused only
  const void* weight;  // nullptr: no weight, offset ignored
  void* y;
  void* h;             // fused only
  void* rstd;
  int64_t M;
  int64_t N;
  int64_t inner;  // channels-first (see top); 0 or 1: contiguous rows
  double eps;
  double offset;
};
RMSNORM_EXT_KERNEL(RmsFwd, RmsFwdParams);
RMSNORM_EXT_KERNEL(FusedAddRmsFwd, RmsFwdParams);

// rms_norm_bwd. x: the normalized tensor (dtype x, also of dx and grad_residual); dy:
// grad_out (dtype g: == x, or bf16/f16 with f32 x); weight/dweight dtype w (g, or f32
// next to bf16/f16 g).
struct RmsBwdParams {
  DType x;
  DType g;
  DType w;
  const void* x_in;
  const void* dy;
  const void* rstd;
  const void* weight;  // nullptr: no weight
  const void* gres;    // nullptr: no grad_residual
  void* dx;
  void* dw;            // nullptr: weight grad not wanted
  int64_t M;
  int64_t N;
  int64_t inner;  // channels-first (see top); 0 or 1: contiguous rows
  double offset;
  int sm_count;
};
RMSNORM_EXT_KERNEL(RmsBwd, RmsBwdParams);

// layer_norm_fwd. weight and bias share dtype w (== t when both absent).
struct LnFwdParams {
  DType t;
  DType w;
  const void* x;
  const void* weight;  // may be nullptr
  const void* bias;    // may be nullptr
  void* y;
  void* mean;
  void* rstd;
  int64_t M;
  int64_t N;
  int64_t inner;  // channels-first (see top); 0 or 1: contiguous rows
  double eps;
};
RMSNORM_EXT_KERNEL(LnFwd, LnFwdParams);

// layer_norm_bwd. dy has dtype t. dw and db have dtype w (the weight's, or t without one).
struct LnBwdParams {
  DType t;
  DType w;
  const void* x;
  const void* dy;
  const void* mean;
  const void* rstd;
  const void* weight;  // may be nullptr (treated as ones)
  void* dx;
  void* dw;            // nullptr: not wanted
  void* db;            // nullptr: not wanted
  int64_t M;
  int64_t N;
  int64_t inner;  // channels-first (see top); 0 or 1: contiguous rows
  int sm_count;
};
RMSNORM_EXT_KERNEL(LnBwd, LnBwdParams);

// ---------------------------------------------------------------------------------------
// Gated RMSNorm (gated_rms_norm_fwd / _bwd): x, gate, y, grad_out, dx and dgate all have
// dtype t; the weight (and dweight) dtype w (t, or f32 next to bf16/f16 t). The RMS is
// taken over each contiguous group of `group` elements of a row (group divides N; N: one
// group), so the statistics (rstd: float, double for f64) are M * (N / group) values,
// row-major [M][N / group]. With a = act(gate):
//   norm_before_gate:  y = x * rstd(x) * w * a
//   otherwise:         z = x * a, y = z * rstd(z) * w       (Mamba2's gated norm)
enum class GateAct : int { silu = 0, sigmoid = 1 };

struct GatedRmsFwdParams {
  DType t;
  DType w;
  GateAct act;
  bool norm_before_gate;
  const void* x;
  const void* gate;
  const void* weight;  // nullptr: no weight (ones)
  void* y;
  void* rstd;
  int64_t M;
  int64_t N;
  int64_t group;
  double eps;
};
RMSNORM_EXT_KERNEL(GatedRmsFwd, GatedRmsFwdParams);

struct GatedRmsBwdParams {
  DType t;
  DType w;
  GateAct act;
  bool norm_before_gate;
  const void* dy;
  const void* x;
  const void* gate;
  const void* rstd;
  const void* weight;  // nullptr: no weight (ones)
  void* dx;
  void* dgate;
  void* dw;            // nullptr: weight grad not wanted
  int64_t M;
  int64_t N;
  int64_t group;
  int sm_count;
};
RMSNORM_EXT_KERNEL(GatedRmsBwd, GatedRmsBwdParams);

// ---------------------------------------------------------------------------------------
// Norm + quantize (rms_norm_quant, fused_add_rms_norm_quant, layer_norm_quant): one kernel
// family, the norm's fusions as optional operands. y is the norm's output in fp32 (never
// rounded to the input dtype); out = quantize(y * (1 / s)) with s the static scale, or per
// group of `group` consecutive elements of a row (group == N: per token)
// s = max(min(absmax(y_group), *scale_ub) / qmax, min_scale).
enum class NormKind : int { rms = 0, fused_add_rms = 1, layer = 2 };

// f8e4m3: float8_e4m3fn (saturated to +-448), f8e5m2: float8_e5m2 (+-57344), both round to
// nearest even, NaN -> NaN; i8: int8, round half to even, clamped to [-128, 127], NaN -> 0.
enum class QuantDType : int { f8e4m3 = 0, f8e5m2 = 1, i8 = 2 };

// qmax and the smallest dynamic scale (vLLM's: 1 / (qmax * 512) for fp8, the float32
// epsilon for int8).
inline constexpr float quant_max(QuantDType q) {
  return q == QuantDType::f8e4m3 ? 448.0f : q == QuantDType::f8e5m2 ? 57344.0f : 127.0f;
}
inline constexpr float quant_min_scale(QuantDType q) {
  return q == QuantDType::i8 ? 1.1920928955078125e-07f : 1.0f / (quant_max(q) * 512.0f);
}

struct NormQuantParams {
  NormKind kind;
  QuantDType q;
  DType t;  // x
  DType w;  // weight and bias (== t when absent)
  DType r;  // residual and h (fused only; == t otherwise)
  const void* x;
  const void* r_in;      // fused only
  const void* weight;    // nullptr: no weight (offset ignored)
  const void* bias;      // layer only; nullptr: no bias
  void* h;               // fused only: input + residual, dtype r
  void* out;             // M * N one-byte elements
  float* scales;         // dynamic: M * (N / group) fp32 scales, row-major; unused if static
  const float* scale;    // static dequantization scale (one element), nullptr: dynamic
  const float* scale_ub; // upper bound of the dynamic absmax (one element), may be nullptr
  int64_t M;
  int64_t N;
  int64_t group;         // divides N; N for per-token (and static) scales
  double eps;
  double offset;         // rms kinds: weight_offset
};
RMSNORM_EXT_KERNEL(NormQuant, NormQuantParams);

// ---------------------------------------------------------------------------------------
// Fused QK-norm + RoPE (qk_norm_rope_fwd / _bwd; Qwen3, Gemma 3, GLM): per-head RMSNorm of
// q [..., S, Hq, D] and k [..., S, Hk, D], then the rotary embedding. A row is one head
// vector of D elements; q has P * Hq rows and k P * Hk rows, P = B * S positions (B the
// product of the leading dims). Head row i is at position i / H, whose cos/sin row is
// i / H ([B * S, D] tables, cs_per_batch) or (i / H) % S ([S, D] tables shared by the
// batch). q, k, their outputs and gradients have dtype t; the weights wq / wk (t, or f32
// next to bf16/f16 t; == t when absent); cos and sin dtype cs (t, or f32 next to
// bf16/f16 t). Statistics (rstd, one per row) are float, double for f64. Math in
// float (double for f64), one rounding per output.
//
// With u = v * rstd * w (w = 1 without a weight) and c, s the cos/sin row, the rotation
// acts on pairs (a, b) of a row: (j, j + D/2) for j < D/2 (rotate-half, interleaved =
// false) or (2i, 2i + 1) (GPT-J, interleaved = true). Each output element uses the cos/sin
// entries of its own index:
//   out[a] = u[a] * c[a] - u[b] * s[a]
//   out[b] = u[b] * c[b] + u[a] * s[b]
// (rotate-half: out = u * c + rotate_half(u) * s, rotate_half(u) = cat(-u[D/2:], u[:D/2]);
// interleaved: out = u * c + rotate_every_two(u) * s.) The backward is the transpose:
//   du[a] = g[a] * c[a] + g[b] * s[b],   du[b] = g[b] * c[b] - g[a] * s[a]
// then RMSNorm's backward per row: dv = rstd * (du * w - vhat * mean(du * w * vhat)),
// vhat = v * rstd, and dw = sum over all rows of du * vhat. No gradient for cos / sin.
struct QkNormRopeFwdParams {
  DType t;
  DType cs;
  DType wq;
  DType wk;
  bool interleaved;
  bool cs_per_batch;
  const void* q;
  const void* k;
  const void* q_weight;  // nullptr: no weight (ones)
  const void* k_weight;  // nullptr: no weight (ones)
  const void* cos;
  const void* sin;
  void* q_out;
  void* k_out;
  void* q_rstd;
  void* k_rstd;
  int64_t P;   // positions B * S
  int64_t S;
  int64_t Hq;
  int64_t Hk;
  int64_t D;   // even
  double eps;
};
RMSNORM_EXT_KERNEL(QkNormRopeFwd, QkNormRopeFwdParams);

struct QkNormRopeBwdParams {
  DType t;
  DType cs;
  DType wq;
  DType wk;
  bool interleaved;
  bool cs_per_batch;
  const void* dq_out;  // grad_q (of q_out)
  const void* dk_out;  // grad_k (of k_out)
  const void* q;
  const void* k;
  const void* q_weight;  // nullptr: no weight (ones)
  const void* k_weight;  // nullptr: no weight (ones)
  const void* cos;
  const void* sin;
  const void* q_rstd;
  const void* k_rstd;
  void* dq;
  void* dk;
  void* dwq;  // nullptr: not wanted
  void* dwk;  // nullptr: not wanted
  int64_t P;
  int64_t S;
  int64_t Hq;
  int64_t Hk;
  int64_t D;
  int sm_count;
};
RMSNORM_EXT_KERNEL(QkNormRopeBwd, QkNormRopeBwdParams);

// adaLN modulation (rms_norm_modulate_fwd, layer_norm_modulate_fwd, norm_modulate_bwd): one
// kernel family for both norms, the kind (rms or layer) set by the host from the operands:
//   y = yn * (1 + scale[b]) + shift[b],   yn = xhat * w (+ bias)
// with xhat = x * rstd (rms) or (x - mean) * rstd (layer), and b = row / S: scale and shift
// are Bs = M / S rows of N, one per sample of S consecutive rows (S = M: one row for all).
// Math in fp32 (fp64 for f64 data), y rounded once. Stats as for the plain norms.
struct NormModulateParams {
  NormKind kind;       // rms or layer
  DType t;             // x and y
  DType w;             // weight and bias (== t when both are absent)
  DType s;             // scale and shift
  const void* x;
  const void* weight;  // nullptr: no weight
  const void* bias;    // layer only; nullptr: no bias
  const void* scale;   // Bs x N
  const void* shift;   // Bs x N; nullptr: no shift
  void* y;
  void* mean;          // layer only
  void* rstd;
  int64_t M;
  int64_t N;
  int64_t S;           // rows per scale row (divides M)
  double eps;
};
RMSNORM_EXT_KERNEL(NormModulateFwd, NormModulateParams);

// The backward, with m = 1 + scale[b], dyn = dy * m, g = dyn * w:
//   dx = rstd * (g - xhat * mean(g * xhat))              (rms)
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))    (layer)
//   dscale[b] = sum over the S rows of sample b of dy * yn, dshift[b] = sum of dy,
//   dweight = sum over all rows of dyn * xhat, dbias = sum of dyn.
// Sums in the accumulation type, cascaded / pairwise and in a fixed order (deterministic);
// dscale and dshift are stored in dtype s, dweight and dbias in dtype w.
struct NormModulateBwdParams {
  NormKind kind;       // rms or layer
  DType t;             // x, dy and dx
  DType w;             // weight, bias, dweight, dbias (== t when both are absent)
  DType s;             // scale, dscale, dshift
  const void* x;
  const void* dy;
  const void* mean;    // layer only
  const void* rstd;
  const void* weight;  // nullptr: no weight (ones)
  const void* bias;    // layer only; nullptr: no bias (read for yn, i.e. dscale)
  const void* scale;   // Bs x N
  void* dx;
  void* dscale;        // Bs x N; nullptr: not wanted
  void* dshift;        // Bs x N; nullptr: not wanted
  void* dweight;       // N; nullptr: not wanted
  void* dbias;         // N; nullptr: not wanted
  int64_t M;
  int64_t N;
  int64_t S;           // rows per scale row (divides M)
  int sm_count;
};
RMSNORM_EXT_KERNEL(NormModulateBwd, NormModulateBwdParams);

}  // namespace rmsnorm_ext
