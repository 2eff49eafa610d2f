// Variable-length attention, forward and backward, for one (sequence, head) at a time.
// Included by kernels_impl.h, so it is compiled once per CPU capability (DEFAULT, AVX2, AVX512)
// and sees at::vec::Vectorized<float> at that width. Raw pointers only: the operators in
// csrc/attention/attention.cpp check the tensors, allocate the outputs and run (sequence, head)
// items in parallel, each with its own workspace.
//
// Only the n real tokens of a sequence are touched: q, k, v rows are gathered (any row stride,
// fp32 or bf16) into small fp32 buffers padded to whole vectors, the scores of the whole
// (sequence, head) tile are formed with a register-blocked micro-kernel, softmax runs on the
// tile, and only the log-sum-exp per query is kept for the backward, which recomputes P.
//   forward : S = scale Q K^T, P = softmax(S), O = P V, lse = rowwise log-sum-exp of S
//   backward: D_i = dO_i . O_i, dP = dO V^T, dS = P * (dP - D), dQ = scale dS K,
//             dK = scale dS^T Q, dV = P^T dO
// With dropout (inverted, on the probabilities; M = keep / (1 - p), regenerated from the seed):
//   forward : P' = P * M, O = P' V (lse stays that of the undropped softmax)
//   backward: dV = P'^T dO, dP' = dO V^T, dP = dP' * M, dS = P * (dP - D), D_i = dO_i . O_i
//   still: sum_j P_ij dP_ij = sum_j P_ij M_ij (dO_i . V_j) = dO_i . sum_j P'_ij V_j = dO_i . O_i.
// The backward works on transposed tiles (S^T = K Q^T), so dK and dV are plain row products
// and dQ^T = scale K^T dS^T: no n x n transposes. Rows of padded tokens (tokens n..n+n_pad
// of the item) are written as zeros in every output, and their lse as 0.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "kernel_table.h"
#include "philox_simd.h"

