"""The README's "Use a trained model" examples run as written: each fenced python and bash block,
in a directory holding a checkpoint at run/checkpoints/best (a tiny one) and CS224N files in data/."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Use a trained model"
SIZES = {"sst": {"train": 3, "dev": 9, "test-student": 3},
         "quora": {"train": 3, "dev": 7, "test-student": 3},
         "sts": {"train": 3, "dev": 11, "test-student": 3}}


def blocks() -> list[tuple[str, str]]:
    """(language, code) of every python and bash block of the section, in order."""
    text = (REPO / "README.md").read_text()
    assert SECTION in text, f"README.md lost its section {SECTION!r}"
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(python|bash)\n(.*?)```", body, flags=re.S)


@pytest.fixture(scope="module")
def workdir(make_tiny_run, make_head_checkpoint, tmp_path_factory):
    encoder, data = make_tiny_run(SIZES, name="tiny_readme")
    ckpt = make_head_checkpoint(encoder, "cls", "cross", "symmetric")
    root = tmp_path_factory.mktemp("readme")
    shutil.copytree(ckpt, root / "run" / "checkpoints" / "best")
    shutil.copytree(data, root / "data")
    return root


def run(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_examples_run_in_order(workdir):
    """Later blocks use what earlier ones wrote (the exports), so they run in order."""
    examples = blocks()
    assert {lang for lang, _ in examples} == {"python", "bash"}
    for n, (lang, code) in enumerate(examples, start=1):
        if lang == "python":
            r = run([sys.executable, "-c", code], workdir)
        else:
            r = run(["bash", "-euo", "pipefail", "-c", code.replace("python -m", f"{sys.executable} -m")],
                    workdir)
        assert r.returncode == 0, f"block {n} ({lang}):\n{code}\n{r.stderr[-3000:]}"
        assert r.stdout.strip(), f"block {n} ({lang}) printed nothing"
