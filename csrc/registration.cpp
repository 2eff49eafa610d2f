// Operator schemas (declared once, here) and their CPU kernels. Python adds the fake (meta)
// and autograd registrations: smarter_fast/ops/*/cpp.py.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "checks.h"
#include "kernels/kernel_table.h"

namespace smarter_fast {
namespace {

constexpr int64_t kGrain = 32768;  // elements per task: ~128 KiB per stream, enough to amortise

const cpu::KernelTable& K() { return cpu::kernels(); }

// ---- smart_mse: mean((a - b)^2) ----------------------------------------------------------
at::Tensor smart_mse_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_cpu_float(a, "smart_mse", "a");
  check_cpu_float(b, "smart_mse", "b");
  check_same_shape(a, b, "smart_mse", "a", "b");
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const float* pa = ac.const_data_ptr<float>();
  const float* pb = bc.const_data_ptr<float>();
  const int64_t n = ac.numel();
  const double total = at::parallel_reduce(
      0, n, kGrain, 0.0,
      [&](int64_t begin, int64_t end, double acc) {
        return acc + K().sq_diff_sum_f32(pa, pb, begin, end);
      },
      std::plus<double>());
  return at::scalar_tensor(n > 0 ? total / double(n) : std::nan(""), ac.options());
}

std::tuple<at::Tensor, at::Tensor> smart_mse_backward_cpu(const at::Tensor& grad,
                                                          const at::Tensor& a,
                                                          const at::Tensor& b) {
  check_cpu_float(a, "smart_mse_backward", "a");
  check_cpu_float(b, "smart_mse_backward", "b");
  check_same_shape(a, b, "smart_mse_backward", "a", "b");
  TORCH_CHECK(grad.numel() == 1, "smart_mse_backward: grad must be a scalar");
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor grad_a = at::empty_like(ac), grad_b = at::empty_like(bc);
  const int64_t n = ac.numel();
  const float scale = n > 0 ? float(2.0 * grad.item<double>() / double(n)) : 0.0f;
  const float* pa = ac.const_data_ptr<float>();
  const float* pb = bc.const_data_ptr<float>();
  float* ga = grad_a.data_ptr<float>();
  float* gb = grad_b.data_ptr<float>();
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    K().sq_diff_backward_f32(pa, pb, scale, ga, gb, begin, end);
  });
  return {grad_a, grad_b};
}

// ---- smart_noise: x + sigma * N(0, 1), counter-based, never stored -----------------------
at::Tensor smart_noise_cpu(const at::Tensor& x, double sigma, int64_t seed) {
  check_cpu_float(x, "smart_noise", "x");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t n = xc.numel();
  const float* px = xc.const_data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t groups = (n + 3) / 4;  // Philox yields 4 normals per counter
  at::parallel_for(0, groups, kGrain / 4, [&](int64_t gb, int64_t ge) {
    K().noise_f32(px, float(sigma), uint64_t(seed), po, 4 * gb, std::min(n, 4 * ge));
  });
  return out;
}

