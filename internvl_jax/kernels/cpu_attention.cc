// Flash attention for training on the CPU, forward and backward, as XLA FFI handlers (built on first use by
// internvl_jax/kernels with cpu_decode.cc; plain GCC vectors, no intrinsics).
//
// XLA CPU computes a softmax attention as separate passes over the whole [L, S] score array (a product, a max,
// an exp, a sum, a product, and as many again backward): bound by memory, 1.6-1.8x the time of PyTorch's CPU
// flash kernel on a ViT tile's 1025 tokens or a 2048-token causal row. Here each [64 x 64] block of scores lives
// in cache from its product to its use, as in FlashAttention-2: the forward keeps a running max and sum per row
// and returns the log-sum-exp of each row; the backward recomputes each block's probabilities from it.
//
// Layouts: q, o, do, dq [B, L, H, D]; k, v, dk, dv [B, S, K, D] (H a multiple of K: query head h reads KV head
// h / (H / K)); segment ids int32 [B, L] and [B, S] (0 = padding; a query attends to the keys of its own non-zero
// segment and, when causal, of index <= its own); lse float32 [B, H, L] (+inf for a row that attends to nothing,
// whose output is zero). Scores, softmax and sums in float32.
#pragma GCC optimize("fp-contract=fast")  // a * b + c as one fused multiply-add in the products

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using internvl_kernels::parallel_for;

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t i8v __attribute__((vector_size(32)));

constexpr int64_t kQ = 64;       // rows of a query block
constexpr int64_t kKV = 64;      // keys of a KV block: the score block's columns (a multiple of 16)
constexpr int64_t kCols = 16;    // columns of the product's register tile (two vectors)
constexpr int kRows = 6;         // rows of the register tile: 12 accumulators + 2 loads + 1 broadcast registers
constexpr float kInf = std::numeric_limits<float>::infinity();

inline v8 load(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }

inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// exp(x) of each lane: Cephes' single-precision range reduction and polynomial (~1 ulp), 0 below -87.3.
inline v8 exp8(v8 x) {
  const v8 lo = splat(-87.33654f), hi = splat(88.3762626647949f);
  const v8 zero_below = x < lo ? splat(0.0f) : splat(1.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  v8 fx = x * splat(1.44269504088896341f) + splat(0.5f);
  v8 t = __builtin_convertvector(__builtin_convertvector(fx, i8v), v8);  // truncation, then floor
  fx = t > fx ? t - splat(1.0f) : t;
  x = x - fx * splat(0.693359375f) - fx * splat(-2.12194440e-4f);
  const v8 z = x * x;
  v8 y = splat(1.9875691500e-4f);
  y = y * x + splat(1.3981999507e-3f);
  y = y * x + splat(8.3334519073e-3f);
  y = y * x + splat(4.1665795894e-2f);
  y = y * x + splat(1.6666665459e-1f);
  y = y * x + splat(5.0000001201e-1f);
  y = y * z + x + splat(1.0f);
  const i8v pow2 = (__builtin_convertvector(fx, i8v) + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &pow2, sizeof(scale));
  return y * scale * zero_below;
}

// C[R x 16] (+)= A[R x K] . B[K x 16]: A rows lda apart, B rows ldb apart, C rows ldc apart.
template <int R>
inline void tile(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t K,
                 bool accumulate) {
  v8 c0[R], c1[R];
  for (int r = 0; r < R; ++r) {
    c0[r] = accumulate ? load(C + r * ldc) : splat(0.0f);
    c1[r] = accumulate ? load(C + r * ldc + 8) : splat(0.0f);
  }
  for (int64_t k = 0; k < K; ++k) {
    const v8 b0 = load(B + k * ldb), b1 = load(B + k * ldb + 8);
    for (int r = 0; r < R; ++r) {
      const v8 a = splat(A[r * lda + k]);
      c0[r] += a * b0;
      c1[r] += a * b1;
    }
  }
  for (int r = 0; r < R; ++r) {
    store(C + r * ldc, c0[r]);
    store(C + r * ldc + 8, c1[r]);
  }
}

// C[M x N] (+)= A[M x K] . B[K x N], row-major with leading strides; N a multiple of 16.
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate) {
  for (int64_t j = 0; j < N; j += kCols) {
    int64_t i = 0;
    for (; i + kRows <= M; i += kRows) tile<kRows>(A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc, K, accumulate);
    const float* a = A + i * lda;
    float* c = C + i * ldc + j;
    switch (M - i) {
      case 5: tile<5>(a, lda, B + j, ldb, c, ldc, K, accumulate); break;
      case 4: tile<4>(a, lda, B + j, ldb, c, ldc, K, accumulate); break;
      case 3: tile<3>(a, lda, B + j, ldb, c, ldc, K, accumulate); break;
      case 2: tile<2>(a, lda, B + j, ldb, c, ldc, K, accumulate); break;
      case 1: tile<1>(a, lda, B + j, ldb, c, ldc, K, accumulate); break;
      default: break;
    }
  }
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols
void transpose(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
}

struct Shape {
  int64_t B, L, S, H, K, D, Dp;  // Dp: D rounded up to 16 (the products' column tile)
  bool causal;
  float scale;
  int64_t G() const { return H / K; }
  int64_t q_blocks() const { return (L + kQ - 1) / kQ; }
  int64_t kv_blocks() const { return (S + kKV - 1) / kKV; }
};

// The smallest and largest segment id of each block (of `block` entries) of a [B, N] segment-id array, for
// skipping block pairs that share no segment (packed samples, padding).
struct BlockRanges {
  std::vector<int32_t> lo, hi;
  BlockRanges(const int32_t* seg, int64_t B, int64_t N, int64_t block) {
    const int64_t nb = (N + block - 1) / block;
    lo.resize(B * nb);
    hi.resize(B * nb);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < nb; ++j) {
        const int32_t* s = seg + b * N + j * block;
        const auto [mn, mx] = std::minmax_element(s, s + std::min(block, N - j * block));
        lo[b * nb + j] = *mn;
        hi[b * nb + j] = *mx;
      }
  }
};

