"""CPU-capability build variants of the C++ kernels, shared by setup.py and the JIT build.

Like ATen, the vectorised kernels (csrc/kernels/capability_*.cpp) are compiled once per
instruction set, each with its own -m flags and CPU_CAPABILITY define, so `at::vec::Vectorized`
really uses 256- or 512-bit registers; at run time csrc/kernels/dispatch.cpp picks the best
variant the CPU supports. Without these defines `Vectorized` silently falls back to scalar code.

This module imports nothing heavy: setup.py loads it before torch may be importable.
CMakeLists.txt repeats the same flags (keep them in step).
"""

import platform

# name -> (source file relative to the project root, extra compiler flags)
VARIANTS = {
    "DEFAULT": ("csrc/kernels/capability_default.cpp", []),
    "AVX2": (
        "csrc/kernels/capability_avx2.cpp",
        ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt"],
    ),
    "AVX512": (
        "csrc/kernels/capability_avx512.cpp",
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
         "-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt"],
    ),
}

# Sources compiled once, with the common flags. Default-capability objects come first in the link
# so that inline functions shared by several variants resolve to their baseline (portable) copy.
# One registration file per op (csrc/<op>/<op>.cpp) beside the namespace's csrc/library.cpp;
# the basenames must differ, as torch's JIT build names each object after its source's basename.
COMMON_SOURCES = [
    "csrc/library.cpp",
    "csrc/smart/smart.cpp",
    "csrc/adamw/adamw.cpp",
    "csrc/attention/attention.cpp",
    "csrc/layernorm/layernorm.cpp",
    "csrc/testing/testing.cpp",
    "csrc/kernels/dispatch.cpp",
]

COMMON_FLAGS = ["-O3", "-std=c++17", "-fno-math-errno"]


def variant_names():
    """Variants this architecture can build: the x86 ones only on x86-64."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        return list(VARIANTS)
    return ["DEFAULT"]


def variant_flags(name):
    """Compiler flags (beyond COMMON_FLAGS) for one variant, defines included."""
    extra = VARIANTS[name][1]
    defines = [f"-DCPU_CAPABILITY={name}", f"-DCPU_CAPABILITY_{name}"]
    return extra + defines


def have_defines(names):
    """Defines telling dispatch.cpp which variants are linked in."""
    return [f"-DSMARTER_FAST_HAVE_{n}" for n in names if n != "DEFAULT"]
