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
// and W [N, K] kept in its GGUF block quantization (ggml's Q4_1 and Q8_0, 32
// weights a block along K): a weight is dequantized in registers exactly as
// gguf-py does it (d * q + m, where d * q is exact, so one rounding either way),
// so the weights used are bitwise the float32 ones; only 0.625 (Q4_1) or 1.06
// (Q8_0) bytes per weight are read from memory instead of 4.
// Work is split over column blocks and shared with XLA's intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace specjax;

// Register blocking, sized for the variant's register file (common.h). Every accumulator
// below is one vector; a pass also holds its weight vectors and one x vector.
//   kn: kKnVecs vectors of columns x kKnRows rows     (32 regs: 4 x 6 = 24; 16 regs: 4 x 2 = 8)
//   nk: 4 outputs x kNkRows rows                      (same budget)
//   quantized: up to kQRows rows x NB outputs (see q_nb)
constexpr int kKnVecs = 4;
constexpr int kKnRows = kRegs >= 32 ? 6 : 2;
constexpr int kNkRows = kRegs >= 32 ? 6 : 2;
constexpr int kQRows = 8;
constexpr int64_t kKnWidth = kKnVecs * kLanes;  // columns per kn block
constexpr int64_t kSlab = 32;   // W rows per pass in kn
constexpr int64_t kAhead = 64;  // kn prefetch distance along a W row, in floats (the next block)

// kn: kKnWidth columns [n0, n0 + kKnWidth) of MR rows over W rows [k0, k1), added to y
// unless k0 == 0. Walking k in short slabs keeps the weight reads to a few sequential
// streams (one per W row of the slab) instead of one strided jump per k.
template <int MR>
void kn_block(const float* x, int64_t K, const float* w, int64_t N, float* y, int64_t n0, int64_t k0,
              int64_t k1) {
  vf acc[MR][kKnVecs];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < kKnVecs; ++j) acc[m][j] = k0 ? load(y + m * N + n0 + kLanes * j) : vf{};
  const float* wp = w + k0 * N + n0;
  for (int64_t k = k0; k < k1; ++k, wp += N) {
    for (int j = 0; j < kKnWidth; j += 16) __builtin_prefetch(wp + kAhead + j, 0, 0);  // a later block, same row
    vf wv[kKnVecs];
    for (int j = 0; j < kKnVecs; ++j) wv[j] = load(wp + kLanes * j);
    for (int m = 0; m < MR; ++m) {
      const float xv = x[m * K + k];
      for (int j = 0; j < kKnVecs; ++j) acc[m][j] += xv * wv[j];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < kKnVecs; ++j) store(y + m * N + n0 + kLanes * j, acc[m][j]);
}

// The order in which a row of K weights is summed, shared by the float32 nk kernel and the
// quantized kernels (so a packed matrix gives bitwise the float32 result): 32-weight blocks
// in order; inside a block, pairs p = 0 .. 16 / kLanes - 1 of the chunks at p * kLanes and
// 16 + p * kLanes (a Q4_1 byte holds weights j and j + 16: one load serves a pair);
// a last partial block (K % 32 == 16) in chunk order.
constexpr int kPairs = 16 / kLanes;

// nk: 4 outputs [n0, n0 + 4) of MR rows; needs K % 16 == 0.
template <int MR>
void nk_block(const float* x, int64_t K, const float* w, int64_t N, float* y, int64_t n0, int64_t, int64_t) {
  vf acc[MR][4] = {};
  const float* r0 = w + n0 * K;
  auto chunk = [&](int64_t k) {
    const vf w0 = load(r0 + k), w1 = load(r0 + K + k), w2 = load(r0 + 2 * K + k), w3 = load(r0 + 3 * K + k);
    for (int m = 0; m < MR; ++m) {
      const vf xv = load(x + m * K + k);
      acc[m][0] += xv * w0;
      acc[m][1] += xv * w1;
      acc[m][2] += xv * w2;
      acc[m][3] += xv * w3;
    }
  };
  int64_t k = 0;
  for (; k + 32 <= K; k += 32)
    for (int p = 0; p < kPairs; ++p) chunk(k + p * kLanes), chunk(k + 16 + p * kLanes);
  for (; k < K; k += kLanes) chunk(k);
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) y[m * N + n0 + j] = hsum(acc[m][j]);
}

