// One table of raw-pointer kernels per CPU capability (DEFAULT, AVX2, AVX512).
//
// The capability translation units (capability_*.cpp) include only ATen's vector headers and
// work on plain pointers over [begin, end) ranges; threading (at::parallel_for), tensor checks
// and the choice of variant live in dispatch.cpp and registration.cpp, compiled once.
#pragma once

#include <cstdint>

namespace smarter_fast::cpu {

struct AdamWParams {
  float lr;
  float beta1;
  float beta2;
  float one_minus_beta1;  // computed in double: 1 - float(0.999) loses 4 digits
  float one_minus_beta2;
  float eps;
  float weight_decay;
  float step_size;  // lr * sqrt(1 - beta2^t) / (1 - beta1^t), or lr without bias correction
};

struct KernelTable {
  const char* name;
  // CS224N minBERT AdamW over [begin, end) of flat fp32 buffers, in place on p, m, v.
  void (*adamw_f32)(float* p, const float* g, float* m, float* v, int64_t begin, int64_t end,
                    const AdamWParams& hp);
  // sum((a - b)^2) over [begin, end), accumulated in double.
  double (*sq_diff_sum_f32)(const float* a, const float* b, int64_t begin, int64_t end);
  // grad_a = scale * (a - b), grad_b = -grad_a over [begin, end); either output may be null.
  void (*sq_diff_backward_f32)(const float* a, const float* b, float scale, float* grad_a,
                               float* grad_b, int64_t begin, int64_t end);
  // out = x + sigma * N(0, 1) over [begin, end), noise from Philox4x32-10 keyed by seed and
  // counter index / 4, so any split of the range gives the same values. begin % 4 == 0.
  void (*noise_f32)(const float* x, float sigma, uint64_t seed, float* out, int64_t begin,
                    int64_t end);
};

// Each capability TU defines its table in namespace smarter_fast::cpu::<CAPABILITY>.
#define SMARTER_FAST_DECLARE_TABLE(CAP) \
  namespace CAP {                       \
  const KernelTable& kernel_table();    \
  }

SMARTER_FAST_DECLARE_TABLE(DEFAULT)
SMARTER_FAST_DECLARE_TABLE(AVX2)
SMARTER_FAST_DECLARE_TABLE(AVX512)

// The table of the best variant linked in and supported by this CPU (or forced with the
// environment variable ATEN_CPU_CAPABILITY=default|avx2|avx512, as in ATen).
const KernelTable& kernels();

}  // namespace smarter_fast::cpu
