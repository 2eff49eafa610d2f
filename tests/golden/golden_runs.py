"""Golden runs: train a fixed set of configurations on the CS224N data and keep their metric rows,
to prove that a refactor of the training engine changes no result.

    python tests/golden/golden_runs.py record OUT_DIR [--data-dir DIR] [--only NAME ...]
    python tests/golden/golden_runs.py compare BEFORE_DIR AFTER_DIR [--tol 1e-6]

`record` runs `python -m smarter_fast.train` from the checkout this file is in (PYTHONPATH), so a
worktree of an older commit records that commit's goldens. Every row's metric keys are compared
(timing keys excluded). Needs the real data (../shared/data/cs224n by default).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "cs224n"
COMMON = ["--limit", "200", "--epochs", "2", "--seed", "11711", "--precision", "fp32"]

CONFIGS = {
    "report": [],
    "baseline": ["--schedule", "baseline"],
    "split2": ["--schedule", "split2"],
    "smart-simple": ["--smart", "simple"],
    "smart-full-bregman": ["--smart", "full", "--smart-full-bregman"],
    "sqrt-ema-linear": ["--schedule", "sqrt", "--ema", "0.99", "--lr-schedule", "linear",
                        "--warmup-ratio", "0.1"],
    "pair-bi": ["--pair-features", "bi"],
    "pair-both": ["--pair-features", "both"],
    "layer-decay": ["--layer-decay", "0.9"],
    "label-smoothing": ["--label-smoothing", "0.1"],
    "pcgrad": ["--grad-surgery", "pcgrad"],
    "gradvac": ["--grad-surgery", "gradvac"],
    "pcgrad-smart": ["--grad-surgery", "pcgrad", "--smart", "simple"],
    # changed on purpose by the per-task swap patterns of group steps
    "pcgrad-symmetric": ["--grad-surgery", "pcgrad", "--pair-order", "symmetric"],
    "resume": ["--save-every", "10"],   # stopped by SIGTERM after step 30, then --resume
    "torchrun": [],                     # two processes, half the batch each
}
# metrics.jsonl keys that are timings (machine-dependent) or run bookkeeping, not results
TIMING = {"train_seconds", "examples_per_second", "eval_seconds", "train_minutes_total"}


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "0"}


def _train(argv, out: Path, log, torchrun=False):
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "smarter_fast.train", *argv, "--num-threads", "1"]
        env = {**_env(), "OMP_NUM_THREADS": "1"}
    else:
        cmd, env = [sys.executable, "-m", "smarter_fast.train", *argv], _env()
    return subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=log, stderr=subprocess.STDOUT)


def _global_step(out: Path) -> int:
    try:
        return json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())["global_step"]
    except (OSError, ValueError, KeyError):
        return -1


def record_one(name: str, out_root: Path, data_dir: Path) -> dict:
    out = out_root / name
    argv = ["--data-dir", str(data_dir), "--out", str(out), *COMMON, *CONFIGS[name]]
    t0 = time.time()
    with open(out_root / f"{name}.log", "w") as log:
        if name == "resume":
            proc = _train(argv, out, log)
            while _global_step(out) < 30 and proc.poll() is None:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait()
            if rc != 128 + signal.SIGTERM:
                raise SystemExit(f"{name}: the stopped run exited {rc}, expected {128 + signal.SIGTERM}")
            proc = _train([*argv, "--resume"], out, log)
        else:
            proc = _train(argv, out, log, torchrun=name == "torchrun")
        rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"{name}: exited {rc}; see {out_root / f'{name}.log'}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"{name}: {len(rows)} rows, mean_score {rows[-1]['mean_score']:.6f} "
          f"({time.time() - t0:.0f} s)", flush=True)
    return {"argv": argv, "rows": rows}


def compare(before: Path, after: Path, tol: float) -> int:
    bad = 0
    for name in CONFIGS:
        a, b = before / f"{name}.json", after / f"{name}.json"
        if not (a.is_file() and b.is_file()):
            print(f"{name}: missing ({'before' if not a.is_file() else 'after'})")
            bad += 1
            continue
        ra, rb = json.loads(a.read_text())["rows"], json.loads(b.read_text())["rows"]
        diffs = []
        if len(ra) != len(rb):
            diffs.append(f"{len(ra)} rows before, {len(rb)} after")
        for i, (x, y) in enumerate(zip(ra, rb)):
            for key in sorted((set(x) | set(y)) - TIMING):
                u, v = x.get(key, "<absent>"), y.get(key, "<absent>")
                same = (math.isclose(u, v, rel_tol=0, abs_tol=tol)
                        if isinstance(u, float) and isinstance(v, float) else u == v)
                if not same:
                    diffs.append(f"row {i + 1} {key}: {u} -> {v}")
        print(f"{name}: {'equal' if not diffs else 'DIFFERS'}")
        for d in diffs[:20]:
            print(f"    {d}")
        bad += bool(diffs)
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("out")
    r.add_argument("--data-dir", default=str(DATA))
    r.add_argument("--only", nargs="*", choices=tuple(CONFIGS))
    c = sub.add_parser("compare")
    c.add_argument("before")
    c.add_argument("after")
    c.add_argument("--tol", type=float, default=1e-6)
    a = p.parse_args(argv)
    if a.cmd == "compare":
        return compare(Path(a.before), Path(a.after), a.tol)
    out_root = Path(a.out).resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    for name in a.only or CONFIGS:
        result = record_one(name, out_root, Path(a.data_dir).resolve())
        (out_root / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
