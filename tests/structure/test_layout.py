"""The package's structure (docs/design.md, "Layers"): no import cycles (imports inside functions
included), imports that run downwards only (commands -> training application -> library -> ops),
short functions in the training engine and the commands, a model file that is a model, and no
process-wide optimizer hooks."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "smarter_fast"
MAX_FUNCTION_LINES = 80
# the training engine and the command-line tools (python -m smarter_fast.<command>)
COMMANDS = ("train", "evaluate", "predict", "export", "ablate", "info", "build", "selfcheck")
# `smarter-fast COMMAND` / `python -m smarter_fast COMMAND`: the commands' dispatcher, in their layer
ENTRY_POINTS = ("cli", "__main__")
SHORT_FUNCTION_FILES = sorted(PACKAGE.glob("training/*.py")) + [
    PACKAGE / f"{name}.py" for name in COMMANDS + ENTRY_POINTS]
MAX_COMMAND_LINES = 330  # a command parses arguments and calls the library (train: ~50 flags)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> set[str]:
    return {module_name(p) for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path) -> set[str]:
    """Every smarter_fast module `path` imports, at any depth of its code."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("smarter_fast")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("smarter_fast"):
                continue
            modules = {f"{target}.{a.name}" for a in node.names} & all_modules()
            out |= modules  # `from . import x` imports the submodule x
            if len(modules) < len(node.names):  # and the package, for any other name
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for target in imports_of(path):
            # a module's import also runs its packages' __init__ (smarter_fast itself aside)
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != name and target != "smarter_fast":
                deps.add(target)
        graph[name] = deps
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_reader_sees_imports_inside_functions(tmp_path):
    f = PACKAGE / "training" / "run.py"
    assert "smarter_fast.evaluation" in imports_of(f)  # imported inside a function there


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_functions_in_the_engine_and_commands_are_short():
    long = []
    for path in SHORT_FUNCTION_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 2 and parts[1] in COMMANDS + ENTRY_POINTS:
        return "command"
    if len(parts) >= 2 and parts[1] == "training":
        return "training"
    if len(parts) >= 2 and parts[1] == "ops":
        return "ops"
    return "library"


def test_imports_run_downwards_only():
    """The library never imports the training application or a command; the training
    application never imports a command; ops import nothing else of the package."""
    allowed = {"command": {"command", "training", "library", "ops"},
               "training": {"training", "library", "ops"},
               "library": {"library", "ops"},
               "ops": {"ops"}}
    wrong = [f"{m} ({layer_of(m)}) imports {d} ({layer_of(d)})"
             for m, deps in sorted(import_graph().items()) for d in sorted(deps)
             if layer_of(d) not in allowed[layer_of(m)]]
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_every_command_runs_as_a_module_and_stays_thin():
    for name in COMMANDS:
        path = PACKAGE / f"{name}.py"
        text = path.read_text()
        assert 'if __name__ == "__main__":' in text, name
        assert len(text.splitlines()) <= MAX_COMMAND_LINES, f"{name}.py: {len(text.splitlines())} lines"


def test_the_model_file_is_a_model():
    """bert.py holds the encoder; the gradient machinery lives in model/grad_sinks.py."""
    bert = (PACKAGE / "model" / "bert.py").read_text()
    assert len(bert.splitlines()) < 300
    assert "autograd.Function" not in bert and "torch.optim" not in bert and "._grad_sink" not in bert


def test_no_process_wide_optimizer_hooks_and_no_outside_design_file():
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        assert "register_optimizer_step_pre_hook" not in text, path
        assert "register_optimizer_step_post_hook" not in text, path
        assert "DESIGN.md" not in text, f"{path} cites a file outside the repository"


def test_every_command_runs_with_python_dash_m():
    """`python -m smarter_fast.<command> --help` works for every command (info takes no options
    and prints its report; selfcheck without CUDA says so), from any directory."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent), "SMARTER_FAST_NO_EXT": "1"}
    for name in COMMANDS:
        r = subprocess.run([sys.executable, "-m", f"smarter_fast.{name}", "--help"], env=env,
                           capture_output=True, text=True, timeout=120, cwd="/")
        assert r.returncode == 0, f"{name}: {r.stderr[-2000:]}"
        assert r.stdout.strip(), name
