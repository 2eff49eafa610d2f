"""A training run from a TrainConfig: data, model, optimizer and Trainer set up, trained, and the
best checkpoint evaluated into predictions. `python -m smarter_fast.train` is a thin command line
over `run` and `run_ensemble`.

Writes into config.out (default runs/<date-time>/):
  metrics.jsonl            one JSON object per epoch (dev metrics, training loss per task, speed)
  args.json                the resolved configuration (JSON, with the data directory and world size)
  config.toml              the resolved configuration as a config file: --config it to repeat the run
                           (training.config_files); --resume continues with it (training.layers)
  checkpoints/last, best   the model (save_pretrained) + train_state.pt + trainer_state.json
  predictions/             leaderboard .csv files of the best checkpoint (dev and test-student)
  plots/                   training_loss.png, dev_metrics.png, sst_confusion.png
  dev_metrics.json         dev metrics of the best checkpoint
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed
from ..data.cs224n import DataError, find_data_files, load_cs224n
from ..data.schedules import TASK_ORDER, Schedule, resolve_split_parts
from ..precision import resolve_device, resolve_precision
from .recipes import describe as describe_recipe
from .recipes import format_settings
from ..tasks import METRIC_KEYS, QUORA, SST
from .checkpoint import CheckpointError, check_format, clean_temporaries, find_last_checkpoint, find_older_checkpoint
from .config import MODEL_OPTIONS, TrainConfig
from .config_files import MEMBER_NOTE, write_config
from .trainer import Trainer

log = logging.getLogger("smarter_fast")
REPORT_LR = 1e-5  # the report's best recipe
DEMO_LR = 1e-4  # the demo data gets ~800 steps: at 1e-5 the fresh heads barely move


class UsageError(Exception):
    """A problem to report as one clean line (no traceback)."""


@dataclass
class RunSetup:
    """What a run resolved before training: where, on what, from which checkpoint."""

    out_dir: Path
    resume_dir: Path | None
    data_dir: Path
    synthetic: bool
    device: torch.device
    t_setup: float = 0.0

    @property
    def tag(self) -> str:
        return " [SYNTHETIC]" if self.synthetic else ""


# ---- setup helpers -------------------------------------------------------------------------------
class _TqdmHandler(logging.Handler):
    def emit(self, record):
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never break training
            self.handleError(record)


def setup_logging() -> None:
    if not any(isinstance(h, _TqdmHandler) for h in log.handlers):
        h = _TqdmHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def run_dir(config) -> Path:
    """--out, else runs/<date-time>/."""
    return Path(config.out) if config.out else Path("runs") / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def checkpoint_desc(path) -> str:
    if path is None:
        from ..model import default_checkpoint_dir
        try:
            return f"embedded all-MiniLM-L6-v2 ({default_checkpoint_dir()})"
        except (ModuleNotFoundError, FileNotFoundError) as e:
            raise UsageError(str(e)) from None
    return str(path)


def resolve_data_dir(arg, out_dir: Path) -> tuple[Path, str, bool]:
    """(directory, description, synthetic). Raises DataError for a bad --data-dir."""
    if arg is not None:
        find_data_files(arg)
        return Path(arg), f"CS224N data in {arg}", False
    local = Path("data")
    try:
        find_data_files(local)
        return local, f"CS224N data in ./{local}", False
    except DataError:
        pass
    from ..data.demo import write_demo_data
    directory = write_demo_data(distributed.demo_data_dir(out_dir))
    return directory, (f"SYNTHETIC demo data generated in {directory} (no --data-dir and no "
                       f"CS224N files in ./data; metrics are for the synthetic set only)"), True


def resolve_precision_of(config, device, verbose: bool = True) -> None:
    """Replace precision auto by fp32 or bf16 for `device` (smarter_fast.precision); say why."""
    config.precision_requested = config.precision_requested or config.precision
    config.precision, message = resolve_precision(config.precision_requested, device)
    if message and verbose:
        print(message, flush=True)


def model_options(config, resume_dir) -> dict:
    """{"pooling", "pair_features", "pair_order"} of the model to train (how pairs are encoded):
    on --resume the checkpoint's (a different explicit flag is an error; a recipe's default
    gives way), else the config's, else as saved in --pretrained, else cls / cross. Written back
    into the config."""
    from ..model import MultitaskBert
    try:
        if resume_dir is not None:
            options = MultitaskBert.resolve_options(resume_dir)
            for key, value in options.items():
                asked = getattr(config, key)
                if asked is not None and asked != value and key in config.model_options_from_recipe:
                    print(f"--recipe {config.recipe}'s {key.replace('_', '-')} {asked} gives way to the "
                          f"checkpoint's {value} on --resume", flush=True)
                elif asked is not None and asked != value:
                    flag = "--" + key.replace("_", "-")
                    raise UsageError(f"cannot resume from {resume_dir} with {flag} {asked}: it "
                                     f"was trained with {flag} {value}")
        else:
            options = MultitaskBert.resolve_options(config.pretrained, config.pooling, config.pair_features,
                                                    config.pair_order)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        raise UsageError(str(e)) from None
    for key, value in options.items():
        setattr(config, key, value)
    return options


# ---- the run -------------------------------------------------------------------------------------
def prepare(config: TrainConfig) -> RunSetup:
    """Process group, output directory, data directory, device, precision, seeds."""
    from .tracking import require
    require(config.report_targets())  # a missing package fails before any work
    device = distributed.init()  # torchrun: process group, this rank's device; None otherwise
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    out_dir = Path(distributed.broadcast_object(str(run_dir(config))))
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a directory")
    resume_dir = find_last_checkpoint(out_dir) if config.resume else None
    older = find_older_checkpoint(out_dir) if config.resume and resume_dir is None else None
    if older is not None:  # refused, not taken for "no checkpoint" (a fresh run would overwrite it)
        try:
            check_format(older)
        except CheckpointError as e:
            raise UsageError(f"cannot resume: {e}") from None
    try:
        data_dir, data_desc, synthetic = resolve_data_dir(config.data_dir, out_dir)
    except DataError as e:
        raise UsageError(str(e)) from None
    ck_desc = (f"{resume_dir} (resuming; started from {checkpoint_desc(config.pretrained)})"
               if resume_dir is not None else checkpoint_desc(config.pretrained))
    print(f"data: {data_desc} | checkpoint: {ck_desc}", flush=True)
    if config.lr is None:
        config.lr = DEMO_LR if synthetic else REPORT_LR
        if synthetic:
            print(f"SYNTHETIC demo recipe: --lr {DEMO_LR:g} (the report's {REPORT_LR:g} needs more "
                  f"steps than the demo has; pass --lr to choose)", flush=True)
    if config.resume and resume_dir is None:
        print(f"--resume: no checkpoint in {out_dir / 'checkpoints' / 'last'}; starting afresh", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        clean_temporaries(out_dir)
    if device is not None and config.device != "auto" and device.type != config.device:
        raise UsageError(f"--device {config.device}: torchrun gave this process {device}")
    try:
        device = device or resolve_device(config.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    resolve_precision_of(config, device, distributed.is_main())
    if config.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("--precision bf16: this GPU does not support bfloat16")
    seed_everything(config.seed)
    return RunSetup(out_dir, resume_dir, data_dir, synthetic, device, time.perf_counter())


def load_data(config: TrainConfig, setup: RunSetup):
    """(tokenizer, train data, dev data, schedule, recipe settings): read, tokenize, check."""
    from ..data.tokenize import load_tokenizer
    from ..evaluation import encode_split
    tokenizer = load_tokenizer(config.pretrained, max_length=config.max_length)
    try:
        train_split = load_cs224n(setup.data_dir, "train", limit=config.limit, strict=config.strict)
        dev_split = load_cs224n(setup.data_dir, "dev", strict=config.strict)
    except DataError as e:
        raise UsageError(str(e)) from None
    for split in (train_split, dev_split):
        empty = [t for t in TASK_ORDER if not getattr(split, t)]
        if empty:
            raise UsageError(f"no usable {split.split} examples for {', '.join(empty)} in {setup.data_dir}")
    unset = [k for k in MODEL_OPTIONS if getattr(config, k) is None]
    options = model_options(config, setup.resume_dir)
    settings = _describe_recipe(config, setup, {k: options[k] for k in unset})
    if options != {"pooling": "cls", "pair_features": "cross", "pair_order": "given"}:
        print(f"model: pooling {options['pooling']}, pair features {options['pair_features']}, "
              f"pair order {options['pair_order']}", flush=True)
    symmetric = options["pair_order"] == "symmetric"
    train_data = encode_split(train_split, tokenizer, options["pair_features"], symmetric)
    dev_data = encode_split(dev_split, tokenizer, options["pair_features"], symmetric)
    sizes = {t: len(train_data[t]) for t in TASK_ORDER}
    parts = resolve_split_parts(config.split_parts, sizes[SST.name], sizes[QUORA.name])
    schedule = Schedule(config.schedule, {t: train_data[t].lengths for t in TASK_ORDER},
                        # the global batch: each rank trains its shard, in micro-batches of --batch-size
                        config.batch_size * config.grad_accum_steps * distributed.world(),
                        seed=config.seed, parts=parts, interleave=config.interleave, epochs=config.epochs or 1)
    part_note = f", {parts} parts" if config.schedule in ("split1", "split2") else ""
    per_epoch = schedule.epoch_counts(0)
    print(f"train: {', '.join(f'{t} {sizes[t]}' for t in TASK_ORDER)} examples; "
          f"schedule {config.schedule}{part_note}{' interleaved' if config.interleave else ''}: "
          f"epoch 1 trains {' + '.join(f'{t} {per_epoch[t]}' for t in TASK_ORDER)}; "
          f"dev: {', '.join(f'{t} {len(dev_data[t])}' for t in TASK_ORDER)}", flush=True)
    return tokenizer, train_data, dev_data, schedule, settings


def _describe_recipe(config, setup, checkpoint_options: dict) -> dict:
    """Prints the recipe's settings and what flags changed; returns the settings."""
    defaults = {**TrainConfig().to_dict(), "epochs": None, "lr": DEMO_LR if setup.synthetic else REPORT_LR,
                **checkpoint_options}  # an option not asked for: the checkpoint's choice
    settings, overrides = describe_recipe(config.recipe, config, defaults)
    print(f"recipe {config.recipe}: {format_settings(settings)}"
          + ("; set by flags: " + ", ".join(f"{k.replace('_', '-')} {a} -> {b}" for k, (a, b) in overrides.items())
             if overrides else ""), flush=True)
    return settings


