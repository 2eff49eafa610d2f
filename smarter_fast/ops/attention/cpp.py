"""C++ variable-length attention: not written yet (issue 5)."""


def availability():
    return "no C++ kernel for this op yet"
