// Decoding kernels for the CPU, as XLA FFI handlers (built on first use by internvl_jax/kernels; plain GCC
// vectors, no intrinsics: any ISA the host compiler targets).
//
// InternvlMatvec: few-row matrix products y[M, N] = x[M, K] . w[N, K]^T, float32 products and sums, w in
// float32 or bfloat16 (widened in registers). A decode step is bound by reading the weights once; XLA CPU
// widens a whole bfloat16 matrix into a fresh float32 buffer before each matrix-vector product (~1.5 GB/s).
// float32 weights take the same kernel (one decode path; it reads them at least at XLA's rate).
//
// InternvlCacheAttention: one query token per row over a KV cache. XLA CPU transposes every layer's keys on
// every step for the scores (~10x the time of reading the cache once).
//
// Both split their work over XLA's intra-op threads (parallel_for).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using internvl_kernels::parallel_for;

constexpr int kLanes = 16;
typedef float f32v __attribute__((vector_size(4 * kLanes)));
typedef uint32_t u32v __attribute__((vector_size(4 * kLanes)));

inline f32v load_f32(const void* p) {
  f32v v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline u32v load_u32(const void* p) {
  u32v v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

typedef uint16_t u16v __attribute__((vector_size(2 * kLanes)));
typedef int32_t i32v __attribute__((vector_size(4 * kLanes)));

inline f32v as_f32(u32v v) {
  f32v f;
  std::memcpy(&f, &v, sizeof(f));
  return f;
}

inline float bf16_to_f32(uint16_t h) {
  uint32_t w = uint32_t(h) << 16;
  float v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

// the sum of the lanes, as a tree of shuffles (a lane-by-lane loop is a chain of 16 dependent adds)
inline float hsum(f32v v) {
  static_assert(kLanes == 16, "the shuffle tree below is for 16 lanes");
  v += __builtin_shuffle(v, u32v{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, u32v{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v += __builtin_shuffle(v, u32v{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v += __builtin_shuffle(v, u32v{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return v[0];
}

// Lane j of the result = the sum of the lanes of v[j], for 16 vectors at once: a tree that halves the vectors
// at each level (15 shuffle pairs in all, against 16 hsum's 64 dependent shuffles).
inline f32v sums16(f32v* v) {
  static_assert(kLanes == 16, "the shuffle tree below is for 16 lanes");
  for (int i = 0; i < 8; ++i)  // vector i: the 8 half-sums of v[2i], then those of v[2i + 1]
    v[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], u32v{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}) +
           __builtin_shuffle(v[2 * i], v[2 * i + 1], u32v{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  for (int i = 0; i < 4; ++i)  // 4 quarter-sums of 4 sources each
    v[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], u32v{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27}) +
           __builtin_shuffle(v[2 * i], v[2 * i + 1], u32v{4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31});
  for (int i = 0; i < 2; ++i)  // 2 partial sums of 8 sources each
    v[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], u32v{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29}) +
           __builtin_shuffle(v[2 * i], v[2 * i + 1], u32v{2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31});
  return __builtin_shuffle(v[0], v[1], u32v{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}) +
         __builtin_shuffle(v[0], v[1], u32v{1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31});
}

// Per weight type: elements consumed per step, and the step itself. A bfloat16 step reads 32 weights as 16
// 32-bit lanes: the low halves (even k) shifted up and the high halves (odd k) masked are float32 values, so x
// is passed de-interleaved per 32-block (16 even then 16 odd elements; see deinterleave).
//
// prefetch_bytes(G): how far ahead of each weight row to prefetch against G rows of x, 0 for none. Measured on
// two Xeon cores (rows of 896 and 4864): bfloat16 rows read at 18-23 GB/s alone and 24-26 GB/s with a prefetch
// ~32 KB ahead; float32 rows against one x row read at 26-28 GB/s alone and slower with any prefetch, against
// 2-8 x rows (fewer weight rows per tile, more arithmetic per byte) 5-25% faster with it (32 KB).
struct F32Weights {
  using T = float;
  static constexpr int kStep = kLanes;
  static constexpr int64_t prefetch_bytes(int G) { return G == 1 ? 0 : 32 << 10; }
  static inline void step(const float* x, const float* w, f32v& acc) { acc += load_f32(x) * load_f32(w); }
  static inline float scalar(const float* x, const float* w, int64_t k) { return x[k] * w[k]; }
};

struct Bf16Weights {
  using T = uint16_t;
  static constexpr int kStep = 2 * kLanes;
  static constexpr int64_t prefetch_bytes(int) { return 32 << 10; }
  static inline void step(const float* x, const uint16_t* w, f32v& acc) {
    const u32v pair = load_u32(w);
    acc += load_f32(x) * as_f32(pair << 16);
    acc += load_f32(x + kLanes) * as_f32(pair & 0xffff0000u);
  }
  // the tail past the last whole step is not de-interleaved
  static inline float scalar(const float* x, const uint16_t* w, int64_t k) { return x[k] * bf16_to_f32(w[k]); }
};

// y[m0 + g, n0 + r] for g < G, r < R: R weight rows read once against G rows of x (x row stride K); the
// weights ``ahead`` elements further on are prefetched while they stay before row n_end.
template <typename P, int G, int R>
void tile(const float* x, const typename P::T* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t n0,
          int64_t n_end, int64_t ahead) {
  f32v acc[G][R] = {};
  const int64_t kv = K - K % P::kStep;
  const bool prefetch = P::prefetch_bytes(G) > 0 && (n0 + R) * K + ahead <= n_end * K;
  for (int64_t k = 0; k < kv; k += P::kStep) {
    for (int r = 0; r < R; ++r) {
      const auto* wr = w + (n0 + r) * K + k;
      if (prefetch) __builtin_prefetch(wr + ahead);
      for (int g = 0; g < G; ++g) P::step(x + (m0 + g) * K + k, wr, acc[g][r]);
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[g][r]);
      for (int64_t k = kv; k < K; ++k) s += P::scalar(x + (m0 + g) * K, w + (n0 + r) * K, k);
      y[(m0 + g) * N + n0 + r] = s;
    }
  }
}

constexpr int kMaxG = 8;                                        // x rows per tile
// Weight rows per tile: 24 accumulators (of 32 vector registers). More rows read at once are more memory
// streams in flight; measured on two Xeon cores against 8 rows per x row: float32 decode products +3.5%, batch 8
// +10%.
constexpr int rows_per_tile(int G) { return G == 1 ? 24 : G == 2 ? 12 : G <= 4 ? 6 : 3; }
constexpr int64_t kRowAlign = 24;  // chunks hold whole tiles

template <typename P, int G>
void rows(const float* x, const typename P::T* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t n_begin,
          int64_t n_end) {
  constexpr int R = rows_per_tile(G);
  const int64_t ahead = (P::prefetch_bytes(G) / int64_t(sizeof(typename P::T)) / K + 1) * K;  // whole rows
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R) tile<P, G, R>(x, w, y, K, N, m0, n, n_end, ahead);
  for (; n < n_end; ++n) tile<P, G, 1>(x, w, y, K, N, m0, n, n_end, ahead);
}

template <typename P, int G = kMaxG>
void rows_tail(const float* x, const typename P::T* w, float* y, int64_t K, int64_t N, int64_t m0, int g,
               int64_t n_begin, int64_t n_end) {
  if constexpr (G > 0) {
    if (g == G) return rows<P, G>(x, w, y, K, N, m0, n_begin, n_end);
    rows_tail<P, G - 1>(x, w, y, K, N, m0, g, n_begin, n_end);
  }
}

// rows n_begin .. n_end of the output, every row of x
template <typename P>
void chunk(const float* x, const void* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n_begin,
           int64_t n_end) {
  const auto* wt = static_cast<const typename P::T*>(w);
  int64_t m = 0;
  for (; m + kMaxG <= M; m += kMaxG) rows<P, kMaxG>(x, wt, y, K, N, m, n_begin, n_end);
  if (m < M) rows_tail<P>(x, wt, y, K, N, m, int(M - m), n_begin, n_end);
}

// x [M, K] with every whole 32-block reordered as its 16 even then its 16 odd elements (Bf16Weights::step)
std::vector<float> deinterleave(const float* x, int64_t M, int64_t K) {
  std::vector<float> out(x, x + M * K);
  const int64_t kv = K - K % Bf16Weights::kStep;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < kv; k += Bf16Weights::kStep) {
      for (int i = 0; i < kLanes; ++i) {
        out[m * K + k + i] = x[m * K + k + 2 * i];
        out[m * K + k + kLanes + i] = x[m * K + k + 2 * i + 1];
      }
    }
  }
  return out;
}

constexpr int64_t kMinChunkBytes = 64 << 10;  // below this, scheduling a chunk costs more than reading it

ffi::Error Matvec(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                  ffi::Result<ffi::Buffer<ffi::F32>> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || y->dimensions().size() != 2 ||
      y->dimensions()[0] != xd[0] || y->dimensions()[1] != wd[0]) {
    return ffi::Error::InvalidArgument("internvl_matvec: expected x [M, K], w [N, K] and y [M, N]");
  }
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  float* out = y->typed_data();
  std::vector<float> x_copy;
  const float* xs = x.typed_data();
  void (*fn)(const float*, const void*, float*, int64_t, int64_t, int64_t, int64_t, int64_t);
  int64_t width;
  switch (w.element_type()) {
    case ffi::DataType::F32:
      fn = chunk<F32Weights>;
      width = 4;
      break;
    case ffi::DataType::BF16:
      fn = chunk<Bf16Weights>;
      x_copy = deinterleave(xs, M, K);
      xs = x_copy.data();
      width = 2;
      break;
    default:
      return ffi::Error::InvalidArgument("internvl_matvec: w must be float32 or bfloat16");
  }
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {  // empty sums
    std::memset(out, 0, sizeof(float) * M * N);
    return ffi::Error::Success();
  }
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t by_size = std::max<int64_t>(1, N * K * width / kMinChunkBytes);
  const int64_t chunks = std::min(by_size, 4 * threads);  // a few per thread even out their speeds
  const int64_t rows_per_chunk = ((N + chunks - 1) / chunks + kRowAlign - 1) / kRowAlign * kRowAlign;
  const void* ws = w.untyped_data();
  parallel_for(pool, (N + rows_per_chunk - 1) / rows_per_chunk, threads, [&](int64_t c) {
    fn(xs, ws, out, M, K, N, c * rows_per_chunk, std::min(N, (c + 1) * rows_per_chunk));
  });
  return ffi::Error::Success();
}

// One cache row of D elements as float32 vectors (bfloat16 widened: its bits are a float32's upper half).
inline f32v load_row(const float* p) { return load_f32(p); }
inline f32v load_row(const uint16_t* p) {
  u16v h;
  std::memcpy(&h, p, sizeof(h));
  return as_f32(__builtin_convertvector(h, u32v) << 16);
}
inline float widen(float v) { return v; }
inline float widen(uint16_t h) { return bf16_to_f32(h); }

// exp(x) for x <= 0, 16 lanes at once (with a scalar expf per score the attention of 24 layers over 448 slots
// took 1.6-1.9 ms instead of 1.35, at batch 8 13.4 instead of 9.5):
// x = n ln2 + r with |r| <= ln2 / 2, exp(r) by Cephes' degree-7 polynomial (~1 ulp), times 2^n through the
// exponent bits. x is clamped at -87 (exp(-87) ~ 1.6e-38, the smallest normal float's order): a softmax term
// that small is negligible next to the largest, which is 1.
inline f32v exp_nonpositive(f32v x) {
  x = x < -87.f ? f32v{} - 87.f : x;
  const f32v fx = x * 1.44269504088896341f + 0.5f;
  i32v n = __builtin_convertvector(fx, i32v);
  n += __builtin_convertvector(fx < __builtin_convertvector(n, f32v), i32v);  // truncation -> floor
  const f32v nf = __builtin_convertvector(n, f32v);
  const f32v r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  f32v p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  f32v scale;
  const i32v bits = (n + 127) << 23;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

constexpr int kHeadBlock = 8;  // query heads whose outputs accumulate in registers together

// One (row, kv head): the G query heads q [G, D] sharing it attend over the S slots of k, v [S, D] that `mask`
// allows, softmax in float32; out [G, D]. With no slot allowed every slot counts equally (what a softmax of
// equal masked scores gives). `probs` is scratch of G rounded up to kHeadBlock rows of S.
template <typename T>
void attend(const float* q, const T* k, const T* v, const bool* mask, float* out, int64_t G, int64_t S,
            int64_t D, float scale, float* probs) {
  const int64_t dv = D - D % kLanes, sv = S - S % kLanes;
  bool any = false;
  for (int64_t s = 0; s < S; ++s) any |= mask[s];
  const auto kept = [&](int64_t s) { return !any || mask[s]; };
  // scaled scores of the kept slots, -inf elsewhere: 16 slots x one head at a time, their 16 dot products
  // summed across lanes together (one hsum per score made the scores latency-bound). With the prefetches below,
  // 24 float32 layers over 448 slots read from memory take 0.8-0.96 ms instead of 1.0-1.24 (bfloat16: -10%).
  for (int64_t s0 = 0; s0 < sv; s0 += kLanes) {
    i32v keep;
    bool some = false;
    for (int j = 0; j < kLanes; ++j) {
      keep[j] = kept(s0 + j) ? -1 : 0;
      some |= kept(s0 + j);
    }
    // more reads in flight than the hardware prefetcher keeps: k's rows two blocks on, and v's rows of this
    // block (read after the softmax) where some are kept
    for (int64_t j = 0; j < kLanes * D; j += 64 / sizeof(T)) {
      if (s0 + 2 * kLanes < sv) __builtin_prefetch(k + (s0 + 2 * kLanes) * D + j);
      if (some) __builtin_prefetch(v + s0 * D + j);
    }
    if (!some || !any) {  // no slot of the block allowed: -inf; no slot allowed at all: equal scores
      for (int64_t g = 0; g < G; ++g) std::fill_n(probs + g * S + s0, kLanes, any ? -INFINITY : 0.f);
      continue;
    }
    for (int64_t g = 0; g < G; ++g) {
      float* out_g = probs + g * S + s0;
      const float* qg = q + g * D;
      f32v acc[kLanes] = {};
      for (int64_t d = 0; d < dv; d += kLanes) {
        const f32v qd = load_f32(qg + d);
        for (int j = 0; j < kLanes; ++j) acc[j] += qd * load_row(k + (s0 + j) * D + d);
      }
      f32v dots = sums16(acc);
      for (int64_t d = dv; d < D; ++d) {
        for (int j = 0; j < kLanes; ++j) dots[j] += qg[d] * widen(k[(s0 + j) * D + d]);
      }
      const f32v scores = keep != 0 ? dots * scale : f32v{} - INFINITY;
      std::memcpy(out_g, &scores, sizeof(scores));
    }
  }
  for (int64_t s = sv; s < S; ++s) {  // the last S % 16 slots one by one
    const T* ks = k + s * D;
    for (int64_t g = 0; g < G; ++g) {
      float dot = -INFINITY;
      if (kept(s)) {
        const float* qg = q + g * D;
        f32v acc = {};
        for (int64_t d = 0; d < dv; d += kLanes) acc += load_f32(qg + d) * load_row(ks + d);
        dot = hsum(acc);
        for (int64_t d = dv; d < D; ++d) dot += qg[d] * widen(ks[d]);
        dot = any ? dot * scale : 0.f;
      }
      probs[g * S + s] = dot;
    }
  }
  // softmax of each head; the padding heads up to a whole block get zeros
  for (int64_t g = 0; g < G; ++g) {
    float* pg = probs + g * S;
    float top = -INFINITY;
    for (int64_t s = 0; s < S; ++s) top = std::max(top, pg[s]);
    f32v sums = {};
    for (int64_t s = 0; s < sv; s += kLanes) {
      const f32v x = load_f32(pg + s) - top;
      const f32v e = x == -INFINITY ? f32v{} : exp_nonpositive(x);
      std::memcpy(pg + s, &e, sizeof(e));
      sums += e;
    }
    float total = hsum(sums);
    for (int64_t s = sv; s < S; ++s) {
      pg[s] = std::exp(pg[s] - top);
      total += pg[s];
    }
    const float inv = 1.f / total;
    for (int64_t s = 0; s < S; ++s) pg[s] *= inv;
  }
  const int64_t blocks = (G + kHeadBlock - 1) / kHeadBlock;
  std::memset(probs + G * S, 0, sizeof(float) * (blocks * kHeadBlock - G) * S);
  // out = probs . v, for kHeadBlock heads x 16 lanes at a time
  for (int64_t g0 = 0; g0 < G; g0 += kHeadBlock) {
    const float* p = probs + g0 * S;
    const int64_t heads = std::min<int64_t>(kHeadBlock, G - g0);
    for (int64_t d = 0; d < dv; d += kLanes) {
      f32v acc[kHeadBlock] = {};
      for (int64_t s = 0; s < S; ++s) {
        if (!kept(s)) continue;
        const f32v row = load_row(v + s * D + d);
        for (int g = 0; g < kHeadBlock; ++g) acc[g] += p[g * S + s] * row;
      }
      for (int64_t g = 0; g < heads; ++g) std::memcpy(out + (g0 + g) * D + d, &acc[g], sizeof(f32v));
    }
    for (int64_t d = dv; d < D; ++d) {
      for (int64_t g = 0; g < heads; ++g) {
        float o = 0.f;
        for (int64_t s = 0; s < S; ++s) o += kept(s) ? p[g * S + s] * widen(v[s * D + d]) : 0.f;
        out[(g0 + g) * D + d] = o;
      }
    }
  }
}

template <typename T>
void attend_all(ffi::ThreadPool& pool, const float* q, const void* k, const void* v, const bool* mask,
                float* out, int64_t B, int64_t H, int64_t KV, int64_t S, int64_t D, float scale) {
  const int64_t G = H / KV;
  const auto* kt = static_cast<const T*>(k);
  const auto* vt = static_cast<const T*>(v);
  parallel_for(pool, B * KV, std::max<int64_t>(1, pool.num_threads()), [&](int64_t i) {
    const int64_t b = i / KV, h = i % KV;
    std::vector<float> probs((G + kHeadBlock - 1) / kHeadBlock * kHeadBlock * S);
    attend(q + (b * H + h * G) * D, kt + i * S * D, vt + i * S * D, mask + b * S, out + (b * H + h * G) * D, G,
           S, D, scale, probs.data());
  });
}

// q [B, H, D] float32, k and v [B, KV, S, D] (float32 or bfloat16, H a multiple of KV), mask [B, S] -> out
// [B, H, D]: query head h reads kv head h / (H / KV).
ffi::Error CacheAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                          ffi::Buffer<ffi::PRED> mask, ffi::Result<ffi::Buffer<ffi::F32>> out, float scale) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  const auto md = mask.dimensions();
  const auto same = [](auto a, auto b) { return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin()); };
  if (qd.size() != 3 || kd.size() != 4 || !same(v.dimensions(), kd) || k.element_type() != v.element_type() ||
      kd[0] != qd[0] || kd[3] != qd[2] || kd[1] == 0 || qd[1] % kd[1] != 0 || md.size() != 2 || md[0] != qd[0] ||
      md[1] != kd[2] || !same(out->dimensions(), qd)) {
    return ffi::Error::InvalidArgument(
        "internvl_cache_attention: expected q [B, H, D], k and v [B, KV, S, D] of one type with H a multiple of "
        "KV, mask [B, S] and out [B, H, D]");
  }
  const int64_t B = qd[0], H = qd[1], D = qd[2], KV = kd[1], S = kd[2];
  if (B * H * D == 0) return ffi::Error::Success();
  if (S == 0) {  // nothing to attend to: the empty average
    std::memset(out->typed_data(), 0, sizeof(float) * B * H * D);
    return ffi::Error::Success();
  }
  const auto* m = reinterpret_cast<const bool*>(mask.typed_data());
  switch (k.element_type()) {
    case ffi::DataType::F32:
      attend_all<float>(pool, q.typed_data(), k.untyped_data(), v.untyped_data(), m, out->typed_data(), B, H, KV,
                        S, D, scale);
      break;
    case ffi::DataType::BF16:
      attend_all<uint16_t>(pool, q.typed_data(), k.untyped_data(), v.untyped_data(), m, out->typed_data(), B, H,
                           KV, S, D, scale);
      break;
    default:
      return ffi::Error::InvalidArgument("internvl_cache_attention: k and v must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(InternvlMatvec, Matvec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(InternvlCacheAttention, CacheAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
