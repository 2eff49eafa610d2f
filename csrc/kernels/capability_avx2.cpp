// The AVX2 build of the vectorised kernels: compiled with the flags of
// smarter_fast/ops/capabilities.py (-DCPU_CAPABILITY=AVX2 ...).
#include "kernels_impl.h"
