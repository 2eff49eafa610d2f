// Helpers shared by the per-op registration files (csrc/<op>/<op>.cpp).
#pragma once

#include <cstdint>

#include "kernels/kernel_table.h"

namespace smarter_fast {

// Elements per parallel task: ~128 KiB per stream, enough to amortise the task overhead.
constexpr int64_t kGrain = 32768;

// The kernel variant this CPU runs (picked once, csrc/kernels/dispatch.cpp).
inline const cpu::KernelTable& K() { return cpu::kernels(); }

}  // namespace smarter_fast
