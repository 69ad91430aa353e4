// Device and launch helpers shared by the CUDA norm kernels: 16-byte packed loads and
// stores, fp32/fp64 accumulation types, the per-row reduction, and the host-side choice
// of launch shape.
//
// Deliberately free of c10/ATen headers: nvcc runs cudafe++ and cicc over everything a
// .cu includes, once per architecture, and the torch headers made each kernel file take
// minutes to compile. The kernel files see only raw pointers and their own 16-bit storage
// types; all tensor handling lives in norm_ops_cuda.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels_api.h"
#include "register_kernel.cuh"

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

namespace rmsnorm_ext {
namespace cuda {

// ---------------------------------------------------------------------------------------
// Types

// Accumulation type: fp32 for every input dtype except float64, which keeps fp64.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// Storage-only 16-bit float types (same bits as c10::BFloat16 / c10::Half).
struct alignas(2) bf16_t {
  uint16_t x;
};
struct alignas(2) f16_t {
  uint16_t x;
};

template <typename T>
inline constexpr bool is_reduced_v = std::is_same_v<T, bf16_t> || std::is_same_v<T, f16_t>;

// A parameter / residual dtype P is allowed next to data dtype T when equal, or float
// next to bf16/fp16. Dispatch only instantiates allowed pairs.
template <typename T, typename P>
inline constexpr bool allowed_pair_v =
    std::is_same_v<T, P> || (is_reduced_v<T> && std::is_same_v<P, float>);

// Conversions on the raw 16-bit patterns with the CUDA intrinsics (round to nearest even,
// NaN preserved); they work whether or not the build defines __CUDA_NO_HALF_CONVERSIONS__
// / __CUDA_NO_BFLOAT16_CONVERSIONS__ (torch's defaults do). (Going through c10's
// operators, which take the address of the member, made ptxas put packs in local memory.)
template <typename A, typename T>
__device__ __forceinline__ A to_acc(T v) {
  if constexpr (std::is_same_v<T, bf16_t>) {
    return static_cast<A>(__uint_as_float(static_cast<unsigned>(v.x) << 16));
  } else if constexpr (std::is_same_v<T, f16_t>) {
    return static_cast<A>(__half2float(__ushort_as_half(v.x)));
  } else {
    return static_cast<A>(v);
  }
}
template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) {
  if constexpr (std::is_same_v<T, bf16_t>) {
    return T{__bfloat16_as_ushort(__float2bfloat16_rn(static_cast<float>(v)))};
  } else if constexpr (std::is_same_v<T, f16_t>) {
    return T{__half_as_ushort(__float2half_rn(static_cast<float>(v)))};
  } else {
    return static_cast<T>(v);
  }
}

// ---------------------------------------------------------------------------------------
// Packed memory access. A pack is VEC consecutive elements; with VEC = 16 / sizeof(smallest
// streamed type) one pack of the narrowest tensor is exactly one 128-bit access (wider
// tensors, e.g. an fp32 weight next to bf16 data, take two). Same idea as ATen's
// aligned_vector: the alignas lets nvcc emit LDG.128/STG.128. The host only selects VEC > 1
// after checking that every row of every tensor is aligned to sizeof(pack).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* row, int64_t pack_idx) {
  return reinterpret_cast<const Pack<T, VEC>*>(row)[pack_idx];
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* row, int64_t pack_idx, const Pack<T, VEC>& p) {
  reinterpret_cast<Pack<T, VEC>*>(row)[pack_idx] = p;
}

// ---------------------------------------------------------------------------------------
// Per-row reduction.
//
// A block of blockDim.x threads handles rows_per_block (rpb) rows at once; each row is
// owned by a "group" of tpr consecutive threads, where tpr is a power of two <= 32
// (several rows per warp), or a multiple of 32 (one or more whole warps per row).
// group_sum must be called by every thread of the block (also by groups whose row is past
// the end): it uses full-warp shuffles and, for tpr > 32, __syncthreads.
//
// Every thread of a group ends with bitwise the same sums: the xor butterfly adds a+b on
// one lane and b+a on the other (IEEE addition is commutative), and the cross-warp step
// has every thread add the per-warp partials in the same fixed order. The result is also
// deterministic run to run.
//
// smem: 32 * NV accumulators. Consecutive calls must alternate between two buffers (or be
// separated by a __syncthreads): a fast warp could otherwise overwrite partials that a
// slow warp is still reading.
template <typename A, int NV>
__device__ __forceinline__ void group_sum(A (&v)[NV], int tpr, A* smem) {
  const int width = tpr < 32 ? tpr : 32;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    if (off < width) {
#pragma unroll
      for (int i = 0; i < NV; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], off);
    }
  }
  if (tpr <= 32) return;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) smem[warp * NV + i] = v[i];
  }
  __syncthreads();
  const int wpr = tpr >> 5;
  const int first = (warp / wpr) * wpr;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    A s = smem[first * NV + i];
    for (int j = 1; j < wpr; ++j) s += smem[(first + j) * NV + i];
    v[i] = s;
  }
}

