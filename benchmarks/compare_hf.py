"""Dev quality per epoch: this package's trainer against a plain Hugging Face pipeline, over seeds.

    python benchmarks/compare_hf.py --data-dir ../shared/data/cs224n --seeds 3 --epochs 2 \
        [--limit N] [--split-parts 2] [--out DIR] [--only ours|hf] [--num-threads N]

For every seed S (0, 1, ... unless --first-seed), two runs:

- ours: `python -m smarter_fast.train --data-dir DIR --epochs E --batch-size 8 --lr 1e-5
  --schedule split1 --split-parts P --seed S --precision fp32 --out OUT/ours/seedS [--limit N]
  [--num-threads N] [--pretrained CKPT] [--ours-args ...]` in a subprocess; its dev metrics are
  the epoch rows of OUT/ours/seedS/metrics.jsonl.
- hf: the plain pipeline of the issue, written out below (`HFPipeline`): `transformers.BertModel`
  from the same checkpoint (default: the package's embedded all-MiniLM-L6-v2, found by
  `smarter_fast.model.checkpoint.default_checkpoint_dir`), the [CLS] pooler output into three
  `nn.Linear` heads with PyTorch's default init (SST 5, Quora 1, STS 1), cross-entropy /
  BCE-with-logits / MSE, `torch.optim.AdamW(lr, eps=1e-6, weight_decay=0.01)` over every
  parameter, random batches of 8 padded to the batch's longest sequence, pairs as one sequence
  `[CLS] s1 [SEP] s2 [SEP]` with token types (max length 128, longest-first truncation), Quora
  cut once into P shuffled parts and part e mod P trained in epoch e, tasks one after the other
  (SST, Quora, STS), dev evaluation after every epoch (SST accuracy, Quora accuracy at sigmoid >
  0.5, STS Pearson r, their mean). The CS224N files are parsed by
  `smarter_fast.data.cs224n.load_cs224n` (parsing only: the same rows as ours, `--limit` the
  first N of each training file); tokenization is `transformers.BertTokenizerFast.from_pretrained`
  on the checkpoint directory (its vocab.txt / tokenizer.json), not the package's tokenizer.
  Seeded (python, numpy, torch; the data order from its own numpy generators): the same seed
  gives the same run on the same machine and thread count.

Then the per-epoch dev metrics, mean +- sample sd over the seeds present, side by side (rows:
epoch; columns: ours and hf for sst, quora, sts, mean), and the wall time per run, are printed
and written to OUT/summary.json and OUT/summary.md (with the CPU model, torch and transformers
versions). Each run's results go to OUT/<system>/seed<S>/result.json; a rerun with the same
--out reuses every finished run whose settings match (so a long comparison can be stopped and
continued; an unfinished run of ours continues from its last checkpoint with --resume, one of hf
starts over) and refuses results made with other settings unless --force. Run
`python -m smarter_fast.build` first: a run of ours that compiles the C++ kernels (cold build
cache) is flagged, its wall time includes the build.

One change at a time: --ours-args passes flags to our trainer (e.g. "--weight-decay 0.01"); the
hf pipeline's --hf-weight-decay, --hf-eps, --hf-batching random|length (length: length-bucketed
batches as ours makes them: pools of 50 batches sorted by length, the batch order shuffled) and
--hf-dropout-on-heads default to the pipeline described above.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

# As `python -m smarter_fast.train` sets them before torch loads, so both systems run alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # smarter_fast from this checkout (data parsing, checkpoint location)
    sys.path.insert(0, str(REPO))

SYSTEMS = ("ours", "hf")

from smarter_fast import tasks as registry  # noqa: E402  (names, file columns and metric keys only)

# The registry's names and keys (tests/test_tasks.py: no second spelling of a task string): SST,
# Quora, STS in its order; each task's kind (classification / binary / regression) picks the
# plain pipeline's loss and metric below.
TASKS = registry.TASK_NAMES
SPEC = {t.name: t for t in registry.TASKS}
QUORA = registry.QUORA.name
METRICS = (*registry.METRIC_KEYS, "mean_score")
SHORT = {**{t.metric_key: t.name for t in registry.TASKS}, "mean_score": "mean"}
RESULT = "result.json"


# ---- the machine -----------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(num_threads: int | None) -> dict:
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "transformers": tf_version, "python": platform.python_version(), "platform": platform.platform(),
            "num_threads": num_threads or torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "commit": commit}


# ---- arguments --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/compare_hf.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", required=True, help="CS224N data directory")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are FIRST, FIRST+1, ...")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="first N rows of each training file")
    p.add_argument("--split-parts", type=int, default=2, help="Quora parts (one per epoch)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--pretrained", default=None,
                   help="BERT checkpoint directory for both systems (default: the package's embedded one)")
    p.add_argument("--out", default="runs/compare-hf", help="output directory (results reused from here)")
    p.add_argument("--only", choices=SYSTEMS, default=None, help="run one system (the summary shows both)")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads of both systems")
    p.add_argument("--force", action="store_true", help="rerun runs whose results exist")
    p.add_argument("--ours-args", default="", help="extra flags for python -m smarter_fast.train (one string)")
    p.add_argument("--hf-weight-decay", type=float, default=0.01, help="torch.optim.AdamW weight_decay")
    p.add_argument("--hf-eps", type=float, default=1e-6, help="torch.optim.AdamW eps")
    p.add_argument("--hf-batching", choices=("random", "length"), default="random",
                   help="random batches, or length-bucketed ones (pools of 50 batches sorted by length)")
    p.add_argument("--hf-dropout-on-heads", type=float, default=0.0, help="dropout on the pooled vector")
    p.add_argument("--max-length", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--eval-batch-size", type=int, default=64, help=argparse.SUPPRESS)
    return p


def checkpoint_dir(pretrained) -> Path:
    if pretrained is not None:
        return Path(pretrained).resolve()
    from smarter_fast.model.checkpoint import default_checkpoint_dir
    return default_checkpoint_dir()


def common_settings(args) -> dict:
    """What both systems share; a stored result is reused only when these (and its own) match."""
    return {"data_dir": str(Path(args.data_dir).resolve()), "epochs": args.epochs, "limit": args.limit,
            "split_parts": args.split_parts, "batch_size": args.batch_size, "lr": args.lr,
            "pretrained": str(checkpoint_dir(args.pretrained))}


def run_settings(args, system: str, seed: int) -> dict:
    s = {**common_settings(args), "system": system, "seed": seed}
    if system == "ours":
        s["ours_args"] = shlex.split(args.ours_args)
    else:
        s.update(weight_decay=args.hf_weight_decay, eps=args.hf_eps, batching=args.hf_batching,
                 dropout_on_heads=args.hf_dropout_on_heads, max_length=args.max_length)
    return s


# ---- ours: the package's command line in a subprocess ----------------------------------------------
_BAR = re.compile(r"\d+%\|| \d+/\d+ \[|ex/s\]")


def ours_command(args, seed: int, run_dir: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "smarter_fast.train", "--data-dir", str(Path(args.data_dir).resolve()),
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", repr(args.lr),
           "--schedule", "split1", "--split-parts", str(args.split_parts), "--seed", str(seed),
           "--precision", "fp32", "--out", str(run_dir)]
    if args.limit is not None:
        cmd += ["--limit", str(args.limit)]
    if args.num_threads:
        cmd += ["--num-threads", str(args.num_threads)]
    if args.pretrained is not None:
        cmd += ["--pretrained", str(checkpoint_dir(args.pretrained))]
    cmd += shlex.split(args.ours_args)
    if resume:
        cmd.append("--resume")
    return cmd


def ours_epoch_rows(run_dir: Path) -> list[dict]:
    """The end-of-epoch rows of metrics.jsonl (rows of --eval-every carry epoch_end False)."""
    file = run_dir / "metrics.jsonl"
    if not file.is_file():
        return []
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    out = []
    for r in rows:
        if r.get("epoch_end", True):
            out.append({"epoch": r["epoch"], **{k: r[k] for k in METRICS},
                        "train_seconds": r.get("train_seconds"), "eval_seconds": r.get("eval_seconds"),
                        **{f"train_loss_{t}": r.get(f"train_loss_{t}") for t in TASKS},
                        **{f"train_examples_{t}": r.get(f"train_examples_{t}") for t in TASKS}})
    return out


def run_ours(args, seed: int, run_dir: Path, settings: dict) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    partial = run_dir / "attempts.json"  # wall time of every attempt (a resumed run sums them)
    attempts = json.loads(partial.read_text()) if partial.is_file() else []
    resume = (run_dir / "checkpoints" / "last").is_dir()
    cmd = ours_command(args, seed, run_dir, resume)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    print(f"[ours seed {seed}] {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0 = time.perf_counter()
    log = open(run_dir / "train.log", "ab")
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail: list[str] = []
    built = False
    try:
        for raw in proc.stdout:
            log.write(raw)
            text = raw.decode("utf-8", "replace").rstrip("\n").split("\r")[-1].strip()
            built = built or "compiling the C++ kernels" in text
            if text and not _BAR.search(text):
                print(f"  [ours seed {seed}] {text}", flush=True)
                tail = (tail + [text])[-20:]
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        attempts.append({"wall_seconds": time.perf_counter() - t0, "rc": None})
        partial.write_text(json.dumps(attempts))
        raise
    finally:
        log.close()
    wall = time.perf_counter() - t0
    attempts.append({"wall_seconds": wall, "rc": rc, "resumed": resume, "extension_build": built})
    partial.write_text(json.dumps(attempts))
    rows = ours_epoch_rows(run_dir)
    if rc != 0 or len(rows) < args.epochs:
        raise RuntimeError(f"ours seed {seed}: exit code {rc}, {len(rows)} of {args.epochs} epochs in "
                           f"{run_dir / 'metrics.jsonl'}; log: {run_dir / 'train.log'}, ending:\n    " + "\n    ".join(tail[-5:]))
    return {"settings": settings, "command": cmd, "epochs": rows[:args.epochs],
            "wall_seconds": sum(a["wall_seconds"] for a in attempts), "attempts": attempts,
            "extension_build": any(a.get("extension_build") for a in attempts)}


# ---- hf: the plain transformers pipeline ------------------------------------------------------------
def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class HFPipeline:
    """transformers.BertModel + three Linear heads on the pooler output, trained as the issue
    describes. `batching` random | length; `dropout_on_heads` on the pooled vector."""

    def __init__(self, ckpt: Path, seed: int, lr: float, batch_size: int, split_parts: int, weight_decay: float,
                 eps: float, batching: str, dropout_on_heads: float, max_length: int, eval_batch_size: int):
        import transformers
        from transformers import BertModel, BertTokenizerFast
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.seed, self.batch_size, self.parts, self.batching = seed, batch_size, split_parts, batching
        self.max_length, self.eval_batch_size = max_length, eval_batch_size
        seed_all(seed)
        # BertTokenizerFast(vocab_file=...) silently ignores the file in transformers 5; from_pretrained reads it.
        self.tokenizer = BertTokenizerFast.from_pretrained(str(ckpt))
        vocab = (ckpt / "vocab.txt").read_text(encoding="utf-8").splitlines()
        if self.tokenizer.vocab_size != len(vocab) or self.tokenizer.cls_token_id != vocab.index("[CLS]"):
            raise RuntimeError(f"the transformers tokenizer of {ckpt} does not use its vocab.txt")
        self.bert = BertModel.from_pretrained(str(ckpt))  # with the pooler; comes in eval mode
        H = self.bert.config.hidden_size
        seed_all(seed)  # the heads' init and the dropout masks: whatever loading drew
        self.drop = nn.Dropout(dropout_on_heads)
        self.heads = nn.ModuleDict({t: nn.Linear(H, SPEC[t].num_outputs) for t in TASKS})  # 5, 1, 1
        params = list(self.bert.parameters()) + list(self.heads.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=weight_decay)
        self.data_rng = np.random.default_rng([seed, 0xDA7A])

    # -- data
    def encode(self, split) -> dict:
        """{task: (ids, type_ids, labels)} of a CS224NSplit."""
        out = {}
        for task in TASKS:
            examples = getattr(split, task)
            if not SPEC[task].is_pair:
                enc = self.tokenizer([e.sentence for e in examples], truncation=True, max_length=self.max_length)
            else:
                enc = self.tokenizer([e.sentence1 for e in examples], [e.sentence2 for e in examples],
                                     truncation=True, max_length=self.max_length)
            kind = SPEC[task].kind
            labels = np.asarray([e.label for e in examples], dtype=np.int64 if kind == "classification" else np.float32)
            out[task] = (enc["input_ids"], enc["token_type_ids"], labels)
        return out

    def pad(self, ids, type_ids, indices) -> dict:
        n = max(len(ids[i]) for i in indices)
        input_ids = torch.full((len(indices), n), self.tokenizer.pad_token_id, dtype=torch.long)
        types = torch.zeros((len(indices), n), dtype=torch.long)
        mask = torch.zeros((len(indices), n), dtype=torch.long)
        for row, i in enumerate(indices):
            k = len(ids[i])
            input_ids[row, :k] = torch.tensor(ids[i])
            types[row, :k] = torch.tensor(type_ids[i])
            mask[row, :k] = 1
        return {"input_ids": input_ids, "token_type_ids": types, "attention_mask": mask}

    def batches(self, indices: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
        order = self.data_rng.permutation(indices)
        b = self.batch_size
        if self.batching == "random":
            return [order[i:i + b] for i in range(0, len(order), b)]
        pool, out = 50 * b, []
        for start in range(0, len(order), pool):
            chunk = order[start:start + pool]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            out += [chunk[i:i + b] for i in range(0, len(chunk), b)]
        return [out[i] for i in self.data_rng.permutation(len(out))]

    # -- model
    def forward(self, task: str, batch: dict) -> torch.Tensor:
        pooled = self.bert(**batch).pooler_output
        out = self.heads[task](self.drop(pooled))
        return out if SPEC[task].num_outputs > 1 else out.squeeze(-1)

    @staticmethod
    def loss(task: str, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        kind = SPEC[task].kind
        if kind == "classification":  # SST
            return F.cross_entropy(out, labels)
        if kind == "binary":  # Quora
            return F.binary_cross_entropy_with_logits(out, labels)
        return F.mse_loss(out, labels)  # STS

    def train_epoch(self, train: dict, quora_parts: list, epoch: int) -> dict:
        self.bert.train()
        self.heads.train()
        self.drop.train()
        stats, real, padded = {}, 0, 0
        t0 = time.perf_counter()
        for task in TASKS:
            ids, type_ids, labels = train[task]
            lengths = np.asarray([len(x) for x in ids])
            indices = quora_parts[epoch % len(quora_parts)] if task == QUORA else np.arange(len(ids))
            total, n = 0.0, 0
            for idx in self.batches(indices, lengths):
                batch = self.pad(ids, type_ids, idx)
                y = torch.from_numpy(labels[idx])
                loss = self.loss(task, self.forward(task, batch), y)
                loss.backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                total += float(loss.detach()) * len(idx)
                n += len(idx)
                real += int(batch["attention_mask"].sum())
                padded += batch["attention_mask"].numel()
            stats[f"train_loss_{task}"] = total / n if n else None
            stats[f"train_examples_{task}"] = n
        stats["train_seconds"] = time.perf_counter() - t0
        stats["padding_fraction"] = 1 - real / padded if padded else 0.0
        return stats

    @torch.no_grad()
    def evaluate(self, dev: dict) -> dict:
        self.bert.eval()
        self.heads.eval()
        self.drop.eval()
        scores = {}
        for task in TASKS:
            ids, type_ids, labels = dev[task]
            order = np.argsort([len(x) for x in ids], kind="stable")  # little padding, same outputs
            k = SPEC[task].num_outputs
            outs = np.zeros((len(ids), k) if k > 1 else (len(ids),), dtype=np.float64)
            for start in range(0, len(order), self.eval_batch_size):
                idx = order[start:start + self.eval_batch_size]
                outs[idx] = self.forward(task, self.pad(ids, type_ids, idx)).double().numpy()
            kind, key = SPEC[task].kind, SPEC[task].metric_key
            if kind == "classification":  # SST accuracy
                scores[key] = float((outs.argmax(-1) == labels).mean())
            elif kind == "binary":  # Quora accuracy, sigmoid > 0.5
                scores[key] = float(((1 / (1 + np.exp(-outs)) > 0.5) == (labels > 0.5)).mean())
            else:  # STS Pearson r
                x, y = outs - outs.mean(), labels.astype(np.float64) - labels.mean()
                den = math.sqrt(float((x * x).sum() * (y * y).sum()))
                scores[key] = float((x * y).sum() / den) if den > 0 else 0.0
        scores["mean_score"] = sum(scores[t.metric_key] for t in registry.TASKS) / len(registry.TASKS)
        return scores


def same_tokens_as_package(ckpt: Path, max_length: int, splits: dict) -> dict:
    """A check, not part of the pipeline: per split and task, how many examples the transformers
    tokenizer encodes differently (ids or token types) from the package's tokenizer (0: the two
    systems train and evaluate on the same token sequences)."""
    from smarter_fast.data.tokenize import encode_pairs, encode_sentences, load_tokenizer
    tok = load_tokenizer(ckpt, max_length=max_length)
    out = {}
    for name, (split, encoded) in splits.items():
        for task in TASKS:
            examples = getattr(split, task)
            if not SPEC[task].is_pair:
                ids, types = encode_sentences(tok, [e.sentence for e in examples])
            else:
                ids, types = encode_pairs(tok, [e.sentence1 for e in examples], [e.sentence2 for e in examples])
            hf_ids, hf_types, _ = encoded[task]
            out[f"{name}_{task}"] = sum(1 for a, b, c, d in zip(ids, hf_ids, types, hf_types)
                                        if list(a) != list(b) or list(c) != list(d))
    return out


def run_hf(args, seed: int, run_dir: Path, settings: dict) -> dict:
    from smarter_fast.data.cs224n import load_cs224n
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    t0 = time.perf_counter()
    pipe = HFPipeline(checkpoint_dir(args.pretrained), seed, args.lr, args.batch_size, args.split_parts,
                      args.hf_weight_decay, args.hf_eps, args.hf_batching, args.hf_dropout_on_heads,
                      args.max_length, args.eval_batch_size)
    train_split = load_cs224n(args.data_dir, "train", limit=args.limit)
    dev_split = load_cs224n(args.data_dir, "dev")
    train, dev = pipe.encode(train_split), pipe.encode(dev_split)
    token_check = same_tokens_as_package(checkpoint_dir(args.pretrained), args.max_length,
                                         {"train": (train_split, train), "dev": (dev_split, dev)})
    n_quora = len(train[QUORA][0])
    perm = np.random.default_rng([seed, 0x5917]).permutation(n_quora)
    quora_parts = np.array_split(perm, args.split_parts)
    print(f"[hf seed {seed}] train: " + ", ".join(f"{t} {len(train[t][0])}" for t in TASKS)
          + f"; quora in {args.split_parts} parts; batching {args.hf_batching}; AdamW eps {args.hf_eps:g} "
            f"weight decay {args.hf_weight_decay:g}; attention {pipe.bert.config._attn_implementation}; "
            f"examples tokenized unlike ours: {sum(token_check.values())}", flush=True)
    rows = []
    for epoch in range(args.epochs):
        stats = pipe.train_epoch(train, quora_parts, epoch)
        t_eval = time.perf_counter()
        metrics = pipe.evaluate(dev)
        row = {"epoch": epoch + 1, **metrics, **stats, "eval_seconds": time.perf_counter() - t_eval}
        rows.append(row)
        print(f"  [hf seed {seed}] epoch {epoch + 1}/{args.epochs}: "
              + " ".join(f"{SHORT[k]} {row[k]:.4f}" for k in METRICS)
              + " | loss " + " ".join(f"{t} {row[f'train_loss_{t}']:.3f}" for t in TASKS)
              + f" | train {row['train_seconds']:.1f}s, eval {row['eval_seconds']:.1f}s, "
                f"padding {row['padding_fraction']:.0%}", flush=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"settings": settings, "epochs": rows, "wall_seconds": time.perf_counter() - t0,
            "tokenizer": "transformers.BertTokenizerFast.from_pretrained(checkpoint)",
            "attn_implementation": pipe.bert.config._attn_implementation,
            "examples_tokenized_unlike_ours": token_check}


# ---- runs, reuse and the summary -------------------------------------------------------------------
class SettingsMismatch(RuntimeError):
    pass


def load_result(file: Path, settings: dict | None) -> dict | None:
    """A stored result, checked against `settings` (None: any)."""
    if not file.is_file():
        return None
    result = json.loads(file.read_text())
    if settings is not None and result.get("settings") != settings:
        theirs = result.get("settings", {})
        diff = {k: (theirs.get(k), v) for k, v in settings.items() if theirs.get(k) != v}
        raise SettingsMismatch(f"{file} was made with other settings {diff} (stored, asked); use another "
                               f"--out, or --force to redo it")
    return result


def run_one(args, system: str, seed: int, out: Path, machine: dict) -> tuple[dict | None, bool]:
    """(result, reused)."""
    run_dir = out / system / f"seed{seed}"
    settings = run_settings(args, system, seed)
    file = run_dir / RESULT
    if not args.force:
        result = load_result(file, settings)
        if result is not None:
            return result, True
    elif file.is_file():
        file.unlink()
        if system == "ours":  # a fresh run, not a resumed one
            import shutil
            for name in ("checkpoints", "attempts.json", "metrics.jsonl"):
                path = run_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    result = (run_ours if system == "ours" else run_hf)(args, seed, run_dir, settings)
    result.update(system=system, seed=seed, started=started,
                  finished=datetime.datetime.now().isoformat(timespec="seconds"),
                  machine={k: machine[k] for k in ("cpu_model", "torch", "transformers", "num_threads", "commit")})
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(file)
    print(f"[{system} seed {seed}] done in {result['wall_seconds']:.1f}s: "
          + " | ".join(f"epoch {r['epoch']} " + " ".join(f"{SHORT[k]} {r[k]:.4f}" for k in METRICS)
                       for r in result["epochs"]), flush=True)
    return result, False


def mean_sd(values: list[float]) -> dict:
    values = [float(v) for v in values if v is not None]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def fmt(cell: dict, digits: int = 3) -> str:
    if not cell or cell["n"] == 0:
        return "-"
    sd = "n/a" if cell["sd"] is None else f"{cell['sd']:.{digits}f}"
    return f"{cell['mean']:.{digits}f} ± {sd}"


def summarize(results: dict, epochs: int) -> dict:
    """results: {system: {seed: result}} -> per-epoch mean/sd of each metric, and wall times."""
    table = []
    for e in range(1, epochs + 1):
        row = {"epoch": e}
        for system in SYSTEMS:
            runs = [r for r in results.get(system, {}).values() if len(r["epochs"]) >= e]
            row[system] = {k: mean_sd([r["epochs"][e - 1][k] for r in runs]) for k in METRICS}
            row[system]["seeds"] = sorted(r["seed"] for r in runs)
        table.append(row)
    timing = {}
    for system in SYSTEMS:
        runs = list(results.get(system, {}).values())
        timing[system] = {
            "runs": len(runs), "wall_seconds": mean_sd([r["wall_seconds"] for r in runs]),
            "train_seconds_per_epoch": mean_sd([x["train_seconds"] for r in runs for x in r["epochs"]]),
            "eval_seconds_per_epoch": mean_sd([x["eval_seconds"] for r in runs for x in r["epochs"]]),
            "per_run": {str(r["seed"]): r["wall_seconds"] for r in runs},
            "with_extension_build": sorted(r["seed"] for r in runs if r.get("extension_build"))}
    return {"epochs": table, "timing": timing}


def markdown(summary: dict, machine: dict, settings: dict, args) -> str:
    lines = ["# Dev metrics per epoch: ours vs a plain Hugging Face pipeline", "",
             f"Machine: {machine['cpu_model']} ({machine['cpu_count']} CPUs), torch {machine['torch']}, "
             f"transformers {machine['transformers']}, {machine['num_threads']} threads, commit {machine['commit']}.",
             f"Settings: {json.dumps(settings)}; ours-args {args.ours_args!r}; hf: weight decay "
             f"{args.hf_weight_decay:g}, eps {args.hf_eps:g}, batching {args.hf_batching}, dropout on heads "
             f"{args.hf_dropout_on_heads:g}.",
             "Cells: mean ± sample sd over the seeds present (n/a with one seed).", ""]
    head = ["epoch"] + [f"{SHORT[k]} {s}" for k in METRICS for s in SYSTEMS] + ["seeds ours", "seeds hf"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary["epochs"]:
        cells = [str(row["epoch"])] + [fmt(row[s][k]) for k in METRICS for s in SYSTEMS]
        cells += [",".join(map(str, row[s]["seeds"])) or "-" for s in SYSTEMS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| system | runs | wall s per run | train s per epoch | eval s per epoch |", "|---|---|---|---|---|"]
    for s in SYSTEMS:
        t = summary["timing"][s]
        lines.append(f"| {s} | {t['runs']} | {fmt(t['wall_seconds'], 1)} | {fmt(t['train_seconds_per_epoch'], 1)} | "
                     f"{fmt(t['eval_seconds_per_epoch'], 1)} |")
    built = summary["timing"]["ours"]["with_extension_build"]
    if built:
        lines += ["", f"Note: the wall time of ours for seed(s) {', '.join(map(str, built))} includes compiling "
                      f"the C++ kernels (a cold build cache; `python -m smarter_fast.build` beforehand avoids it)."]
    lines += ["", "Wall time of ours is the whole command (python and torch start-up, setup, checkpoints, the "
                  "final predictions on dev and test included); of hf, loading the model, tokenizing, training "
                  "and the dev evaluations (transformers imported beforehand)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.seeds < 1 or args.epochs < 1 or args.split_parts < 1:
        raise SystemExit("--seeds, --epochs and --split-parts must be >= 1")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    machine = machine_info(args.num_threads)
    print(f"machine: {machine['cpu_model']} ({machine['cpu_count']} CPUs); torch {machine['torch']}; "
          f"transformers {machine['transformers']}; threads {machine['num_threads']}; commit {machine['commit']}",
          flush=True)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    systems = [args.only] if args.only else list(SYSTEMS)
    if "hf" in systems:
        __import__("transformers")  # imported once, outside the runs' wall time
    results = {s: {} for s in SYSTEMS}
    failures, reused = [], []
    for seed in seeds:
        for system in SYSTEMS:
            if system in systems:
                try:
                    result, was_reused = run_one(args, system, seed, out, machine)
                except SettingsMismatch as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 2
                except Exception as e:  # noqa: BLE001 - one failed run leaves the others to finish
                    print(f"[{system} seed {seed}] FAILED: {e}", file=sys.stderr, flush=True)
                    failures.append(f"{system} seed {seed}")
                    continue
                if was_reused:
                    reused.append(f"{system} seed {seed}")
            else:  # the other system's finished runs, when there are any
                try:
                    result = load_result(out / system / f"seed{seed}" / RESULT, run_settings(args, system, seed))
                except SettingsMismatch as e:
                    print(f"note: not shown: {e}", file=sys.stderr)
                    result = None
            if result is not None:
                results[system][seed] = result
    if reused:
        print(f"reused finished runs: {', '.join(reused)}", flush=True)
    summary = summarize(results, args.epochs)
    settings = common_settings(args)
    doc = {"machine": machine, "settings": settings, "seeds": seeds,
           "ours_args": args.ours_args,
           "hf": {"weight_decay": args.hf_weight_decay, "eps": args.hf_eps, "batching": args.hf_batching,
                  "dropout_on_heads": args.hf_dropout_on_heads},
           "summary": summary, "failures": failures, "reused": reused,
           "runs": {s: {str(k): {"epochs": v["epochs"], "wall_seconds": v["wall_seconds"]}
                        for k, v in results[s].items()} for s in SYSTEMS}}
    (out / "summary.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown(summary, machine, settings, args)
    (out / "summary.md").write_text(md)
    print()
    print(md, end="")
    print(f"\nwritten: {out / 'summary.json'}, {out / 'summary.md'}", flush=True)
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