// Pair p of a 32-weight block of output row n, block b: wa = weights [p L, p L + L) and
// wb = [16 + p L, 16 + p L + L) (L = kLanes), dequantized exactly as gguf-py does (d * q + m
// with d * q exact: one rounding, with or without FMA).
// Q4_1: per block d, m (float32 here; float16 in the file) and 16 bytes: byte j
// holds weight j (low nibble) and weight j + 16 (high nibble).
struct Q41 {
  const uint8_t* qs;  // [N, K / 2]
  const float* dm;    // [N, K / 32, 2]
  int64_t K;
  inline void deq(int64_t n, int64_t b, int p, vf& wa, vf& wb) const {
    const uint8_t* q = qs + n * (K / 2) + 16 * b + p * kLanes;
    const float d = dm[(n * (K / 32) + b) * 2], m = dm[(n * (K / 32) + b) * 2 + 1];
#if defined(SPECJAX_ISA_AVX512)
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    const __m512 vd = _mm512_set1_ps(d), vm = _mm512_set1_ps(m);
    wa = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15))), vd, vm);
    wb = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), vd, vm);
#elif defined(SPECJAX_ISA_AVX2)
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
    const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
    wa = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15))), vd, vm);
    wb = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), vd, vm);
#else
    for (int j = 0; j < kLanes; ++j) {
      wa[j] = static_cast<float>(q[j] & 15) * d + m;
      wb[j] = static_cast<float>(q[j] >> 4) * d + m;
    }
#endif
  }
};

// Q8_0: per block d (float32 here) and 32 signed bytes.
struct Q80 {
  const int8_t* qs;  // [N, K]
  const float* d;    // [N, K / 32]
  int64_t K;
  inline void deq(int64_t n, int64_t b, int p, vf& wa, vf& wb) const {
    const int8_t* q = qs + n * K + 32 * b + p * kLanes;
    const float s = d[n * (K / 32) + b];
#if defined(SPECJAX_ISA_AVX512)
    const __m512 vs = _mm512_set1_ps(s);
    wa = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)))), vs);
    wb = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)))), vs);
#elif defined(SPECJAX_ISA_AVX2)
    const __m256 vs = _mm256_set1_ps(s);
    wa = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)))), vs);
    wb = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 16)))), vs);
#else
    for (int j = 0; j < kLanes; ++j) {
      wa[j] = static_cast<float>(q[j]) * s;
      wb[j] = static_cast<float>(q[j + 16]) * s;
    }
#endif
  }
};

#define SPECJAX_DISPATCH(fn, rows)                                                        \
  void fn##_rows(int mr, const float* x, int64_t K, const float* w, int64_t N, float* y,  \
                 int64_t n0, int64_t k0, int64_t k1) {                                    \
    static_assert(rows == 2 || rows == 6, "dispatch covers 2 or 6 rows");                 \
    switch (mr) {                                                                         \
      case 1: return fn<1>(x, K, w, N, y, n0, k0, k1);                                    \
      case 2: return fn<2>(x, K, w, N, y, n0, k0, k1);                                    \
      case 3: return fn<(rows > 2 ? 3 : 2)>(x, K, w, N, y, n0, k0, k1);                   \
      case 4: return fn<(rows > 2 ? 4 : 2)>(x, K, w, N, y, n0, k0, k1);                   \
      case 5: return fn<(rows > 2 ? 5 : 2)>(x, K, w, N, y, n0, k0, k1);                   \
      default: return fn<rows>(x, K, w, N, y, n0, k0, k1);                                \
    }                                                                                     \
  }
