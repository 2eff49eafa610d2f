"""MultitaskBert: one shared BERT encoder and three small task heads.

- sentiment (SST):   Linear(H, 5)  -> (B, 5) class logits
- paraphrase (Quora): Linear(H, 1) -> (B,) logit of "is a paraphrase"
- similarity (STS):  Linear(H, 1)  -> (B,) raw regression output, trained against the 0-5 gold
  scores (no squashing, so it can leave [0, 5] slightly; clamp when reporting if you like).

Pair features (`pair_features`, for paraphrase and similarity only):
- cross: one sequence `[CLS] s1 [SEP] s2 [SEP]` (token_type_ids 0 / 1) -> pooled (B, H) -> head.
- bi:    s1 and s2 encoded separately (`[CLS] s [SEP]`, type 0) by the same encoder, in one batch
         of 2B rows [s1 rows; s2 rows] -> pooled u, v -> head on [u*v, |u-v|, cos(u, v)] (2H + 1).
- both:  3B rows [pair rows; s1 rows; s2 rows] -> head on [cross, u*v, |u-v|, cos(u, v)] (3H + 1).
The model splits the pooled (kB, H) rows by its own setting (`rows_per_example`), so every path
(forward, forward_packed, heads_from_embeddings) takes such stacked batches; labels stay (B,).

Pair order (`pair_order`): paraphrase and similarity are symmetric, but a cross-encoded pair is
not. given: s1 then s2 as in the data. symmetric: training feeds each pair in a random order and
predictions average both orders (smarter_fast.evaluate), twice the inference work for pairs.

For SMART the work splits in two: `bert.embed(...)` once, then `heads_from_embeddings(task, E,
...)` for the clean and for the perturbed embeddings.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import tasks as registry
from .bert import BertModel, load_pretrained_bert, packed_position_ids
from .checkpoint import default_checkpoint_dir, read_head_options, save_checkpoint, warn_unused
from .config import CONFIG_KEYS, PAIR_FEATURES, PAIR_ORDERS, POOLINGS

# The model's tasks are its heads' names (module attributes and checkpoint tensor prefixes); the
# registry's short names are accepted too.
TASKS = tuple(t.head for t in registry.TASKS)
ALIASES = {t.name: t.head for t in registry.TASKS}
N_SENTIMENT_CLASSES = registry.SST.num_outputs
PAIR_TASKS = tuple(t.head for t in registry.TASKS if t.is_pair)
_OUTPUTS = {t.head: t.num_outputs for t in registry.TASKS}
ROWS_PER_PAIR = {"cross": 1, "bi": 2, "both": 3}  # encoder rows per pair example
DEFAULTS = {"pooling": "cls", "pair_features": "cross", "pair_order": "given"}


def pair_input_size(hidden: int, pair_features: str) -> int:
    """Input width of the paraphrase / similarity heads: H, 2H + 1 or 3H + 1."""
    return {"cross": hidden, "bi": 2 * hidden + 1, "both": 3 * hidden + 1}[pair_features]


def _resolve(saved: dict, pooling, pair_features, pair_order=None) -> dict:
    asked = {"pooling": pooling, "pair_features": pair_features, "pair_order": pair_order}
    return {k: asked[k] if asked[k] is not None else saved.get(k, DEFAULTS[k]) for k in DEFAULTS}


class MultitaskBert(nn.Module):
    # With [CLS] pooling the last encoder layer computes only the [CLS] row (BertModel.encode
    # cls_only): the same outputs and gradients for about a sixth less work. False: full layer.
    cls_only_last_layer = True

    def __init__(self, bert: BertModel, dropout: float = 0.0, pooling: str = "cls",
                 pair_features: str = "cross", pair_order: str = "given"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        if pair_features not in PAIR_FEATURES:
            raise ValueError(f"pair_features must be 'cross', 'bi' or 'both', got {pair_features!r}")
        if pair_order not in PAIR_ORDERS:
            raise ValueError(f"pair_order must be 'given' or 'symmetric', got {pair_order!r}")
        H = bert.config.hidden_size
        self.bert = bert
        self.pooling = pooling
        self.pair_features = pair_features
        self.pair_order = pair_order
        self.dropout = nn.Dropout(dropout)
        for t in registry.TASKS:  # in registry order: the heads' init draws and state_dict order
            width = pair_input_size(H, pair_features) if t.is_pair else H
            setattr(self, t.head, nn.Linear(width, t.num_outputs))
        if pair_features != "cross":
            # Warm start on the cosine feature (the last input). The embedded all-MiniLM-L6-v2
            # is a sentence-embedding model trained with mean pooling and cosine similarity:
            # zero-shot, the cosine of mean-pooled separate encodings gives STS dev Pearson 0.837
            # and Quora best-threshold accuracy 0.778. So similarity starts near 5 * cos (the
            # 0-5 scale) and paraphrase at logit 10 * (cos - 0.7) (threshold cos 0.7); the other
            # weights keep the default init and training moves them from there. (Most useful
            # with --pooling mean, the way that checkpoint was trained.) Loading saved heads
            # overwrites this.
            similarity, paraphrase = getattr(self, registry.STS.head), getattr(self, registry.QUORA.head)
            with torch.no_grad():
                similarity.weight[0, -1] = 5.0
                similarity.bias.zero_()
                paraphrase.weight[0, -1] = 10.0
                paraphrase.bias.fill_(-7.0)

    @property
    def config(self):
        return self.bert.config

    @staticmethod
    def resolve_options(path=None, pooling: str | None = None,
                        pair_features: str | None = None, pair_order: str | None = None) -> dict:
        """{"pooling", "pair_features", "pair_order"} for a checkpoint directory (None: the embedded default):
        an explicit value wins, None means as saved in its config.json, else cls / cross.
        Reads config.json only (to encode data before the model is loaded)."""
        saved = read_head_options(default_checkpoint_dir() if path is None else path)
        return _resolve(saved, pooling, pair_features, pair_order)

    @classmethod
    def from_pretrained(cls, path=None, dropout: float = 0.0, pooling: str | None = None,
                        pair_features: str | None = None, pair_order: str | None = None,
                        backend: str = "auto") -> "MultitaskBert":
        """Encoder from a BERT directory (None: the embedded default). Task heads are loaded
        too when the directory was written by save_checkpoint from a MultitaskBert, and freshly
        initialised otherwise. pooling / pair_features: None means as saved in the checkpoint
        (config.json), else cls / cross; an explicit value wins, and saved pair heads of another
        input size are an error. Returned in eval mode."""
        bert, extra, directory = load_pretrained_bert(path, backend=backend)
        saved = read_head_options(directory)
        options = _resolve(saved, pooling, pair_features, pair_order)
        model = cls(bert, dropout=dropout, **options)
        heads = {k: extra.pop(k) for k in list(extra) if k.split(".")[0] in TASKS}
        if heads:
            own = model.state_dict()
            wrong = [f"{k} {tuple(v.shape)} (pair_features={options['pair_features']!r} needs "
                     f"{tuple(own[k].shape)})" for k, v in heads.items()
                     if k in own and v.shape != own[k].shape]
            if wrong:
                raise ValueError(
                    f"{directory}: its task heads were trained with pair_features="
                    f"{saved.get('pair_features', 'cross')!r} and do not fit pair_features="
                    f"{options['pair_features']!r}: {', '.join(wrong)}; leave pair_features unset "
                    f"(--pair-features) to use the checkpoint's, or start from a plain BERT")
            model.load_state_dict(heads, strict=False)
            absent = [k for t in registry.TASKS for k in t.head_tensors if k not in heads]
            if absent:
                raise ValueError(f"{directory}: task heads incomplete, lacking {absent}")
        warn_unused(extra, directory)
        return model.eval()

    def save_pretrained(self, directory, vocab_file=None, max_seq_length: int | None = None):
        """A checkpoint directory (save_checkpoint): the encoder, the heads, these options in
        config.json, and the sentence-transformers modules of this pooling, truncating at
        max_seq_length (the training run's --max-length; None: 128)."""
        return save_checkpoint(self, directory, self.config, vocab_file=vocab_file,
                               max_seq_length=max_seq_length)

    def checkpoint_config(self) -> dict:
        """The extra config.json keys that let from_pretrained restore these options."""
        return {CONFIG_KEYS["pooling"]: self.pooling,
                CONFIG_KEYS["pair_features"]: self.pair_features,
                CONFIG_KEYS["pair_order"]: self.pair_order}

    def rows_per_example(self, task: str) -> int:
        """Encoder rows per example in a batch of `task`: 1, or 2 / 3 for pair tasks in bi / both
        ([s1; s2] or [pair; s1; s2], each block B rows)."""
        task = ALIASES.get(task, task)
        return ROWS_PER_PAIR[self.pair_features] if task in PAIR_TASKS else 1

    def pool(self, out: dict, attention_mask=None, cu_seqlens=None) -> torch.Tensor:
        """Sentence vector (B, H): the BERT pooler output ('cls') or the mean of the last hidden
        states over real tokens ('mean')."""
        if self.pooling == "cls":
            return out["pooler_output"]
        h = out["last_hidden_state"]
        if cu_seqlens is not None:  # packed (T, H): sum each segment, divide by its length
            starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
            seq = torch.repeat_interleave(torch.arange(starts.numel(), device=h.device),
                                          ends - starts, output_size=h.shape[0])
            sums = h.new_zeros(starts.numel(), h.shape[1]).index_add_(0, seq, h)
            return sums / (ends - starts).clamp(min=1)[:, None].to(h.dtype)
        if attention_mask is None:
            return h.mean(dim=1)
        m = attention_mask.to(h.dtype)[:, :, None]  # (B, L, 1)
        return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)

    def pair_head_input(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled rows of a stacked pair batch -> the pair heads' input (B, 2H + 1 | 3H + 1):
        bi: rows [u; v] -> [u*v, |u-v|, cos(u, v)]; both: [c; u; v] -> [c, u*v, |u-v|, cos]."""
        k = ROWS_PER_PAIR[self.pair_features]
        if k == 1:
            return pooled
        n = pooled.shape[0]
        if n % k:
            raise ValueError(f"pair_features={self.pair_features!r} takes {k} rows per example "
                             f"({'[s1; s2]' if k == 2 else '[pair; s1; s2]'}), got {n} rows")
        parts = pooled.split(n // k)
        u, v = parts[-2], parts[-1]
        # the cosine in fp32 (a bf16 one is only good to ~3 digits), then back to the rows' dtype
        cos = F.cosine_similarity(u.float(), v.float(), dim=-1).to(u.dtype)[:, None]
        return torch.cat([*parts[:-2], u * v, (u - v).abs(), cos], dim=-1)

    def head(self, task: str, pooled: torch.Tensor) -> torch.Tensor:
        """Task output from pooled rows: (B, 5) for sentiment, (B,) otherwise. Pair tasks in
        bi / both take the stacked rows (2B or 3B, H) and build their features here."""
        task = ALIASES.get(task, task)
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        x = self.dropout(pooled)  # on the sentence vectors, before any pair features
        if task in PAIR_TASKS:
            x = self.pair_head_input(x)
        out = getattr(self, task)(x)
        return out if _OUTPUTS[task] > 1 else out.squeeze(-1)

    def heads_from_embeddings(self, task: str, E: torch.Tensor, attention_mask=None,
                              cu_seqlens=None, max_seqlen=None) -> torch.Tensor:
        """Task output from an embedding output E (from bert.embed), possibly perturbed:
        padded E (N, L, H) + attention_mask, or packed E (T, H) + cu_seqlens, max_seqlen, with
        N = rows_per_example(task) * B sequences in the stacked pair layout."""
        # [CLS] pooling reads one row of the last layer: compute only that row there.
        out = self.bert.encode(E, attention_mask, cu_seqlens, max_seqlen,
                               cls_only=self.pooling == "cls" and self.cls_only_last_layer)
        return self.head(task, self.pool(out, attention_mask, cu_seqlens))

    def forward(self, task: str, input_ids, attention_mask=None, token_type_ids=None, *,
                embeddings_hook=None) -> torch.Tensor:
        """Padded batch -> that task's output (a forward, so DDP and hooks see the call).
        Pair tasks in bi / both take the stacked rows (see the module doc)."""
        E = self.bert.embed(input_ids, token_type_ids)
        if embeddings_hook is not None:
            E = embeddings_hook(E)
        return self.heads_from_embeddings(task, E, attention_mask)

    def forward_packed(self, task: str, input_ids, cu_seqlens, max_seqlen, token_type_ids=None,
                       position_ids=None) -> torch.Tensor:
        """Packed batch (input_ids (T,), cu_seqlens (B + 1,)) -> that task's output."""
        if position_ids is None:
            position_ids = packed_position_ids(cu_seqlens, input_ids.shape[0])
        E = self.bert.embed(input_ids, token_type_ids, position_ids)
        return self.heads_from_embeddings(task, E, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

    def sentence_embedding(self, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, L) single sentences -> (B, H): the pooled vector the heads see (before their
        dropout), not normalised. What `smarter_fast.load(...).embed` returns."""
        E = self.bert.embed(input_ids)
        out = self.bert.encode(E, attention_mask,
                               cls_only=self.pooling == "cls" and self.cls_only_last_layer)
        return self.pool(out, attention_mask)

    # On token tensors, one pair order: smarter_fast.load(...) predicts on text and averages both
    # orders for a model trained with pair_order "symmetric".
    def predict_sentiment(self, input_ids, attention_mask) -> torch.Tensor:
        """(B, L) single sentences -> (B, 5) logits over the SST classes."""
        return self(registry.SST.head, input_ids, attention_mask)

    def predict_paraphrase(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """(B, L) encoded pairs -> (B,) logits; sigmoid > 0.5 means paraphrase."""
        return self(registry.QUORA.head, input_ids, attention_mask, token_type_ids)

    def predict_similarity(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """(B, L) encoded pairs -> (B,) similarity on the 0-5 scale (raw regression output)."""
        return self(registry.STS.head, input_ids, attention_mask, token_type_ids)


__all__ = ["MultitaskBert", "TASKS", "ALIASES", "POOLINGS", "PAIR_FEATURES", "PAIR_TASKS",
           "ROWS_PER_PAIR", "CONFIG_KEYS", "pair_input_size"]
