// C++ tests (ctest): each CPU-capability variant of the kernels against straightforward scalar
// loops in double precision, on random inputs with odd sizes; then the registered operators
// through the dispatcher. Plain checks, no test framework needed.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <tuple>
#include <random>
#include <string>
#include <vector>

#include "kernels/kernel_table.h"

using smarter_fast::cpu::AdamWParams;
using smarter_fast::cpu::KernelTable;

static int failures = 0;
static int checks = 0;

#define EXPECT(cond, ...)                                         \
  do {                                                            \
    ++checks;                                                     \
    if (!(cond)) {                                                \
      ++failures;                                                 \
      std::fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                          \
      std::fprintf(stderr, "\n");                                 \
    }                                                             \
  } while (0)

static std::vector<float> random_vector(int64_t n, std::mt19937& rng, float lo, float hi) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

static double rel_err(double got, double want) {
  return std::abs(got - want) / std::max(1e-12, std::abs(want));
}

static void test_adamw(const KernelTable& k, std::mt19937& rng) {
  for (int64_t n : {1, 7, 16, 33, 1031}) {
    auto p = random_vector(n, rng, -1.f, 1.f), g = random_vector(n, rng, -0.1f, 0.1f);
    auto m = random_vector(n, rng, -0.01f, 0.01f), v = random_vector(n, rng, 1e-6f, 1e-3f);
    const int step = 3;
    const double lr = 1e-3, b1 = 0.9, b2 = 0.999, eps = 1e-6, wd = 0.01;
    const double ss = lr * std::sqrt(1 - std::pow(b2, step)) / (1 - std::pow(b1, step));
    std::vector<double> pw(n), mw(n), vw(n);
    for (int64_t i = 0; i < n; ++i) {
      mw[i] = b1 * m[i] + (1 - b1) * g[i];
      vw[i] = b2 * v[i] + (1 - b2) * double(g[i]) * g[i];
      pw[i] = p[i] - ss * mw[i] / (std::sqrt(vw[i]) + eps);
      pw[i] -= lr * wd * pw[i];
    }
    AdamWParams hp{float(lr),     float(b1), float(b2),        float(1 - b1),
                   float(1 - b2), float(eps), float(wd), float(ss)};
    // Two ranges: the split point must not matter.
    // The second range also writes a bf16 copy of p[c0, n) (c0 inside the range): it must
    // hold bf16(p) there and leave the rest of the copy buffer alone.
    const int64_t c0 = n / 2 + (n - n / 2) / 3;
    std::vector<uint16_t> copy(n, 0);
    k.adamw_f32(p.data(), g.data(), m.data(), v.data(), 0, n / 2, hp, nullptr, 0, 0);
    k.adamw_f32(p.data(), g.data(), m.data(), v.data(), n / 2, n, hp, copy.data(), c0, n);
    for (int64_t i = c0; i < n; ++i) {
      const uint16_t want = c10::BFloat16(p[i]).x;
      EXPECT(copy[i - c0] == want, "%s adamw n=%ld copy of p[%ld] = %#x, bf16(p) = %#x",
             k.name, long(n), long(i), unsigned(copy[i - c0]), unsigned(want));
    }
    for (int64_t j = n - c0; j < n; ++j)
      EXPECT(copy[j] == 0, "%s adamw n=%ld copy[%ld] written beyond its range", k.name, long(n),
             long(j));
    // Error relative to each buffer's largest magnitude: element-wise relative error is
    // meaningless where m = b1 m + (1 - b1) g cancels to nearly zero.
    auto normwise = [n](const std::vector<float>& got, const std::vector<double>& want) {
      double diff = 0, scale = 0;
      for (int64_t i = 0; i < n; ++i) {
        diff = std::max(diff, std::abs(got[i] - want[i]));
        scale = std::max(scale, std::abs(want[i]));
      }
      return diff / scale;
    };
    const double worst = std::max({normwise(p, pw), normwise(m, mw), normwise(v, vw)});
    EXPECT(worst < 1e-6, "%s adamw n=%ld worst relative error %g", k.name, long(n), worst);
  }
}