// ---------------------------------------------------------------------------------------
// LayerNorm statistics (layer_norm_fwd_kernels.cu, channels_first_kernels.cu): the
// corrected two-pass formula from mean0 = sum(x) / N and the second pass's sums of
// d = x - mean0: s[0] = sum(d^2), s[1] = sum(d). Same operation order as the CPU.
template <typename A>
__device__ __forceinline__ void corrected_stats(A mean0, const A (&s)[2], int64_t N, A eps,
                                                A& mean, A& rstd) {
  const A inv_n = A(1) / static_cast<A>(N);
  mean = mean0 + s[1] * inv_n;
  const A var_raw = (s[0] - s[1] * s[1] * inv_n) * inv_n;
  const A var = var_raw < A(0) ? A(0) : var_raw;  // keeps NaN (fmax would drop it)
  rstd = A(1) / sqrt(var + eps);
}

// ---------------------------------------------------------------------------------------
// Host-side helpers.

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool is_aligned(const void* p, size_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Records the first launch error (cudaGetLastError after every launch is what
// C10_CUDA_KERNEL_LAUNCH_CHECK does; the host side turns the error into a c10::Error).
#define RMSNORM_EXT_LAUNCH_CHECK(err)                         \
  do {                                                        \
    const cudaError_t e_ = cudaGetLastError();                \
    if ((err) == cudaSuccess && e_ != cudaSuccess) (err) = e_; \
  } while (0)

// Launch shape for a row of P packs.
//  items > 0: register kernel, each thread holds `items` packs of its row (items in {4, 8});
//  items == 0: re-reading kernel (any P), the row is streamed twice (second time mostly
//  from L1/L2).
// Threads per row (tpr) = packs / items rounded up to a power of two (<= 32) or a multiple
// of 32, so small rows share a warp (warp-per-row / sub-warp-per-row) and large rows get a
// whole block. Rows per block (rpb) fills blocks to ~256 threads.
struct RowConfig {
  int tpr;
  int rpb;
  int items;
  int threads() const { return tpr * rpb; }
};

constexpr int kTargetBlock = 256;

inline int64_t threads_for(int64_t n) {
  if (n <= 32) {
    int64_t p = 1;
    while (p < n) p <<= 1;
    return p;
  }
  return ceil_div(n, 32) * 32;
}

// max_tpr: the kernels' __launch_bounds__; max_items: largest register bucket (4 or 8)
// the kernel family instantiates; allow_reg: false forces the re-reading kernel (used for
// the unaligned / odd-N scalar path, which has no register instantiation).
inline RowConfig pick_row_config(int64_t P, int max_tpr, int max_items, bool allow_reg) {
  RowConfig c{};
  const int64_t need4 = ceil_div(P, 4);
  const int64_t need8 = ceil_div(P, 8);
  if (allow_reg && need4 <= max_tpr) {
    c.items = 4;
    c.tpr = static_cast<int>(threads_for(need4));
  } else if (allow_reg && max_items >= 8 && need8 <= max_tpr) {
    c.items = 8;
    c.tpr = static_cast<int>(threads_for(need8));
  } else {
    c.items = 0;
    c.tpr = static_cast<int>(std::min<int64_t>(max_tpr, threads_for(need4)));
  }
  c.rpb = c.tpr >= kTargetBlock ? 1 : kTargetBlock / c.tpr;
  return c;
}

// Grid for the backward kernels, which loop over a contiguous chunk of rows per block so
// that each block produces one partial row of the parameter gradients: about as many
// blocks as fit on the GPU at once. chunk is a multiple of rpb.
struct PersistentGrid {
  int64_t blocks;
  int64_t chunk;
};

// max_chunk (a multiple of rpb) caps the rows per block where a block's running sums must
// stay short (see kRunRows / kRunsPerPartial); more blocks than fit at once then run in
// waves.
template <typename Kernel>
inline PersistentGrid persistent_grid(Kernel kernel, int threads, size_t smem, int64_t M,
                                      int rpb, int sm_count,
                                      int64_t max_chunk = INT64_MAX) {
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem) !=
      cudaSuccess) {
    (void)cudaGetLastError();  // not sticky; fall back to one block per SM
    per_sm = 1;
  }
  const int64_t max_blocks = static_cast<int64_t>(sm_count) * std::max(per_sm, 1);
  const int64_t groups = ceil_div(M, rpb);
  const int64_t blocks = std::min(groups, max_blocks);
  const int64_t chunk = std::min(ceil_div(groups, blocks) * rpb, std::max<int64_t>(max_chunk, rpb));
  return {ceil_div(M, chunk), chunk};
}