namespace smarter_fast::cpu {
namespace CPU_CAPABILITY {
namespace attn {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();
constexpr int kMR = 4;  // rows of A per micro-tile
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kNV = 4;  // vectors of B per micro-tile: 4x4 accumulators + 4 B + 1 A of 32 zmm
#else
constexpr int kNV = 3;  // 4x3 + 3 + 1 = 16 ymm
#endif

#if defined(__GNUC__)
#define SMARTER_FAST_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define SMARTER_FAST_ALWAYS_INLINE inline
#endif

inline int64_t round_up(int64_t x) { return (x + kV - 1) / kV * kV; }

// C[r, 0:NV*kV] = alpha * sum_k A[r, k] * B[k, 0:NV*kV] for r < MR: MR x NV accumulators live in
// registers across the whole k loop; each B vector loaded once serves MR rows.
template <int MR, int NV>
inline void micro_tile(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                       int64_t ldc, int64_t K, float alpha) {
  Vec acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec(0.0f);
  for (int64_t k = 0; k < K; ++k) {
    Vec b[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) b[v] = Vec::loadu(B + k * ldb + v * kV);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const Vec a(A[r * lda + k]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(a, b[v], acc[r][v]);
    }
  }
  const Vec al(alpha);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) (acc[r][v] * al).store(C + r * ldc + v * kV);
}

template <int MR>
inline void micro_row(int nv, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                      int64_t ldc, int64_t K, float alpha) {
  switch (nv) {
    case 1: micro_tile<MR, 1>(A, lda, B, ldb, C, ldc, K, alpha); break;
    case 2: micro_tile<MR, 2>(A, lda, B, ldb, C, ldc, K, alpha); break;
    case 3: micro_tile<MR, 3>(A, lda, B, ldb, C, ldc, K, alpha); break;
#if defined(CPU_CAPABILITY_AVX512)
    case 4: micro_tile<MR, 4>(A, lda, B, ldb, C, ldc, K, alpha); break;
#endif
    default: break;
  }
}

// C (M x N) = alpha * A (M x K) . B (K x N), all row-major fp32 with leading dimensions in
// floats; N is a multiple of kV (the buffers are padded to whole vectors).
inline void matmul(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                   int64_t ldc, int64_t M, int64_t N, int64_t K, float alpha) {
  const int64_t vectors = N / kV;
  for (int64_t c = 0; c < vectors; c += kNV) {
    const int nv = int(std::min<int64_t>(kNV, vectors - c));
    const float* Bc = B + c * kV;
    float* Cc = C + c * kV;
    int64_t r = 0;
    for (; r + kMR <= M; r += kMR)
      micro_row<kMR>(nv, A + r * lda, lda, Bc, ldb, Cc + r * ldc, ldc, K, alpha);
    switch (M - r) {
      case 1: micro_row<1>(nv, A + r * lda, lda, Bc, ldb, Cc + r * ldc, ldc, K, alpha); break;
      case 2: micro_row<2>(nv, A + r * lda, lda, Bc, ldb, Cc + r * ldc, ldc, K, alpha); break;
      case 3: micro_row<3>(nv, A + r * lda, lda, Bc, ldb, Cc + r * ldc, ldc, K, alpha); break;
      default: break;
    }
  }
}

inline float hmax(const Vec& x) {
  float lanes[kV];
  x.store(lanes);
  float m = lanes[0];
  for (int64_t j = 1; j < kV; ++j) m = std::max(m, lanes[j]);
  return m;
}

inline float hsum(const Vec& x) {
  float lanes[kV];
  x.store(lanes);
  float s = 0.0f;
  for (int64_t j = 0; j < kV; ++j) s += lanes[j];
  return s;
}

// Where token i of one (sequence, head) item lives in a tensor.
struct Rows {
  const AttnSeq& s;
  int64_t row(const AttnTensor& t, int64_t i) const {
    const int64_t tok = s.tokens ? s.tokens[i] : s.first_token + i;
    return s.batch * t.batch_stride + tok * t.token_stride + s.head * t.head_stride;
  }
};

template <typename T>
inline float to_f(T x) { return float(x); }

// dst (n x ld) <- rows 0..n of t, converted to fp32, columns D..ld zero.
template <typename T>
inline void gather_rows(const AttnTensor& t, const Rows& rows, int64_t n, int64_t D, int64_t ld,
                        float* dst) {
  const T* base = static_cast<const T*>(t.data);
  for (int64_t i = 0; i < n; ++i) {
    const T* src = base + rows.row(t, i);
    float* d = dst + i * ld;
    if constexpr (std::is_same_v<T, float>) {
      int64_t j = 0;
      for (; j + kV <= D; j += kV) Vec::loadu(src + j).store(d + j);
      if (j < D) Vec::loadu(src + j, int(D - j)).store(d + j);  // zero-fills to the vector end
    } else {
      for (int64_t j = 0; j < D; ++j) d[j] = to_f(src[j]);
      for (int64_t j = D; j < ld; ++j) d[j] = 0.0f;
    }
  }
}

// dst (D x ld) <- rows 0..n of t transposed, columns n..ld zero.
template <typename T>
inline void gather_cols(const AttnTensor& t, const Rows& rows, int64_t n, int64_t D, int64_t ld,
                        float* dst) {
  const T* base = static_cast<const T*>(t.data);
  for (int64_t i = 0; i < n; ++i) {
    const T* src = base + rows.row(t, i);
    for (int64_t j = 0; j < D; ++j) dst[j * ld + i] = to_f(src[j]);
  }
  for (int64_t j = 0; j < D; ++j)
    for (int64_t i = n; i < ld; ++i) dst[j * ld + i] = 0.0f;
}

// dst (D x ld_dst) <- transpose of src (n x ld_src, first D columns); columns n..ld_dst zero.
inline void transpose(const float* src, int64_t ld_src, int64_t n, int64_t D, int64_t ld_dst,
                      float* dst) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < D; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
  for (int64_t j = 0; j < D; ++j)
    for (int64_t i = n; i < ld_dst; ++i) dst[j * ld_dst + i] = 0.0f;
}

// rows 0..n of t <- src (n x ld), first D columns.
template <typename T>
inline void scatter_rows(const AttnTensor& t, const Rows& rows, int64_t n, int64_t D, int64_t ld,
                         const float* src) {
  T* base = static_cast<T*>(t.data);
  for (int64_t i = 0; i < n; ++i) {
    T* d = base + rows.row(t, i);
    const float* s = src + i * ld;
    if constexpr (std::is_same_v<T, float>) {
      int64_t j = 0;
      for (; j + kV <= D; j += kV) Vec::loadu(s + j).store(d + j);
      if (j < D) Vec::loadu(s + j).store(d + j, int(D - j));
    } else {
      for (int64_t j = 0; j < D; ++j) d[j] = T(s[j]);
    }
  }
}

// rows 0..n of t <- transpose of src (D x ld).
template <typename T>
inline void scatter_cols(const AttnTensor& t, const Rows& rows, int64_t n, int64_t D, int64_t ld,
                         const float* src) {
  T* base = static_cast<T*>(t.data);
  for (int64_t i = 0; i < n; ++i) {
    T* d = base + rows.row(t, i);
    for (int64_t j = 0; j < D; ++j) d[j] = T(src[j * ld + i]);
  }
}

template <typename T>
inline void zero_rows(const AttnTensor& t, const Rows& rows, int64_t from, int64_t to,
                      int64_t D) {
  T* base = static_cast<T*>(t.data);
  for (int64_t i = from; i < to; ++i) std::memset(base + rows.row(t, i), 0, sizeof(T) * D);
}

// Prefetches rows 0..n of t (the next work item's inputs and outputs) into L2 (a hint of low
// temporal locality: into L1 they would evict this item's workspace): the rows of a
// (sequence, head) are scattered (token stride H * D or 3 * H * D), so the hardware prefetcher
// does not find them and the first touch would otherwise stall on every row (a sizeable share
// of a short sequence's time: benchmarks/bench_attention.py).
// Always inlined: as a function of its own, GCC 12 deems it pure (prefetches are not side
// effects) and deletes the calls.
template <typename T>
SMARTER_FAST_ALWAYS_INLINE void prefetch_rows(const AttnTensor& t, const AttnSeq& s, int64_t n,
                                              int64_t D) {
  const Rows rows{s};
  const char* base = static_cast<const char*>(t.data);
  const int64_t bytes = D * int64_t(sizeof(T));
  for (int64_t i = 0; i < n; ++i) {
    const char* p = base + rows.row(t, i) * int64_t(sizeof(T));
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 1);
    __builtin_prefetch(p + bytes - 1, 0, 1);
  }
}

