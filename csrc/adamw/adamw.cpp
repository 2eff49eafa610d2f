// The fused AdamW step on CPU. Python side: smarter_fast/ops/adamw/.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "checks.h"
#include "library.h"

namespace smarter_fast {
namespace {

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(smarter_fast, m) {
  m.def(
      "adamw_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, int step, "
      "bool correct_bias, Tensor(d!)? copy=None, int copy_offset=0) -> ()");
}

TORCH_LIBRARY_IMPL(smarter_fast, CPU, m) {
  m.impl("adamw_step_", &adamw_step_cpu);
}

}  // namespace smarter_fast