enum class Pair { kSkip, kFull, kMasked };

// Whether query block i and KV block j of row b share no attended pair, every pair, or some.
Pair classify(const Shape& s, const BlockRanges& qr, const BlockRanges& kr, int64_t b, int64_t i, int64_t j) {
  const int64_t qi = b * s.q_blocks() + i, kj = b * s.kv_blocks() + j;
  const int64_t q0 = i * kQ, q1 = std::min(s.L, q0 + kQ) - 1;
  const int64_t k0 = j * kKV, k1 = std::min(s.S, k0 + kKV) - 1;
  if (s.causal && k0 > q1) return Pair::kSkip;
  if (kr.hi[kj] == 0 || qr.hi[qi] == 0 || kr.hi[kj] < qr.lo[qi] || qr.hi[qi] < kr.lo[kj]) return Pair::kSkip;
  const bool one_segment = qr.lo[qi] == qr.hi[qi] && kr.lo[kj] == kr.hi[kj] && qr.lo[qi] == kr.lo[kj];
  return one_segment && (!s.causal || k1 <= q0) ? Pair::kFull : Pair::kMasked;
}

// scores[r, c] = -inf where query q0 + r may not see key k0 + c (rows < nq, columns < nk); padding columns up to
// ldp are -inf too.
void mask_block(const Shape& s, const int32_t* qseg, const int32_t* kseg, int64_t q0, int64_t k0, int64_t nq,
                int64_t nk, float* scores, int64_t ldp, bool masked) {
  for (int64_t r = 0; r < nq; ++r) {
    float* row = scores + r * ldp;
    if (masked) {
      const int32_t sq = qseg[q0 + r];
      for (int64_t c = 0; c < nk; ++c) {
        const int32_t sk = kseg[k0 + c];
        if (sk != sq || sk == 0 || (s.causal && k0 + c > q0 + r)) row[c] = -kInf;
      }
    }
    for (int64_t c = nk; c < ldp; ++c) row[c] = -kInf;
  }
}