// ---- adamw_step_: one fused pass over flat fp32 buffers ----------------------------------
void adamw_step_cpu(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                    at::Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps,
                    double weight_decay, int64_t step, bool correct_bias,
                    const std::optional<at::Tensor>& copy, int64_t copy_offset) {
  const char* op = "adamw_step_";
  check_cpu_float(param, op, "param");
  check_cpu_float(grad, op, "grad");
  check_cpu_float(exp_avg, op, "exp_avg");
  check_cpu_float(exp_avg_sq, op, "exp_avg_sq");
  check_same_shape(param, grad, op, "param", "grad");
  check_same_shape(param, exp_avg, op, "param", "exp_avg");
  check_same_shape(param, exp_avg_sq, op, "param", "exp_avg_sq");
  check_contiguous(param, op, "param");
  check_contiguous(exp_avg, op, "exp_avg");
  check_contiguous(exp_avg_sq, op, "exp_avg_sq");
  TORCH_CHECK(step >= 1, op, ": step must be >= 1, got ", step);
  const at::Tensor gc = grad.contiguous();
  double step_size = lr;
  if (correct_bias) {
    step_size = lr * std::sqrt(1.0 - std::pow(beta2, double(step))) /
                (1.0 - std::pow(beta1, double(step)));
  }
  const cpu::AdamWParams hp{float(lr),         float(beta1),        float(beta2),
                            float(1.0 - beta1), float(1.0 - beta2), float(eps),
                            float(weight_decay), float(step_size)};
  float* p = param.data_ptr<float>();
  const float* g = gc.const_data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  // copy (bf16, contiguous): copy[j] = bf16(updated param[copy_offset + j]), in the same pass.
  uint16_t* c = nullptr;
  int64_t lo = 0, hi = 0;
  if (copy.has_value()) {
    const at::Tensor& ct = *copy;
    TORCH_CHECK(ct.device().is_cpu(), op, ": copy must be a CPU tensor, got ", ct.device());
    TORCH_CHECK(ct.scalar_type() == at::kBFloat16, op, ": copy must be bfloat16, got ",
                ct.scalar_type());
    check_contiguous(ct, op, "copy");
    lo = copy_offset;
    hi = copy_offset + ct.numel();
    TORCH_CHECK(lo >= 0 && hi <= param.numel(), op, ": copy of ", ct.numel(),
                " elements at offset ", copy_offset, " exceeds param's ", param.numel());
    c = reinterpret_cast<uint16_t*>(ct.data_ptr<at::BFloat16>());
  }
  at::parallel_for(0, param.numel(), kGrain, [&](int64_t begin, int64_t end) {
    K().adamw_f32(p, g, m, v, begin, end, hp, c, lo, hi);
  });
}

// ---- attention: variable-length, padded (attention_mask) or packed (cu_seqlens) ------------
// Work items are (sequence, head) pairs run in parallel, each over its real tokens only (the
// kernels: csrc/kernels/attention_impl.h). Only the log-sum-exp per query is kept for the
// backward, which recomputes the probabilities.

// q, k, v, out, grads: fp32 or bf16, one dtype; the head dimension must be contiguous.
at::Tensor attn_rows_contiguous(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

void check_attn_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       int64_t ndim, const char* op) {
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": q, k, v must be CPU tensors, got ", t->device());
    TORCH_CHECK(t->dim() == ndim, op, ": q, k, v must have ", ndim, " dimensions, got ",
                t->sizes());
  }
  TORCH_CHECK(q.sizes() == k.sizes() && q.sizes() == v.sizes(), op,
              ": q, k, v shapes differ: ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k, v dtypes differ");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, op,
              ": q, k, v must be float32 or bfloat16, got ", q.scalar_type());
}

void check_attn_like(const at::Tensor& t, const at::Tensor& q, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.sizes() == q.sizes(), op, ": ", name, " must have shape ", q.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must be ", q.scalar_type(),
              ", got ", t.scalar_type());
}

// (B, H, L, D) with any strides -> AttnTensor; packed (T, H, D) -> batch stride 0.
cpu::AttnTensor attn_view(const at::Tensor& t) {
  if (t.dim() == 4) return {t.data_ptr(), t.stride(0), t.stride(2), t.stride(1)};
  TORCH_CHECK(t.dim() == 3, "attention: expected a 3-D or 4-D tensor, got ", t.sizes());
  return {t.data_ptr(), 0, t.stride(0), t.stride(1)};
}

cpu::AttnTensor lse_view(const at::Tensor& lse) {
  if (lse.dim() == 3) return {lse.data_ptr(), lse.stride(0), lse.stride(2), lse.stride(1)};
  return {lse.data_ptr(), 0, lse.stride(0), lse.stride(1)};  // packed (T, H)
}

// Tokens of every batch row, real ones first (in order), then padding; and the real counts.
// Any mask works, not only right padding: the kernels read tokens through this index.
struct PaddedIndex {
  std::vector<int64_t> tokens;  // B * L
  std::vector<int64_t> counts;  // B
  int64_t max_len = 0;
};

