// The CPU emulator of CUDA launches (cuda_emulation.h): one fiber per CUDA thread, blocks
// one after another, barriers and warp shuffles as fiber switches, plus the handful of
// runtime calls the kernel files make. Only in the emulation build.
#include "cuda_emulation.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

extern "C" void rmsnorm_ext_emu_switch(void** save_sp, void* next_sp);

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores the stack pointer in
// *save_sp, and resumes the context whose stack pointer is next_sp (System V x86-64).
// swapcontext would do, but it makes a sigprocmask system call per switch.
asm(R"(
  .text
  .globl rmsnorm_ext_emu_switch
  .hidden rmsnorm_ext_emu_switch
  .type rmsnorm_ext_emu_switch,@function
rmsnorm_ext_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size rmsnorm_ext_emu_switch,.-rmsnorm_ext_emu_switch
)");
#else
#error "the CUDA emulator's fiber switch is written for x86-64"
#endif

namespace cuda_emu {

struct Fiber {
  void* sp = nullptr;
  uint3 tid{};
  int linear = 0;
  bool done = false;
};

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;
constexpr size_t kDefaultDynamicSmem = 48 * 1024;
constexpr size_t kOptinSmem = 227 * 1024;  // an H100's per-block opt-in limit

struct Barrier {
  unsigned gen = 0;
  int count = 0;
  const char* site = nullptr;
};

struct Warp {
  int lanes = 0;  // threads of the block in this warp
  int live = 0;
  Barrier bar;
  unsigned char slot[32][16];
};

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "[cuda emulation] %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

std::string block_str(const ThreadState& s) {
  return "block (" + std::to_string(s.block_idx.x) + "," + std::to_string(s.block_idx.y) + "," +
         std::to_string(s.block_idx.z) + ")";
}

struct Emu {
  ThreadState ts;
  void* sched_sp = nullptr;
  std::vector<Fiber> fibers;
  std::vector<unsigned char*> stacks;
  std::vector<Warp> warps;
  const std::function<void()>* body = nullptr;
  int live = 0;
  Barrier block_bar;
  uint64_t progress = 0;
  cudaError_t last_error = cudaSuccess;
  std::vector<unsigned char> smem;
  bool running = false;
};

Emu& emu() {
  thread_local Emu e;
  return e;
}

bool reverse_order() {
  static const bool r = [] {
    const char* v = std::getenv("RMSNORM_EXT_EMU_ORDER");
    return v != nullptr && std::string(v) == "reverse";
  }();
  return r;
}

void yield() {
  Emu& e = emu();
  rmsnorm_ext_emu_switch(&e.ts.cur->sp, e.sched_sp);
}

// Arrive at a barrier of `members` threads and wait for the others.
void arrive_and_wait(Barrier& b, const int& members, const char* site, const char* what) {
  Emu& e = emu();
  if (b.count == 0) {
    b.site = site;
  } else if (site != b.site && std::string(site) != b.site) {
    die(std::string("threads of ") + block_str(e.ts) + " wait at different " + what + ": " +
        b.site + " and " + site);
  }
  ++e.progress;
  const unsigned gen = b.gen;
  if (++b.count == members) {
    b.count = 0;
    ++b.gen;
    return;
  }
  while (b.gen == gen) yield();
}

// A thread that exits no longer counts at its block's and warp's barriers.
void release_if_complete(Barrier& b, int members) {
  if (b.count > 0 && b.count == members) {
    b.count = 0;
    ++b.gen;
  }
}

void fiber_main() {
  Emu& e = emu();
  Fiber* f = e.ts.cur;
  (*e.body)();
  f->done = true;
  ++e.progress;
  --e.live;
  Warp& w = e.warps[f->linear / 32];
  --w.live;
  release_if_complete(e.block_bar, e.live);
  release_if_complete(w.bar, w.live);
  rmsnorm_ext_emu_switch(&f->sp, e.sched_sp);
  __builtin_unreachable();
}

unsigned char* new_stack() {
  void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) die("cannot map a fiber stack");
  mprotect(p, static_cast<size_t>(sysconf(_SC_PAGESIZE)), PROT_NONE);  // overflow guard
  return static_cast<unsigned char*>(p);
}

