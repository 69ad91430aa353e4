// Batched backing of a fresh output's pages, just ahead of a kernel's writes (Linux).
//
// Each norm writes an output it has just allocated. torch's CPU allocator does not cache,
// so a large output is a new anonymous mapping (glibc maps every allocation of 32 MiB or
// more, and smaller ones until its threshold adapts), and each 4 KiB page of it is backed
// by a page fault on its first write. On the 2-vCPU VM of the CPU benchmarks a fault costs
// about 1-2 us and faults barely overlap across threads: at [4096, 4096] they are about
// half of a forward's time (x.clone() pays them as well). madvise(MADV_POPULATE_WRITE)
// (Linux 5.14) backs a range of pages in one call, for less than one fault per page; it
// writes and changes no data. A kernel calls it for a chunk of rows (kChunkBytes) right
// before computing them, so the freshly zeroed pages are still in L2 when the rows are
// stored, and only on outputs it allocated itself (never on in-place outputs), of at least
// kMinBytes, and not already backed (see backed()). Where the call is unsupported (older
// kernels, seccomp filters, other systems) it is skipped from then on and the pages fault
// as before.
//
// Huge pages: before the first write, the output's 2 MiB-aligned interior is also marked
// madvise(MADV_HUGEPAGE), where the system's transparent-huge-page mode allows it
// ("madvise" or "always" in /sys/kernel/mm/transparent_hugepage/enabled): one fault then
// backs 2 MiB instead of 4 KiB, and the TLB covers the whole output. Only memory the kernel
// allocated itself, never the process's policy (torch's THP_MEM_ALLOC_ENABLE does that for
// every allocation) and never memory the caller owns. RMSNORM_EXT_HUGEPAGES=0 turns it off
// (for A/B measurements); "never", EINVAL (no THP in the kernel) or another system: off.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>

#include <cerrno>
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // linux/mman.h since 5.14; older libc headers lack it
#endif
#endif

namespace rmsnorm_ext::cpu {

class OutputPrefault {
 public:
  static constexpr int64_t kChunkBytes = int64_t{256} << 10;
  static constexpr int64_t kMinBytes = int64_t{8} << 20;

  // out: the output, M rows of row_bytes bytes each (null: nothing to do).
  OutputPrefault(void* out, int64_t M, int64_t row_bytes)
      : base_(static_cast<char*>(out)), row_bytes_(row_bytes) {
#if defined(__linux__)
    if (out != nullptr && M * row_bytes >= kMinBytes && !unsupported().load(std::memory_order_relaxed) &&
        !backed(base_ + M * row_bytes / 2)) {
      rows_ = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(row_bytes, 1));
      advise_huge(base_, base_ + M * row_bytes);
    }
#else
    (void)M;
#endif
  }

  // Called before row i of a thread's rows [b, e) is computed: every rows_-th row from b backs
  // the pages of rows [i, min(e, i + rows_)) (whole pages only: the boundary pages, which a
  // neighbouring range may share, fault as usual).
  void before_row(int64_t i, int64_t b, int64_t e) const {
    if (rows_ == 0 || (i - b) % rows_ != 0) return;
    populate(base_ + i * row_bytes_, base_ + std::min(e, i + rows_) * row_bytes_);
  }

 private:
  static std::atomic<bool>& unsupported() {
    static std::atomic<bool> flag{false};
    return flag;
  }

  // Whether the page holding p is backed already: then the output is a reused allocation
  // (from the heap, or a caching allocator), whose pages are all backed, and populating them
  // would only walk the page table (about 50 ns a page: a fifth of an L3-resident forward).
  // A fresh mapping has no page backed yet. One mincore call per kernel call.
  static bool backed(const char* p) {
#if defined(__linux__)
    unsigned char v = 0;
    const uintptr_t page = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{4095};
    return mincore(reinterpret_cast<void*>(page), 1, &v) != 0 || (v & 1) != 0;
#else
    (void)p;
    return true;
#endif
  }

  // Whether transparent huge pages may be asked for (read once per process).
  static bool huge_pages_allowed() {
#if defined(__linux__)
    static const bool allowed = [] {
      const char* env = std::getenv("RMSNORM_EXT_HUGEPAGES");
      if (env != nullptr && std::strcmp(env, "0") == 0) return false;
      std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
      std::string mode;
      std::getline(f, mode);
      return mode.find("[madvise]") != std::string::npos ||
             mode.find("[always]") != std::string::npos;
    }();
    return allowed;
#else
    return false;
#endif
  }

  // MADV_HUGEPAGE on the 2 MiB-aligned interior of [begin, end) (the boundary pieces, which
  // may share a huge page with other memory, stay 4 KiB pages).
  static void advise_huge(char* begin, char* end) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    static std::atomic<bool> failed{false};
    if (!huge_pages_allowed() || failed.load(std::memory_order_relaxed)) return;
    constexpr uintptr_t kHuge = uintptr_t{2} << 20;
    const uintptr_t b = (reinterpret_cast<uintptr_t>(begin) + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t e = reinterpret_cast<uintptr_t>(end) & ~(kHuge - 1);
    if (e <= b) return;
    if (madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE) != 0 &&
        (errno == EINVAL || errno == ENOSYS || errno == EPERM)) {
      failed.store(true, std::memory_order_relaxed);
    }
#else
    (void)begin;
    (void)end;
#endif
  }

  static void populate(char* begin, char* end) {
#if defined(__linux__)
    constexpr uintptr_t kPage = 4096;
    const uintptr_t b = (reinterpret_cast<uintptr_t>(begin) + kPage - 1) & ~(kPage - 1);
    const uintptr_t e = reinterpret_cast<uintptr_t>(end) & ~(kPage - 1);
    if (e <= b || unsupported().load(std::memory_order_relaxed)) return;
    if (madvise(reinterpret_cast<void*>(b), e - b, MADV_POPULATE_WRITE) != 0 &&
        (errno == EINVAL || errno == ENOSYS || errno == EPERM)) {  // EPERM: a seccomp filter
      unsupported().store(true, std::memory_order_relaxed);
    }
#else
    (void)begin;
    (void)end;
#endif
  }

  char* base_;
  int64_t row_bytes_;
  int64_t rows_ = 0;  // rows per chunk; 0: off
};

}  // namespace rmsnorm_ext::cpu