// ---- dropout mask: Philox4x32-10, keyed by (seed, sequence, head, query row, key column) ----
// Keys come in chunks of 64: key j = 64 t + 16 w + l (lane l < 16, word w < 4) takes word w of
// Philox(key = seed, counter = (16 t + l, row, head, seq)); it is kept when that word's top 24
// bits are >= threshold (= round(p * 2^24)), and then weighs `scale` = 1 / (1 - p), else 0.
// So 16 consecutive keys are one word of 16 counters: one AVX-512 register (two AVX2 ones), no
// shuffles. The same stream as Triton's tl.philox in smarter_fast/ops/attention/triton.py and
// ref.dropout_keep_mask (PyTorch).
constexpr int64_t kMaskChunk = 64;  // keys per 16 counters

inline int64_t mask_floats(int64_t n) {
  return (std::max<int64_t>(n, 1) + kMaskChunk - 1) / kMaskChunk * kMaskChunk;
}

#if defined(CPU_CAPABILITY_AVX512)
// mult[0..64) for keys 64 t .. 64 t + 64.
inline void philox_chunk(uint64_t seed, uint32_t t, uint32_t row, uint32_t head, uint32_t seq,
                         uint32_t threshold, float scale, float* mult) {
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(int(16 * t)),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                  14, 15));
  __m512i c1 = _mm512_set1_epi32(int(row)), c2 = _mm512_set1_epi32(int(head)),
          c3 = _mm512_set1_epi32(int(seq));
  philox::rounds10(c0, c1, c2, c3, seed);
  const __m512i thr = _mm512_set1_epi32(int(threshold));
  const __m512 sc = _mm512_set1_ps(scale);
  const __m512i words[4] = {c0, c1, c2, c3};
  for (int w = 0; w < 4; ++w) {
    const __mmask16 keep = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(words[w], 8), thr);
    _mm512_storeu_ps(mult + 16 * w, _mm512_maskz_mov_ps(keep, sc));
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
inline void philox_chunk(uint64_t seed, uint32_t t, uint32_t row, uint32_t head, uint32_t seq,
                         uint32_t threshold, float scale, float* mult) {
  // thr - 1 >= -1 and (x >> 8) < 2^24: a signed compare is exact
  const __m256i thr_m1 = _mm256_set1_epi32(int(threshold) - 1);
  const __m256 sc = _mm256_set1_ps(scale);
  for (int half = 0; half < 2; ++half) {  // lanes 0..7, then 8..15
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(int(16 * t + 8 * half)),
                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i c1 = _mm256_set1_epi32(int(row)), c2 = _mm256_set1_epi32(int(head)),
            c3 = _mm256_set1_epi32(int(seq));
    philox::rounds10(c0, c1, c2, c3, seed);
    const __m256i words[4] = {c0, c1, c2, c3};
    for (int w = 0; w < 4; ++w) {
      const __m256i keep = _mm256_cmpgt_epi32(_mm256_srli_epi32(words[w], 8), thr_m1);
      _mm256_storeu_ps(mult + 16 * w + 8 * half, _mm256_and_ps(_mm256_castsi256_ps(keep), sc));
    }
  }
}
#else
inline void philox_chunk(uint64_t seed, uint32_t t, uint32_t row, uint32_t head, uint32_t seq,
                         uint32_t threshold, float scale, float* mult) {
  for (uint32_t l = 0; l < 16; ++l) {
    uint32_t c[4] = {16 * t + l, row, head, seq};
    uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      const uint64_t p0 = uint64_t(philox::kA) * c[0];
      const uint64_t p1 = uint64_t(philox::kB) * c[2];
      c[0] = uint32_t(p1 >> 32) ^ c[1] ^ k0;
      c[1] = uint32_t(p1);
      c[2] = uint32_t(p0 >> 32) ^ c[3] ^ k1;
      c[3] = uint32_t(p0);
      k0 += philox::kKeyA;
      k1 += philox::kKeyB;
    }
    for (int w = 0; w < 4; ++w) mult[16 * w + l] = (c[w] >> 8) >= threshold ? scale : 0.0f;
  }
}
#endif

