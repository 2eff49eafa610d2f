"""MultitaskBert: one shared BERT encoder and three small task heads.

- sentiment (SST):   Linear(H, 5)  -> (B, 5) class logits
- paraphrase (Quora): Linear(H, 1) -> (B,) logit of "is a paraphrase"
- similarity (STS):  Linear(H, 1)  -> (B,) raw regression output, trained against the 0-5 gold
  scores (no squashing, so it can leave [0, 5] slightly; clamp when reporting if you like).

Pairs arrive as one sequence `[CLS] s1 [SEP] s2 [SEP]` with token_type_ids 0 / 1.
For SMART the work splits in two: `bert.embed(...)` once, then `heads_from_embeddings(task, E,
...)` for the clean and for the perturbed embeddings.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .bert import BertModel

TASKS = ("sentiment", "paraphrase", "similarity")
ALIASES = {"sst": "sentiment", "quora": "paraphrase", "sts": "similarity"}
N_SENTIMENT_CLASSES = 5


class MultitaskBert(nn.Module):
    # With [CLS] pooling the last encoder layer computes only the [CLS] row (BertModel.encode
    # cls_only): the same outputs and gradients for about a sixth less work. False: full layer.
    cls_only_last_layer = True

    def __init__(self, bert: BertModel, dropout: float = 0.0, pooling: str = "cls"):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        H = bert.config.hidden_size
        self.bert = bert
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.sentiment = nn.Linear(H, N_SENTIMENT_CLASSES)
        self.paraphrase = nn.Linear(H, 1)
        self.similarity = nn.Linear(H, 1)

    @property
    def config(self):
        return self.bert.config

    @classmethod
    def from_pretrained(cls, path=None, dropout: float = 0.0, pooling: str = "cls",
                        backend: str = "auto") -> "MultitaskBert":
        """Encoder from a BERT directory (None: the embedded default). Task heads are loaded
        too when the directory was written by save_checkpoint from a MultitaskBert, and freshly
        initialised otherwise. Returned in eval mode."""
        from .checkpoint import load_pretrained_bert, warn_unused
        bert, extra, directory = load_pretrained_bert(path, backend=backend)
        model = cls(bert, dropout=dropout, pooling=pooling)
        heads = {k: extra.pop(k) for k in list(extra) if k.split(".")[0] in TASKS}
        if heads:
            model.load_state_dict(heads, strict=False)
            absent = [k for k, _ in model.named_parameters()
                      if k.split(".")[0] in TASKS and k not in heads]
            if absent:
                raise ValueError(f"{directory}: task heads incomplete, lacking {absent}")
        warn_unused(extra, directory)
        return model.eval()

    def save_pretrained(self, directory, vocab_file=None):
        from .checkpoint import save_checkpoint
        return save_checkpoint(self, directory, self.config, vocab_file=vocab_file)

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

    def head(self, task: str, pooled: torch.Tensor) -> torch.Tensor:
        """Task output from a pooled (B, H) vector: (B, 5) for sentiment, (B,) otherwise."""
        task = ALIASES.get(task, task)
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        out = getattr(self, task)(self.dropout(pooled))
        return out if task == "sentiment" else out.squeeze(-1)

    def heads_from_embeddings(self, task: str, E: torch.Tensor, attention_mask=None,
                              cu_seqlens=None, max_seqlen=None) -> torch.Tensor:
        """Task output from an embedding output E (from bert.embed), possibly perturbed:
        padded E (B, L, H) + attention_mask, or packed E (T, H) + cu_seqlens, max_seqlen."""
        # [CLS] pooling reads one row of the last layer: compute only that row there.
        out = self.bert.encode(E, attention_mask, cu_seqlens, max_seqlen,
                               cls_only=self.pooling == "cls" and self.cls_only_last_layer)
        return self.head(task, self.pool(out, attention_mask, cu_seqlens))

    def forward(self, task: str, input_ids, attention_mask=None, token_type_ids=None, *,
                embeddings_hook=None) -> torch.Tensor:
        """Padded batch -> that task's output (a forward, so DDP and hooks see the call)."""
        E = self.bert.embed(input_ids, token_type_ids)
        if embeddings_hook is not None:
            E = embeddings_hook(E)
        return self.heads_from_embeddings(task, E, attention_mask)

    def forward_packed(self, task: str, input_ids, cu_seqlens, max_seqlen, token_type_ids=None,
                       position_ids=None) -> torch.Tensor:
        """Packed batch (input_ids (T,), cu_seqlens (B + 1,)) -> that task's output."""
        from .bert import packed_position_ids
        if position_ids is None:
            position_ids = packed_position_ids(cu_seqlens, input_ids.shape[0])
        E = self.bert.embed(input_ids, token_type_ids, position_ids)
        return self.heads_from_embeddings(task, E, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

    def predict_sentiment(self, input_ids, attention_mask) -> torch.Tensor:
        """(B, L) single sentences -> (B, 5) logits over the SST classes."""
        return self("sentiment", input_ids, attention_mask)

    def predict_paraphrase(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """(B, L) encoded pairs -> (B,) logits; sigmoid > 0.5 means paraphrase."""
        return self("paraphrase", input_ids, attention_mask, token_type_ids)

    def predict_similarity(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """(B, L) encoded pairs -> (B,) similarity on the 0-5 scale (raw regression output)."""
        return self("similarity", input_ids, attention_mask, token_type_ids)


__all__ = ["MultitaskBert", "TASKS", "ALIASES"]
