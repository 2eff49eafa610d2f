"""A trained model on text: `smarter_fast.load(checkpoint)` returns a Predictor.

    import smarter_fast
    model = smarter_fast.load("run/checkpoints/best")
    model.predict_sentiment(["a gorgeous, witty film"])[0]   # Sentiment(label=4, ...)
    model.predict_paraphrase([("How do I cook rice?", "What is the way to cook rice?")])
    model.predict_similarity([("A man is playing a guitar.", "A man plays the guitar.")])
    model.embed(["a sentence"])                                # (1, H) numpy array

The outputs are the ones `python -m smarter_fast.evaluate` scores, computed by the same code
(smarter_fast.evaluation): batches cut from the inputs sorted by length, the checkpoint's pooling
and pair features, both pair orders averaged for a model trained with pair_order "symmetric",
and several checkpoints averaged as one ensemble (their raw outputs: logits and scores).
The command line over this is `python -m smarter_fast.predict`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import tasks as registry
from .data.cs224n import PairExample, SentenceExample
from .data.tokenize import load_tokenizer
from .evaluation import (EncodedTask, Ensemble, model_outputs, predictions_from_outputs,
                         sentence_embeddings)
from .model import MultitaskBert
from .model.checkpoint import DEFAULT_MAX_LENGTH, default_checkpoint_dir
from .model.export import missing_heads, training_max_length
from .precision import resolve_device, resolve_precision

log = logging.getLogger("smarter_fast")


@dataclass(frozen=True)
class Sentiment:
    """SST: the predicted class (0-4), its name, and the probability of each class."""
    label: int
    label_name: str
    probabilities: tuple[float, ...]


@dataclass(frozen=True)
class Paraphrase:
    """Quora: label 1 (a paraphrase) where the probability is above 0.5."""
    label: int
    label_name: str
    probability: float


@dataclass(frozen=True)
class Similarity:
    """STS: the similarity on the 0-5 scale (the raw regression output, not clamped)."""
    score: float


def results_from_outputs(task: str, outputs: np.ndarray) -> list:
    """Raw model outputs of `task` (as evaluation.model_outputs gives them) -> one result each."""
    spec = registry.task(task)
    labels = predictions_from_outputs(task, outputs)
    if spec.kind == "classification":
        logits = torch.from_numpy(np.asarray(outputs, dtype=np.float32))
        probs = torch.softmax(logits.double(), dim=-1).numpy()
        return [Sentiment(int(y), spec.label_names[int(y)], tuple(float(p) for p in row))
                for y, row in zip(labels, probs)]
    if spec.kind == "binary":
        probs = torch.sigmoid(torch.from_numpy(np.asarray(outputs, dtype=np.float64))).numpy()
        return [Paraphrase(int(y), spec.label_names[int(y)], float(p)) for y, p in zip(labels, probs)]
    return [Similarity(float(s)) for s in labels]


def as_record(result) -> dict:
    """A result as a JSON-ready dict (probabilities as a list)."""
    d = asdict(result)
    if "probabilities" in d:
        d["probabilities"] = list(d["probabilities"])
    return d


def has_task_heads(checkpoint) -> bool:
    """Whether a checkpoint directory holds trained task heads (saved by a MultitaskBert)."""
    return not missing_heads(checkpoint)


class Predictor:
    """A MultitaskBert (or an Ensemble of them) with its tokenizer, device and precision, on text.
    Build one with `smarter_fast.load`."""

    def __init__(self, model, tokenizer, device: torch.device, precision: str = "fp32",
                 batch_size: int = 64, checkpoints=(), trained: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.precision, self.batch_size = precision, batch_size
        self.checkpoints, self.trained = [Path(c) for c in checkpoints], trained
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None

    @property
    def pair_features(self) -> str:
        return self.model.pair_features

    @property
    def pair_order(self) -> str:
        return self.model.pair_order

    def __repr__(self) -> str:
        where = ", ".join(map(str, self.checkpoints)) or "the embedded encoder, untrained heads"
        return (f"Predictor({where}; device={self.device}, precision={self.precision}, "
                f"pair_features={self.pair_features}, pair_order={self.pair_order})")

    # ---- encoding --------------------------------------------------------------------------------
    def encode(self, task: str, inputs) -> EncodedTask:
        """Texts (a sentence task) or (s1, s2) pairs -> the EncodedTask evaluation scores."""
        spec = registry.task(task)
        if spec.is_pair:
            examples = [PairExample(str(i), a, b, None) for i, (a, b) in enumerate(_pairs(inputs))]
        else:
            examples = [SentenceExample(str(i), s, None) for i, s in enumerate(_texts(inputs))]
        return EncodedTask(task, examples, self.tokenizer, self.pair_features,
                           both_orders=self.pair_order == "symmetric")

    def outputs(self, task: str, inputs) -> np.ndarray:
        """Raw outputs: (N, 5) SST logits, (N,) Quora logits, (N,) STS scores."""
        return model_outputs(self.model, self.encode(task, inputs), self.batch_size, self.device,
                             self.autocast_dtype)

    # ---- predictions -----------------------------------------------------------------------------
    def predict(self, task: str, inputs) -> list:
        """`task` ('sst', 'quora' or 'sts') on texts or pairs -> one result per input."""
        return results_from_outputs(task, self.outputs(task, inputs))

    def predict_sentiment(self, texts) -> list[Sentiment]:
        """Sentences -> [Sentiment(label 0-4, label_name, probabilities of the 5 classes)]."""
        return self.predict(registry.SST.name, texts)

    def predict_paraphrase(self, pairs) -> list[Paraphrase]:
        """(s1, s2) pairs -> [Paraphrase(label 0/1, label_name, probability)]."""
        return self.predict(registry.QUORA.name, pairs)

    def predict_similarity(self, pairs) -> list[Similarity]:
        """(s1, s2) pairs -> [Similarity(score on the 0-5 scale)]."""
        return self.predict(registry.STS.name, pairs)

    def embed(self, texts) -> np.ndarray:
        """Sentences -> (N, H) float32: the pooled vector the heads see, not normalised."""
        data = self.encode(registry.SST.name, texts)  # any single-sentence task encodes alike
        return sentence_embeddings(self.model, data, self.batch_size, self.device, self.autocast_dtype)


def _texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("expected a list of sentences, got one string: wrap it in a list")
    texts = list(texts)
    for i, s in enumerate(texts):
        if not isinstance(s, str):
            raise TypeError(f"sentence {i}: expected a string, got {type(s).__name__}")
    return texts


def _pairs(pairs) -> list[tuple[str, str]]:
    if isinstance(pairs, str):
        raise TypeError("expected a list of (sentence1, sentence2) pairs, got one string")
    pairs = list(pairs)
    if len(pairs) == 2 and all(isinstance(p, str) for p in pairs):
        raise TypeError("expected a list of (sentence1, sentence2) pairs, got one pair: "
                        "wrap it in a list")
    out = []
    for i, p in enumerate(pairs):
        if isinstance(p, str) or len(p) != 2 or not all(isinstance(s, str) for s in p):
            raise TypeError(f"pair {i}: expected two strings (sentence1, sentence2), got {p!r:.80}")
        out.append((p[0], p[1]))
    return out


def training_precision(checkpoint) -> str:
    """The precision a checkpoint's run trained (and evaluated) in, from its trainer_state.json:
    'bf16' or 'fp32' (also for a checkpoint without one)."""
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        return "bf16" if state["args"]["precision"] == "bf16" else "fp32"
    except (OSError, ValueError, KeyError, TypeError):
        return "fp32"


def choose_precision(requested: str | None, checkpoints, device: torch.device) -> tuple[str, str | None]:
    """(precision, message). None: as the (first) checkpoint was trained, so that its outputs are
    the ones its training run scored; a bf16 run on a device without native bf16 falls back to
    fp32 (the scalar bf16 path is many times slower), said in the message."""
    if requested is not None:
        return resolve_precision(requested, device)
    trained = training_precision(checkpoints[0]) if checkpoints else "fp32"
    if trained == "fp32":
        return "fp32", None
    chosen, why = resolve_precision("auto", device)
    if chosen == "bf16":
        return "bf16", "precision bf16, as the checkpoint was trained"
    return "fp32", (f"warning: precision fp32: the checkpoint was trained in bf16, but {why.split(': ', 1)[-1]}; "
                    "outputs differ slightly from the training run's")


def load(checkpoint=None, *, device: str | torch.device | None = "auto", precision: str | None = None,
         backend: str = "auto", batch_size: int = 64, max_length: int | None = None) -> Predictor:
    """A Predictor for a checkpoint directory (e.g. RUN/checkpoints/best), a list of them (an
    ensemble: raw outputs averaged; they must share pair_features and pair_order), or None: the
    embedded encoder with untrained heads (said as a warning; `embed` is meaningful there).

    device: 'auto' (the GPU when torch sees one), 'cpu' or 'cuda'. precision: 'fp32', 'bf16'
    (autocast), 'auto' (bf16 where the device runs it natively) or None: as the checkpoint was
    trained (its trainer_state.json), so the outputs are the ones its run scored. max_length: truncation
    (default: the first checkpoint's training run's, else 128)."""
    paths = [] if checkpoint is None else \
        [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_dir():
            raise FileNotFoundError(f"checkpoint directory {p} not found")
    device = resolve_device(device)
    precision, message = choose_precision(precision, paths, device)
    if message and message.startswith("warning"):
        log.warning(message)
    elif message:
        log.info(message)
    if max_length is None:
        max_length = training_max_length(paths[0]) if paths else DEFAULT_MAX_LENGTH
    if not 8 <= max_length <= 512:  # as the trainer's
        raise ValueError(f"max_length must be in [8, 512] (BERT position embeddings), got {max_length}")
    untrained = [p for p in paths if not has_task_heads(p)] if paths else [default_checkpoint_dir()]
    if untrained:
        log.warning(f"{', '.join(map(str, untrained))}: no trained task heads; the heads are "
                    f"freshly initialised, so their predictions mean nothing (embed is the "
                    f"encoder's)")
    models = [MultitaskBert.from_pretrained(p, backend=backend).to(device).eval()
              for p in (paths or [None])]
    model = models[0] if len(models) == 1 else Ensemble(models)
    tokenizer = load_tokenizer(paths[0] if paths else None, max_length=max_length)
    return Predictor(model, tokenizer, device, precision, batch_size, paths, trained=not untrained)


__all__ = ["Paraphrase", "Predictor", "Sentiment", "Similarity", "as_record",
           "has_task_heads", "load", "results_from_outputs"]
