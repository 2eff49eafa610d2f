"""`TrainConfig`: every option of a training run, typed and validated once.

The command line (`smarter_fast.train`) turns its flags into a TrainConfig; everything below it
(the Trainer, its components, the loss) reads this object, never the argparse Namespace. A config
is complete: defaults < recipe < config file < flags have been applied before it is made
(smarter_fast.training.config_files reads and writes config files).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from ..data.schedules import SAMPLERS, SCHEDULES
from ..optim.lr_schedule import LR_SCHEDULES
from ..precision import PRECISIONS
from ..regularizers.smart import SMART_MODES
from ..regularizers.surgery import SURGERIES

DEFAULT_EPOCHS = 10
BACKENDS = ("auto", "ref", "cpp", "triton")
DEVICES = ("auto", "cpu", "cuda")
REPORT_TO = ("none", "csv", "tensorboard")
MODEL_OPTIONS = ("pooling", "pair_features", "pair_order")
# Fields that record how options were resolved, not options: no config file reads or writes them.
BOOKKEEPING = ("precision_requested", "model_options_from_recipe")
# Where a run is, not what it is: a config file may set them, a run's config.toml leaves them out.
LOCATION = ("out", "resume")
# The options that may change when a run is continued (--resume): how long it trains, how often it
# saves or evaluates, and how it runs on this machine (none changes what a training step computes);
# and ema, whose average the engine starts afresh when a resumed run adds it. Every other explicit
# option must equal the run's OUT/config.toml (smarter_fast.training.layers). Names that are not
# (yet) fields are ignored: options added elsewhere under these names are changeable once they exist.
CHANGEABLE_ON_RESUME = ("epochs", "time_budget", "save_every", "num_threads", "eval_batch_size",
                        "max_nonfinite", "backend", "ema",
                        "max_steps", "eval_every", "report_to", "device")


class ConfigError(ValueError):
    """An invalid combination of options (the message names the flags)."""


@dataclass
class TrainConfig:
    # data and model
    data_dir: str | None = None
    pretrained: str | None = None
    limit: int | None = None
    max_length: int = 128
    pooling: str | None = None  # None: the checkpoint's (resolved at setup)
    pair_features: str | None = None
    pair_order: str | None = None
    strict: bool = False
    # training
    recipe: str = "report"
    epochs: int | None = DEFAULT_EPOCHS
    time_budget: float | None = None  # minutes of training
    batch_size: int = 8
    eval_batch_size: int = 64
    lr: float | None = None  # None: 1e-5 (the report's), 1e-4 on the synthetic demo data
    weight_decay: float = 0.0
    schedule: str = "split1"
    split_parts: int | str = "auto"
    interleave: bool = False
    dropout: float = 0.0
    label_smoothing: float = 0.0
    ensemble: int = 1
    ema: float = 0.0
    encoder_dropout: float | None = None  # None: the checkpoint's hidden and attention dropout
    # trainer knobs (off or neutral by default: the report's recipe is unchanged)
    max_grad_norm: float | None = None  # None: no clipping
    grad_accum_steps: int = 1
    max_steps: int | None = None  # optimizer steps
    eval_every: int | None = None  # optimizer steps; None: after every epoch only
    report_to: str = "none"  # comma-separated REPORT_TO
    # SMART
    smart: str = "off"
    smart_sigma: float = 0.05
    smart_lambda: float = 10.0
    smart_full_sigma: float = 1e-5
    smart_full_eta: float = 1e-3
    smart_full_steps: int = 1
    smart_full_lambda: float = 1.0
    smart_full_epsilon: float | None = None
    smart_full_keep_dropout: bool = False
    smart_full_bregman: bool = False
    smart_full_beta: float = 0.995
    smart_full_mu: float = 1.0
    # learning-rate schedule and gradient surgery
    lr_schedule: str = "constant"
    warmup_ratio: float = 0.0
    warmup_steps: int | None = None
    layer_decay: float = 1.0
    grad_surgery: str = "off"
    # run
    backend: str = "auto"
    device: str = "auto"
    precision: str = "fp32"
    seed: int = 11711
    out: str | None = None
    resume: bool = False
    save_every: int | None = None
    max_nonfinite: int = 5
    num_threads: int | None = None
    # bookkeeping of how the options were chosen
    precision_requested: str | None = None  # "auto" before it was resolved to fp32 / bf16
    model_options_from_recipe: list = field(default_factory=list)

    @classmethod
    def from_namespace(cls, ns) -> "TrainConfig":
        """The config of parsed command-line flags (unknown attributes are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names})

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # -- checks ---------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Raises ConfigError for a value or combination that cannot run; returns self."""
        def need(ok, message):
            if not ok:
                raise ConfigError(message)

        need(self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}")
        need(self.smart in SMART_MODES, f"--smart must be one of {', '.join(SMART_MODES)}")
        need(self.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}")
        need(self.grad_surgery in SURGERIES, f"--grad-surgery must be one of {', '.join(SURGERIES)}")
        need(self.backend in BACKENDS, f"backend {self.backend!r}: expected auto, ref, cpp or triton")
        need(self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}")
        need(self.smart_full_sigma >= 0 and self.smart_full_eta > 0 and self.smart_full_lambda >= 0,
             "--smart-full-sigma/-lambda must be >= 0 and --smart-full-eta > 0")
        need(self.smart_full_steps >= 1, f"--smart-full-steps must be >= 1, got {self.smart_full_steps}")
        need(self.smart_full_epsilon is None or self.smart_full_epsilon > 0, "--smart-full-epsilon must be > 0")
        need(0 <= self.smart_full_beta < 1 and self.smart_full_mu >= 0,
             "--smart-full-beta must be in [0, 1) and --smart-full-mu >= 0")
        need(0 <= self.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        need(self.warmup_steps is None or self.warmup_steps >= 0, "--warmup-steps must be >= 0")
        need(0 < self.layer_decay <= 1, f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        need(self.grad_surgery == "off" or int(os.environ.get("WORLD_SIZE", "1")) <= 1,
             "--grad-surgery runs in one process (its steps are not sharded over ranks); "
             "run it without torchrun")
        need(self.epochs is not None or self.schedule != "annealed",
             "--schedule annealed needs --epochs (the horizon of its annealing), also with --time-budget")
        need(self.max_length >= 8, f"--max-length must be >= 8, got {self.max_length}")
        need(self.max_length <= 512, f"--max-length must be <= 512 (BERT position embeddings), got {self.max_length}")
        need(self.epochs is not None or self.time_budget is not None or self.max_steps is not None,
             "--epochs, --time-budget or --max-steps is needed")
        need(self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}")
        need(self.max_grad_norm is None or self.max_grad_norm > 0, "--max-grad-norm must be > 0")
        need(self.grad_accum_steps >= 1, f"--grad-accum-steps must be >= 1, got {self.grad_accum_steps}")
        need(self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1")
        need(self.eval_every is None or self.eval_every >= 1, "--eval-every must be >= 1")
        need(self.encoder_dropout is None or 0 <= self.encoder_dropout < 1, "--encoder-dropout must be in [0, 1)")
        unknown = [k for k in self.report_targets() if k not in REPORT_TO]
        need(not unknown, f"--report-to: unknown {', '.join(map(repr, unknown))}; expected a comma-separated "
                          f"list of {', '.join(REPORT_TO[1:])}, or none")
        return self

    def report_targets(self) -> tuple[str, ...]:
        """The --report-to targets, `none` left out."""
        names = [k.strip() for k in str(self.report_to).split(",") if k.strip()]
        return tuple(dict.fromkeys(k for k in names if k != "none"))

    def warnings(self) -> list[str]:
        """Options that are set but have no effect with the others."""
        out = []
        if self.schedule not in ("split1", "split2") and self.split_parts not in ("auto", 1):
            out.append(f"--split-parts is ignored by --schedule {self.schedule}")
        defaults = TrainConfig()
        for mode, names in (("simple", ("smart_sigma", "smart_lambda")),
                            ("full", tuple(f.name for f in dataclasses.fields(self)
                                           if f.name.startswith("smart_full_")))):
            unused = ["--" + n.replace("_", "-") for n in names if getattr(self, n) != getattr(defaults, n)]
            if unused and self.smart != mode:
                out.append(f"{', '.join(unused)} only apply to --smart {mode}; ignored with --smart {self.smart}")
        if self.schedule in SAMPLERS and self.interleave:
            out.append(f"--interleave is ignored by --schedule {self.schedule}: its sampler already "
                       f"interleaves the tasks' batches")
        return out


__all__ = ["BACKENDS", "BOOKKEEPING", "CHANGEABLE_ON_RESUME", "ConfigError", "DEFAULT_EPOCHS", "DEVICES",
           "LOCATION", "MODEL_OPTIONS", "REPORT_TO", "TrainConfig"]