void start_fiber(Fiber& f, unsigned char* stack) {
  auto top = reinterpret_cast<uintptr_t>(stack + kStackBytes) & ~uintptr_t(15);
  auto** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                  // fiber_main's return address (never used)
  *--sp = reinterpret_cast<void*>(&fiber_main);     // where the first switch "returns"
  for (int i = 0; i < 6; ++i) *--sp = nullptr;      // rbp rbx r12 r13 r14 r15
  f.sp = sp;
  f.done = false;
}

void run_block(Emu& e) {
  const int n = static_cast<int>(e.fibers.size());
  for (int i = 0; i < n; ++i) start_fiber(e.fibers[i], e.stacks[i]);
  e.live = n;
  e.block_bar = Barrier{};
  for (size_t w = 0; w < e.warps.size(); ++w) {
    Warp& wp = e.warps[w];
    wp.lanes = std::min(32, n - static_cast<int>(w) * 32);
    wp.live = wp.lanes;
    wp.bar = Barrier{};
  }
  const bool rev = reverse_order();
  while (e.live > 0) {
    const uint64_t before = e.progress;
    for (int k = 0; k < n; ++k) {
      Fiber& f = e.fibers[rev ? n - 1 - k : k];
      if (f.done) continue;
      e.ts.cur = &f;
      rmsnorm_ext_emu_switch(&e.sched_sp, f.sp);
    }
    e.ts.cur = nullptr;
    if (e.live > 0 && e.progress == before) {
      die("deadlock in " + block_str(e.ts) + ": " + std::to_string(e.live) +
          " threads wait at barriers the others never reach (site " +
          (e.block_bar.site ? e.block_bar.site : "?") + ")");
    }
  }
}

std::map<const void*, size_t>& dynamic_limits() {
  static std::map<const void*, size_t> m;
  return m;
}

size_t dynamic_limit(const void* kernel) {
  auto it = dynamic_limits().find(kernel);
  return it == dynamic_limits().end() ? kDefaultDynamicSmem : it->second;
}

}  // namespace

ThreadState& state() { return emu().ts; }

const uint3& thread_idx() { return emu().ts.cur->tid; }

int lane_id() { return emu().ts.cur->linear & 31; }

void syncthreads(const char* site) {
  Emu& e = emu();
  arrive_and_wait(e.block_bar, e.live, site, "__syncthreads");
}

void warp_exchange(unsigned mask, const void* mine, void* theirs, int src, size_t bytes) {
  Emu& e = emu();
  Fiber* f = e.ts.cur;
  Warp& w = e.warps[f->linear / 32];
  if (bytes > sizeof(w.slot[0])) die("shuffle of more than 16 bytes");
  const unsigned full = w.lanes == 32 ? 0xffffffffu : ((1u << w.lanes) - 1u);
  if (mask != full || w.live != w.lanes) {
    die("shuffle in " + block_str(e.ts) + " with mask " + std::to_string(mask) + " but " +
        std::to_string(w.live) + " of the warp's " + std::to_string(w.lanes) +
        " lanes running (a lane named in the mask has exited or does not exist)");
  }
  const int lane = f->linear & 31;
  std::memcpy(w.slot[lane], mine, bytes);
  arrive_and_wait(w.bar, w.live, "shuffle", "warp barriers");
  if (src < 0 || src >= w.lanes) die("shuffle reads lane " + std::to_string(src) + " of a warp of " + std::to_string(w.lanes));
  std::memcpy(theirs, w.slot[src], bytes);
  arrive_and_wait(w.bar, w.live, "shuffle", "warp barriers");
}