PaddedIndex padded_index(const std::optional<at::Tensor>& mask, int64_t B, int64_t L,
                         const char* op) {
  PaddedIndex idx;
  idx.tokens.resize(B * L);
  idx.counts.assign(B, L);
  if (!mask.has_value() || !mask->defined()) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < L; ++t) idx.tokens[b * L + t] = t;
    idx.max_len = B > 0 ? L : 0;
    return idx;
  }
  TORCH_CHECK(mask->device().is_cpu(), op, ": attention_mask must be a CPU tensor");
  TORCH_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == L, op,
              ": attention_mask must be (B, L) = (", B, ", ", L, "), got ", mask->sizes());
  const at::Tensor real = mask->ne(0).contiguous();
  const bool* m = real.const_data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t* row = idx.tokens.data() + b * L;
    int64_t r = 0;
    for (int64_t t = 0; t < L; ++t)
      if (m[b * L + t]) row[r++] = t;
    idx.counts[b] = r;
    idx.max_len = std::max(idx.max_len, r);
    for (int64_t t = 0; t < L; ++t)
      if (!m[b * L + t]) row[r++] = t;
  }
  return idx;
}

// Runs the kernel over every (sequence, head) item in parallel; each task walks its items in
// order (heads of one sequence are adjacent in memory) and prefetches the next one's rows.
template <typename MakeSeq>
void attn_parallel(int64_t n_seq, int64_t H, int64_t max_len, int64_t D, bool backward,
                   const MakeSeq& make_seq, const cpu::AttnArgs& args) {
  const int64_t ws_floats = K().attention_workspace(max_len, D, backward);
  at::parallel_for(0, n_seq * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> ws(ws_floats);
    cpu::AttnSeq seq = make_seq(begin / H, begin % H);
    for (int64_t w = begin; w < end; ++w) {
      const bool last = w + 1 == end;
      const cpu::AttnSeq next = last ? seq : make_seq((w + 1) / H, (w + 1) % H);
      const cpu::AttnSeq* nx = last ? nullptr : &next;
      if (backward) K().attention_bwd(args, seq, nx, ws.data());
      else K().attention_fwd(args, seq, nx, ws.data());
      seq = next;
    }
  });
}

// (B, H, L, D) output laid out as (B, L, H, D) in memory: what the model reshapes to (B, L, H*D).
at::Tensor attn_empty_padded(const at::Tensor& q) {
  return at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options())
      .permute({0, 2, 1, 3});
}

// Attention dropout: inverted dropout on the probabilities with a mask that is never stored,
// regenerated from (seed, sequence, head, query, key) by Philox (kernel_table.h, AttnArgs).
void attn_set_dropout(cpu::AttnArgs& a, double p, int64_t seed, const char* op) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, op, ": dropout_p must be in [0, 1], got ", p);
  a.dropout = p > 0.0;
  a.dropout_threshold = uint32_t(std::min(16777216.0, std::nearbyint(p * 16777216.0)));
  a.dropout_scale = p < 1.0 ? float(1.0 / (1.0 - p)) : 0.0f;
  a.seed = uint64_t(seed);
}