static void test_mse(const KernelTable& k, std::mt19937& rng) {
  for (int64_t n : {1, 5, 17, 1024, 4099}) {
    auto a = random_vector(n, rng, -2.f, 2.f), b = random_vector(n, rng, -2.f, 2.f);
    double want = 0;
    for (int64_t i = 0; i < n; ++i) want += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    const double got = k.sq_diff_sum_f32(a.data(), b.data(), 0, n);
    EXPECT(rel_err(got, want) < 1e-6, "%s sq_diff_sum n=%ld got %g want %g", k.name, long(n), got,
           want);
    std::vector<float> ga(n), gb(n);
    const float scale = 0.37f;
    k.sq_diff_backward_f32(a.data(), b.data(), scale, ga.data(), gb.data(), 0, n);
    double worst = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double w = scale * (double(a[i]) - b[i]);
      worst = std::max({worst, std::abs(ga[i] - w), std::abs(gb[i] + w)});
    }
    EXPECT(worst < 1e-6, "%s sq_diff_backward n=%ld worst abs error %g", k.name, long(n), worst);
  }
}

static void test_noise(const KernelTable& k, const KernelTable& reference) {
  const int64_t n = 200003;
  std::vector<float> x(n, 1.5f), whole(n), parts(n), other(n);
  k.noise_f32(x.data(), 0.5f, 1234, whole.data(), 0, n);
  k.noise_f32(x.data(), 0.5f, 1234, parts.data(), 0, 4096);  // any 4-aligned split: same noise
  k.noise_f32(x.data(), 0.5f, 1234, parts.data(), 4096, n);
  reference.noise_f32(x.data(), 0.5f, 1234, other.data(), 0, n);
  double mean = 0, sq = 0;
  int64_t same = 0, match_ref = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double z = (whole[i] - 1.5) / 0.5;
    mean += z;
    sq += z * z;
    same += whole[i] == parts[i];
    match_ref += std::abs(whole[i] - other[i]) < 1e-5f;
  }
  mean /= n;
  const double var = sq / n - mean * mean;
  EXPECT(same == n, "%s noise depends on the split (%ld of %ld equal)", k.name, long(same), long(n));
  EXPECT(match_ref == n, "%s noise differs from the DEFAULT variant", k.name);
  EXPECT(std::abs(mean) < 0.01 && std::abs(var - 1.0) < 0.02, "%s noise mean %g variance %g",
         k.name, mean, var);
  std::vector<float> seeded(n);
  k.noise_f32(x.data(), 0.5f, 1235, seeded.data(), 0, n);
  int64_t equal = 0;
  for (int64_t i = 0; i < n; ++i) equal += seeded[i] == whole[i];
  EXPECT(equal < n / 100, "%s noise with another seed repeats %ld values", k.name, long(equal));
}

static void test_operators() {
  at::manual_seed(0);
  auto a = at::randn({3, 37}), b = at::randn({3, 37});
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("smarter_fast::smart_mse", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  const double got = op.call(a, b).item<double>();
  const double want = (a.to(at::kDouble) - b.to(at::kDouble)).pow(2).mean().item<double>();
  EXPECT(rel_err(got, want) < 1e-6, "smart_mse operator %g vs %g", got, want);
}


// Attention through the registered operators against the textbook formulas in double:
// S = Q K^T / sqrt(D) with padded keys masked, P = softmax(S), O = P V; backward
// dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dP P)), dQ = dS K / sqrt(D), dK = dS^T Q / sqrt(D).
// Padded query rows are zero in every output.
static void test_attention_operator() {
  auto fwd = c10::Dispatcher::singleton().findSchemaOrThrow("smarter_fast::attention_fwd", "")
                 .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                           const at::Tensor&,
                                                           const std::optional<at::Tensor>&,
                                                           double, int64_t)>();
  auto bwd = c10::Dispatcher::singleton().findSchemaOrThrow("smarter_fast::attention_bwd", "")
                 .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                     const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                     double, int64_t)>();
  for (auto [B, H, L, D] : std::vector<std::array<int64_t, 4>>{{3, 5, 7, 8}, {2, 3, 33, 40},
                                                                {2, 2, 130, 64}, {1, 1, 1, 32}}) {
    at::manual_seed(B * 1000 + L);
    auto q = at::randn({B, H, L, D}), k = at::randn({B, H, L, D}), v = at::randn({B, H, L, D});
    auto lengths = at::randint(1, L + 1, {B}, at::kLong);
    lengths[0] = L;  // one full row, one possibly of length 1
    auto mask = at::arange(L).unsqueeze(0) < lengths.unsqueeze(1);  // (B, L) bool
    auto [out, lse] = fwd.call(q, k, v, mask, 0.0, 0);
    auto grad_out = at::randn({B, H, L, D});
    auto [dq, dk, dv] = bwd.call(grad_out, q, k, v, mask, out, lse, 0.0, 0);

    auto Q = q.to(at::kDouble), K = k.to(at::kDouble), V = v.to(at::kDouble);
    auto keys = mask.view({B, 1, 1, L}), rows = mask.view({B, 1, L, 1}).to(at::kDouble);
    const double scale = 1.0 / std::sqrt(double(D));
    auto S = at::matmul(Q, K.transpose(-1, -2)) * scale;
    auto P = at::softmax(S.masked_fill(keys.logical_not(), -1e300), -1);
    auto O = at::matmul(P, V) * rows;
    auto dO = grad_out.to(at::kDouble) * rows;
    auto dV = at::matmul(P.transpose(-1, -2), dO);
    auto dP = at::matmul(dO, V.transpose(-1, -2));
    auto dS = P * (dP - (dP * P).sum(-1, true));
    auto dQ = at::matmul(dS, K) * scale, dK = at::matmul(dS.transpose(-1, -2), Q) * scale;
    auto err = [](const at::Tensor& got, const at::Tensor& want) {
      return (got.reshape(want.sizes()).to(at::kDouble) - want).abs().max().item<double>();
    };
    const double e_out = err(out, O), e_dq = err(dq, dQ), e_dk = err(dk, dK), e_dv = err(dv, dV);
    EXPECT(e_out < 1e-5 && e_dq < 1e-4 && e_dk < 1e-4 && e_dv < 1e-4,
           "attention B=%ld H=%ld L=%ld D=%ld: max errors out %g dq %g dk %g dv %g", long(B),
           long(H), long(L), long(D), e_out, e_dq, e_dk, e_dv);
  }
}

