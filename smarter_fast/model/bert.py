"""minBERT: the BERT encoder in one file, padded and packed (variable-length) paths.

Attention always goes through smarter_fast.ops, so the backend (ref / cpp / triton) is chosen
there. Q, K and V are one fused Linear (out 3H): one matmul instead of three. The Linear layers
and the word embedding are called through smarter_fast.model.grad_sinks, which is plain
autograd unless attach_grad_sinks() connected the model to its optimizer. Checkpoints in the
Hugging Face layout are converted on load by smarter_fast.model.checkpoint.

Shapes: B batch, L padded length, T packed tokens, H hidden, nh heads, hs head size (H // nh).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .checkpoint import load_bert_state, read_config, read_weights, resolve_checkpoint_dir, warn_unused
from .config import ACTIVATIONS, BertConfig
from .grad_sinks import cls_qkv, linear, word_embedding


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        H = config.hidden_size
        self.word = nn.Embedding(config.vocab_size, H, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, H)
        self.token_type = nn.Embedding(config.type_vocab_size, H)
        self.norm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids=None, position_ids=None):
        # input_ids (B, L) or (T,); position_ids default to 0..L-1 along the last dim.
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[-1], device=input_ids.device)
        x = word_embedding(self.word, input_ids) + self.position(position_ids)  # (..., H)
        if token_type_ids is None:
            x = x + self.token_type.weight[0]  # all segment 0, without a lookup
        else:
            x = x + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        H, I = config.hidden_size, config.intermediate_size
        self.n_head = config.num_attention_heads
        self.qkv = nn.Linear(H, 3 * H)  # rows: [query; key; value]
        self.attn_out = nn.Linear(H, H)
        self.attn_norm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(H, I)
        self.ffn_out = nn.Linear(I, H)
        self.ffn_norm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.act_name = ACTIVATIONS[config.hidden_act]  # applied by linear(ffn_out)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attn_dropout = config.attention_probs_dropout_prob

    def self_attention(self, x, attention_mask, cu_seqlens, max_seqlen, backend):
        H = x.shape[-1]
        nh, hs = self.n_head, H // self.n_head
        p = self.attn_dropout if self.training else 0.0
        qkv = linear(self.qkv, x)  # (B, L, 3H) or (T, 3H)
        if cu_seqlens is None:
            B, L, _ = x.shape
            q, k, v = qkv.view(B, L, 3, nh, hs).permute(2, 0, 3, 1, 4)  # each (B, nh, L, hs)
            y = ops.attention(q, k, v, attention_mask, dropout_p=p, backend=backend)
            return y.transpose(1, 2).reshape(B, L, H)  # (B, L, H)
        T = x.shape[0]
        q, k, v = qkv.view(T, 3, nh, hs).unbind(1)  # each (T, nh, hs)
        y = ops.attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=p, backend=backend)
        return y.reshape(T, H)  # (T, H)

    def cls_attention(self, x, attention_mask):
        """Self-attention output of the first ([CLS]) token only: (B, H). Keys and values of
        every token, the query of token 0 alone (a quarter of the QKV GEMM and none of the
        full (L, L) attention): what the last layer needs when only [CLS] is read out."""
        B, L, H = x.shape
        nh, hs = self.n_head, H // self.n_head
        q, kv = cls_qkv(self.qkv, x)  # (B, H), (B, L, 2H)
        q = q.view(B, nh, 1, hs)
        k, v = kv.view(B, L, 2, nh, hs).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) * hs ** -0.5  # (B, nh, 1, L)
        if attention_mask is not None:
            pad = (attention_mask == 0)[:, None, None, :]
            scores = scores.masked_fill(pad, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1)
        if self.training and self.attn_dropout > 0.0:
            probs = F.dropout(probs, self.attn_dropout)
        return (probs.to(v.dtype) @ v).reshape(B, H)

    def forward(self, x, attention_mask=None, cu_seqlens=None, max_seqlen=None, backend="auto",
                cls_only: bool = False):
        """cls_only (padded path only): compute just the first token's output row, (B, 1, H);
        the other rows of a last layer do not reach the pooler."""
        # Post-LayerNorm as in the original BERT: add the residual, then normalise.
        # Dropout, residual add and LayerNorm are one fused op (smarter_fast.ops).
        p = self.dropout.p if self.training else 0.0
        if cls_only and cu_seqlens is None:
            y = self.cls_attention(x, attention_mask)
            x = x[:, 0]
        else:
            y = self.self_attention(x, attention_mask, cu_seqlens, max_seqlen, backend)
        x = self._add_norm(x, linear(self.attn_out, y), self.attn_norm, p, backend)
        h = linear(self.ffn_in, x)  # (..., I) before the activation
        x = self._add_norm(x, linear(self.ffn_out, h, act=self.act_name), self.ffn_norm, p, backend)
        return x[:, None] if cls_only and cu_seqlens is None else x

    @staticmethod
    def _add_norm(x, h, norm: nn.LayerNorm, p: float, backend):
        """norm(x + dropout(h)), fused: one pass forward, one backward, the mask not stored."""
        return ops.dropout_add_layer_norm(x, h, norm.weight, norm.bias, norm.eps, p,
                                          backend=backend)


class BertModel(nn.Module):
    """BERT encoder + pooler. `backend` is passed to the attention ops ("auto", "ref", ...)."""

    def __init__(self, config: BertConfig, backend: str = "auto"):
        super().__init__()
        self.config = config
        self.backend = backend
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.apply(self._init_weights)

    def set_dropout(self, p: float) -> None:
        """Hidden and attention dropout `p` everywhere in the encoder (--encoder-dropout); the
        config follows, so a saved checkpoint says what it was trained with."""
        self.config.hidden_dropout_prob = self.config.attention_probs_dropout_prob = float(p)
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = float(p)
            if isinstance(module, BertLayer):
                module.attn_dropout = float(p)

    def _init_weights(self, module):
        # As in Hugging Face BERT, so a checkpoint without a pooler gets the usual init.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, path=None, backend: str = "auto") -> "BertModel":
        """Load a Hugging Face BERT directory (None: the embedded all-MiniLM-L6-v2). The model
        comes back in eval mode, like transformers; call .train() to fine-tune."""
        model, extra, directory = load_pretrained_bert(path, backend=backend)
        warn_unused(extra, directory)
        return model

    def embed(self, input_ids, token_type_ids=None, position_ids=None):
        """Embedding output E (B, L, H) or (T, H): what SMART perturbs."""
        return self.embeddings(input_ids, token_type_ids, position_ids)

    def encode(self, E, attention_mask=None, cu_seqlens=None, max_seqlen=None,
               cls_only: bool = False) -> dict:
        """Run the encoder and pooler on an embedding output. Padded: E (B, L, H) with
        attention_mask (B, L). Packed: E (T, H) with cu_seqlens (B + 1,) and max_seqlen.
        cls_only (padded path): the last layer computes only the [CLS] row, which is all the
        pooler reads (same pooler output; last_hidden_state is then (B, 1, H))."""
        x = E
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, attention_mask, cu_seqlens, max_seqlen, self.backend,
                      cls_only=cls_only and i == last)
        if cu_seqlens is None:
            first = x[:, 0]  # (B, H) the [CLS] token
        else:
            first = x[cu_seqlens[:-1].long()]  # (B, H) first token of each sequence
        return {"last_hidden_state": x, "pooler_output": torch.tanh(self.pooler(first))}

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, *,
                embeddings_hook: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
        """input_ids (B, L); attention_mask (B, L), nonzero for real tokens. embeddings_hook,
        if given, maps the embedding output E to the tensor the encoder sees.
        Returns {"last_hidden_state": (B, L, H), "pooler_output": (B, H)}."""
        E = self.embed(input_ids, token_type_ids)
        if embeddings_hook is not None:
            E = embeddings_hook(E)
        return self.encode(E, attention_mask)

    def forward_packed(self, input_ids, cu_seqlens, max_seqlen, token_type_ids=None,
                       position_ids=None, *, embeddings_hook=None) -> dict:
        """Packed path, no padding anywhere: input_ids (T,) are the sequences laid end to end,
        cu_seqlens (B + 1,) int32 their offsets, max_seqlen the longest length.
        Returns {"last_hidden_state": (T, H), "pooler_output": (B, H)}."""
        if position_ids is None:
            position_ids = packed_position_ids(cu_seqlens, input_ids.shape[0])
        E = self.embed(input_ids, token_type_ids, position_ids)
        if embeddings_hook is not None:
            E = embeddings_hook(E)
        return self.encode(E, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


def packed_position_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Positions restarting at 0 for each packed sequence: (T,) long."""
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    return torch.arange(total, device=cu_seqlens.device) - starts.repeat_interleave(lengths, output_size=total)


def load_pretrained_bert(path=None, backend: str = "auto"):
    """(BertModel in eval mode, non-encoder tensors, directory) for a checkpoint directory."""
    directory = resolve_checkpoint_dir(path)
    config = read_config(directory)
    state, file = read_weights(directory)
    model = BertModel(config, backend=backend)
    extra = load_bert_state(model, state, file)
    model.source_dir = directory  # lets save_checkpoint copy the vocabulary along
    return model.eval(), extra, directory


__all__ = ["BertConfig", "BertModel", "load_pretrained_bert", "packed_position_ids"]
