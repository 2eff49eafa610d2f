// Operator schemas (declared once, here) and their CPU kernels. Python adds the fake (meta)
// and autograd registrations: smarter_fast/ops/*/cpp.py.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>

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
                    double weight_decay, int64_t step, bool correct_bias) {
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
  at::parallel_for(0, param.numel(), kGrain, [&](int64_t begin, int64_t end) {
    K().adamw_f32(p, g, m, v, begin, end, hp);
  });
}

std::string kernel_variant() { return K().name; }

}  // namespace

TORCH_LIBRARY(smarter_fast, m) {
  m.def("smart_mse(Tensor a, Tensor b) -> Tensor");
  m.def("smart_mse_backward(Tensor grad, Tensor a, Tensor b) -> (Tensor, Tensor)");
  m.def("smart_noise(Tensor x, float sigma, int seed) -> Tensor");
  m.def(
      "adamw_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, int step, "
      "bool correct_bias) -> ()");
  // Which vectorised variant (DEFAULT, AVX2, AVX512) the CPU kernels run.
  m.def("kernel_variant() -> str", &kernel_variant);
}

TORCH_LIBRARY_IMPL(smarter_fast, CPU, m) {
  m.impl("smart_mse", &smart_mse_cpu);
  m.impl("smart_mse_backward", &smart_mse_backward_cpu);
  m.impl("smart_noise", &smart_noise_cpu);
  m.impl("adamw_step_", &adamw_step_cpu);
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
