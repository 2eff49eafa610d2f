// Picks the best kernel variant for this CPU once, as ATen's DispatchStub does.
#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>

#include "kernel_table.h"

namespace smarter_fast::cpu {
namespace {

enum class Capability { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };

Capability detected() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma"))
    return Capability::AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Capability::AVX2;
#endif
  return Capability::DEFAULT;
}

Capability parse(const char* name) {
  std::string s(name);
  for (auto& ch : s) ch = char(std::tolower(ch));
  if (s == "default") return Capability::DEFAULT;
  if (s == "avx2") return Capability::AVX2;
  return Capability::AVX512;
}

Capability requested() {
  // Same variable and values as ATen: lets a user cap the instruction set.
  const char* env = std::getenv("ATEN_CPU_CAPABILITY");
  return env == nullptr ? Capability::AVX512 : parse(env);
}

const KernelTable& select() {
  const int cap = std::min(int(detected()), int(requested()));
#ifdef SMARTER_FAST_HAVE_AVX512
  if (cap >= int(Capability::AVX512)) return AVX512::kernel_table();
#endif
#ifdef SMARTER_FAST_HAVE_AVX2
  if (cap >= int(Capability::AVX2)) return AVX2::kernel_table();
#endif
  (void)cap;
  return DEFAULT::kernel_table();
}

}  // namespace

const KernelTable& kernels() {
  static const KernelTable& table = select();
  return table;
}

bool cpu_supports(const char* capability) { return int(detected()) >= int(parse(capability)); }

}  // namespace smarter_fast::cpu
