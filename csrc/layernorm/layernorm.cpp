// dropout_add_layer_norm: LayerNorm(x + dropout(h)) fused, forward and backward, on CPU
// (kernels: csrc/kernels/layernorm_impl.h). The mask is regenerated from (seed, element index);
// the forward keeps xhat (fp32, x's shape) and rstd (fp32, one per row) for the backward.
// Python side: smarter_fast/ops/layernorm/.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "layernorm/dropout.h"
#include "library.h"

namespace smarter_fast {
namespace {

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(smarter_fast, m) {
  // LayerNorm(x + dropout(h)) over the last dim -> (out, xhat, rstd); out has the promoted
  // dtype of x and h. The backward regenerates the dropout mask from (dropout_p, seed).
  m.def(
      "dropout_add_layer_norm(Tensor x, Tensor h, Tensor weight, Tensor bias, float eps, "
      "float dropout_p=0., int seed=0) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dropout_add_layer_norm_backward(Tensor grad_out, Tensor xhat, Tensor rstd, "
      "Tensor weight, float dropout_p, int seed, ScalarType x_dtype, ScalarType h_dtype) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(smarter_fast, CPU, m) {
  m.impl("dropout_add_layer_norm", &dropout_add_layer_norm_cpu);
  m.impl("dropout_add_layer_norm_backward", &dropout_add_layer_norm_backward_cpu);
}

}  // namespace smarter_fast