cpu::AttnArgs attn_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse) {
  cpu::AttnArgs a{};
  a.head_dim = q.size(-1);
  a.scale = float(1.0 / std::sqrt(double(std::max<int64_t>(a.head_dim, 1))));
  a.bf16 = q.scalar_type() == at::kBFloat16;
  a.q = attn_view(q);
  a.k = attn_view(k);
  a.v = attn_view(v);
  a.out = attn_view(out);
  a.lse = lse_view(lse);
  return a;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_, const at::Tensor& k_,
                                                     const at::Tensor& v_,
                                                     const std::optional<at::Tensor>& mask,
                                                     double dropout_p, int64_t seed) {
  const char* op = "attention_fwd";
  check_attn_inputs(q_, k_, v_, 4, op);
  const at::Tensor q = attn_rows_contiguous(q_), k = attn_rows_contiguous(k_),
                   v = attn_rows_contiguous(v_);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  const PaddedIndex idx = padded_index(mask, B, L, op);
  at::Tensor out = attn_empty_padded(q);
  at::Tensor lse = at::empty({B, H, L}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    lse.zero_();
    return {out, lse};
  }
  cpu::AttnArgs args = attn_args(q, k, v, out, lse);
  attn_set_dropout(args, dropout_p, seed, op);
  attn_parallel(B, H, idx.max_len, D, false, [&](int64_t b, int64_t h) {
    return cpu::AttnSeq{b, h, idx.tokens.data() + b * L, 0, idx.counts[b], L - idx.counts[b]};
  }, args);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const std::optional<at::Tensor>& mask, const at::Tensor& out_, const at::Tensor& lse,
    double dropout_p, int64_t seed) {
  const char* op = "attention_bwd";
  check_attn_inputs(q_, k_, v_, 4, op);
  check_attn_like(grad_, q_, op, "grad_out");
  check_attn_like(out_, q_, op, "out");
  const int64_t B = q_.size(0), H = q_.size(1), L = q_.size(2), D = q_.size(3);
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat &&
                  lse.sizes() == at::IntArrayRef({B, H, L}),
              op, ": lse must be float32 (B, H, L), got ", lse.sizes());
  const at::Tensor q = attn_rows_contiguous(q_), k = attn_rows_contiguous(k_),
                   v = attn_rows_contiguous(v_), grad = attn_rows_contiguous(grad_),
                   out = attn_rows_contiguous(out_);
  const PaddedIndex idx = padded_index(mask, B, L, op);
  at::Tensor dq = attn_empty_padded(q), dk = attn_empty_padded(q), dv = attn_empty_padded(q);
  if (dq.numel() == 0) return {dq, dk, dv};
  cpu::AttnArgs args = attn_args(q, k, v, out, lse);
  args.grad_out = attn_view(grad);
  args.grad_q = attn_view(dq);
  args.grad_k = attn_view(dk);
  args.grad_v = attn_view(dv);
  attn_set_dropout(args, dropout_p, seed, op);
  attn_parallel(B, H, idx.max_len, D, true, [&](int64_t b, int64_t h) {
    return cpu::AttnSeq{b, h, idx.tokens.data() + b * L, 0, idx.counts[b], L - idx.counts[b]};
  }, args);
  return {dq, dk, dv};
}

