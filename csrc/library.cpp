// The smarter_fast operator namespace. torch allows one TORCH_LIBRARY per namespace, so it is
// here and declares only what belongs to no op; each op adds its schemas with
// TORCH_LIBRARY_FRAGMENT and its CPU kernels with TORCH_LIBRARY_IMPL in csrc/<op>/<op>.cpp.
// Python adds the fake (meta) and autograd registrations: smarter_fast/ops/*/cpp.py.
#include <torch/library.h>

#include <string>

#include "library.h"

namespace smarter_fast {
namespace {

std::string kernel_variant() { return K().name; }

}  // namespace

TORCH_LIBRARY(smarter_fast, m) {
  // Which vectorised variant (DEFAULT, AVX2, AVX512) the CPU kernels run.
  m.def("kernel_variant() -> str", &kernel_variant);
}

}  // namespace smarter_fast

#ifdef SMARTER_FAST_PYTHON_MODULE
// Lets `import smarter_fast._C` load the library (and so run every file's registrations) when
// it is built ahead of time by setup.py; the operators live in torch.ops.smarter_fast.
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
