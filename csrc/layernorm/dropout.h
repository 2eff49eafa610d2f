// LayerNorm dropout settings, shared by the layernorm ops and the testing op that exposes the
// mask (csrc/testing/testing.cpp), so both draw the same mask for the same (p, seed).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

namespace smarter_fast {

// An element is kept when its 16 random bits are >= threshold = round(p * 2^16), and scaled by
// 1 / (1 - threshold / 2^16) (csrc/kernels/layernorm_impl.h).
struct LnDropout {
  bool on = false;
  uint32_t threshold = 0;
  float scale = 1.0f;
};

inline LnDropout ln_dropout(double p, const char* op) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
  LnDropout d;
  d.threshold = uint32_t(std::lround(p * 65536.0));
  if (d.threshold > 0) {
    d.on = true;
    d.scale = float(1.0 / (1.0 - double(d.threshold) / 65536.0));
  }
  return d;
}

}  // namespace smarter_fast