// LayerNorm(x + h) (no dropout) against at::layer_norm in double, forward.
static void test_layer_norm_operator() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("smarter_fast::dropout_add_layer_norm", "")
                .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    double, double, int64_t)>();
  for (int64_t H : {1, 7, 384, 129}) {
    auto x = at::randn({5, 3, H}), h = at::randn({5, 3, H});
    auto w = at::rand({H}) + 0.5, b = at::randn({H});
    auto [out, xhat, rstd] = op.call(x, h, w, b, 1e-12, 0.0, 0);
    auto want = at::layer_norm((x + h).to(at::kDouble), {H}, w.to(at::kDouble), b.to(at::kDouble),
                               1e-12);
    const double e = (out.to(at::kDouble) - want).abs().max().item<double>();
    EXPECT(e < 1e-4, "dropout_add_layer_norm H=%ld max error %g", long(H), e);
  }
}

// ctest's skip code: the run asked for an instruction set this CPU lacks (ATen trusts
// ATEN_CPU_CAPABILITY without checking the CPU, so going on would die of SIGILL in ATen).
constexpr int kSkip = 77;

int main() {
  const char* requested = std::getenv("ATEN_CPU_CAPABILITY");
  if (requested != nullptr && !smarter_fast::cpu::cpu_supports(requested)) {
    std::printf("skipped: ATEN_CPU_CAPABILITY=%s, which this CPU does not support\n", requested);
    return kSkip;
  }
  std::mt19937 rng(42);
  std::vector<const KernelTable*> tables = {&smarter_fast::cpu::DEFAULT::kernel_table()};
#ifdef SMARTER_FAST_HAVE_AVX2
  if (smarter_fast::cpu::cpu_supports("avx2")) tables.push_back(&smarter_fast::cpu::AVX2::kernel_table());
#endif
#ifdef SMARTER_FAST_HAVE_AVX512
  if (smarter_fast::cpu::cpu_supports("avx512")) tables.push_back(&smarter_fast::cpu::AVX512::kernel_table());
#endif
  for (const KernelTable* k : tables) {
    std::printf("testing the %s kernels\n", k->name);
    test_adamw(*k, rng);
    test_mse(*k, rng);
    test_noise(*k, *tables[0]);
  }
  std::printf("dispatch picks %s\n", smarter_fast::cpu::kernels().name);
  test_operators();
  test_attention_operator();
  test_layer_norm_operator();
  std::printf("%d passed, %d failed\n", checks - failures, failures);
  return failures == 0 ? 0 : 1;
}
