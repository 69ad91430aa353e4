// Column sums of the backward kernels' partial parameter gradients: ws holds `rows` fp32
// (fp64) partial rows of N columns per plane; out[c] = sum over rows, added in a fixed
// order (strided per thread, then a fixed tree over the 32 row-threads), so the result is
// bitwise identical run to run. blockIdx.y picks the plane (dweight, dbias).
#pragma once

#include "cuda_utils.cuh"

namespace rmsnorm_ext {
namespace cuda {

template <typename A, typename W>
__global__ void __launch_bounds__(1024)
    col_reduce_kernel(const A* ws, int64_t rows, int64_t N, int64_t plane_stride, W* out0,
                      W* out1) {
  __shared__ A sm[32][33];
  const A* src = ws + blockIdx.y * plane_stride;
  W* out = blockIdx.y == 0 ? out0 : out1;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  A s = A(0);
  if (col < N && out != nullptr) {
    // 4 independent loads in flight per thread.
    int64_t r = threadIdx.y;
    for (; r + 96 < rows; r += 128) {
      const A a0 = src[r * N + col];
      const A a1 = src[(r + 32) * N + col];
      const A a2 = src[(r + 64) * N + col];
      const A a3 = src[(r + 96) * N + col];
      s += a0;
      s += a1;
      s += a2;
      s += a3;
    }
    for (; r < rows; r += 32) s += src[r * N + col];
  }
  sm[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < N && out != nullptr) {
    A t = sm[0][threadIdx.x];
#pragma unroll
    for (int k = 1; k < 32; ++k) t += sm[k][threadIdx.x];
    out[col] = from_acc<W>(t);
  }
}

// out0 / out1 may be nullptr (plane not wanted).
template <typename A, typename W>
inline cudaError_t launch_col_reduce(const A* ws, int64_t rows, int64_t N, int planes, W* out0,
                                     W* out1, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(N, 32)), planes);
  const dim3 block(32, 32);
  col_reduce_kernel<A, W><<<grid, block, 0, stream>>>(ws, rows, N, rows * N, out0, out1);
  cudaError_t err = cudaSuccess;
  RMSNORM_EXT_LAUNCH_CHECK(err);
  return err;
}

}  // namespace cuda
}  // namespace rmsnorm_ext
