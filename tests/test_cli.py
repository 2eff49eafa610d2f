"""The `smarter-fast` command (smarter_fast/cli.py) and `python -m smarter_fast`: one entry point
that runs each command's own main(argv), imported only when dispatched."""

import ast
import importlib
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from smarter_fast import cli

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "smarter_fast"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "SMARTER_FAST_NO_EXT": "1"}
NOT_ON_PATH = ("smarter-fast is not on PATH (package installed before the entry point was added; "
               "reinstall with pip install -e .)")


def test_every_command_module_is_dispatched():
    """Each `python -m smarter_fast.<command>` module (a main() and a __main__ block) is a
    command here, and every command here names its module."""
    modules = {p.stem for p in PACKAGE.glob("*.py")
               if 'if __name__ == "__main__":' in p.read_text() and "def main(" in p.read_text()}
    modules.discard("__main__")
    assert modules == set(cli.COMMANDS) - {"data"}
    for name, (module, summary) in cli.COMMANDS.items():
        assert summary and "\n" not in summary, name
        assert module == f"smarter_fast.{name}" or (name, module) == ("data", "smarter_fast.data.__main__")


def test_top_level_help_lists_every_command_with_one_line(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: smarter-fast COMMAND")
    for name, (_, summary) in cli.COMMANDS.items():
        assert re.search(rf"^  {name} +{re.escape(summary)}$", out, re.M), name


@pytest.mark.parametrize("name", [n for n in cli.COMMANDS if n != "data"])
def test_each_command_help_is_its_own(name, capsys):
    assert cli.main([name, "--help"]) == 0
    out = capsys.readouterr().out
    module = importlib.import_module(f"smarter_fast.{name}")
    assert f"usage: python -m smarter_fast.{name}" in out  # the command's own parser
    assert "commands:" not in out
    if hasattr(module, "build_parser"):
        assert out == module.build_parser().format_help()


def test_data_help_once_the_data_command_is_there(capsys):
    if not (PACKAGE / "data" / "__main__.py").is_file():
        pytest.skip("smarter_fast/data/__main__.py is not in this checkout yet")
    assert cli.main(["data", "--help"]) == 0
    assert "usage:" in capsys.readouterr().out


def test_data_dispatches_to_the_data_package_main_with_the_rest_of_the_line(monkeypatch):
    seen = []
    fake = types.ModuleType("smarter_fast.data.__main__")
    fake.main = lambda argv=None: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "smarter_fast.data.__main__", fake)
    assert cli.main(["data", "fetch", "--to", "x"]) == 3  # its exit status, passed on
    assert seen == [["fetch", "--to", "x"]]

    def exits(argv=None):
        sys.exit(4)
    fake.main = exits
    assert cli.main(["data", "fetch"]) == 4


def test_a_missing_command_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "smarter_fast.data.__main__", None)  # as if not there
    assert cli.main(["data", "fetch"]) == 2
    assert "the data command is not in this installation" in capsys.readouterr().err


def test_unknown_command_exits_2_with_the_commands(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "did you mean train?" in err and "ablate" in err
    assert cli.main(["--nope"]) == 2
    assert "unknown option '--nope'" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert "give a command" in capsys.readouterr().err


def test_help_command_and_version(capsys):
    assert cli.main(["help", "export"]) == 0
    assert "usage: python -m smarter_fast.export" in capsys.readouterr().out
    assert cli.main(["help"]) == 0
    assert "commands:" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"smarter_fast {importlib.import_module('smarter_fast').__version__}"


def test_a_command_s_argument_error_is_its_exit_status(capsys):
    assert cli.main(["ablate", "--data-dir", "x", "--out", "y", "--seeds", "0"]) == 2
    assert "usage: python -m smarter_fast.ablate" in capsys.readouterr().err


def test_importing_the_cli_stays_light():
    r = subprocess.run([sys.executable, "-c", "import sys, smarter_fast.cli; "
                        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                        "('smarter_fast', 'torch', 'numpy')))"],
                       env=ENV, capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['smarter_fast', 'smarter_fast.cli']"


def test_python_dash_m_smarter_fast_runs_a_command():
    r = subprocess.run([sys.executable, "-m", "smarter_fast", "--help"], env=ENV, capture_output=True,
                       text=True, timeout=120, cwd="/")
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m smarter_fast COMMAND"), r.stderr
    r = subprocess.run([sys.executable, "-m", "smarter_fast", "build", "--help"], env=ENV,
                       capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0 and "usage: python -m smarter_fast.build" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "smarter_fast", "nope"], env=ENV, capture_output=True,
                       text=True, timeout=120, cwd="/")
    assert r.returncode == 2 and "unknown command 'nope'" in r.stderr


def test_setup_declares_the_console_script():
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    entry_points = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "entry_points"))
    scripts = dict(re.fullmatch(r"\s*(\S+)\s*=\s*(\S+)\s*", s).groups() for s in entry_points["console_scripts"])
    module, _, attr = scripts["smarter-fast"].partition(":")
    target = getattr(importlib.import_module(module), attr)
    assert target is cli.main and callable(target)


def test_the_installed_script_runs_info():
    exe = shutil.which("smarter-fast")
    if exe is None:
        pytest.skip(NOT_ON_PATH)
    r = subprocess.run([exe, "info"], env={**os.environ, "SMARTER_FAST_NO_EXT": "1"}, capture_output=True,
                       text=True, timeout=600, cwd="/")
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"^attention ref available$", r.stdout, re.M), r.stdout[-2000:]
