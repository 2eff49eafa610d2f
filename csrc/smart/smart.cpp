// SMART's CPU ops: smart_mse (mean squared difference, with its backward) and smart_noise
// (Gaussian perturbation). Python side: smarter_fast/ops/smart/.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>

#include "checks.h"
#include "library.h"

namespace smarter_fast {
namespace {

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(smarter_fast, m) {
  m.def("smart_mse(Tensor a, Tensor b) -> Tensor");
  m.def("smart_mse_backward(Tensor grad, Tensor a, Tensor b) -> (Tensor, Tensor)");
  m.def("smart_noise(Tensor x, float sigma, int seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(smarter_fast, CPU, m) {
  m.impl("smart_mse", &smart_mse_cpu);
  m.impl("smart_mse_backward", &smart_mse_backward_cpu);
  m.impl("smart_noise", &smart_noise_cpu);
}

}  // namespace smarter_fast
