// Per-call parameter handling for the CPU kernels:
//  - EffectiveParam: the weight (plus weight_offset) or bias as one contiguous row of the
//    accumulation type, built once per call so the per-row hot loops read a single dtype
//    and the Gemma-style offset is added in fp32, never in bf16.
//  - RowChunks / PartialTree / sum_chunk_rows: parameter gradients reduced without
//    atomics, as a tree over rows (see below). Rows are split into a fixed number of
//    contiguous chunks (one per thread), so the result is bitwise reproducible for a
//    given thread count.
#pragma once

#include "../kernel_params.h"
#include "vec_io.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace rmsnorm_ext::cpu {

template <typename A>
class EffectiveParam {
 public:
  template <typename W>
  EffectiveParam(const W* w, int64_t N, double offset) {
    if (w == nullptr) return;
    if constexpr (std::is_same_v<W, A>) {
      if (offset == 0.0) {  // already the right type: use it in place
        ptr_ = w;
        return;
      }
    }
    storage_.resize(static_cast<size_t>(N));
    const A off = static_cast<A>(offset);
    for (int64_t j = 0; j < N; ++j) storage_[j] = off + static_cast<A>(w[j]);
    ptr_ = storage_.data();
  }
  EffectiveParam(const EffectiveParam&) = delete;
  EffectiveParam& operator=(const EffectiveParam&) = delete;

  const A* get() const { return ptr_; }

 private:
  const A* ptr_ = nullptr;
  std::vector<A> storage_;
};

// Rows per parallel task: enough elements that a task outweighs the scheduling cost.
inline int64_t row_grain(int64_t N) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1)); }

// N rounded up to a whole step of RowIO<A>, so partial rows load and store vector-wide.
template <typename A>
inline int64_t padded(int64_t N) {
  constexpr int64_t S = RowIO<A>::kStep;
  return (N + S - 1) / S * S;
}

// Rows split into contiguous chunks, one per thread, but no more chunks than tasks of
// row_grain(N) rows: a small backward (a decode step, [16, 256]) runs on one thread instead
// of paying for a parallel region that costs more than the work (and far more when the
// machine is busy). The split depends only on M, N and the thread count.
struct RowChunks {
  int64_t M;
  int64_t count;
  RowChunks(int64_t rows, int64_t N)
      : M(rows),
        count(std::max<int64_t>(
            1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), rows,
                                  (rows + row_grain(N) - 1) / row_grain(N)}))) {}
  int64_t begin(int64_t c) const { return c * M / count; }
  int64_t end(int64_t c) const { return (c + 1) * M / count; }
};

// Runs f(c) for every chunk, in parallel when there is more than one: a single chunk
// (one thread, or one row) runs inline, without opening an OpenMP region.
template <typename F>
void for_each_chunk(const RowChunks& chunks, F&& f) {
  if (chunks.count == 1) return f(int64_t{0});
  at::parallel_for(0, chunks.count, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) f(c);
  });
}

// ---------------------------------------------------------------------------------------
// Parameter gradients summed over rows as a tree (dweight = sum over M rows of one term
// per row and column). A single running fp32 sum over a chunk's rows has an error that
// grows like M * eps; a tree of sums grows like log(M) * eps, which is what torch's
// cascade sum achieves. The tree, from the leaves up:
//  - a block: kBlockRows consecutive rows accumulated into one partial row by the row
//    kernel (a short running sum, as cheap per row as before);
//  - within a chunk (one thread's contiguous rows): block partials added pairwise,
//    binary-counter style (PartialTree), so at most log2(blocks) + 1 partial rows are
//    live and the ones being added are the most recently used, still in cache;
//  - across chunks: the chunks' sums added pairwise (sum_chunk_rows).
// Every step depends only on M, the thread count and the data, never on timing, so the
// result is bitwise reproducible for a given thread count.

// Rows per block. The running sum inside a block contributes an error that grows like
// sqrt(kBlockRows) relative to the tree above it; 16 rows keeps it below the tree's own
// error, while the extra work per block (zeroing a partial row, about two row additions
// into the tree) stays a small fraction of 16 rows of the kernel's work.
constexpr int64_t kBlockRows = 16;

// Rows of a chunk's PartialTree for a chunk of `rows` rows: one per tree level that can
// be occupied at once, plus the block in progress.
inline int64_t tree_rows(int64_t rows) {
  const int64_t blocks = std::max<int64_t>(1, (rows + kBlockRows - 1) / kBlockRows);
  int64_t levels = 0;
  while ((int64_t{1} << levels) <= blocks) ++levels;  // bit width of `blocks`
  return levels + 1;
}

// dst[j] += src[j] for j < width. Plain loop: the compiler vectorizes it.
template <typename A>
inline void add_row(A* __restrict dst, const A* __restrict src, int64_t width) {
  for (int64_t j = 0; j < width; ++j) dst[j] += src[j];
}

