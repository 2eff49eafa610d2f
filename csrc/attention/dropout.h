// Attention dropout settings, shared by the attention ops and the testing op that exposes the
// mask (csrc/testing/testing.cpp), so both draw the same mask for the same (p, seed).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/kernel_table.h"

namespace smarter_fast {

// Attention dropout: inverted dropout on the probabilities with a mask that is never stored,
// regenerated from (seed, sequence, head, query, key) by Philox (kernel_table.h, AttnArgs).
inline void attn_set_dropout(cpu::AttnArgs& a, double p, int64_t seed, const char* op) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, op, ": dropout_p must be in [0, 1], got ", p);
  a.dropout = p > 0.0;
  a.dropout_threshold = uint32_t(std::min(16777216.0, std::nearbyint(p * 16777216.0)));
  a.dropout_scale = p < 1.0 ? float(1.0 / (1.0 - p)) : 0.0f;
  a.seed = uint64_t(seed);
}

}  // namespace smarter_fast
