// Few-row matrix products for decoding on the CPU: y[M, N] = x[M, K] . w[N, K]^T, float32 products and sums,
// w in float32 or bfloat16 (widened in registers), the output rows split over XLA's intra-op threads.
//
// Why by hand: a decode step is bound by reading the weights once. XLA CPU widens a whole bfloat16 matrix
// into a fresh float32 buffer before each matrix-vector product (~1.5 GB/s). float32 weights take the same
// kernel (one decode path; it reads them at least at XLA's rate). Built on first use by internvl_jax/kernels
// (plain GCC vectors, no intrinsics: any ISA the host compiler targets).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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

inline float hsum(f32v v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// Per weight type: elements consumed per step, and the step itself. A bfloat16 step reads 32 weights as 16
// 32-bit lanes: the low halves (even k) shifted up and the high halves (odd k) masked are float32 values, so x
// is passed de-interleaved per 32-block (16 even then 16 odd elements; see deinterleave).
//
// kPrefetchBytes: how far ahead of each weight row to prefetch, 0 for none. Measured on two Xeon cores
// (rows of 896 and 4864): bfloat16 rows read at 18-23 GB/s alone and 24-26 GB/s with a prefetch ~32 KB ahead;
// float32 rows read at 26-28 GB/s alone and slower with any prefetch.
struct F32Weights {
  using T = float;
  static constexpr int kStep = kLanes;
  static constexpr int64_t kPrefetchBytes = 0;
  static inline void step(const float* x, const float* w, f32v& acc) { acc += load_f32(x) * load_f32(w); }
  static inline float scalar(const float* x, const float* w, int64_t k) { return x[k] * w[k]; }
};

struct Bf16Weights {
  using T = uint16_t;
  static constexpr int kStep = 2 * kLanes;
  static constexpr int64_t kPrefetchBytes = 32 << 10;
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
  const bool prefetch = P::kPrefetchBytes > 0 && (n0 + R) * K + ahead <= n_end * K;
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
constexpr int rows_per_tile(int G) { return G <= 2 ? 8 : G <= 4 ? 4 : 2; }  // <= 16 accumulators
constexpr int64_t kRowAlign = 8;                                // chunks hold whole tiles

template <typename P, int G>
void rows(const float* x, const typename P::T* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t n_begin,
          int64_t n_end) {
  constexpr int R = rows_per_tile(G);
  const int64_t ahead = (P::kPrefetchBytes / int64_t(sizeof(typename P::T)) / K + 1) * K;  // whole rows
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

// Chunks of output rows claimed from a counter by the calling thread and by pool tasks alike. A task that
// starts after every chunk was claimed returns at once, so the caller only waits for chunks being computed,
// never for a task still queued (XLA may run several of these ops at once on the same pool).
struct Job {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t chunks = 0, rows_per_chunk = 0;
  int64_t M = 0, K = 0, N = 0;
  std::vector<float> x_copy;
  const float* x = nullptr;
  const void* w = nullptr;
  float* y = nullptr;
  void (*fn)(const float*, const void*, float*, int64_t, int64_t, int64_t, int64_t, int64_t) = nullptr;

  void run() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      const int64_t begin = c * rows_per_chunk;
      fn(x, w, y, M, K, N, begin, std::min(N, begin + rows_per_chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

constexpr int64_t kMinChunkBytes = 64 << 10;  // below this, scheduling a chunk costs more than reading it

ffi::Error Matvec(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                  ffi::Result<ffi::Buffer<ffi::F32>> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || y->dimensions().size() != 2 ||
      y->dimensions()[0] != xd[0] || y->dimensions()[1] != wd[0]) {
    return ffi::Error::InvalidArgument("internvl_matvec: expected x [M, K], w [N, K] and y [M, N]");
  }
  auto job = std::make_shared<Job>();
  job->M = xd[0];
  job->K = xd[1];
  job->N = wd[0];
  job->w = w.untyped_data();
  job->y = y->typed_data();
  int64_t width;
  switch (w.element_type()) {
    case ffi::DataType::F32:
      job->fn = chunk<F32Weights>;
      job->x = x.typed_data();
      width = 4;
      break;
    case ffi::DataType::BF16:
      job->fn = chunk<Bf16Weights>;
      job->x_copy = deinterleave(x.typed_data(), job->M, job->K);
      job->x = job->x_copy.data();
      width = 2;
      break;
    default:
      return ffi::Error::InvalidArgument("internvl_matvec: w must be float32 or bfloat16");
  }
  if (job->M == 0 || job->N == 0) return ffi::Error::Success();
  if (job->K == 0) {  // empty sums
    std::memset(job->y, 0, sizeof(float) * job->M * job->N);
    return ffi::Error::Success();
  }
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t by_size = std::max<int64_t>(1, job->N * job->K * width / kMinChunkBytes);
  const int64_t chunks = std::min(by_size, 4 * threads);  // a few per thread even out their speeds
  job->rows_per_chunk = ((job->N + chunks - 1) / chunks + kRowAlign - 1) / kRowAlign * kRowAlign;
  job->chunks = (job->N + job->rows_per_chunk - 1) / job->rows_per_chunk;
  for (int64_t t = 1; t < std::min(threads, job->chunks); ++t) pool.Schedule([job] { job->run(); });
  job->run();
  for (int spins = 0; job->done.load(std::memory_order_acquire) < job->chunks; ++spins) {
    if (spins > 1000) std::this_thread::yield();
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
