// Helpers shared by the CPU kernels: the vector width and register budget of the ISA
// variant being compiled, and a parallel loop on XLA's intra-op thread pool.
//
// Each kernel source is compiled once per variant (see specjax/kernels/__init__.py):
//   SPECJAX_ISA_AVX512   16-float vectors, 32 vector registers (zmm)
//   SPECJAX_ISA_AVX2     8-float vectors, 16 registers (ymm; AVX2 + FMA)
//   SPECJAX_ISA_GENERIC  4-float vectors, 16 registers: plain GCC vectors, no intrinsics
//                        (SSE2 on any x86-64, NEON elsewhere)
// so the register blocking of each kernel is sized for the registers it will run with.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>

#include "xla/ffi/api/ffi.h"

#if defined(SPECJAX_ISA_AVX512)
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__FMA__)
#error "SPECJAX_ISA_AVX512 needs -mavx512f -mavx512bw -mfma"
#endif
#include <immintrin.h>
#elif defined(SPECJAX_ISA_AVX2)
#if !defined(__AVX2__) || !defined(__FMA__)
#error "SPECJAX_ISA_AVX2 needs -mavx2 -mfma"
#endif
#include <immintrin.h>
#elif !defined(SPECJAX_ISA_GENERIC)
#error "define one of SPECJAX_ISA_AVX512, SPECJAX_ISA_AVX2, SPECJAX_ISA_GENERIC"
#endif

namespace specjax {

namespace ffi = xla::ffi;

#if defined(SPECJAX_ISA_AVX512)
constexpr int kLanes = 16, kRegs = 32;
#elif defined(SPECJAX_ISA_AVX2)
constexpr int kLanes = 8, kRegs = 16;
#else
constexpr int kLanes = 4, kRegs = 16;
#endif

typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));

inline vf load(const float* p) {
  vf r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf splat(float x) { return vf{} + x; }

// Sum of the lanes by halving (lane i + lane i + n/2, ...): log2(kLanes) steps, the same
// order for every vector.
inline float hsum(vf v) {
  float s[kLanes];
  std::memcpy(s, &v, sizeof(v));
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) s[i] += s[i + w];
  return s[0];
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
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
  while (st->done.load(std::memory_order_acquire) < parts) cpu_relax();
}

}  // namespace specjax