SPECJAX_DISPATCH(kn_block, kKnRows)
SPECJAX_DISPATCH(nk_block, kNkRows)

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

ffi::Error Run(bool nk, ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
               ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("small_matmul: x and w must be 2-D");
  const int64_t M = xd[0], K = xd[1], N = nk ? wd[0] : wd[1];
  if ((nk ? wd[1] : wd[0]) != K) return ffi::Error::InvalidArgument("small_matmul: contracting sizes differ");
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t width = nk ? 4 : kKnWidth;           // columns per block
  const int64_t blocks = (nk && K % 16) ? 0 : N / width;
  parallel_for(pool, blocks, [=](int64_t b0, int64_t b1) {
    if (nk) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t m0 = 0; m0 < M; m0 += kNkRows)
          nk_block_rows(static_cast<int>(std::min<int64_t>(kNkRows, M - m0)), xp + m0 * K, K, wp, N,
                        yp + m0 * N, b * width, 0, K);
      return;
    }
    for (int64_t k0 = 0; k0 < K; k0 += kSlab) {
      const int64_t k1 = std::min(K, k0 + kSlab);
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t m0 = 0; m0 < M; m0 += kKnRows)
          kn_block_rows(static_cast<int>(std::min<int64_t>(kKnRows, M - m0)), xp + m0 * K, K, wp, N,
                        yp + m0 * N, b * width, k0, k1);
    }
  });
  if (blocks * width < N) scalar_cols(nk, xp, M, K, wp, N, yp, blocks * width, N);
  return ffi::Error::Success();
}

