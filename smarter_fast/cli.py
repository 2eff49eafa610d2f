"""`smarter-fast COMMAND [ARGS ...]` (the console script) and `python -m smarter_fast COMMAND
[ARGS ...]`: one entry point for the commands. Each runs the same code as
`python -m smarter_fast.<command> [ARGS ...]` (its `main(argv)`), which is imported only when it is
asked for: importing this module imports neither torch nor a command, so `--help` here is instant
and each command sets its own environment (OpenMP's, for one) before torch loads.

    smarter-fast --help                 the commands, one line each
    smarter-fast COMMAND --help         the command's own help (also: smarter-fast help COMMAND)
    smarter-fast --version

A command that is not known exits 2 with the list of commands.
"""

from __future__ import annotations

import sys

# name: (module with main(argv=None) -> int, one line of help). Adding a command: docs/design.md,
# "Adding things".
COMMANDS = {
    "train": ("smarter_fast.train", "fine-tune BERT on SST, Quora and STS, with optional SMART"),
    "evaluate": ("smarter_fast.evaluate", "dev metrics, SST confusion matrix and leaderboard files of a checkpoint"),
    "predict": ("smarter_fast.predict", "a trained model's predictions on new text"),
    "export": ("smarter_fast.export", "a checkpoint as transformers / sentence-transformers directories"),
    "ablate": ("smarter_fast.ablate", "the ablation study: configurations trained in turn, one report"),
    "info": ("smarter_fast.info", "versions, the C++ extension, and every op x backend"),
    "build": ("smarter_fast.build", "compile the C++ extension now and report what was built"),
    "selfcheck": ("smarter_fast.selfcheck", "on a CUDA machine: the CUDA tests and timings of the hot paths"),
    "data": ("smarter_fast.data.__main__", "the CS224N data (data fetch ...)"),
}


def usage(prog: str) -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {prog} COMMAND [ARGS ...]", "",
             "Fast multi-task fine-tuning of BERT encoders with SMART regularisation.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "options:", "  -h, --help  show this help and exit", "  --version   show the version and exit",
              "", f"`{prog} COMMAND --help` shows a command's options; `{prog} COMMAND ...` runs the "
              "same code as `python -m smarter_fast.COMMAND ...`."]
    return "\n".join(lines) + "\n"


def _exit_code(code) -> int:
    """The exit status Python gives `sys.exit(code)`: None -> 0, an int as it is, anything else
    printed to stderr -> 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run_command(name: str, argv: list[str], prog: str = "smarter-fast") -> int:
    """Import the command's module and return its main(argv)'s exit status (a SystemExit from
    argparse, e.g. after --help, included)."""
    import importlib
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:  # a missing dependency inside the command: its own error
            raise
        print(f"{prog}: error: the {name} command is not in this installation ({module_name} "
              "not found)", file=sys.stderr)
        return 2
    try:
        return _exit_code(module.main(argv))
    except SystemExit as e:
        return _exit_code(e.code)


def main(argv=None, prog: str = "smarter-fast") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        sys.stderr.write(usage(prog) + f"\n{prog}: error: give a command\n")
        return 2
    first, rest = argv[0], argv[1:]
    if first in ("-h", "--help"):
        sys.stdout.write(usage(prog))
        return 0
    if first == "--version":
        from . import __version__
        print(f"smarter_fast {__version__}")
        return 0
    if first == "help":  # smarter-fast help [COMMAND]
        return main(rest[:1] + ["--help"], prog)
    if first not in COMMANDS:
        import difflib
        close = difflib.get_close_matches(first, COMMANDS, n=1)
        if first.startswith("-"):
            what = f"unknown option {first!r} (a command's options go after the command)"
        else:
            what = f"unknown command {first!r}" + (f" (did you mean {close[0]}?)" if close else "")
        print(f"usage: {prog} COMMAND [ARGS ...]\n{prog}: error: {what}; the commands: "
              f"{', '.join(COMMANDS)} (see {prog} --help)", file=sys.stderr)
        return 2
    return run_command(first, rest, prog)