// One query block of one head: o rows and lse.
void forward_block(const Shape& s, const float* q, const float* k, const float* v, const int32_t* qseg,
                   const int32_t* kseg, const BlockRanges& qr, const BlockRanges& kr, float* o, float* lse,
                   int64_t b, int64_t h, int64_t i) {
  const int64_t D = s.D, Dp = s.Dp, kh = h / s.G();
  const int64_t q0 = i * kQ, nq = std::min(kQ, s.L - q0);
  constexpr int64_t P = kKV;
  // Q [nq x D]; K^T [D x P] and V [P x Dp] of one KV block, zero beyond it; scores [nq x P]; output rows
  std::vector<float> buffers(kQ * D + D * P + P * Dp + kQ * P + kQ * Dp);
  float* qp = buffers.data();
  float* ktp = qp + kQ * D;
  float* vp = ktp + D * P;
  float* scores = vp + P * Dp;
  float* accp = scores + kQ * P;
  float m[kQ], l[kQ];
  for (int64_t r = 0; r < nq; ++r) {
    std::memcpy(qp + r * D, q + ((b * s.L + q0 + r) * s.H + h) * D, sizeof(float) * D);
    m[r] = -kInf;
    l[r] = 0.0f;
  }
  std::memset(accp, 0, sizeof(float) * nq * Dp);
  for (int64_t j = 0; j < s.kv_blocks(); ++j) {
    const Pair pair = classify(s, qr, kr, b, i, j);
    if (pair == Pair::kSkip) continue;
    const int64_t k0 = j * kKV, nk = std::min(kKV, s.S - k0);
    // K^T [D x P] and V [nk x Dp], zero beyond the block
    std::memset(ktp, 0, sizeof(float) * D * P);
    for (int64_t c = 0; c < nk; ++c) {
      const float* krow = k + ((b * s.S + k0 + c) * s.K + kh) * D;
      for (int64_t d = 0; d < D; ++d) ktp[d * P + c] = krow[d];
      float* vrow = vp + c * Dp;
      std::memcpy(vrow, v + ((b * s.S + k0 + c) * s.K + kh) * D, sizeof(float) * D);
      std::fill(vrow + D, vrow + Dp, 0.0f);
    }
    gemm(nq, P, D, qp, D, ktp, P, scores, P, false);
    mask_block(s, qseg + b * s.L, kseg + b * s.S, q0, k0, nq, nk, scores, P, pair == Pair::kMasked);
    const v8 scale = splat(s.scale);
    for (int64_t r = 0; r < nq; ++r) {
      float* row = scores + r * P;
      v8 top = splat(-kInf);
      for (int64_t c = 0; c < P; c += 8) {
        const v8 x = load(row + c) * scale;
        top = x > top ? x : top;
      }
      float mx = m[r];
      for (int t = 0; t < 8; ++t) mx = std::max(mx, top[t]);
      if (mx == -kInf) {  // nothing attended in this row yet
        std::fill(row, row + P, 0.0f);
        continue;
      }
      v8 sum = splat(0.0f);
      for (int64_t c = 0; c < P; c += 8) {
        const v8 p = exp8(load(row + c) * scale - splat(mx));
        store(row + c, p);
        sum += p;
      }
      const float alpha = m[r] == -kInf ? 0.0f : std::exp(m[r] - mx);
      float total = 0.0f;
      for (int t = 0; t < 8; ++t) total += sum[t];
      l[r] = l[r] * alpha + total;
      m[r] = mx;
      if (alpha != 1.0f)
        for (int64_t d = 0; d < Dp; d += 8) store(accp + r * Dp + d, load(accp + r * Dp + d) * splat(alpha));
    }
    gemm(nq, Dp, nk, scores, P, vp, Dp, accp, Dp, true);
  }
  for (int64_t r = 0; r < nq; ++r) {
    float* out = o + ((b * s.L + q0 + r) * s.H + h) * D;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    for (int64_t d = 0; d < D; ++d) out[d] = accp[r * Dp + d] * inv;
    lse[(b * s.H + h) * s.L + q0 + r] = l[r] > 0.0f ? m[r] + std::log(l[r]) : kInf;
  }
}