// mult[0 .. mask_floats(n)) for query `row`: entries past n are written too (meaningless).
inline void dropout_row(uint64_t seed, uint32_t seq, uint32_t head, uint32_t row, int64_t n,
                        uint32_t threshold, float scale, float* mult) {
  for (int64_t j0 = 0; j0 < n; j0 += kMaskChunk)
    philox_chunk(seed, uint32_t(j0 / kMaskChunk), row, head, seq, threshold, scale, mult + j0);
}

inline void dropout_mask(const AttnArgs& a, const AttnSeq& s, int64_t row, int64_t n,
                         float* mult) {
  dropout_row(a.seed, uint32_t(s.batch), uint32_t(s.head), uint32_t(row), n,
              a.dropout_threshold, a.dropout_scale, mult);
}

inline int64_t workspace_floats(int64_t max_len, int64_t D, bool backward) {
  const int64_t n = std::max<int64_t>(max_len, 1), np = round_up(n), Dp = round_up(D);
  // Q, V, O; K^T; S; one row of dropout multipliers
  if (!backward) return 3 * n * Dp + D * np + n * np + mask_floats(n);
  // Q, K, V, dO, dK, dV; Q^T, K^T, dO^T, dQ^T; S^T, dP^T; lse, D; M^T, one row of M
  return 6 * n * Dp + 4 * D * np + 2 * n * np + 2 * np + n * np + mask_floats(n);
}

