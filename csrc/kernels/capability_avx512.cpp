// The AVX512 build of the vectorised kernels: compiled with the flags of
// smarter_fast/ops/capabilities.py (-DCPU_CAPABILITY=AVX512 ...).
#include "kernels_impl.h"