// Lets `kernel` launch with `dynamic_bytes` of dynamic shared memory on the current device.
//
// A launch may use at most the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize, which
// starts at 48 KB *minus the kernel's static shared memory* (its __shared__ arrays), not at
// 48 KB: a request of exactly 48 KB (or anything above 48 KB - static) fails with "invalid
// argument" unless the kernel has opted in. So the rule reads the static size
// (cudaFuncGetAttributes) and the attribute's current value, and raises the attribute only
// when needed, never lowering a value already set: another thread may be about to launch
// the same kernel with a larger request. The check-and-set runs under one mutex and the
// largest value set is cached per (kernel, device), so concurrent callers only ever raise
// it and the steady state costs one uncontended lock (no CUDA call, which also keeps
// CUDA-graph capture free of them after the first launch).
//
// *fits = false (and cudaSuccess) when static + dynamic exceeds the device's opt-in
// maximum (cudaDevAttrMaxSharedMemoryPerBlockOptin, e.g. 64 KB on sm_75, 99 KB on sm_86):
// the caller falls back to a kernel that needs less.
inline cudaError_t ensure_dynamic_smem(const void* kernel, size_t dynamic_bytes, bool* fits) {
  struct Entry {
    size_t static_bytes;
    size_t max_dynamic;  // what a launch may use now
    size_t optin;        // the device's per-block opt-in limit
  };
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, Entry> cache;
  *fits = false;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find({kernel, dev});
  if (it == cache.end()) {
    cudaFuncAttributes fa{};
    err = cudaFuncGetAttributes(&fa, kernel);
    if (err != cudaSuccess) return err;
    int optin = 0;
    err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (err != cudaSuccess) return err;
    // The default limit, whatever the attribute reports: 48 KB less the static part.
    constexpr size_t kDefault = 48 * 1024;
    const size_t st = fa.sharedSizeBytes;
    const size_t def = st < kDefault ? kDefault - st : 0;
    const size_t cur = std::min<size_t>(def, static_cast<size_t>(std::max(fa.maxDynamicSharedSizeBytes, 0)));
    it = cache.emplace(std::make_pair(kernel, dev), Entry{st, cur, static_cast<size_t>(optin)}).first;
  }
  Entry& e = it->second;
  if (dynamic_bytes <= e.max_dynamic) {
    *fits = true;
    return cudaSuccess;
  }
  if (e.static_bytes + dynamic_bytes > e.optin) return cudaSuccess;  // *fits stays false
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(dynamic_bytes));
  if (err != cudaSuccess) return err;
  e.max_dynamic = dynamic_bytes;
  *fits = true;
  return cudaSuccess;
}

// Calls f(T{}) with the C++ storage type of a dtype tag.
template <typename F>
inline cudaError_t with_dtype(DType d, F&& f) {
  switch (d) {
    case DType::f32:
      return f(float{});
    case DType::f64:
      return f(double{});
    case DType::bf16:
      return f(bf16_t{});
    case DType::f16:
      return f(f16_t{});
  }
  return cudaErrorInvalidValue;
}

// Calls f(T{}, P{}) for a data dtype and an allowed companion dtype (weight, residual):
// 6 combinations instead of 16.
template <typename F>
inline cudaError_t with_dtype_pair(DType t, DType p, F&& f) {
  return with_dtype(t, [&](auto t_tag) -> cudaError_t {
    using T = decltype(t_tag);
    if (p == t) return f(T{}, T{});
    if constexpr (is_reduced_v<T>) {
      if (p == DType::f32) return f(T{}, float{});
    }
    return cudaErrorInvalidValue;
  });
}

}  // namespace cuda
// A product rounded on its own, never contracted into a following add (FMA): used where
// the same product is formed twice and must cancel exactly, e.g. LayerNorm's
// g - mean(g) for a row of one element.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

}  // namespace rmsnorm_ext
