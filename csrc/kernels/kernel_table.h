// One table of raw-pointer kernels per CPU capability (DEFAULT, AVX2, AVX512).
//
// The capability translation units (capability_*.cpp) include only ATen's vector headers and
// work on plain pointers over [begin, end) ranges; threading (at::parallel_for), tensor checks
// and the choice of variant live in dispatch.cpp and the per-op registration files
// (csrc/<op>/<op>.cpp), compiled once.
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

// Attention: where one tensor's rows live. Element strides; the last dimension is contiguous.
// Token t of batch row b, head h starts at b * batch_stride + t * token_stride + h * head_stride.
struct AttnTensor {
  void* data;
  int64_t batch_stride;  // 0 for packed (varlen) tensors, whose token index is global
  int64_t token_stride;
  int64_t head_stride;
};

// Attention: the tensors of one call. q, k, v, out and grads share a dtype (fp32, or bf16 when
// bf16 is set; accumulation is always fp32); lse is fp32. grad_* are used by the backward only.
// Dropout (when `dropout` is set) is inverted dropout on the probabilities, P' = P * keep / (1 - p),
// with keep(i, j) of query i and key j (ranks among the real tokens of the sequence) a pure
// function of (seed, sequence index, head, i, j) from Philox4x32-10, so the backward regenerates
// it: word (j / 16) % 4 of Philox(key = seed, counter = (16 (j / 64) + j % 16, i, head,
// sequence)), kept when its top 24 bits are >= dropout_threshold (= round(p * 2^24)); kept
// weights are scaled by dropout_scale.
struct AttnArgs {
  int64_t head_dim;
  float scale;
  bool bf16;
  AttnTensor q, k, v, out, lse, grad_out, grad_q, grad_k, grad_v;
  bool dropout;
  uint32_t dropout_threshold;
  float dropout_scale;
  uint64_t seed;
};

// Attention: one (sequence, head) work item. Its token i (0 <= i < n_real + n_pad) has index
// tokens[i], or first_token + i when tokens is null; the first n_real are real tokens (they
// attend to each other), the next n_pad are padding whose output rows are written as zeros.
struct AttnSeq {
  int64_t batch;
  int64_t head;
  const int64_t* tokens;
  int64_t first_token;
  int64_t n_real;
  int64_t n_pad;
};

// Fused dropout + residual + LayerNorm (csrc/kernels/layernorm_impl.h): rows of width H,
// row-major. x, h, out, grad_out, grad_x, grad_h are fp32 or bf16 (each flagged); gamma, beta,
// xhat (saved by the forward) and rstd (one per row) are fp32. grad_x / grad_h may be null.
struct LnArgs {
  int64_t H;
  float eps;
  const void* x;
  bool x_bf16;
  const void* h;
  bool h_bf16;
  const float* gamma;
  const float* beta;
  void* out;
  bool out_bf16;
  float* xhat;
  float* rstd;
  const void* grad_out;
  bool grad_out_bf16;
  void* grad_x;
  bool grad_x_bf16;
  void* grad_h;
  bool grad_h_bf16;
  bool dropout;
  uint32_t threshold;  // round(p * 65536): a 16-bit draw below it drops the element
  float scale;         // 1 / (1 - threshold / 65536)
  uint64_t seed;
};

struct KernelTable {
  const char* name;
  // CS224N minBERT AdamW over [begin, end) of flat fp32 buffers, in place on p, m, v. With
  // copy_bf16 (bf16 bits) also copy_bf16[i - copy_begin] = bf16(updated p[i]) for i in
  // [copy_begin, copy_end) within [begin, end), rounded to nearest even as torch's casts: the
  // low-precision weights of the next forward, written in the same pass instead of a second
  // read of p. The update of p, m, v is bit for bit the same with or without the copy.
  void (*adamw_f32)(float* p, const float* g, float* m, float* v, int64_t begin, int64_t end,
                    const AdamWParams& hp, uint16_t* copy_bf16, int64_t copy_begin,
                    int64_t copy_end);
  // sum((a - b)^2) over [begin, end), accumulated in double.
  double (*sq_diff_sum_f32)(const float* a, const float* b, int64_t begin, int64_t end);
  // grad_a = scale * (a - b), grad_b = -grad_a over [begin, end); either output may be null.
  void (*sq_diff_backward_f32)(const float* a, const float* b, float scale, float* grad_a,
                               float* grad_b, int64_t begin, int64_t end);
  // out = x + sigma * N(0, 1) over [begin, end), noise from Philox4x32-10 keyed by seed and
  // counter index / 4, so any split of the range gives the same values. begin % 4 == 0.
  void (*noise_f32)(const float* x, float sigma, uint64_t seed, float* out, int64_t begin,
                    int64_t end);
  // Attention over one (sequence, head) item with `workspace` of attention_workspace floats
  // (for the longest sequence of the call): forward writes out and lse; backward recomputes P
  // from lse (and the dropout mask from the seed) and writes grad_q, grad_k, grad_v. Padded rows
  // come out zero. `next` (or null) is the item the caller runs next: its rows are prefetched
  // while this one computes. attention_dropout_mask writes the multipliers (keep / (1 - p) or 0)
  // of query row `row` of item `seq` for keys 0..n into mult (attention_mask_floats(n) floats;
  // entries n.. are scratch): for tests.
  int64_t (*attention_workspace)(int64_t max_len, int64_t head_dim, bool backward);
  void (*attention_fwd)(const AttnArgs& args, const AttnSeq& seq, const AttnSeq* next,
                        float* workspace);
  void (*attention_bwd)(const AttnArgs& args, const AttnSeq& seq, const AttnSeq* next,
                        float* workspace);
  int64_t (*attention_mask_floats)(int64_t n);
  void (*attention_dropout_mask)(const AttnArgs& args, const AttnSeq& seq, int64_t row,
                                 int64_t n, float* mult);
  // Fused dropout + residual + LayerNorm over rows [begin, end) with ln_workspace(H) floats of
  // scratch; ln_bwd adds this range's sum(dy * xhat) and sum(dy) into dgamma and dbeta.
  int64_t (*ln_workspace)(int64_t H);
  void (*ln_fwd)(const LnArgs& args, int64_t begin, int64_t end, float* workspace);
  void (*ln_bwd)(const LnArgs& args, int64_t begin, int64_t end, float* workspace,
                 float* dgamma, float* dbeta);
  // Multipliers (keep ? scale : 0) of flat elements [e0, e0 + n): for tests.
  void (*ln_dropout_mult)(uint64_t seed, uint32_t threshold, float scale, int64_t e0, int64_t n,
                          float* mult);
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

// Whether this CPU runs the instruction set `capability` ("default", "avx2" or "avx512",
// ATEN_CPU_CAPABILITY's values; anything else counts as "avx512", as for ATen).
bool cpu_supports(const char* capability);

}  // namespace smarter_fast::cpu
