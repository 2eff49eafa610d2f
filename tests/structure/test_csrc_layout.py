"""The C++ sources: one registration file per op, every list of sources in step, one
TORCH_LIBRARY per operator namespace and the test-only ops outside the production one."""

import re
import runpy
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
CAPS = runpy.run_path(str(ROOT / "smarter_fast" / "ops" / "capabilities.py"))
OP_DIRS = ("smart", "adamw", "attention", "layernorm")  # as smarter_fast/ops/
TEST_ONLY = ("attention_dropout_mask", "dropout_add_layer_norm_mask")


def compiled_once():
    """Every .cpp compiled with the common flags: all but the C++ tests and the per-capability
    kernels (those get their own flags)."""
    variants = {v[0] for v in CAPS["VARIANTS"].values()}
    return sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cpp")
                  if "tests" not in p.relative_to(CSRC).parts
                  and str(p.relative_to(ROOT)) not in variants)


def cmake_common_sources():
    text = (ROOT / "CMakeLists.txt").read_text()
    m = re.search(r"set\(COMMON_SOURCES\s+([^)]*)\)", text)
    assert m, "CMakeLists.txt sets no COMMON_SOURCES"
    return m.group(1).split()


def test_one_registration_file_per_op():
    for op in OP_DIRS:
        assert (CSRC / op / f"{op}.cpp").is_file(), op
        assert (ROOT / "smarter_fast" / "ops" / op).is_dir(), op
    assert not (CSRC / "registration.cpp").exists()


def test_source_lists_name_every_file_once():
    common = CAPS["COMMON_SOURCES"]
    assert sorted(common) == compiled_once()
    assert cmake_common_sources() == common
    # torch's JIT build (cpp_extension.load) names each object after its source's basename
    names = Counter(Path(p).name for p in common)
    assert all(n == 1 for n in names.values()), names


def test_setup_depends_on_every_header():
    text = (ROOT / "setup.py").read_text()
    for header in CSRC.rglob("*.h"):
        rel = header.relative_to(CSRC)
        if "tests" not in rel.parts:
            assert f'"{rel}"' in text, f"setup.py's depends lacks {rel}"


def test_ext_finds_csrc_by_a_file_that_exists():
    text = (ROOT / "smarter_fast" / "ops" / "extension.py").read_text()
    probe = re.search(r'candidate / "([^"]+)"', text).group(1)
    assert (CSRC / probe).is_file()


def registrations():
    """(macro, namespace, file) for every TORCH_LIBRARY* block in csrc/."""
    found = []
    for path in CSRC.rglob("*.cpp"):
        text = path.read_text()
        for m in re.finditer(r"^(TORCH_LIBRARY(?:_FRAGMENT|_IMPL)?)\((\w+)", text, re.M):
            found.append((m.group(1), m.group(2), path.relative_to(CSRC).as_posix()))
    return found


def test_one_torch_library_per_namespace():
    libraries = Counter(ns for macro, ns, _ in registrations() if macro == "TORCH_LIBRARY")
    assert libraries == {"smarter_fast": 1, "smarter_fast_testing": 1}
    for op in OP_DIRS:
        macros = {(macro, ns) for macro, ns, f in registrations() if f == f"{op}/{op}.cpp"}
        assert macros == {("TORCH_LIBRARY_FRAGMENT", "smarter_fast"),
                          ("TORCH_LIBRARY_IMPL", "smarter_fast")}, op


def test_test_only_ops_are_defined_only_in_the_testing_namespace():
    for path in CSRC.rglob("*.cpp"):
        text = path.read_text()
        for name in TEST_ONLY:
            if f'"{name}(' in text:
                assert path == CSRC / "testing" / "testing.cpp", (name, path)
    text = (CSRC / "testing" / "testing.cpp").read_text()
    assert "TORCH_LIBRARY(smarter_fast_testing" in text
    assert all(f'"{name}(' in text for name in TEST_ONLY)
