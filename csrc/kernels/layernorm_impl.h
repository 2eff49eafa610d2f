// Fused dropout + residual add + LayerNorm over the last dimension (post-LN BERT sublayer):
//   s = x + dropout(h);  out = (s - mean(s)) * rstd * gamma + beta,  rstd = 1 / sqrt(var(s) + eps)
// forward and backward over [row_begin, row_end) of (rows, H) row-major tensors. Inputs and
// outputs are fp32 or bf16 (each flagged on its own); gamma, beta, xhat and rstd are fp32;
// arithmetic is fp32. The forward keeps xhat = (s - mean) * rstd and rstd for the backward.
//
// Dropout mask: element e (flat index row * H + col) is kept when the 16-bit half (e / 64) % 2
// of word (e / 16) % 4 of Philox4x32-10(key = seed, counter = 16 (e / 128) + e % 16) is
// >= threshold (= round(p * 65536)); kept values are scaled by 1 / (1 - threshold / 65536), so the mask is a
// pure function of (seed, e) and the backward regenerates it instead of storing it.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>

#include "kernel_table.h"
#include "philox.h"
#include "philox_simd.h"

namespace smarter_fast::cpu {
namespace CPU_CAPABILITY {
namespace ln {

using Vec = at::vec::Vectorized<float>;

inline void load_row(const void* base, bool bf16, int64_t offset, int64_t n, float* dst) {
  if (bf16) {
    const c10::BFloat16* p = static_cast<const c10::BFloat16*>(base) + offset;
    for (int64_t i = 0; i < n; ++i) dst[i] = float(p[i]);
  } else {
    const float* p = static_cast<const float*>(base) + offset;
    for (int64_t i = 0; i < n; ++i) dst[i] = p[i];
  }
}

inline void store_row(void* base, bool bf16, int64_t offset, int64_t n, const float* src) {
  if (bf16) {
    c10::BFloat16* p = static_cast<c10::BFloat16*>(base) + offset;
    for (int64_t i = 0; i < n; ++i) p[i] = c10::BFloat16(src[i]);
  } else {
    float* p = static_cast<float*>(base) + offset;
    for (int64_t i = 0; i < n; ++i) p[i] = src[i];
  }
}

// Philox4x32-10 for the 16 counters ctr0 .. ctr0 + 15 at once (out[w][lane] = word w), the same
// values as Philox4x32::generate. ctr0 is a multiple of 16, so the low words never carry.
constexpr int kLanes = 16;

inline void philox_x16(uint64_t seed, uint64_t ctr0, uint32_t out[4][kLanes]) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(int(uint32_t(ctr0))),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                  14, 15));
  __m512i c1 = _mm512_set1_epi32(int(uint32_t(ctr0 >> 32)));
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  philox::rounds10(c0, c1, c2, c3, seed);
  _mm512_storeu_si512(out[0], c0);
  _mm512_storeu_si512(out[1], c1);
  _mm512_storeu_si512(out[2], c2);
  _mm512_storeu_si512(out[3], c3);
#elif defined(CPU_CAPABILITY_AVX2)
  for (int half = 0; half < 2; ++half) {
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(int(uint32_t(ctr0) + 8u * half)),
                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i c1 = _mm256_set1_epi32(int(uint32_t(ctr0 >> 32)));
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    philox::rounds10(c0, c1, c2, c3, seed);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[0] + 8 * half), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[1] + 8 * half), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[2] + 8 * half), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[3] + 8 * half), c3);
  }
#else
  for (int l = 0; l < kLanes; ++l) {
    uint32_t words[4];
    Philox4x32::generate(seed, ctr0 + uint64_t(l), words);
    for (int w = 0; w < 4; ++w) out[w][l] = words[w];
  }
#endif
}

// mult[i] = keep(e0 + i) ? scale : 0 for i in [0, n). Elements come in blocks of 128 sharing
// the 16 Philox counters 16 * (e / 128) + lane; element e takes lane e % 16, word (e / 16) % 4,
// 16-bit half (e / 64) % 2, so a whole block is extracted with contiguous vector loads.
inline uint32_t block_bits(const uint32_t r[4][kLanes], int o) {
  return (r[(o >> 4) & 3][o & 15] >> (16 * (o >> 6))) & 0xFFFFu;
}

inline void dropout_mult(uint64_t seed, uint32_t threshold, float scale, int64_t e0, int64_t n,
                         float* mult) {
  alignas(64) uint32_t r[4][kLanes];
  int64_t i = 0;
  while (i < n) {
    const int64_t e = e0 + i;
    const int64_t block = e >> 7;
    philox_x16(seed, uint64_t(block) * kLanes, r);
    const int first = int(e & 127);
    const int64_t count = std::min<int64_t>(n - i, 128 - first);
    if (first == 0 && count == 128) {
      float* m = mult + i;
      for (int half = 0; half < 2; ++half)
        for (int w = 0; w < 4; ++w)
          for (int l = 0; l < kLanes; ++l) {
            const uint32_t bits = (r[w][l] >> (16 * half)) & 0xFFFFu;
            m[64 * half + 16 * w + l] = bits >= threshold ? scale : 0.0f;
          }
    } else {
      for (int64_t k = 0; k < count; ++k)
        mult[i + k] = block_bits(r, first + int(k)) >= threshold ? scale : 0.0f;
    }
    i += count;
  }
}

inline float hsum(const Vec& v) {
  float lanes[Vec::size()];
  v.store(lanes);
  float total = 0.0f;
  for (int j = 0; j < Vec::size(); ++j) total += lanes[j];
  return total;
}