// The gradients of one (row, KV head): dk, dv of that head and dq of its query heads.
void backward_unit(const Shape& s, const float* q, const float* k, const float* v, const float* o, const float* lse,
                   const float* dout, const int32_t* qseg, const int32_t* kseg, const BlockRanges& qr,
                   const BlockRanges& kr, float* dq, float* dk, float* dv, int64_t b, int64_t kh) {
  const int64_t D = s.D, Dp = s.Dp, L = s.L, S = s.S, Sp = round_up(S, kKV);
  constexpr int64_t P = kKV;
  // per KV head: K [Sp x Dp], K^T and V^T [D x Sp]; dK, dV accumulators [Sp x Dp]
  std::vector<float> kp(Sp * Dp, 0.0f), kt(D * Sp, 0.0f), vt(D * Sp, 0.0f), dkacc(Sp * Dp, 0.0f),
      dvacc(Sp * Dp, 0.0f);
  for (int64_t c = 0; c < S; ++c) {
    const float* krow = k + ((b * S + c) * s.K + kh) * D;
    const float* vrow = v + ((b * S + c) * s.K + kh) * D;
    std::memcpy(kp.data() + c * Dp, krow, sizeof(float) * D);
    for (int64_t d = 0; d < D; ++d) {
      kt[d * Sp + c] = krow[d];
      vt[d * Sp + c] = vrow[d];
    }
  }
  // per query head: Q and dO [Lp x Dp] (zero columns past D), the rows' delta = sum(dO * O)
  const int64_t Lp = round_up(L, kQ);
  std::vector<float> qp(Lp * Dp, 0.0f), dop(Lp * Dp, 0.0f), delta(L);
  // one block pair: P and dS [kQ x P], their transposes [P x kQ]; the block's dQ rows
  std::vector<float> blocks(4 * kQ * P), dqacc(kQ * Dp);
  float *p = blocks.data(), *ds = p + kQ * P, *pt = ds + kQ * P, *dst = pt + kQ * P;
  for (int64_t h = kh * s.G(); h < (kh + 1) * s.G(); ++h) {
    for (int64_t r = 0; r < L; ++r) {
      const int64_t at = ((b * L + r) * s.H + h) * D;
      std::memcpy(qp.data() + r * Dp, q + at, sizeof(float) * D);
      std::memcpy(dop.data() + r * Dp, dout + at, sizeof(float) * D);
      float sum = 0.0f;
      for (int64_t d = 0; d < D; ++d) sum += dout[at + d] * o[at + d];
      delta[r] = sum;
    }
    const float* lse_h = lse + (b * s.H + h) * L;
    for (int64_t i = 0; i < s.q_blocks(); ++i) {
      const int64_t q0 = i * kQ, nq = std::min(kQ, L - q0);
      std::fill(dqacc.begin(), dqacc.end(), 0.0f);
      bool any = false;
      for (int64_t j = 0; j < s.kv_blocks(); ++j) {
        const Pair pair = classify(s, qr, kr, b, i, j);
        if (pair == Pair::kSkip) continue;
        any = true;
        const int64_t k0 = j * kKV, nk = std::min(kKV, S - k0);
        // P = exp(scale * Q K^T - lse), 0 where masked
        gemm(nq, P, D, qp.data() + q0 * Dp, Dp, kt.data() + k0, Sp, p, P, false);
        mask_block(s, qseg + b * L, kseg + b * S, q0, k0, nq, nk, p, P, pair == Pair::kMasked);
        for (int64_t r = 0; r < nq; ++r) {
          const float m = lse_h[q0 + r];
          float* row = p + r * P;
          if (m == kInf) {
            std::fill(row, row + P, 0.0f);
            continue;
          }
          for (int64_t c = 0; c < P; c += 8) store(row + c, exp8(load(row + c) * splat(s.scale) - splat(m)));
        }
        // dV += P^T dO
        transpose(p, P, pt, kQ, nq, nk);
        gemm(nk, Dp, nq, pt, kQ, dop.data() + q0 * Dp, Dp, dvacc.data() + k0 * Dp, Dp, true);
        // dS = scale * P * (dO V^T - delta)
        gemm(nq, P, D, dop.data() + q0 * Dp, Dp, vt.data() + k0, Sp, ds, P, false);
        for (int64_t r = 0; r < nq; ++r) {
          const v8 dr = splat(delta[q0 + r]);
          for (int64_t c = 0; c < P; c += 8) {
            const int64_t at = r * P + c;
            store(ds + at, load(p + at) * (load(ds + at) - dr) * splat(s.scale));
          }
        }
        // dQ += dS K, dK += dS^T Q
        gemm(nq, Dp, nk, ds, P, kp.data() + k0 * Dp, Dp, dqacc.data(), Dp, true);
        transpose(ds, P, dst, kQ, nq, nk);
        gemm(nk, Dp, nq, dst, kQ, qp.data() + q0 * Dp, Dp, dkacc.data() + k0 * Dp, Dp, true);
      }
      for (int64_t r = 0; r < nq; ++r) {
        float* out = dq + ((b * L + q0 + r) * s.H + h) * D;
        if (any) std::memcpy(out, dqacc.data() + r * Dp, sizeof(float) * D);
        else std::fill(out, out + D, 0.0f);
      }
    }
  }
  for (int64_t c = 0; c < S; ++c) {
    std::memcpy(dk + ((b * S + c) * s.K + kh) * D, dkacc.data() + c * Dp, sizeof(float) * D);
    std::memcpy(dv + ((b * S + c) * s.K + kh) * D, dvacc.data() + c * Dp, sizeof(float) * D);
  }
}

