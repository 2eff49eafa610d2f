// Variable-length attention on CPU, padded (attention_mask) or packed (cu_seqlens), forward and
// backward. Python side: smarter_fast/ops/attention/.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "attention/dropout.h"
#include "library.h"

namespace smarter_fast {
namespace {

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(smarter_fast, m) {
  // Out and the log-sum-exp per query (fp32); padded rows of out are zero. The mask may be any
  // (B, L) pattern, nonzero = real token. dropout_p > 0: inverted dropout on the probabilities,
  // the mask regenerated from `seed` (the backward must get the forward's dropout_p and seed).
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
}

TORCH_LIBRARY_IMPL(smarter_fast, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
  m.impl("attention_varlen_fwd", &attention_varlen_fwd_cpu);
  m.impl("attention_varlen_bwd", &attention_varlen_bwd_cpu);
}

}  // namespace smarter_fast
