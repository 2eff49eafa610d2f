// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011):
// a counter-based generator, so noise for element i is a pure function of (seed, i) and never
// has to be stored: forward and any recomputation give the same values.
#pragma once

#include <cmath>
#include <cstdint>

namespace smarter_fast::cpu {

struct Philox4x32 {
  static inline void round(uint32_t c[4], const uint32_t k[2]) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c[0];
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c[2];
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    c[0] = hi1 ^ c[1] ^ k[0];
    c[1] = lo1;
    c[2] = hi0 ^ c[3] ^ k[1];
    c[3] = lo0;
  }
  // Four 32-bit random words for counter `ctr` under key `seed`.
  static inline void generate(uint64_t seed, uint64_t ctr, uint32_t out[4]) {
    uint32_t c[4] = {uint32_t(ctr), uint32_t(ctr >> 32), 0u, 0u};
    uint32_t k[2] = {uint32_t(seed), uint32_t(seed >> 32)};
    for (int r = 0; r < 10; ++r) {
      round(c, k);
      k[0] += 0x9E3779B9u;
      k[1] += 0xBB67AE85u;
    }
    out[0] = c[0]; out[1] = c[1]; out[2] = c[2]; out[3] = c[3];
  }
};

// Uniform in (0, 1], never 0, so log() is finite.
inline float philox_uniform(uint32_t x) {
  return (float(x >> 8) + 1.0f) * (1.0f / 16777216.0f);
}

// Four standard normals (two Box-Muller pairs) for counter `ctr`.
inline void philox_normal4(uint64_t seed, uint64_t ctr, float out[4]) {
  uint32_t r[4];
  Philox4x32::generate(seed, ctr, r);
  constexpr float two_pi = 6.283185307179586f;
  for (int j = 0; j < 4; j += 2) {
    const float radius = std::sqrt(-2.0f * std::log(philox_uniform(r[j])));
    const float theta = two_pi * philox_uniform(r[j + 1]);
    out[j] = radius * std::cos(theta);
    out[j + 1] = radius * std::sin(theta);
  }
}

}  // namespace smarter_fast::cpu
