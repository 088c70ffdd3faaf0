// Small-M matmul for XLA:CPU: y[M, N] = x[M, K] @ W, for the few rows a decode or
// verify step has (M = batch x tokens, small).
//
// Why: a forward over 2..8 tokens must stream the same weights from memory as a
// one-token forward, but XLA:CPU's GEMM paths cost 1.3-2.2x more per matrix for
// it (the tied 49k x 576 head most). Here each weight is read once and used for
// all M rows from registers. Each row's arithmetic (order of the sums) does not
// depend on M, so a row's logits are bitwise the same in a one-token step and in
// a verify step.
//
// Two weight layouts, both row-major:
//   kn: W [K, N]  (a dense layer's kernel)     y = x @ W
//   nk: W [N, K]  (a tied embedding as head)   y = x @ W^T
// Work is split over column blocks and shared with XLA's intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));

inline v16 load(const float* p) {
  v16 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }
inline float hsum(v16 v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

constexpr int kMaxRows = 6;     // rows per register block: 6 x 4 accumulators + 4 weights
constexpr int64_t kSlab = 32;   // W rows per pass in kn
constexpr int64_t kAhead = 64;  // kn prefetch distance along a W row, in floats (the next block)

// kn: 64 columns [n0, n0 + 64) of MR rows over W rows [k0, k1), added to y unless k0 == 0.
// Walking k in short slabs keeps the weight reads to a few sequential streams
// (one per W row of the slab) instead of one strided jump per k.
template <int MR>
void kn_block(const float* x, int64_t K, const float* w, int64_t N, float* y, int64_t n0, int64_t k0,
              int64_t k1) {
  v16 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = k0 ? load(y + m * N + n0 + 16 * j) : v16{};
  const float* wp = w + k0 * N + n0;
  for (int64_t k = k0; k < k1; ++k, wp += N) {
    for (int j = 0; j < 64; j += 16) __builtin_prefetch(wp + kAhead + j, 0, 0);  // a later block, same row
    const v16 w0 = load(wp), w1 = load(wp + 16), w2 = load(wp + 32), w3 = load(wp + 48);
    for (int m = 0; m < MR; ++m) {
      const float xv = x[m * K + k];
      acc[m][0] += xv * w0;
      acc[m][1] += xv * w1;
      acc[m][2] += xv * w2;
      acc[m][3] += xv * w3;
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) store(y + m * N + n0 + 16 * j, acc[m][j]);
}

// nk: 4 outputs [n0, n0 + 4) of MR rows; needs K % 16 == 0.
template <int MR>
void nk_block(const float* x, int64_t K, const float* w, int64_t N, float* y, int64_t n0, int64_t, int64_t) {
  v16 acc[MR][4] = {};
  const float* r0 = w + n0 * K;
  for (int64_t k = 0; k < K; k += 16) {
    const v16 w0 = load(r0 + k), w1 = load(r0 + K + k), w2 = load(r0 + 2 * K + k), w3 = load(r0 + 3 * K + k);
    for (int m = 0; m < MR; ++m) {
      const v16 xv = load(x + m * K + k);
      acc[m][0] += xv * w0;
      acc[m][1] += xv * w1;
      acc[m][2] += xv * w2;
      acc[m][3] += xv * w3;
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) y[m * N + n0 + j] = hsum(acc[m][j]);
}


#define SPECJAX_DISPATCH(fn)                                                                \
  void fn##_rows(int mr, const float* x, int64_t K, const float* w, int64_t N, float* y,  \
                 int64_t n0, int64_t k0, int64_t k1) {                                    \
    switch (mr) {                                                                         \
      case 1: return fn<1>(x, K, w, N, y, n0, k0, k1);                                    \
      case 2: return fn<2>(x, K, w, N, y, n0, k0, k1);                                    \
      case 3: return fn<3>(x, K, w, N, y, n0, k0, k1);                                    \
      case 4: return fn<4>(x, K, w, N, y, n0, k0, k1);                                    \
      case 5: return fn<5>(x, K, w, N, y, n0, k0, k1);                                    \
      default: return fn<6>(x, K, w, N, y, n0, k0, k1);                                   \
    }                                                                                     \
  }
SPECJAX_DISPATCH(kn_block)
SPECJAX_DISPATCH(nk_block)

// Plain loops for the columns a block does not cover (and K % 16 != 0 in nk).
void scalar_cols(bool nk, const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y,
                 int64_t n_begin, int64_t n_end) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n_begin; n < n_end; ++n) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * (nk ? w[n * K + k] : w[k * N + n]);
      y[m * N + n] = s;
    }
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

ffi::Error Run(bool nk, ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
               ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("small_matmul: x and w must be 2-D");
  const int64_t M = xd[0], K = xd[1], N = nk ? wd[0] : wd[1];
  if ((nk ? wd[1] : wd[0]) != K) return ffi::Error::InvalidArgument("small_matmul: contracting sizes differ");
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t width = nk ? 4 : 64;                 // columns per block
  const int64_t blocks = (nk && K % 16) ? 0 : N / width;
  parallel_for(pool, blocks, [=](int64_t b0, int64_t b1) {
    if (nk) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t m0 = 0; m0 < M; m0 += kMaxRows)
          nk_block_rows(static_cast<int>(std::min<int64_t>(kMaxRows, M - m0)), xp + m0 * K, K, wp, N,
                        yp + m0 * N, b * width, 0, K);
      return;
    }
    for (int64_t k0 = 0; k0 < K; k0 += kSlab) {
      const int64_t k1 = std::min(K, k0 + kSlab);
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t m0 = 0; m0 < M; m0 += kMaxRows)
          kn_block_rows(static_cast<int>(std::min<int64_t>(kMaxRows, M - m0)), xp + m0 * K, K, wp, N,
                        yp + m0 * N, b * width, k0, k1);
    }
  });
  if (blocks * width < N) scalar_cols(nk, xp, M, K, wp, N, yp, blocks * width, N);
  return ffi::Error::Success();
}

template <bool NK>
ffi::Error RunLayout(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> y) {
  return Run(NK, pool, x, w, y);
}

// Both handlers take (thread pool; x, w) -> y.
auto Binding() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpecjaxMatmulKN, RunLayout<false>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SpecjaxMatmulNK, RunLayout<true>, Binding());