template <typename T>
void forward(const AttnArgs& a, const AttnSeq& s, const AttnSeq* next, float* ws) {
  const Rows rows{s};
  const int64_t D = a.head_dim, n = s.n_real;
  float* lse = static_cast<float*>(a.lse.data);
  zero_rows<T>(a.out, rows, n, n + s.n_pad, D);
  for (int64_t i = n; i < n + s.n_pad; ++i) lse[rows.row(a.lse, i)] = 0.0f;
  if (n == 0) return;
  const int64_t np = round_up(n), Dp = round_up(D);
  float* Q = ws;            // n x Dp
  float* V = Q + n * Dp;    // n x Dp
  float* O = V + n * Dp;    // n x Dp
  float* Kt = O + n * Dp;   // D x np
  float* S = Kt + D * np;   // n x np: scores, then probabilities
  float* M = S + n * np;    // mask_floats(n): dropout multipliers of one query row
  gather_rows<T>(a.q, rows, n, D, Dp, Q);
  gather_rows<T>(a.v, rows, n, D, Dp, V);
  gather_cols<T>(a.k, rows, n, D, np, Kt);
  if (next != nullptr) {  // overlap the next item's loads with this item's arithmetic
    prefetch_rows<T>(a.q, *next, next->n_real, D);
    prefetch_rows<T>(a.k, *next, next->n_real, D);
    prefetch_rows<T>(a.v, *next, next->n_real, D);
    prefetch_rows<T>(a.out, *next, next->n_real + next->n_pad, D);
  }
  matmul(Q, Dp, Kt, np, S, np, n, np, D, a.scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    float* si = S + i * np;
    for (int64_t j = n; j < np; ++j) si[j] = neg_inf;  // keys past the end get no weight
    Vec vmax(neg_inf);
    for (int64_t j = 0; j < np; j += kV) vmax = at::vec::maximum(vmax, Vec::loadu(si + j));
    const float m = hmax(vmax);
    const Vec vm(m);
    Vec vsum(0.0f);
    for (int64_t j = 0; j < np; j += kV) {
      const Vec e = (Vec::loadu(si + j) - vm).exp_u20();
      e.store(si + j);
      vsum = vsum + e;
    }
    const float sum = hsum(vsum);  // >= 1: the max term is exp(0)
    const Vec inv(1.0f / sum);
    if (a.dropout) {  // P' = P * M; keys n..np hold P = 0 (M there is scratch, finite)
      dropout_mask(a, s, i, n, M);
      for (int64_t j = 0; j < np; j += kV)
        (Vec::loadu(si + j) * inv * Vec::loadu(M + j)).store(si + j);
    } else {
      for (int64_t j = 0; j < np; j += kV) (Vec::loadu(si + j) * inv).store(si + j);
    }
    lse[rows.row(a.lse, i)] = m + std::log(sum);
  }
  matmul(S, np, V, Dp, O, Dp, n, Dp, n, 1.0f);
  scatter_rows<T>(a.out, rows, n, D, Dp, O);
}