bool same_dims(ffi::Span<const int64_t> a, std::initializer_list<int64_t> b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// The shapes of q [B, L, H, D], k and v [B, S, K, D], segment ids [B, L] and [B, S]; false if they do not fit.
bool read_shape(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v,
                ffi::Buffer<ffi::S32>& qseg, ffi::Buffer<ffi::S32>& kseg, bool causal, float scale, Shape* s) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || kd[0] != qd[0] || kd[3] != qd[3] || kd[2] == 0 || qd[2] % kd[2] != 0 ||
      !same_dims(v.dimensions(), {kd[0], kd[1], kd[2], kd[3]}) || !same_dims(qseg.dimensions(), {qd[0], qd[1]}) ||
      !same_dims(kseg.dimensions(), {kd[0], kd[1]})) {
    return false;
  }
  *s = Shape{qd[0], qd[1], kd[1], qd[2], kd[2], qd[3], round_up(qd[3], kCols), causal, scale};
  return true;
}

constexpr const char* kShapeError =
    "expected q [B, L, H, D], k and v [B, S, K, D] with H a multiple of K, segment ids [B, L] and [B, S]";

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::S32> qseg, ffi::Buffer<ffi::S32> kseg, ffi::Result<ffi::Buffer<ffi::F32>> o,
                   ffi::Result<ffi::Buffer<ffi::F32>> lse, bool causal, float scale) {
  Shape s;
  if (!read_shape(q, k, v, qseg, kseg, causal, scale, &s))
    return ffi::Error::InvalidArgument(std::string("internvl_flash_forward: ") + kShapeError);
  if (s.B * s.L * s.H == 0) return ffi::Error::Success();
  const BlockRanges qr(qseg.typed_data(), s.B, s.L, kQ), kr(kseg.typed_data(), s.B, s.S, kKV);
  const int64_t nq = s.q_blocks();
  parallel_for(pool, s.B * s.H * nq, std::max<int64_t>(1, pool.num_threads()), [&](int64_t u) {
    forward_block(s, q.typed_data(), k.typed_data(), v.typed_data(), qseg.typed_data(), kseg.typed_data(), qr, kr,
                  o->typed_data(), lse->typed_data(), u / (s.H * nq), u / nq % s.H, u % nq);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::S32> qseg, ffi::Buffer<ffi::S32> kseg, ffi::Buffer<ffi::F32> o,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, ffi::Result<ffi::Buffer<ffi::F32>> dq,
                    ffi::Result<ffi::Buffer<ffi::F32>> dk, ffi::Result<ffi::Buffer<ffi::F32>> dv, bool causal,
                    float scale) {
  Shape s;
  if (!read_shape(q, k, v, qseg, kseg, causal, scale, &s))
    return ffi::Error::InvalidArgument(std::string("internvl_flash_backward: ") + kShapeError);
  if (s.B * s.S * s.K == 0) return ffi::Error::Success();
  const BlockRanges qr(qseg.typed_data(), s.B, s.L, kQ), kr(kseg.typed_data(), s.B, s.S, kKV);
  parallel_for(pool, s.B * s.K, std::max<int64_t>(1, pool.num_threads()), [&](int64_t u) {
    backward_unit(s, q.typed_data(), k.typed_data(), v.typed_data(), o.typed_data(), lse.typed_data(),
                  dout.typed_data(), qseg.typed_data(), kseg.typed_data(), qr, kr, dq->typed_data(), dk->typed_data(),
                  dv->typed_data(), u / s.K, u % s.K);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(InternvlFlashForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("causal")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(InternvlFlashBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("causal")
                                  .Attr<float>("scale"));
