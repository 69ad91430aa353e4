// Per-call parameter handling for the CPU kernels:
//  - EffectiveParam: the weight (plus weight_offset) or bias as one contiguous row of the
//    accumulation type, built once per call so the per-row hot loops read a single dtype
//    and the Gemma-style offset is added in fp32, never in bf16.
//  - RowChunks / sum_partials: parameter gradients reduced without atomics. Rows are split
//    into a fixed number of contiguous chunks (one per thread); each chunk accumulates its
//    own fp32 partial row and the partial rows are then added in chunk order, so the result
//    is bitwise reproducible for a given thread count.
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

struct RowChunks {
  int64_t M;
  int64_t count;
  explicit RowChunks(int64_t rows)
      : M(rows), count(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows))) {}
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

// The per-chunk partial rows, from the host layer's workspace (freed when the op returns).
template <typename A>
A* alloc_partials(const Workspace& ws, int64_t count) {
  return static_cast<A*>(ws.alloc(ws.ctx, static_cast<size_t>(count) * sizeof(A)));
}

// out[j] = sum over chunks c (in order) of partials[c * stride + j], cast to W.
template <typename A, typename W>
void sum_partials(const A* partials, int64_t chunks, int64_t stride, int64_t N, W* out) {
  // Small reductions stay on this thread: a parallel region costs more than they do.
  const int64_t grain = chunks * N < (1 << 18) ? N : 2048;
  at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      A s = partials[j];
      for (int64_t c = 1; c < chunks; ++c) s += partials[c * stride + j];
      out[j] = static_cast<W>(s);
    }
  });
}

}  // namespace rmsnorm_ext::cpu
