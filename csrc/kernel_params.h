// The kernel parameter structs: the one interface between the device-independent host
// layer (csrc/host/: checks, allocation, empty sizes, filling these structs) and the
// kernels of every device (csrc/cpu/, csrc/cuda/). Plain pointers and dtype tags only,
// so kernel files compile without the torch headers.
//
// Kernels receive contiguous [M, N] rows with M, N > 0; the host has validated shapes
// and dtype combinations before any kernel runs.
#pragma once

#include <cstddef>
#include <cstdint>

namespace rmsnorm_ext {

enum class DType : int { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };

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
  double eps;
  double offset;
};

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
  double offset;
  int sm_count;
};

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
  double eps;
};

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
  int sm_count;
};

}  // namespace rmsnorm_ext
