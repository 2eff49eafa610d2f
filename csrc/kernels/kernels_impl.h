// Vectorised CPU kernels, compiled once per capability (see capability_*.cpp and
// smarter_fast/ops/capabilities.py). Each TU is built with -DCPU_CAPABILITY=<NAME> and the matching
// -m flags, so at::vec::Vectorized<float> holds 8 (AVX2) or 16 (AVX512) lanes here.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>

#include "attention_impl.h"
#include "layernorm_impl.h"
#include "kernel_table.h"
#include "philox.h"

#ifndef CPU_CAPABILITY
#error "compile with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512"
#endif

namespace smarter_fast::cpu {
namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;

// ---- AdamW (CS224N minBERT semantics) ----------------------------------------------------
// m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  p -= step_size * m / (sqrt(v) + eps);
// then decoupled decay on the updated p: p -= lr * wd * p.  7 floats of traffic per element.
inline void adamw_f32_range(float* p, const float* g, float* m, float* v, int64_t begin,
                            int64_t end, const AdamWParams& hp) {
  const float decay = 1.0f - hp.lr * hp.weight_decay;
  const Vec b1(hp.beta1), b2(hp.beta2), c1(hp.one_minus_beta1), c2(hp.one_minus_beta2);
  const Vec eps(hp.eps), step(hp.step_size), vdecay(decay);
  int64_t i = begin;
  for (; i + Vec::size() <= end; i += Vec::size()) {
    const Vec gi = Vec::loadu(g + i);
    const Vec mi = Vec::loadu(m + i) * b1 + gi * c1;
    const Vec vi = Vec::loadu(v + i) * b2 + (gi * gi) * c2;
    Vec pi = Vec::loadu(p + i) - step * (mi / (vi.sqrt() + eps));
    if (hp.weight_decay != 0.0f) pi = pi * vdecay;
    mi.store(m + i);
    vi.store(v + i);
    pi.store(p + i);
  }
  for (; i < end; ++i) {
    const float gi = g[i];
    const float mi = m[i] * hp.beta1 + gi * hp.one_minus_beta1;
    const float vi = v[i] * hp.beta2 + (gi * gi) * hp.one_minus_beta2;
    float pi = p[i] - hp.step_size * (mi / (std::sqrt(vi) + hp.eps));
    if (hp.weight_decay != 0.0f) pi = pi * decay;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi;
  }
}

// With a bf16 copy: blocks small enough that the updated p is still in L1 when converted
// (at::vec::convert: the same rounding as torch's fp32 -> bf16 copy_). 2 more bytes per element.
// The blocks are whole vectors from `begin`, so the vector loop and its scalar tail cover the
// same elements as one call over [begin, end) (the tail's rounding may differ from a vector's).
inline void adamw_f32(float* p, const float* g, float* m, float* v, int64_t begin, int64_t end,
                      const AdamWParams& hp, uint16_t* copy_bf16, int64_t copy_begin,
                      int64_t copy_end) {
  if (copy_bf16 == nullptr || end <= copy_begin || begin >= copy_end) {
    adamw_f32_range(p, g, m, v, begin, end, hp);
    return;
  }
  auto* copy = reinterpret_cast<c10::BFloat16*>(copy_bf16);
  constexpr int64_t kBlock = 1024;  // a multiple of every Vec::size()
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t e = std::min(end, b + kBlock);
    adamw_f32_range(p, g, m, v, b, e, hp);
    const int64_t cb = std::max(b, copy_begin), ce = std::min(e, copy_end);
    if (cb < ce) at::vec::convert(p + cb, copy + (cb - copy_begin), ce - cb);
  }
}

// ---- SMART mean-squared term -------------------------------------------------------------
// Lanes accumulate in fp32 over short blocks, blocks in double: accurate for any length.
inline double sq_diff_sum_f32(const float* a, const float* b, int64_t begin, int64_t end) {
  constexpr int64_t kBlock = 1024;
  double total = 0.0;
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t stop = std::min(end, start + kBlock);
    Vec acc(0.0f);
    int64_t i = start;
    for (; i + Vec::size() <= stop; i += Vec::size()) {
      const Vec d = Vec::loadu(a + i) - Vec::loadu(b + i);
      acc = at::vec::fmadd(d, d, acc);
    }
    float lanes[Vec::size()];
    acc.store(lanes);
    double block = 0.0;
    for (int j = 0; j < Vec::size(); ++j) block += lanes[j];
    for (; i < stop; ++i) {
      const float d = a[i] - b[i];
      block += double(d) * d;
    }
    total += block;
  }
  return total;
}

inline void sq_diff_backward_f32(const float* a, const float* b, float scale, float* grad_a,
                                 float* grad_b, int64_t begin, int64_t end) {
  const Vec s(scale);
  int64_t i = begin;
  for (; i + Vec::size() <= end; i += Vec::size()) {
    const Vec ga = s * (Vec::loadu(a + i) - Vec::loadu(b + i));
    if (grad_a) ga.store(grad_a + i);
    if (grad_b) (Vec(0.0f) - ga).store(grad_b + i);
  }
  for (; i < end; ++i) {
    const float ga = scale * (a[i] - b[i]);
    if (grad_a) grad_a[i] = ga;
    if (grad_b) grad_b[i] = -ga;
  }
}

// ---- SMART noise: out = x + sigma * N(0, 1), Philox keyed by (seed, i / 4) -----------------
inline void noise_f32(const float* x, float sigma, uint64_t seed, float* out, int64_t begin,
                      int64_t end) {
  float z[4];
  for (int64_t i = begin; i < end; i += 4) {
    philox_normal4(seed, uint64_t(i) >> 2, z);
    const int64_t n = std::min<int64_t>(4, end - i);
    for (int64_t j = 0; j < n; ++j) out[i + j] = x[i + j] + sigma * z[j];
  }
}

#define SMARTER_FAST_STR2(x) #x
#define SMARTER_FAST_STR(x) SMARTER_FAST_STR2(x)

const KernelTable& kernel_table() {
  static const KernelTable table{
      SMARTER_FAST_STR(CPU_CAPABILITY), adamw_f32, sq_diff_sum_f32, sq_diff_backward_f32,
      noise_f32,
      attn::workspace_floats, attn::attention_fwd, attn::attention_bwd,
      attn::mask_floats,     attn::dropout_mask,
      ln::ln_workspace,      ln::ln_fwd,           ln::ln_bwd,
      ln::ln_dropout_mult,
  };
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace smarter_fast::cpu
