// Test-only operators, in their own namespace (torch.ops.smarter_fast_testing) so they stay out
// of the production one. The kernels never store their dropout masks but regenerate them from
// (p, seed); these ops return the masks so tests can check the kernels against a reference
// computed with the same mask. Nothing outside tests should call them.
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "attention/dropout.h"
#include "layernorm/dropout.h"
#include "library.h"

namespace smarter_fast {
namespace {

// The dropout multipliers (keep / (1 - p), or 0) the attention kernels use, (n_seq, H, L, L)
// with [b, h, i, j] for query i and key j (ranks among the real tokens of sequence b).
at::Tensor attention_dropout_mask_cpu(int64_t n_seq, int64_t heads, int64_t length,
                                      double dropout_p, int64_t seed) {
  const char* op = "attention_dropout_mask";
  TORCH_CHECK(n_seq >= 0 && heads >= 0 && length >= 0, op, ": sizes must be >= 0");
  cpu::AttnArgs args{};
  attn_set_dropout(args, dropout_p, seed, op);
  at::Tensor mult = at::empty({n_seq, heads, length, length}, at::kFloat);
  float* m = mult.data_ptr<float>();
  std::vector<float> row(K().attention_mask_floats(length));
  for (int64_t b = 0; b < n_seq; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < length; ++i) {
        const cpu::AttnSeq seq{b, h, nullptr, 0, length, 0};
        K().attention_dropout_mask(args, seq, i, length, row.data());
        std::copy(row.begin(), row.begin() + length, m + ((b * heads + h) * length + i) * length);
      }
  return mult;
}

// The multipliers (keep ? scale : 0) of flat elements 0..n-1 that dropout_add_layer_norm uses.
at::Tensor dropout_add_layer_norm_mask_cpu(int64_t n, double dropout_p, int64_t seed) {
  const LnDropout d = ln_dropout(dropout_p, "dropout_add_layer_norm_mask");
  at::Tensor mult = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  if (!d.on) return mult.fill_(1.0f);
  K().ln_dropout_mult(uint64_t(seed), d.threshold, d.scale, 0, n, mult.data_ptr<float>());
  return mult;
}

}  // namespace

// The only file of this namespace, so it owns the TORCH_LIBRARY. The ops take no tensors, so
// their kernels are catch-all (given with the schema) rather than registered for CPU.
TORCH_LIBRARY(smarter_fast_testing, m) {
  m.def("attention_dropout_mask(int n_seq, int heads, int length, float dropout_p, int seed) "
        "-> Tensor", &attention_dropout_mask_cpu);
  m.def("dropout_add_layer_norm_mask(int n, float dropout_p, int seed) -> Tensor",
        &dropout_add_layer_norm_mask_cpu);
}

}  // namespace smarter_fast