// The pairwise sum of one chunk's block partials, in `tree_rows(rows)` rows of `width`
// elements at `buf`. Usage: for each block, row = begin_block(), accumulate the block's
// rows into it, end_block(); then finish() returns the row holding the chunk's sum.
template <typename A>
class PartialTree {
 public:
  PartialTree(A* buf, int64_t nrows, int64_t width) : buf_(buf), nrows_(nrows), width_(width) {
    reset();
  }

  // Every row free and no blocks: the next sum starts here, on the same rows (a row that
  // finish() returned is overwritten by it).
  void reset() {
    free_.clear();
    for (int64_t r = nrows_ - 1; r >= 0; --r) free_.push_back(buf_ + r * width_);
    level_.assign(static_cast<size_t>(nrows_), nullptr);
    cur_ = nullptr;
  }

  // A zeroed row for the next block (padded lanes included: the kernels store whole steps).
  A* begin_block() {
    TORCH_CHECK(!free_.empty() && cur_ == nullptr, "rmsnorm_ext: partial tree overflow");
    cur_ = free_.back();
    free_.pop_back();
    std::fill(cur_, cur_ + width_, A(0));
    return cur_;
  }

  // Binary-counter carry: level l holds the sum of 2^l blocks. A new block adds into
  // the occupied levels from the bottom up (older + newer), so every addition is of two
  // sums of equally many blocks, and the freed row is reused.
  void end_block() {
    A* carry = cur_;
    cur_ = nullptr;
    size_t l = 0;
    for (; level_[l] != nullptr; ++l) {
      add_row(level_[l], carry, width_);
      free_.push_back(carry);
      carry = level_[l];
      level_[l] = nullptr;
    }
    level_[l] = carry;
  }

  // The chunk's sum: the remaining levels, smallest first (each is at most the size of
  // the next one up). Returns a zeroed row when there were no blocks.
  A* finish() {
    A* acc = nullptr;
    for (A* row : level_) {
      if (row == nullptr) continue;
      if (acc != nullptr) {
        add_row(row, acc, width_);
      }
      acc = row;
    }
    if (acc == nullptr) {
      acc = begin_block();
      cur_ = nullptr;
    }
    return acc;
  }

 private:
  A* buf_;
  int64_t nrows_;
  int64_t width_;
  A* cur_ = nullptr;
  std::vector<A*> free_;   // rows not in use
  std::vector<A*> level_;  // level_[l]: the sum of 2^l blocks, or null
};

// Runs a chunk's rows [begin, end) block by block: f(row_begin, row_end, partial_row).
template <typename A, typename F>
void for_each_block(PartialTree<A>& tree, int64_t begin, int64_t end, F&& f) {
  for (int64_t b = begin; b < end; b += kBlockRows) {
    A* row = tree.begin_block();
    f(b, std::min(end, b + kBlockRows), row);
    tree.end_block();
  }
}

// The workspace for the tree: `count` chunks of tree_rows(largest chunk) rows of `width`.
template <typename A>
struct TreeWorkspace {
  A* buf;
  int64_t rows_per_chunk;
  int64_t width;
  TreeWorkspace(const Workspace& ws, const RowChunks& chunks, int64_t w)
      : rows_per_chunk(tree_rows((chunks.M + chunks.count - 1) / chunks.count)), width(w) {
    buf = static_cast<A*>(
        ws.alloc(ws.ctx, static_cast<size_t>(chunks.count * rows_per_chunk * width) * sizeof(A)));
  }
  PartialTree<A> tree(int64_t c) const {
    return PartialTree<A>(buf + c * rows_per_chunk * width, rows_per_chunk, width);
  }
};

// out[j] = (sum over chunks of sums[c][offset + j]) cast to W, the chunks added pairwise
// (0+1, 2+3, ..., then (0+1)+(2+3), ...). Adds into the chunk rows in place.
template <typename A, typename W>
void sum_chunk_rows(const std::vector<A*>& sums, int64_t offset, int64_t N, W* out) {
  const int64_t count = static_cast<int64_t>(sums.size());
  // Small reductions stay on this thread: a parallel region costs more than they do.
  const int64_t grain = count * N < (1 << 18) ? N : 2048;
  at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
    for (int64_t step = 1; step < count; step *= 2) {
      for (int64_t c = 0; c + step < count; c += 2 * step) {
        add_row(sums[c] + offset + b, sums[c + step] + offset + b, e - b);
      }
    }
    const A* s = sums[0] + offset;
    for (int64_t j = b; j < e; ++j) out[j] = static_cast<W>(s[j]);
  });
}

}  // namespace rmsnorm_ext::cpu