// cu_seqlens (B + 1,) int: 0 = c_0 <= c_1 <= ... <= c_B = T. Returns it as int64 and the
// longest length (max_seqlen is only a hint: the kernels size their buffers from the data).
std::vector<int64_t> varlen_offsets(const at::Tensor& cu, int64_t T, int64_t& max_len,
                                    const char* op) {
  TORCH_CHECK(cu.device().is_cpu(), op, ": cu_seqlens must be a CPU tensor");
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 2, op,
              ": cu_seqlens must be 1-D with at least 2 entries");
  TORCH_CHECK(at::isIntegralType(cu.scalar_type(), /*includeBool=*/false), op,
              ": cu_seqlens must be an integer tensor, got ", cu.scalar_type());
  const at::Tensor c = cu.to(at::kLong).contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  std::vector<int64_t> offsets(p, p + c.numel());
  TORCH_CHECK(offsets.front() == 0, op, ": cu_seqlens must start at 0");
  TORCH_CHECK(offsets.back() == T, op, ": cu_seqlens must end at the token count ", T,
              ", got ", offsets.back());
  max_len = 0;
  for (size_t i = 1; i < offsets.size(); ++i) {
    TORCH_CHECK(offsets[i] >= offsets[i - 1], op, ": cu_seqlens must be non-decreasing");
    max_len = std::max(max_len, offsets[i] - offsets[i - 1]);
  }
  return offsets;
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd_cpu(const at::Tensor& q_,
                                                            const at::Tensor& k_,
                                                            const at::Tensor& v_,
                                                            const at::Tensor& cu_seqlens,
                                                            int64_t max_seqlen,
                                                            double dropout_p, int64_t seed) {
  const char* op = "attention_varlen_fwd";
  (void)max_seqlen;
  check_attn_inputs(q_, k_, v_, 3, op);
  const at::Tensor q = attn_rows_contiguous(q_), k = attn_rows_contiguous(k_),
                   v = attn_rows_contiguous(v_);
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  int64_t max_len = 0;
  const std::vector<int64_t> cu = varlen_offsets(cu_seqlens, T, max_len, op);
  at::Tensor out = at::empty({T, H, D}, q.options());
  at::Tensor lse = at::empty({T, H}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse.zero_()};
  cpu::AttnArgs args = attn_args(q, k, v, out, lse);
  attn_set_dropout(args, dropout_p, seed, op);
  attn_parallel(int64_t(cu.size()) - 1, H, max_len, D, false, [&](int64_t b, int64_t h) {
    return cpu::AttnSeq{b, h, nullptr, cu[b], cu[b + 1] - cu[b], 0};
  }, args);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd_cpu(
    const at::Tensor& grad_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& cu_seqlens, int64_t max_seqlen, const at::Tensor& out_,
    const at::Tensor& lse, double dropout_p, int64_t seed) {
  const char* op = "attention_varlen_bwd";
  (void)max_seqlen;
  check_attn_inputs(q_, k_, v_, 3, op);
  check_attn_like(grad_, q_, op, "grad_out");
  check_attn_like(out_, q_, op, "out");
  const int64_t T = q_.size(0), H = q_.size(1), D = q_.size(2);
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat &&
                  lse.sizes() == at::IntArrayRef({T, H}),
              op, ": lse must be float32 (T, H), got ", lse.sizes());
  int64_t max_len = 0;
  const std::vector<int64_t> cu = varlen_offsets(cu_seqlens, T, max_len, op);
  const at::Tensor q = attn_rows_contiguous(q_), k = attn_rows_contiguous(k_),
                   v = attn_rows_contiguous(v_), grad = attn_rows_contiguous(grad_),
                   out = attn_rows_contiguous(out_);
  at::Tensor dq = at::empty({T, H, D}, q.options()), dk = at::empty({T, H, D}, q.options()),
             dv = at::empty({T, H, D}, q.options());
  if (dq.numel() == 0) return {dq, dk, dv};
  cpu::AttnArgs args = attn_args(q, k, v, out, lse);
  args.grad_out = attn_view(grad);
  args.grad_q = attn_view(dq);
  args.grad_k = attn_view(dk);
  args.grad_v = attn_view(dv);
  attn_set_dropout(args, dropout_p, seed, op);
  attn_parallel(int64_t(cu.size()) - 1, H, max_len, D, true, [&](int64_t b, int64_t h) {
    return cpu::AttnSeq{b, h, nullptr, cu[b], cu[b + 1] - cu[b], 0};
  }, args);
  return {dq, dk, dv};
}

// For tests: the dropout multipliers (keep / (1 - p), or 0) the kernels use, (n_seq, H, L, L)
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

std::string kernel_variant() { return K().name; }

}  // namespace

// ---- dropout_add_layer_norm: LayerNorm(x + dropout(h)) fused, fwd + bwd --------------------
// (kernels: csrc/kernels/layernorm_impl.h). The mask is regenerated from (seed, element index);
// the forward keeps xhat (fp32, x's shape) and rstd (fp32, one per row) for the backward.
struct LnDropout {
  bool on = false;
  uint32_t threshold = 0;
  float scale = 1.0f;
};

LnDropout ln_dropout(double p, const char* op) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
  LnDropout d;
  d.threshold = uint32_t(std::lround(p * 65536.0));
  if (d.threshold > 0) {
    d.on = true;
    d.scale = float(1.0 / (1.0 - double(d.threshold) / 65536.0));
  }
  return d;
}

void check_ln_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

