// Runs the CUDA kernel files on the CPU, so that machines without a GPU can test them.
//
// Force-included (g++ -include) ahead of every csrc/cuda file in the emulation build
// (RMSNORM_EXT_CUDA_EMULATION=1, .ci/cuda_emulation.sh). The kernel files are compiled as
// plain C++ after two textual rewrites that C++ cannot express with macros
// (csrc/cuda/emulation/rewrite.py): `k<<<cfg>>>(args)` becomes `k % Cfg{cfg}(args)`, and an
// `extern __shared__` array becomes a pointer to the launch's dynamic shared memory.
//
// A block runs as one fiber per CUDA thread on the calling OS thread; __syncthreads and
// warp shuffles switch fibers, so the kernels run with the same barriers, the same shared
// memory and the same reduction order as on a GPU, one block after another. What this
// checks: index math, tails, alignment choices, launch shapes and their limits, reduction
// trees, partial-sum workspaces, the values every dtype path computes. It also reports,
// and aborts on, three GPU bugs a run on hardware may hide: threads of a block waiting at
// different __syncthreads, a full-mask shuffle with a lane missing, and a deadlock. What it
// cannot check: timing, memory-model races (fibers run to their next barrier in turn; the
// reverse order, RMSNORM_EXT_EMU_ORDER=reverse, flips which side of a missing barrier wins),
// and the fast-math intrinsics' last bits (emulated with the exact functions).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// Device-side keywords: host code now.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block runs at a time, so a function-local static is exactly the block's shared array.
#define __shared__ static

namespace cuda_emu {

struct Fiber;

// The running block and thread (one OS thread runs one launch at a time; thread_local so
// that separate OS threads may each run launches).
struct ThreadState {
  Fiber* cur = nullptr;
  dim3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  unsigned char* dyn_smem = nullptr;
};
ThreadState& state();
const uint3& thread_idx();

void syncthreads(const char* site);
int sm_count();
// Exchanges `bytes` of every lane of the calling warp: returns lane `src`'s value.
void warp_exchange(unsigned mask, const void* mine, void* theirs, int src, size_t bytes);
int lane_id();

struct Cfg {
  dim3 grid, block;
  size_t smem = 0;
  template <class G, class B, class S = size_t, class St = cudaStream_t>
  Cfg(G g, B b, S s = 0, St = nullptr) : grid(to_dim3(g)), block(to_dim3(b)), smem(static_cast<size_t>(s)) {}
  template <class... A>
  auto operator()(A&&... a) const;

 private:
  static dim3 to_dim3(dim3 d) { return d; }
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  static dim3 to_dim3(I i) { return dim3(static_cast<unsigned>(i)); }
};

template <class... A>
struct BoundLaunch {
  Cfg cfg;
  std::tuple<std::decay_t<A>...> args;
};

template <class... A>
auto Cfg::operator()(A&&... a) const {
  return BoundLaunch<A...>{*this, std::tuple<std::decay_t<A>...>(std::forward<A>(a)...)};
}

// Runs body() as every thread of every block of cfg; sets the sticky launch error instead
// where the configuration is one CUDA would refuse.
void run_grid(const Cfg& cfg, const void* kernel, const std::function<void()>& body);

template <class... P, class... A>
void operator%(void (*kernel)(P...), BoundLaunch<A...> b) {
  auto args = std::move(b.args);
  run_grid(b.cfg, reinterpret_cast<const void*>(kernel), [&] { std::apply([&](auto&... a) { kernel(a...); }, args); });
}

template <class T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(state().dyn_smem);
}

// The runtime calls the kernel files make.
cudaError_t get_last_error();   // returns and clears the sticky error
cudaError_t peek_last_error();  // returns it
cudaError_t get_device(int* d);
cudaError_t device_get_attribute(int* v, cudaDeviceAttr attr, int device);
cudaError_t func_get_attributes(cudaFuncAttributes* a, const void* kernel);
cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
cudaError_t memset_async(void* p, int value, size_t bytes, cudaStream_t = nullptr);
template <class K>
cudaError_t occupancy(int* blocks, K, int threads, size_t smem) {
  *blocks = threads > 512 || smem > 64 * 1024 ? 1 : 2;
  return cudaSuccess;
}
template <class K>
cudaError_t func_get_attributes_any(cudaFuncAttributes* a, K k) {
  return func_get_attributes(a, reinterpret_cast<const void*>(k));
}
template <class K>
cudaError_t func_set_attribute_any(K k, cudaFuncAttribute attr, int value) {
  return func_set_attribute(reinterpret_cast<const void*>(k), attr, value);
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::state().block_idx)
#define blockDim (::cuda_emu::state().block_dim)
#define gridDim (::cuda_emu::state().grid_dim)
#define warpSize 32

// The site (file:line) lets the emulator check that a block's threads meet at one barrier.
#define __syncthreads() ::cuda_emu::syncthreads(__FILE__ ":" RMSNORM_EXT_EMU_STR(__LINE__))
#define RMSNORM_EXT_EMU_STR2(x) #x
#define RMSNORM_EXT_EMU_STR(x) RMSNORM_EXT_EMU_STR2(x)

#define cudaGetLastError ::cuda_emu::get_last_error
#define cudaPeekAtLastError ::cuda_emu::peek_last_error
#define cudaGetDevice ::cuda_emu::get_device
#define cudaDeviceGetAttribute ::cuda_emu::device_get_attribute
#define cudaFuncGetAttributes ::cuda_emu::func_get_attributes_any
#define cudaFuncSetAttribute ::cuda_emu::func_set_attribute_any
#define cudaMemsetAsync ::cuda_emu::memset_async
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor ::cuda_emu::occupancy

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  T r;
  const int lane = ::cuda_emu::lane_id();
  const int src = (lane & ~(width - 1)) | ((lane ^ lane_mask) & (width - 1));
  ::cuda_emu::warp_exchange(mask, &v, &r, src, sizeof(T));
  return r;
}

inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline int __float_as_int(float f) { return static_cast<int>(__float_as_uint(f)); }
inline float __int_as_float(int i) { return __uint_as_float(static_cast<unsigned>(i)); }
// Products that must not be contracted into an FMA: volatile keeps the compiler from fusing.
inline float __fmul_rn(float a, float b) {
  volatile float p = a * b;
  return p;
}
inline double __dmul_rn(double a, double b) {
  volatile double p = a * b;
  return p;
}
// Round to nearest even (the default rounding mode); out of range saturates like the
// hardware conversion, NaN gives 0.
inline int __float2int_rn(float f) {
  if (std::isnan(f)) return 0;
  if (f >= 2147483647.0f) return 2147483647;
  if (f <= -2147483648.0f) return static_cast<int>(-2147483647 - 1);
  return static_cast<int>(std::nearbyint(f));
}
// CUDA's math library overloads every function for float: unqualified sqrt(x) on a float is
// the float square root on a GPU, while the C library's ::sqrt alone would compute in double
// and round twice (rstd off by an ulp now and then).
using std::ceil;
using std::exp;
using std::fabs;
using std::floor;
using std::fma;
using std::fmax;
using std::fmin;
using std::log;
using std::sqrt;

inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }

// CUDA's global min/max overloads for mixed arithmetic types.
template <class A, class B, std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, int> = 0>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}
template <class A, class B, std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, int> = 0>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}

template <class T>
inline T atomicMax(T* p, T v) {
  const T old = *p;
  if (v > old) *p = v;
  return old;
}
template <class T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
