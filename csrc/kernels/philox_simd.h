// Philox4x32-10 rounds on 16 (AVX-512) or 8 (AVX2) counters at once, one counter per 32-bit
// lane: the same values as Philox4x32::generate (philox.h), for the dropout masks of the
// attention and LayerNorm kernels. Included inside namespace smarter_fast::cpu::CPU_CAPABILITY.
#pragma once

#include <cstdint>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace smarter_fast::cpu {
namespace CPU_CAPABILITY {
namespace philox {

constexpr uint32_t kA = 0xD2511F53u, kB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;

#if defined(CPU_CAPABILITY_AVX512)
// hi and lo 32 bits of the 32 x 32 products x * a, lane by lane.
inline __attribute__((always_inline)) void mulhilo(__m512i x, __m512i a, __m512i& hi,
                                                   __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(x, a);                       // lanes 0, 2, ...
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), a);  // lanes 1, 3, ...
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// Ten rounds on the counters (c0, c1, c2, c3) under key `seed`; the words replace them.
inline __attribute__((always_inline)) void rounds10(__m512i& c0, __m512i& c1, __m512i& c2,
                                                    __m512i& c3, uint64_t seed) {
  const __m512i A = _mm512_set1_epi32(int(kA)), B = _mm512_set1_epi32(int(kB));
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo(c0, A, hi0, lo0);
    mulhilo(c2, B, hi1, lo1);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(int(k0)));
    c1 = lo1;
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(int(k1)));
    c3 = lo0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
inline __attribute__((always_inline)) void mulhilo(__m256i x, __m256i a, __m256i& hi,
                                                   __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, a);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), a);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

inline __attribute__((always_inline)) void rounds10(__m256i& c0, __m256i& c1, __m256i& c2,
                                                    __m256i& c3, uint64_t seed) {
  const __m256i A = _mm256_set1_epi32(int(kA)), B = _mm256_set1_epi32(int(kB));
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo(c0, A, hi0, lo0);
    mulhilo(c2, B, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(int(k0)));
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(int(k1)));
    c3 = lo0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
}
#endif

}  // namespace philox
}  // namespace CPU_CAPABILITY
}  // namespace smarter_fast::cpu