int64_t ln_grain_rows(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> dropout_add_layer_norm_cpu(
    const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
    double eps, double dropout_p, int64_t seed) {
  const char* op = "dropout_add_layer_norm";
  check_ln_float(x, op, "x");
  check_ln_float(h, op, "h");
  check_cpu_float(weight, op, "weight");
  check_cpu_float(bias, op, "bias");
  check_same_shape(x, h, op, "x", "h");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  const int64_t H = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == H && bias.dim() == 1 && bias.size(0) == H,
              op, ": weight and bias must have shape (", H, "), got ", weight.sizes(), " and ",
              bias.sizes());
  const LnDropout d = ln_dropout(dropout_p, op);
  const at::Tensor xc = x.contiguous(), hc = h.contiguous();
  const at::Tensor wc = weight.contiguous(), bc = bias.contiguous();
  const auto out_dtype = at::promote_types(x.scalar_type(), h.scalar_type());
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(out_dtype));
  at::Tensor xhat = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  const int64_t rows = H == 0 ? 0 : x.numel() / H;
  if (rows == 0) return {out, xhat, rstd};
  cpu::LnArgs a{};
  a.H = H;
  a.eps = float(eps);
  a.x = xc.const_data_ptr();
  a.x_bf16 = xc.scalar_type() == at::kBFloat16;
  a.h = hc.const_data_ptr();
  a.h_bf16 = hc.scalar_type() == at::kBFloat16;
  a.gamma = wc.const_data_ptr<float>();
  a.beta = bc.const_data_ptr<float>();
  a.out = out.data_ptr();
  a.out_bf16 = out_dtype == at::kBFloat16;
  a.xhat = xhat.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.dropout = d.on;
  a.threshold = d.threshold;
  a.scale = d.scale;
  a.seed = uint64_t(seed);
  const int64_t ws = K().ln_workspace(H);
  at::parallel_for(0, rows, ln_grain_rows(H), [&](int64_t rb, int64_t re) {
    std::vector<float> workspace(ws);
    K().ln_fwd(a, rb, re, workspace.data());
  });
  return {out, xhat, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_layer_norm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& xhat, const at::Tensor& rstd,
    const at::Tensor& weight, double dropout_p, int64_t seed, at::ScalarType x_dtype,
    at::ScalarType h_dtype) {
  const char* op = "dropout_add_layer_norm_backward";
  check_ln_float(grad_out, op, "grad_out");
  check_cpu_float(xhat, op, "xhat");
  check_cpu_float(rstd, op, "rstd");
  check_cpu_float(weight, op, "weight");
  check_same_shape(grad_out, xhat, op, "grad_out", "xhat");
  TORCH_CHECK((x_dtype == at::kFloat || x_dtype == at::kBFloat16) &&
              (h_dtype == at::kFloat || h_dtype == at::kBFloat16),
              op, ": x_dtype and h_dtype must be float32 or bfloat16");
  const int64_t H = xhat.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == H, op, ": weight must have shape (", H, ")");
  const int64_t rows = H == 0 ? 0 : xhat.numel() / H;
  TORCH_CHECK(rstd.numel() == rows, op, ": rstd must have one entry per row");
  const LnDropout d = ln_dropout(dropout_p, op);
  const at::Tensor gc = grad_out.contiguous(), xc = xhat.contiguous(), rc = rstd.contiguous();
  const at::Tensor wc = weight.contiguous();
  at::Tensor grad_x = at::empty(xhat.sizes(), xhat.options().dtype(x_dtype));
  at::Tensor grad_h = at::empty(xhat.sizes(), xhat.options().dtype(h_dtype));
  const int64_t nchunks =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                              (rows + ln_grain_rows(H) - 1) / ln_grain_rows(H)));
  at::Tensor partial = at::zeros({nchunks, 2, H}, xhat.options());
  if (rows > 0) {
    cpu::LnArgs a{};
    a.H = H;
    a.xhat = const_cast<float*>(xc.const_data_ptr<float>());
    a.rstd = const_cast<float*>(rc.const_data_ptr<float>());
    a.gamma = wc.const_data_ptr<float>();
    a.grad_out = gc.const_data_ptr();
    a.grad_out_bf16 = gc.scalar_type() == at::kBFloat16;
    a.grad_x = grad_x.data_ptr();
    a.grad_x_bf16 = x_dtype == at::kBFloat16;
    a.grad_h = grad_h.data_ptr();
    a.grad_h_bf16 = h_dtype == at::kBFloat16;
    a.dropout = d.on;
    a.threshold = d.threshold;
    a.scale = d.scale;
    a.seed = uint64_t(seed);
    const int64_t ws = K().ln_workspace(H);
    float* pp = partial.data_ptr<float>();
    at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
      std::vector<float> workspace(ws);
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t rb = rows * c / nchunks, re = rows * (c + 1) / nchunks;
        K().ln_bwd(a, rb, re, workspace.data(), pp + c * 2 * H, pp + c * 2 * H + H);
      }
    });
  }
  const at::Tensor sums = partial.sum(0);  // (2, H)
  return {grad_x, grad_h, sums[0].clone(), sums[1].clone()};
}

