// Attention of a decode or verify step for XLA:CPU: T new tokens per row attend over
// their row's cached K/V and over themselves, under an explicit mask; optionally the
// new K/V are then written into the cache in place.
//
// Why: in XLA, the cache that a while-loop step both reads (attention) and updates
// (dynamic-update-slice) is copied two or three times per layer per step, and V is
// transposed for the dot: at a 1024-slot cache that is ~140 MB of copies a step,
// more than the weights. Here one call reads the cache once and writes T slots.
// It also skips masked slots, so a long cache bucket costs only the live prefix.
//
// Shapes (row-major): q [B, T, K, G, H]; k_cache, v_cache [B, K, S, H]; k_new, v_new
// [B, T, K, H]; mask [B, T, S + T] (cache slots, then the new tokens); starts [B].
// Every token's attended keys are visited in one order (cache slots ascending, then
// new tokens), so its result does not depend on T: a token gets bitwise the same
// attention in a one-token step and in a verify step.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace specjax;

// exp(x) for x <= 0, lane-wise (Cephes expf: range reduction by ln 2, degree-6
// polynomial; ~1 ulp). A value's result never depends on its lane.
inline vf expv(vf x) {
  x = x < splat(-87.3f) ? splat(-87.3f) : x;
  const vf t = x * 1.44269504088896341f + 0.5f;
  vi n = __builtin_convertvector(t, vi);
  n -= (__builtin_convertvector(n, vf) > t) ? 1 : 0;  // floor
  const vf fn = __builtin_convertvector(n, vf);
  const vf r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vf y = p * r * r + r + 1.0f;
  const vi bits = (n + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

template <int... I>
constexpr vi iota(std::integer_sequence<int, I...>) { return vi{I...}; }
constexpr vi kLane = iota(std::make_integer_sequence<int, kLanes>{});

// One step of the lane-sum tree: x and y hold segments of S lanes, each segment partial
// sums of one original vector; the result holds segments of S / 2 (first half + second).
template <int S, int... I>
inline vf halve(vf x, vf y, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(x, y, ((I / (S / 2)) * S + I % (S / 2))...) +
         __builtin_shufflevector(x, y, ((I / (S / 2)) * S + S / 2 + I % (S / 2))...);
}
template <int S>
inline void halve_all(vf* a, int n) {
  for (int j = 0; j < n / 2; ++j) a[j] = halve<S>(a[2 * j], a[2 * j + 1], std::make_integer_sequence<int, kLanes>{});
  if constexpr (S > 2) halve_all<S / 2>(a, n / 2);
}

// Lane i of the result = the sum of the kLanes lanes of a[i] (a is overwritten): one
// shuffle-add tree for kLanes vectors instead of kLanes horizontal sums. The adds a lane
// sum goes through depend only on the lane, not on the other vectors.
inline vf sum_lanes(vf* a) {
  halve_all<kLanes>(a, kLanes);
  return a[0];
}

constexpr int kMaxG = 16;  // query heads per KV head handled in one pass

struct Dims {
  int64_t B, T, K, G, H, S;
};

// P.V for NG query heads x NC kLanes-float chunks of the head dim at once: NG*NC independent
// accumulators (12, or 9 with 16 registers, which leaves room for the value and score loads), so
// the loop over keys is bound by FMA throughput, not by the latency of one accumulator
// chain (a 4x slower verify row with one chain per (head, chunk)). Each
// accumulator still sums its keys in ascending order, so results do not depend on T.
constexpr int kPvHeads = 3, kPvChunks = kRegs >= 32 ? 4 : 3;  // 16 registers: 9 accumulators + 3 + 3

template <int NG, int NC>
void pv(int64_t n, int64_t np, const float* const* vals, const float* sc, int64_t h0, float* ob, int64_t H,
        const float* inv) {
  vf acc[NG][NC] = {};
  for (int64_t i = 0; i < n; ++i) {
    const float* v = vals[i] + h0;
    for (int g = 0; g < NG; ++g)
      for (int c = 0; c < NC; ++c) acc[g][c] += sc[g * np + i] * load(v + kLanes * c);
  }
  for (int g = 0; g < NG; ++g)
    for (int c = 0; c < NC; ++c) store(ob + g * H + kLanes * c, acc[g][c] * inv[g]);
}

void pv_dispatch(int64_t ng, int64_t nc, int64_t n, int64_t np, const float* const* vals, const float* sc,
                 int64_t h0, float* ob, int64_t H, const float* inv) {
  using Fn = void (*)(int64_t, int64_t, const float* const*, const float*, int64_t, float*, int64_t, const float*);
  static_assert(kPvHeads <= 3 && kPvChunks <= 4, "the table covers 3 x 4");
  static constexpr Fn table[3][4] = {{pv<1, 1>, pv<1, 2>, pv<1, 3>, pv<1, 4>},
                                                    {pv<2, 1>, pv<2, 2>, pv<2, 3>, pv<2, 4>},
                                                    {pv<3, 1>, pv<3, 2>, pv<3, 3>, pv<3, 4>}};
  table[ng - 1][nc - 1](n, np, vals, sc, h0, ob, H, inv);
}

// Output of token t of row b for KV head k (its G query heads).
void attend_one(const Dims& d, const float* q, const float* kc, const float* vc, const float* kn,
                const float* vn, const bool* mask, float* out, int64_t b, int64_t t, int64_t k,
                std::vector<const float*>& keys, std::vector<const float*>& vals, std::vector<float>& sc) {
  const int64_t H = d.H, G = d.G, S = d.S, T = d.T;
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  const bool* m = mask + (b * T + t) * (S + T);
  keys.clear();
  vals.clear();
  const int64_t cache_off = (b * d.K + k) * S * H;
  for (int64_t s = 0; s < S; ++s)
    if (m[s]) keys.push_back(kc + cache_off + s * H), vals.push_back(vc + cache_off + s * H);
  for (int64_t j = 0; j < T; ++j)
    if (m[S + j]) {
      const int64_t off = ((b * T + j) * d.K + k) * H;
      keys.push_back(kn + off), vals.push_back(vn + off);
    }
  const int64_t n = static_cast<int64_t>(keys.size()), np = (n + kLanes - 1) / kLanes * kLanes;
  const float* qb = q + ((b * T + t) * d.K + k) * G * H;
  float* ob = out + ((b * T + t) * d.K + k) * G * H;
  if (n == 0) {  // nothing visible: zeros (XLA's masked softmax would average garbage)
    std::memset(ob, 0, sizeof(float) * G * H);
    return;
  }
  sc.resize(G * np);  // every kLanes-key block is written in full below
  for (int64_t i0 = 0; i0 < n; i0 += kLanes) {  // kLanes keys at a time, their lane sums in one tree
    const float* kr[kLanes];
    for (int j = 0; j < kLanes; ++j) kr[j] = keys[std::min(i0 + j, n - 1)];  // past n: any key, masked
    const vi valid = kLane < static_cast<int32_t>(n - i0);
    for (int64_t g = 0; g < G; ++g) {
      vf acc[kLanes] = {};
      for (int64_t h = 0; h < H; h += kLanes) {
        const vf qh = load(qb + g * H + h);
        for (int j = 0; j < kLanes; ++j) acc[j] += qh * load(kr[j] + h);
      }
      const vf s = sum_lanes(acc) * scale;
      store(sc.data() + g * np + i0, valid ? s : splat(-INFINITY));
    }
  }
  float inv[kMaxG];
  for (int64_t g = 0; g < G; ++g) {
    float* row = sc.data() + g * np;
    const float mx = *std::max_element(row, row + n);
    vf sum{};
    for (int64_t i = 0; i < np; i += kLanes) {
      const vf in = load(row + i);
      const vf p = in == splat(-INFINITY) ? splat(0.f) : expv(in - mx);  // padding lanes: 0
      store(row + i, p);
      sum += p;
    }
    inv[g] = 1.0f / hsum(sum);
  }
  for (int64_t g = 0; g < G; g += kPvHeads)
    for (int64_t h = 0; h < H; h += kLanes * kPvChunks)
      pv_dispatch(std::min<int64_t>(kPvHeads, G - g), std::min<int64_t>(kPvChunks, (H - h) / kLanes), n, np,
                  vals.data(), sc.data() + g * np, h, ob + g * H + h, H, inv + g);
}

// out = cache [B, K, S, H] with new [B, T, K, H] at slots starts[b] + t (out may alias cache).
void write_slots(const float* cache, const float* knew, const int32_t* starts, float* out, int64_t B, int64_t K,
                 int64_t S, int64_t H, int64_t T) {
  if (out != cache) std::memcpy(out, cache, sizeof(float) * B * K * S * H);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t slot = static_cast<int64_t>(starts[b]) + t;
      if (slot < 0 || slot >= S) continue;  // the caller checks room; never write outside
      for (int64_t k = 0; k < K; ++k)
        std::memcpy(out + ((b * K + k) * S + slot) * H, knew + ((b * T + t) * K + k) * H, sizeof(float) * H);
    }
}

template <bool Write>
ffi::Error Run(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> kc, ffi::Buffer<ffi::F32> vc,
               ffi::Buffer<ffi::F32> kn, ffi::Buffer<ffi::F32> vn, ffi::Buffer<ffi::PRED> mask,
               ffi::Buffer<ffi::S32> starts, ffi::ResultBuffer<ffi::F32> out, float* kc_out, float* vc_out) {
  const auto qd = q.dimensions(), cd = kc.dimensions();
  if (qd.size() != 5 || cd.size() != 4) return ffi::Error::InvalidArgument("attention: q must be 5-D, caches 4-D");
  const Dims d{qd[0], qd[1], qd[2], qd[3], qd[4], cd[2]};
  if (d.H % 16 || d.G > kMaxG) return ffi::Error::InvalidArgument("attention: head_dim % 16 and G <= 16 needed");
  const float *qp = q.typed_data(), *kcp = kc.typed_data(), *vcp = vc.typed_data();
  const float *knp = kn.typed_data(), *vnp = vn.typed_data();
  const bool* mp = mask.typed_data();
  float* op = out->typed_data();
  parallel_for(pool, d.B * d.T * d.K, [=](int64_t u0, int64_t u1) {
    std::vector<const float*> keys, vals;
    std::vector<float> sc;
    keys.reserve(d.S + d.T), vals.reserve(d.S + d.T);
    for (int64_t u = u0; u < u1; ++u)
      attend_one(d, qp, kcp, vcp, knp, vnp, mp, op, u / (d.T * d.K), (u / d.K) % d.T, u % d.K, keys, vals, sc);
  });
  if (Write) {  // after every read of the old cache; outputs alias the cache inputs
    write_slots(kcp, knp, starts.typed_data(), kc_out, d.B, d.K, d.S, d.H, d.T);
    write_slots(vcp, vnp, starts.typed_data(), vc_out, d.B, d.K, d.S, d.H, d.T);
  }
  return ffi::Error::Success();
}

ffi::Error RunRead(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> kc, ffi::Buffer<ffi::F32> vc,
                   ffi::Buffer<ffi::F32> kn, ffi::Buffer<ffi::F32> vn, ffi::Buffer<ffi::PRED> mask,
                   ffi::Buffer<ffi::S32> starts, ffi::ResultBuffer<ffi::F32> out) {
  return Run<false>(pool, q, kc, vc, kn, vn, mask, starts, out, nullptr, nullptr);
}

ffi::Error RunWrite(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> kc,
                    ffi::Buffer<ffi::F32> vc, ffi::Buffer<ffi::F32> kn, ffi::Buffer<ffi::F32> vn,
                    ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::S32> starts, ffi::ResultBuffer<ffi::F32> out,
                    ffi::ResultBuffer<ffi::F32> kc_out, ffi::ResultBuffer<ffi::F32> vc_out) {
  return Run<true>(pool, q, kc, vc, kn, vn, mask, starts, out, kc_out->typed_data(), vc_out->typed_data());
}

// Writes new [B, T, K, H] into a cache [B, K, S, H] at slots starts[b] + t, in place (the
// output aliases the cache). XLA copies a loop-carried cache for a dynamic-update-slice that
// follows a conditional reading it (the padded verify's lax.switch): a whole-cache copy per
// layer per step.
ffi::Error RunCacheWrite(ffi::Buffer<ffi::F32> cache, ffi::Buffer<ffi::F32> knew, ffi::Buffer<ffi::S32> starts,
                         ffi::ResultBuffer<ffi::F32> out) {
  const auto cd = cache.dimensions(), nd = knew.dimensions();
  if (cd.size() != 4 || nd.size() != 4) return ffi::Error::InvalidArgument("cache_write: 4-D cache and new");
  write_slots(cache.typed_data(), knew.typed_data(), starts.typed_data(), out->typed_data(), cd[0], cd[1], cd[2],
              cd[3], nd[1]);
  return ffi::Error::Success();
}

auto Inputs() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::PRED>>().Arg<ffi::Buffer<ffi::S32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpecjaxAttendRead, RunRead, Inputs().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SpecjaxAttendWrite, RunWrite,
                              Inputs().Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SpecjaxCacheWrite, RunCacheWrite,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>().Ret<ffi::Buffer<ffi::F32>>());