template <typename T>
void backward(const AttnArgs& a, const AttnSeq& s, const AttnSeq* next, float* ws) {
  const Rows rows{s};
  const int64_t D = a.head_dim, n = s.n_real;
  zero_rows<T>(a.grad_q, rows, n, n + s.n_pad, D);
  zero_rows<T>(a.grad_k, rows, n, n + s.n_pad, D);
  zero_rows<T>(a.grad_v, rows, n, n + s.n_pad, D);
  if (n == 0) return;
  const int64_t np = round_up(n), Dp = round_up(D);
  float* Q = ws;              // n x Dp
  float* K = Q + n * Dp;      // n x Dp
  float* V = K + n * Dp;      // n x Dp
  float* dO = V + n * Dp;     // n x Dp
  float* dK = dO + n * Dp;    // n x Dp
  float* dV = dK + n * Dp;    // n x Dp
  float* Qt = dV + n * Dp;    // D x np
  float* Kt = Qt + D * np;    // D x np
  float* dOt = Kt + D * np;   // D x np
  float* dQt = dOt + D * np;  // D x np
  float* PT = dQt + D * np;   // n x np: S^T, then P^T (row j = key, column i = query)
  float* dST = PT + n * np;   // n x np: dP^T, then dS^T
  float* L = dST + n * np;    // np: lse per query (+inf past the end, so P^T is 0 there)
  float* Dq = L + np;         // np: rowsum(dO * O) per query (0 past the end)
  float* MT = Dq + np;        // n x np: dropout multipliers, transposed (row j = key)
  float* Mrow = MT + n * np;  // mask_floats(n): one query row of them
  gather_rows<T>(a.q, rows, n, D, Dp, Q);
  gather_rows<T>(a.k, rows, n, D, Dp, K);
  gather_rows<T>(a.v, rows, n, D, Dp, V);
  gather_rows<T>(a.grad_out, rows, n, D, Dp, dO);
  transpose(Q, Dp, n, D, np, Qt);  // from the L1-resident copies, not the tensors again
  transpose(K, Dp, n, D, np, Kt);
  transpose(dO, Dp, n, D, np, dOt);
  const float* lse = static_cast<const float*>(a.lse.data);
  const T* out = static_cast<const T*>(a.out.data);
  for (int64_t i = 0; i < n; ++i) {
    L[i] = lse[rows.row(a.lse, i)];
    const T* o = out + rows.row(a.out, i);
    const float* g = dO + i * Dp;
    float acc = 0.0f;
    for (int64_t j = 0; j < D; ++j) acc += g[j] * to_f(o[j]);
    Dq[i] = acc;
  }
  for (int64_t i = n; i < np; ++i) {
    L[i] = std::numeric_limits<float>::infinity();
    Dq[i] = 0.0f;
  }
  if (next != nullptr) {  // overlap the next item's loads with this item's arithmetic
    const int64_t m = next->n_real;
    prefetch_rows<T>(a.q, *next, m, D);
    prefetch_rows<T>(a.k, *next, m, D);
    prefetch_rows<T>(a.v, *next, m, D);
    prefetch_rows<T>(a.out, *next, m, D);
    prefetch_rows<T>(a.grad_out, *next, m, D);
    prefetch_rows<T>(a.grad_q, *next, m + next->n_pad, D);
    prefetch_rows<T>(a.grad_k, *next, m + next->n_pad, D);
    prefetch_rows<T>(a.grad_v, *next, m + next->n_pad, D);
  }
  matmul(K, Dp, Qt, np, PT, np, n, np, D, a.scale);  // S^T
  matmul(V, Dp, dOt, np, dST, np, n, np, D, 1.0f);   // dP^T (dP'^T with dropout)
  if (a.dropout) {
    for (int64_t i = 0; i < n; ++i) {  // the forward's mask, row by row, stored transposed
      dropout_mask(a, s, i, n, Mrow);
      for (int64_t j = 0; j < n; ++j) MT[j * np + i] = Mrow[j];
    }
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = n; i < np; ++i) MT[j * np + i] = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      float* p = PT + j * np;
      float* ds = dST + j * np;
      const float* mt = MT + j * np;
      for (int64_t i = 0; i < np; i += kV) {
        const Vec pv = (Vec::loadu(p + i) - Vec::loadu(L + i)).exp_u20();
        const Vec m = Vec::loadu(mt + i);
        (pv * m).store(p + i);  // P'^T, for dV
        (pv * (Vec::loadu(ds + i) * m - Vec::loadu(Dq + i))).store(ds + i);
      }
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      float* p = PT + j * np;
      float* ds = dST + j * np;
      for (int64_t i = 0; i < np; i += kV) {
        const Vec pv = (Vec::loadu(p + i) - Vec::loadu(L + i)).exp_u20();
        pv.store(p + i);
        (pv * (Vec::loadu(ds + i) - Vec::loadu(Dq + i))).store(ds + i);
      }
    }
  }
  matmul(PT, np, dO, Dp, dV, Dp, n, Dp, n, 1.0f);      // dV = P^T dO (P'^T with dropout)
  matmul(dST, np, Q, Dp, dK, Dp, n, Dp, n, a.scale);   // dK = scale dS^T Q
  matmul(Kt, np, dST, np, dQt, np, D, np, n, a.scale); // dQ^T = scale K^T dS^T
  scatter_cols<T>(a.grad_q, rows, n, D, np, dQt);
  scatter_rows<T>(a.grad_k, rows, n, D, Dp, dK);
  scatter_rows<T>(a.grad_v, rows, n, D, Dp, dV);
}

inline void attention_fwd(const AttnArgs& a, const AttnSeq& s, const AttnSeq* next, float* ws) {
  if (a.bf16) forward<c10::BFloat16>(a, s, next, ws);
  else forward<float>(a, s, next, ws);
}

inline void attention_bwd(const AttnArgs& a, const AttnSeq& s, const AttnSeq* next, float* ws) {
  if (a.bf16) backward<c10::BFloat16>(a, s, next, ws);
  else backward<float>(a, s, next, ws);
}

}  // namespace attn
}  // namespace CPU_CAPABILITY
}  // namespace smarter_fast::cpu