inline float vsum(const float* a, int64_t n) {
  Vec acc(0.0f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = acc + Vec::loadu(a + i);
  float total = hsum(acc);
  for (; i < n; ++i) total += a[i];
  return total;
}

inline float vdot(const float* a, const float* b, int64_t n) {
  Vec acc(0.0f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size())
    acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
  float total = hsum(acc);
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// Scratch floats per call of ln_fwd / ln_bwd for rows of width H.
inline int64_t ln_workspace(int64_t H) { return 4 * H + 64; }

inline void ln_fwd(const LnArgs& a, int64_t row_begin, int64_t row_end, float* ws) {
  const int64_t H = a.H;
  float* s = ws;
  float* hb = ws + H;
  float* mult = ws + 2 * H;
  float* o = ws + 3 * H;
  const Vec veps(a.eps);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t off = r * H;
    load_row(a.x, a.x_bf16, off, H, s);
    load_row(a.h, a.h_bf16, off, H, hb);
    int64_t i = 0;
    if (a.dropout) {
      dropout_mult(a.seed, a.threshold, a.scale, off, H, mult);
      for (; i + Vec::size() <= H; i += Vec::size())
        at::vec::fmadd(Vec::loadu(hb + i), Vec::loadu(mult + i), Vec::loadu(s + i)).store(s + i);
      for (; i < H; ++i) s[i] += hb[i] * mult[i];
    } else {
      for (; i + Vec::size() <= H; i += Vec::size())
        (Vec::loadu(s + i) + Vec::loadu(hb + i)).store(s + i);
      for (; i < H; ++i) s[i] += hb[i];
    }
    const float mean = vsum(s, H) / float(H);
    const Vec vmean(mean);
    Vec acc(0.0f);
    for (i = 0; i + Vec::size() <= H; i += Vec::size()) {
      const Vec d = Vec::loadu(s + i) - vmean;
      acc = at::vec::fmadd(d, d, acc);
    }
    float var = hsum(acc);
    for (; i < H; ++i) var += (s[i] - mean) * (s[i] - mean);
    var /= float(H);
    const float rstd = 1.0f / std::sqrt(var + a.eps);
    const Vec vrstd(rstd);
    float* xhat = a.xhat + off;
    for (i = 0; i + Vec::size() <= H; i += Vec::size()) {
      const Vec xh = (Vec::loadu(s + i) - vmean) * vrstd;
      xh.store(xhat + i);
      at::vec::fmadd(xh, Vec::loadu(a.gamma + i), Vec::loadu(a.beta + i)).store(o + i);
    }
    for (; i < H; ++i) {
      const float xh = (s[i] - mean) * rstd;
      xhat[i] = xh;
      o[i] = xh * a.gamma[i] + a.beta[i];
    }
    a.rstd[r] = rstd;
    store_row(a.out, a.out_bf16, off, H, o);
  }
}

// Also accumulates sum(dy * xhat) into dgamma and sum(dy) into dbeta (H floats each).
inline void ln_bwd(const LnArgs& a, int64_t row_begin, int64_t row_end, float* ws,
                   float* dgamma, float* dbeta) {
  const int64_t H = a.H;
  float* dy = ws;
  float* g = ws + H;
  float* mult = ws + 2 * H;
  float* ds = ws + 3 * H;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t off = r * H;
    const float* xhat = a.xhat + off;
    load_row(a.grad_out, a.grad_out_bf16, off, H, dy);
    int64_t i = 0;
    Vec sg(0.0f), sgx(0.0f);
    for (; i + Vec::size() <= H; i += Vec::size()) {
      const Vec d = Vec::loadu(dy + i);
      const Vec xh = Vec::loadu(xhat + i);
      const Vec gi = d * Vec::loadu(a.gamma + i);
      gi.store(g + i);
      sg = sg + gi;
      sgx = at::vec::fmadd(gi, xh, sgx);
      at::vec::fmadd(d, xh, Vec::loadu(dgamma + i)).store(dgamma + i);
      (Vec::loadu(dbeta + i) + d).store(dbeta + i);
    }
    float sum_g = hsum(sg);
    float sum_gx = hsum(sgx);
    for (; i < H; ++i) {
      const float gi = dy[i] * a.gamma[i];
      g[i] = gi;
      sum_g += gi;
      sum_gx += gi * xhat[i];
      dgamma[i] += dy[i] * xhat[i];
      dbeta[i] += dy[i];
    }
    const float rstd = a.rstd[r];
    const float mg = sum_g / float(H), mgx = sum_gx / float(H);
    const Vec vrstd(rstd), vmg(mg), vmgx(mgx);
    for (i = 0; i + Vec::size() <= H; i += Vec::size())
      (vrstd * (Vec::loadu(g + i) - vmg - Vec::loadu(xhat + i) * vmgx)).store(ds + i);
    for (; i < H; ++i) ds[i] = rstd * (g[i] - mg - xhat[i] * mgx);
    if (a.grad_x) store_row(a.grad_x, a.grad_x_bf16, off, H, ds);
    if (a.grad_h) {
      if (a.dropout) {
        dropout_mult(a.seed, a.threshold, a.scale, off, H, mult);
        for (i = 0; i + Vec::size() <= H; i += Vec::size())
          (Vec::loadu(ds + i) * Vec::loadu(mult + i)).store(ds + i);
        for (; i < H; ++i) ds[i] *= mult[i];
      }
      store_row(a.grad_h, a.grad_h_bf16, off, H, ds);
    }
  }
}

// The multipliers (keep ? scale : 0) of elements [e0, e0 + n): for tests.
inline void ln_dropout_mult(uint64_t seed, uint32_t threshold, float scale, int64_t e0,
                            int64_t n, float* mult) {
  dropout_mult(seed, threshold, scale, e0, n, mult);
}

}  // namespace ln
}  // namespace CPU_CAPABILITY
}  // namespace smarter_fast::cpu
