// Helpers shared by the CPU kernels: 16-float vectors and a parallel loop on XLA's
// intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace specjax {

namespace ffi = xla::ffi;

typedef float v16 __attribute__((vector_size(64)));

inline v16 load(const float* p) {
  v16 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
inline float hsum(v16 v) {  // pairwise halves: 4 shuffles and adds, not 15 dependent lane adds
  const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// Runs f(begin, end) over [0, n) split into one contiguous range per thread of the
// pool (this thread included). Ranges are claimed, so a task the pool starts late
// finds nothing left and never touches the buffers after the caller returned.
template <class F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, F f) {
  const int64_t parts = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), n);
  if (parts <= 1) {
    if (n > 0) f(0, n);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto st = std::make_shared<State>();
  auto work = [st, n, parts, f]() {
    for (;;) {
      const int64_t i = st->next.fetch_add(1);
      if (i >= parts) return;
      f(i * n / parts, (i + 1) * n / parts);
      st->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 1; i < parts; ++i) pool.Schedule(decltype(work)(work));
  work();
  while (st->done.load(std::memory_order_acquire) < parts) __builtin_ia32_pause();
}

}  // namespace specjax
