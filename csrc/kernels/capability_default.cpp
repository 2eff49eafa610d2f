// The DEFAULT build of the vectorised kernels: compiled with the flags of
// smarter_fast/ops/capabilities.py (-DCPU_CAPABILITY=DEFAULT ...).
#include "kernels_impl.h"