void run_grid(const Cfg& cfg, const void* kernel, const std::function<void()>& body) {
  // One launch at a time in the process: a kernel's __shared__ arrays are function-local
  // statics, shared by every OS thread.
  static std::mutex one_launch;
  const std::lock_guard<std::mutex> lock(one_launch);
  Emu& e = emu();
  if (e.running) die("a kernel launched from inside a kernel");
  const uint64_t threads = uint64_t(cfg.block.x) * cfg.block.y * cfg.block.z;
  const bool bad_shape = threads == 0 || threads > kMaxThreads || cfg.block.x > 1024 ||
                         cfg.block.y > 1024 || cfg.block.z > 64 || cfg.grid.x == 0 ||
                         cfg.grid.y == 0 || cfg.grid.z == 0 || cfg.grid.x > 0x7fffffffu ||
                         cfg.grid.y > 65535 || cfg.grid.z > 65535;
  if (bad_shape) {
    if (e.last_error == cudaSuccess) e.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (cfg.smem > dynamic_limit(kernel)) {
    if (e.last_error == cudaSuccess) e.last_error = cudaErrorInvalidValue;
    return;
  }
  const int n = static_cast<int>(threads);
  while (static_cast<int>(e.stacks.size()) < n) e.stacks.push_back(new_stack());
  e.fibers.assign(n, Fiber{});
  for (int i = 0; i < n; ++i) {
    Fiber& f = e.fibers[i];
    f.linear = i;
    f.tid.x = i % cfg.block.x;
    f.tid.y = (i / cfg.block.x) % cfg.block.y;
    f.tid.z = i / (cfg.block.x * cfg.block.y);
  }
  e.warps.assign((n + 31) / 32, Warp{});
  e.smem.assign(cfg.smem, 0);
  e.ts.block_dim = cfg.block;
  e.ts.grid_dim = cfg.grid;
  e.ts.dyn_smem = e.smem.empty() ? nullptr : e.smem.data();
  e.body = &body;
  e.running = true;
  const bool rev = reverse_order();
  const uint64_t blocks = uint64_t(cfg.grid.x) * cfg.grid.y * cfg.grid.z;
  for (uint64_t k = 0; k < blocks; ++k) {
    const uint64_t b = rev ? blocks - 1 - k : k;
    e.ts.block_idx = dim3(static_cast<unsigned>(b % cfg.grid.x),
                          static_cast<unsigned>((b / cfg.grid.x) % cfg.grid.y),
                          static_cast<unsigned>(b / (uint64_t(cfg.grid.x) * cfg.grid.y)));
    // Shared memory starts with whatever the last block left: poison it so that a read
    // before the block's own write shows (NaN for floats).
    if (!e.smem.empty()) std::memset(e.smem.data(), 0xff, e.smem.size());
    run_block(e);
  }
  e.running = false;
  e.body = nullptr;
}

cudaError_t peek_last_error() { return emu().last_error; }

cudaError_t get_last_error() {
  Emu& e = emu();
  const cudaError_t r = e.last_error;
  e.last_error = cudaSuccess;
  return r;
}

cudaError_t get_device(int* d) {
  *d = 0;
  return cudaSuccess;
}

int sm_count() {
  static const int n = [] {
    const char* v = std::getenv("RMSNORM_EXT_EMU_SMS");
    const int k = v ? std::atoi(v) : 0;
    return k > 0 ? k : 4;
  }();
  return n;
}

cudaError_t device_get_attribute(int* v, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *v = sm_count();
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *v = static_cast<int>(kOptinSmem);
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *v = static_cast<int>(kDefaultDynamicSmem);
      return cudaSuccess;
    default:
      *v = 0;
      return cudaErrorInvalidValue;
  }
}

cudaError_t func_get_attributes(cudaFuncAttributes* a, const void* kernel) {
  *a = cudaFuncAttributes{};
  a->maxThreadsPerBlock = kMaxThreads;
  a->maxDynamicSharedSizeBytes = static_cast<int>(dynamic_limit(kernel));
  a->sharedSizeBytes = 0;  // static shared memory is not known here
  return cudaSuccess;
}

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || static_cast<size_t>(value) > kOptinSmem) return cudaErrorInvalidValue;
  dynamic_limits()[kernel] = static_cast<size_t>(value);
  return cudaSuccess;
}

cudaError_t memset_async(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}

}  // namespace cuda_emu