def build_model(config: TrainConfig, device, resume_dir=None):
    """(model, optimizer) on `device`: from the last checkpoint when resuming, else from
    --pretrained (None: the embedded checkpoint)."""
    from ..optim.lr_schedule import param_groups
    from ..model import MultitaskBert
    from ..ops import BackendUnavailableError
    from ..optim import AdamW
    src = resume_dir if resume_dir is not None else config.pretrained
    try:
        model = MultitaskBert.from_pretrained(src, dropout=config.dropout, backend=config.backend,
                                              **{k: getattr(config, k) for k in MODEL_OPTIONS})
        if config.encoder_dropout is not None:
            model.bert.set_dropout(config.encoder_dropout)
    except Exception as e:  # corrupt or foreign checkpoint (safetensors, torch.load, shapes)
        if isinstance(e, (BackendUnavailableError, ModuleNotFoundError, MemoryError)):
            raise
        where = src if src is not None else "the embedded checkpoint"
        raise UsageError(f"cannot load the checkpoint in {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    model.to(device).train()
    params = (model.parameters() if config.layer_decay == 1.0
              else param_groups(model, config.lr, config.layer_decay, config.weight_decay))
    return model, AdamW(params, lr=config.lr, weight_decay=config.weight_decay, backend=config.backend)


def run(config: TrainConfig) -> int:
    from ..report import atomic_write_json, atomic_write_text
    setup_logging()
    setup = prepare(config)
    tokenizer, train_data, dev_data, schedule, settings = load_data(config, setup)
    model, optimizer = build_model(config, setup.device, setup.resume_dir)
    trainer = Trainer(config, model, optimizer, schedule, train_data, dev_data, setup.device, setup.out_dir,
                      row_info={"recipe": config.recipe, "recipe_settings": settings}, synthetic=setup.synthetic)
    if trainer.describe():
        print(f"options: {trainer.describe()}", flush=True)
    if setup.resume_dir is not None:
        try:
            trainer.resume(setup.resume_dir)
        except CheckpointError as e:
            raise UsageError(f"cannot resume from {setup.resume_dir}: {e}") from None
    elif distributed.is_main():
        atomic_write_text(setup.out_dir / "metrics.jsonl", "")
    if distributed.is_main():
        atomic_write_json(setup.out_dir / "args.json", {
            **config.to_dict(), "data_dir": str(setup.data_dir), "synthetic_data": setup.synthetic,
            "split_parts_resolved": schedule.parts, "world_size": distributed.world()})
        member = config.ensemble > 1  # one member of run_ensemble: recorded as a run of its own
        write_config(setup.out_dir, config.replace(ensemble=1) if member else config, MEMBER_NOTE if member else "")
    print(f"setup {time.perf_counter() - setup.t_setup:.1f}s; device {setup.device}, precision {config.precision}, "
          f"backend {config.backend}, lr {config.lr:g}, smart {config.smart}"
          + (f" (sigma {config.smart_sigma}, lambda {config.smart_lambda})" if config.smart == "simple" else "")
          + f"; writing to {setup.out_dir}", flush=True)
    last_epoch = trainer.fit()
    if distributed.is_main():
        final_evaluation(trainer, tokenizer, setup, last_epoch)
    return 0


def final_evaluation(trainer: Trainer, tokenizer, setup: RunSetup, last_epoch) -> dict:
    """Predictions and the confusion matrix of the best checkpoint (rank 0)."""
    from ..evaluation import format_class_metrics, write_evaluation
    from ..model import MultitaskBert
    from ..report import format_metrics
    config, best_dir = trainer.config, trainer.ck_dir / "best"
    if not (best_dir / "model.safetensors").is_file():
        raise UsageError(f"no best checkpoint in {best_dir}")
    # the weights in memory are the best ones when no step was taken since the best evaluation
    if trainer.best_in_memory is not None and trainer.best_in_memory[0] == trainer.progress.global_step:
        best_model = trainer.ema.model if trainer.ema is not None else trainer.model
        dev_result = trainer.best_in_memory[1]
    else:
        best_model = MultitaskBert.from_pretrained(best_dir, backend=config.backend).to(setup.device)
        dev_result = None
    final = write_evaluation(best_model, tokenizer, setup.data_dir, setup.out_dir, config.eval_batch_size,
                             setup.device, trainer.autocast_dtype, dev=trainer.dev_data, title_suffix=setup.tag,
                             dev_result=dev_result)
    best = trainer.record.best
    print(f"best epoch {best['epoch']}{setup.tag}: {format_metrics(final)}  {format_class_metrics(final)}",
          flush=True)
    print(f"outputs: {setup.out_dir / 'metrics.jsonl'}, {best_dir}, {setup.out_dir / 'predictions'}, "
          f"{setup.out_dir / 'plots'}", flush=True)
    return final


def run_ensemble(config: TrainConfig) -> int:
    """--ensemble K: the members, each a whole `run` of its own in OUT/memberI (seed + I - 1,
    budget / K), then their best checkpoints evaluated together (evaluation.Ensemble: raw outputs
    averaged) into OUT: dev_metrics.json, predictions/, plots/ and ensemble.json (the members'
    own dev metrics beside the ensemble's)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--ensemble trains its members one after another; run it without torchrun")
    k, out_dir, members = config.ensemble, run_dir(config), []
    write_config(out_dir, config)  # what --resume continues; rewritten resolved after the members
    for i in range(k):
        member = config.replace(seed=config.seed + i, out=str(out_dir / f"member{i + 1}"),
                                time_budget=None if config.time_budget is None else config.time_budget / k)
        budget = f", {member.time_budget:g} min of training" if member.time_budget is not None else ""
        print(f"== ensemble member {i + 1}/{k}: seed {member.seed}{budget}, in {member.out}", flush=True)
        rc = run(member)
        if rc:
            return rc
        members.append(Path(member.out))
        config.precision, config.precision_requested = member.precision, member.precision_requested
    write_config(out_dir, config.replace(lr=member.lr, **{k: getattr(member, k) for k in MODEL_OPTIONS}))
    return evaluate_ensemble(config, out_dir, members)


def evaluate_ensemble(config: TrainConfig, out_dir: Path, members: list[Path]) -> int:
    from ..data.tokenize import load_tokenizer
    from ..evaluation import Ensemble, format_class_metrics, write_evaluation
    from ..model import MultitaskBert
    from ..report import atomic_write_json, format_metrics
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data_dir, _, synthetic = resolve_data_dir(config.data_dir, out_dir)
    models = [MultitaskBert.from_pretrained(m / "checkpoints" / "best", backend=config.backend).to(device)
              for m in members]
    tag, k = " [SYNTHETIC]" if synthetic else "", len(members)
    final = write_evaluation(Ensemble(models), load_tokenizer(config.pretrained, max_length=config.max_length),
                             data_dir, out_dir, config.eval_batch_size, device,
                             torch.bfloat16 if config.precision == "bf16" else None,
                             title_suffix=f" (ensemble of {k}){tag}")
    member_metrics = [json.loads((m / "dev_metrics.json").read_text()) for m in members]
    keys = (*METRIC_KEYS, "mean_score")
    atomic_write_json(out_dir / "ensemble.json", {
        "members": [{"dir": str(m), "seed": config.seed + i, **{key: mm[key] for key in keys}}
                    for i, (m, mm) in enumerate(zip(members, member_metrics))],
        **{key: final[key] for key in keys}})
    for i, mm in enumerate(member_metrics):
        print(f"member {i + 1}{tag}: {format_metrics(mm)}", flush=True)
    print(f"ensemble of {k}{tag}: {format_metrics(final)}  {format_class_metrics(final)}", flush=True)
    print(f"outputs: {out_dir / 'dev_metrics.json'}, {out_dir / 'predictions'}, {out_dir / 'ensemble.json'}",
          flush=True)
    return 0


__all__ = ["DEMO_LR", "REPORT_LR", "RunSetup", "UsageError", "build_model", "final_evaluation", "load_data",
           "prepare", "run", "run_dir", "run_ensemble"]
