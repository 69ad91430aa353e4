// Checks of the CUDA emulator itself (run by .ci/cuda_emulation.sh before the kernel tests,
// after the same rewrite.py pass as the kernel files):
// that it runs what a GPU runs -- a block reduction through shared memory and warp shuffles,
// a 2-D block, dynamic shared memory, the launch errors CUDA gives -- and that it aborts on
// the bugs it claims to catch (each in a forked child): threads at different
// __syncthreads, a shuffle after a lane exited, a deadlock.
#include <algorithm>

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("[emulator selftest] %s: %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

// Sum of each block's inputs: per-warp xor butterfly, then warp partials through shared
// memory (the shape of group_sum).
__global__ void block_sum(const float* in, float* out, int n) {
  __shared__ float part[32];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = i < n ? in[i] : 0.0f;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) s += part[w];
    out[blockIdx.x] = s;
  }
}

// Transposes a tile through dynamic shared memory with a 2-D block.
__global__ void transpose_tile(const int* in, int* out, int w) {
  extern __shared__ int tile[];
  tile[threadIdx.y * w + threadIdx.x] = in[threadIdx.y * w + threadIdx.x];
  __syncthreads();
  out[threadIdx.y * w + threadIdx.x] = tile[threadIdx.x * w + threadIdx.y];
}

__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void shuffle_after_exit(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void deadlock(float* out) {
  // Thread 0 waits at the block barrier while the rest of its warp waits in a shuffle that
  // needs thread 0: neither ever completes.
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    out[threadIdx.x % 32] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
  }
}

}  // namespace

namespace {

// Runs f in a child process; true if the child aborted (SIGABRT) with `expect` in the
// emulator's message. A child that hangs instead is killed after 60 s (and fails).
template <class F>
bool aborts(F&& f, const char* expect) {
  char path[] = "/tmp/rmsnorm_ext_emu_selftest.XXXXXX";
  const int fd = mkstemp(path);
  if (fd < 0) return false;
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(fd, 2);
    alarm(60);
    f();
    std::_Exit(0);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  std::string log;
  char buf[4096];
  lseek(fd, 0, SEEK_SET);
  for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) log.append(buf, static_cast<size_t>(n));
  close(fd);
  unlink(path);
  return WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT && log.find(expect) != std::string::npos;
}

}  // namespace

int main() {
  {
    const int n = 1000, threads = 128, blocks = (n + threads - 1) / threads;
    std::vector<float> in(n), out(blocks, -1.0f);
    for (int i = 0; i < n; ++i) in[i] = static_cast<float>(i % 7);
    block_sum<<<blocks, threads, 0, nullptr>>>(in.data(), out.data(), n);
    bool ok = cudaGetLastError() == cudaSuccess;
    for (int b = 0; b < blocks; ++b) {
      float want = 0.0f;
      for (int i = b * threads; i < std::min(n, (b + 1) * threads); ++i) want += in[i];
      ok = ok && out[b] == want;
    }
    check(ok, "block reduction with shuffles and shared memory");
  }
  {
    const int w = 16;
    std::vector<int> in(w * w), out(w * w, -1);
    for (int i = 0; i < w * w; ++i) in[i] = i;
    transpose_tile<<<1, dim3(w, w), w * w * sizeof(int), nullptr>>>(in.data(), out.data(), w);
    bool ok = cudaGetLastError() == cudaSuccess;
    for (int y = 0; y < w; ++y)
      for (int x = 0; x < w; ++x) ok = ok && out[y * w + x] == in[x * w + y];
    check(ok, "2-D block with dynamic shared memory");
  }
  {
    std::vector<float> out(2048);
    block_sum<<<1, 2048, 0, nullptr>>>(out.data(), out.data(), 0);
    const bool too_many = cudaGetLastError() == cudaErrorInvalidConfiguration;
    transpose_tile<<<1, dim3(4, 4), 64 * 1024, nullptr>>>(nullptr, nullptr, 4);
    const bool smem = cudaGetLastError() == cudaErrorInvalidValue;
    check(too_many && smem && cudaGetLastError() == cudaSuccess,
          "launch errors: 2048 threads, 64 KB dynamic shared memory without opting in; then cleared");
  }
  std::vector<int> buf(64, 0);
  std::vector<float> fbuf(32, 0.0f);
  check(aborts([&] { divergent_barrier<<<1, 64, 0, nullptr>>>(buf.data()); }, "different __syncthreads"),
        "aborts: threads of a block at different __syncthreads");
  check(aborts([&] { shuffle_after_exit<<<1, 32, 0, nullptr>>>(fbuf.data()); }, "has exited"),
        "aborts: full-mask shuffle after a lane exited");
  check(aborts([&] { deadlock<<<1, 64, 0, nullptr>>>(fbuf.data()); }, "deadlock"),
        "aborts: deadlock");
  check(!aborts([&] { block_sum<<<2, 64, 0, nullptr>>>(fbuf.data(), fbuf.data(), 32); }, ""),
        "a correct kernel does not abort in a child either");
  std::printf("[emulator selftest] %s\n", failures == 0 ? "all passed" : "FAILED");
  return failures == 0 ? 0 : 1;
}