// For tests: the multipliers (keep ? scale : 0) of flat elements 0..n-1.
at::Tensor dropout_add_layer_norm_mask_cpu(int64_t n, double dropout_p, int64_t seed) {
  const LnDropout d = ln_dropout(dropout_p, "dropout_add_layer_norm_mask");
  at::Tensor mult = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  if (!d.on) return mult.fill_(1.0f);
  K().ln_dropout_mult(uint64_t(seed), d.threshold, d.scale, 0, n, mult.data_ptr<float>());
  return mult;
}

TORCH_LIBRARY(smarter_fast, m) {
  m.def("smart_mse(Tensor a, Tensor b) -> Tensor");
  m.def("smart_mse_backward(Tensor grad, Tensor a, Tensor b) -> (Tensor, Tensor)");
  m.def("smart_noise(Tensor x, float sigma, int seed) -> Tensor");
  m.def(
      "adamw_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, int step, "
      "bool correct_bias, Tensor(d!)? copy=None, int copy_offset=0) -> ()");
  // Attention (smarter_fast/ops/attention/cpp.py): out and the log-sum-exp per query (fp32);
  // padded rows of out are zero. The mask may be any (B, L) pattern, nonzero = real token.
  // dropout_p > 0: inverted dropout on the probabilities, the mask regenerated from `seed` (the
  // backward must get the forward's dropout_p and seed).
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attention_mask, "
      "float dropout_p=0., int seed=0) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? attention_mask, "
      "Tensor out, Tensor lse, float dropout_p=0., int seed=0) -> (Tensor, Tensor, Tensor)");
  m.def(
      "attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, "
      "float dropout_p=0., int seed=0) -> (Tensor, Tensor)");
  m.def(
      "attention_varlen_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, "
      "int max_seqlen, Tensor out, Tensor lse, float dropout_p=0., int seed=0) "
      "-> (Tensor, Tensor, Tensor)");
  // For tests: the kernels' dropout multipliers (n_seq, heads, length, length).
  m.def("attention_dropout_mask(int n_seq, int heads, int length, float dropout_p, int seed) "
        "-> Tensor", &attention_dropout_mask_cpu);
  // LayerNorm(x + dropout(h)) over the last dim -> (out, xhat, rstd); out has the promoted
  // dtype of x and h. The backward regenerates the dropout mask from (dropout_p, seed).
  m.def(
      "dropout_add_layer_norm(Tensor x, Tensor h, Tensor weight, Tensor bias, float eps, "
      "float dropout_p=0., int seed=0) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dropout_add_layer_norm_backward(Tensor grad_out, Tensor xhat, Tensor rstd, "
      "Tensor weight, float dropout_p, int seed, ScalarType x_dtype, ScalarType h_dtype) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("dropout_add_layer_norm_mask(int n, float dropout_p, int seed) -> Tensor",
        &dropout_add_layer_norm_mask_cpu);
  // Which vectorised variant (DEFAULT, AVX2, AVX512) the CPU kernels run.
  m.def("kernel_variant() -> str", &kernel_variant);
}

TORCH_LIBRARY_IMPL(smarter_fast, CPU, m) {
  m.impl("smart_mse", &smart_mse_cpu);
  m.impl("smart_mse_backward", &smart_mse_backward_cpu);
  m.impl("smart_noise", &smart_noise_cpu);
  m.impl("adamw_step_", &adamw_step_cpu);
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
  m.impl("attention_varlen_fwd", &attention_varlen_fwd_cpu);
  m.impl("attention_varlen_bwd", &attention_varlen_bwd_cpu);
  m.impl("dropout_add_layer_norm", &dropout_add_layer_norm_cpu);
  m.impl("dropout_add_layer_norm_backward", &dropout_add_layer_norm_backward_cpu);
}

}  // namespace smarter_fast

#ifdef SMARTER_FAST_PYTHON_MODULE
// Lets `import smarter_fast._C` load the library (and so run the registrations above) when it
// is built ahead of time by setup.py; the operators live in torch.ops.smarter_fast.
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