// NB outputs [n0, n0 + NB) of MR rows from a block-quantized W [N, K]: each pair of a
// 32-weight block is dequantized into registers once and used for all MR rows. A row sums
// its products in the order of nk_block whatever MR and NB are, so its result does not
// depend on how many rows share the pass, and equals the float32 nk kernel's bit for bit.
template <int MR, int NB, class Q>
void q_block(const float* x, int64_t K, const Q& w, float* y, int64_t N, int64_t n0) {
  vf acc[MR][NB] = {};
  for (int64_t b = 0; b < K / 32; ++b) {
    if constexpr (kRegs >= 32) {  // all NB outputs' weights of a pair in registers, x loaded once per row
      for (int p = 0; p < kPairs; ++p) {
        vf wa[NB], wb[NB];
        for (int j = 0; j < NB; ++j) w.deq(n0 + j, b, p, wa[j], wb[j]);
        for (int m = 0; m < MR; ++m) {
          const float* xr = x + m * K + 32 * b + p * kLanes;
          const vf xa = load(xr), xb = load(xr + 16);
          for (int j = 0; j < NB; ++j) {
            acc[m][j] += xa * wa[j];
            acc[m][j] += xb * wb[j];
          }
        }
      }
    } else {  // one output's block at a time (its scales live only meanwhile), x read from L1 by each FMA
      for (int j = 0; j < NB; ++j)
        for (int p = 0; p < kPairs; ++p) {
          vf wa, wb;
          w.deq(n0 + j, b, p, wa, wb);
          for (int m = 0; m < MR; ++m) {
            const float* xr = x + m * K + 32 * b + p * kLanes;
            acc[m][j] += load(xr) * wa;
            acc[m][j] += load(xr + 16) * wb;
          }
        }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NB; ++j) y[m * N + n0 + j] = hsum(acc[m][j]);
}

// Outputs per pass for MR rows. 32 registers: MR x NB accumulators + 2 NB weights + 2 x:
// 4 outputs up to 4 rows, 3 for 5-6, 2 for 7-8 (at most 26 live). 16 registers: MR x NB
// accumulators + 2 weights, 2 scales and the nibble mask: 4 outputs for 1-2 rows (independent
// FMA chains for a short pass), 3 for 3, 2 for 4, 1 for 5-8 (at most 9 accumulators, 14 live).
// There a block is dequantized once per pass whatever NB is, so one pass over all 8 rows
// (not two of 4) halves the dequantization work a verify row pays for.
constexpr int q_nb(int mr) {
  return kRegs >= 32 ? (mr <= 4 ? 4 : mr <= 6 ? 3 : 2) : (mr <= 2 ? 4 : mr == 3 ? 3 : mr == 4 ? 2 : 1);
}

// A group of kGroup outputs (a multiple of every q_nb) in passes of NB.
constexpr int kGroup = 12;
template <int MR, class Q>
void q_group(const float* x, int64_t K, const Q& w, float* y, int64_t N, int64_t n0) {
  constexpr int NB = q_nb(MR);
  static_assert(kGroup % NB == 0, "a group is whole passes");
  for (int j = 0; j < kGroup; j += NB) q_block<MR, NB>(x, K, w, y, N, n0 + j);
}
template <class Q>
void q_pass(int mr, const float* x, int64_t K, const Q& w, float* y, int64_t N, int64_t n0) {
  static_assert(kQRows == 4 || kQRows == 8, "q_pass covers 4 or 8 rows");
  switch (mr) {
    case 1: return q_group<1>(x, K, w, y, N, n0);
    case 2: return q_group<2>(x, K, w, y, N, n0);
    case 3: return q_group<3>(x, K, w, y, N, n0);
    case 4: return q_group<4>(x, K, w, y, N, n0);
    case 5: return q_group<(kQRows > 4 ? 5 : 4)>(x, K, w, y, N, n0);
    case 6: return q_group<(kQRows > 4 ? 6 : 4)>(x, K, w, y, N, n0);
    case 7: return q_group<(kQRows > 4 ? 7 : 4)>(x, K, w, y, N, n0);
    default: return q_group<kQRows>(x, K, w, y, N, n0);
  }
}

// y[M, N] = x[M, K] @ dequant(W)^T for a block-quantized W [N, K] (Q41 or Q80), in
// passes of up to kQRows rows over groups of kGroup outputs.
template <class Q>
ffi::Error RunQuant(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, int64_t N, const Q& w,
                    ffi::ResultBuffer<ffi::F32>& y) {
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1];
  if (K != w.K || K % 32) return ffi::Error::InvalidArgument("quantized matmul: K must match and be a multiple of 32");
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  parallel_for(pool, N / kGroup, [=](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t m0 = 0; m0 < M; m0 += kQRows)
        q_pass(static_cast<int>(std::min<int64_t>(kQRows, M - m0)), xp + m0 * K, K, w, yp + m0 * N, N,
               kGroup * g);
  });
  for (int64_t n = N / kGroup * kGroup; n < N; ++n)  // the last N % kGroup outputs
    for (int64_t m0 = 0; m0 < M; ++m0) q_block<1, 1>(xp + m0 * K, K, w, yp + m0 * N, N, n);
  return ffi::Error::Success();
}

ffi::Error RunQ41(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> qs, ffi::Buffer<ffi::F32> dm,
                  ffi::ResultBuffer<ffi::F32> y) {
  const auto qd = qs.dimensions();
  if (x.dimensions().size() != 2 || qd.size() != 2) return ffi::Error::InvalidArgument("q4_1 matmul: 2-D x and qs");
  const Q41 w{qs.typed_data(), dm.typed_data(), qd[1] * 2};
  return RunQuant(pool, x, qd[0], w, y);
}

ffi::Error RunQ80(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> qs, ffi::Buffer<ffi::F32> d,
                  ffi::ResultBuffer<ffi::F32> y) {
  const auto qd = qs.dimensions();
  if (x.dimensions().size() != 2 || qd.size() != 2) return ffi::Error::InvalidArgument("q8_0 matmul: 2-D x and qs");
  const Q80 w{qs.typed_data(), d.typed_data(), qd[1]};
  return RunQuant(pool, x, qd[0], w, y);
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
XLA_FFI_DEFINE_HANDLER_SYMBOL(SpecjaxMatmulQ41, RunQ41,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SpecjaxMatmulQ80, RunQ80,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
