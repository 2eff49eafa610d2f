"""minBERT: the BERT encoder in one file, padded and packed (variable-length) paths.

Attention always goes through smarter_fast.ops, so the backend (ref / cpp / triton) is chosen
there. Q, K and V are one fused Linear (out 3H): one matmul instead of three. Checkpoints in the
Hugging Face layout are converted on load by smarter_fast.model.checkpoint.

Shapes: B batch, L padded length, T packed tokens, H hidden, nh heads, hs head size (H // nh).
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .checkpoint import load_bert_state, read_config, read_weights, resolve_checkpoint_dir, warn_unused
from .config import ACTIVATIONS, BertConfig

# the function BertLayer applies for each activation of config.hidden_act (inside linear(ffn_out))
_FUSED_ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
                      "relu": F.relu}


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
        x = self._word_lookup(input_ids) + self.position(position_ids)  # (..., H)
        if token_type_ids is None:
            x = x + self.token_type.weight[0]  # all segment 0, without a lookup
        else:
            x = x + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))

    # ---- the word-embedding gradient, without a fresh dense (vocab, H) tensor every step ----
    # A batch touches a few hundred of the 30522 rows, yet autograd's embedding backward zeroes
    # a new dense (vocab, H) gradient each step (47 MB for MiniLM; 20-40 ms a step here, mostly
    # page faults on the fresh allocation). Instead the backward adds the rows into weight.grad
    # itself: into the existing gradient when there is one (accumulation, as torch does), else
    # into a buffer this module keeps, which becomes weight.grad after re-zeroing only the rows
    # it held last time. Same values as F.embedding's backward (padding_idx rows get none).
    # Caveats: a caller that keeps a reference to an old weight.grad across `weight.grad = None`
    # and a new backward sees it reused (copy it, as the optimizer and gradient surgery do); and
    # a caller that writes other rows of weight.grad in place (an L2 term added to the gradient)
    # and then sets it to None must zero it instead (zero_grad(set_to_none=False)) or set
    # `fused_word_grad = False`: only the rows the last backward wrote are cleared.
    # Used only when a gradient is being recorded, outside torch.distributed (DDP's hooks need
    # autograd's accumulation) and when `fused_word_grad` is True.
    fused_word_grad = True

    def _word_lookup(self, input_ids):
        w = self.word.weight
        if not (self.fused_word_grad and torch.is_grad_enabled() and w.requires_grad
                and w.layout == torch.strided and not _distributed()):
            return self.word(input_ids)
        return _WordEmbedding.apply(input_ids, w, self)

    @torch.no_grad()
    def _accumulate_word_grad(self, ids, grad):
        w = self.word.weight
        ids = ids.reshape(-1)
        g = grad.reshape(-1, w.shape[1]).to(w.dtype)
        pad = self.word.padding_idx
        if pad is not None:
            keep = ids != pad
            ids, g = ids[keep], g[keep]
        buf = getattr(self, "_word_grad", None)
        if buf is None:
            _watch_optimizer_steps(self)
        if w.grad is None:
            if buf is None or buf.shape != w.shape or buf.dtype != w.dtype or buf.device != w.device:
                buf = torch.zeros_like(w, memory_format=torch.contiguous_format)
            elif self._word_grad_rows.numel():
                buf.index_fill_(0, self._word_grad_rows, 0.0)
            self._word_grad, self._word_grad_rows = buf, ids
            w.grad = buf
        elif w.grad is buf:  # a second backward before the step: more rows to clear later
            rows = torch.cat([self._word_grad_rows, ids])
            self._word_grad_rows = rows.unique() if rows.numel() > w.shape[0] else rows
        # weight.grad now holds values on _word_grad_rows only (what _adopt_stepped_grad needs)
        self._word_grad_fresh = w.grad is buf
        w.grad.index_add_(0, ids, g)


    def _check_before_step(self) -> None:
        buf = getattr(self, "_word_grad", None)
        self._word_grad_fresh = (getattr(self, "_word_grad_fresh", False) and buf is not None
                                 and self.word.weight.grad is buf)

    def _adopt_stepped_grad(self, optimizer=None, held=None) -> None:
        """After an optimizer step: if the optimizer moved our buffer's values into a gradient
        of its own (smarter_fast.optim.AdamW copies stray grads into its flat grad buffer and
        re-points weight.grad at its view), that tensor holds nonzero values on our rows only,
        so it becomes the buffer: the next backward writes into the optimizer's own memory and
        the next step copies nothing."""
        buf, g = getattr(self, "_word_grad", None), self.word.weight.grad
        if (buf is not None and g is not None and g is not buf and g.shape == buf.shape
                and g.dtype == buf.dtype and g.device == buf.device and g.is_contiguous()
                and getattr(self, "_word_grad_fresh", False)):
            self._word_grad = g
        self._word_grad_fresh = False


_WATCHED: weakref.WeakSet = weakref.WeakSet()  # objects with _adopt_stepped_grad()
_HOOKED = False


def _watch_optimizer_steps(module) -> None:
    global _HOOKED
    _WATCHED.add(module)
    if not _HOOKED:
        from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                           register_optimizer_step_pre_hook)
        register_optimizer_step_pre_hook(_before_optimizer_step)
        register_optimizer_step_post_hook(_after_optimizer_step)
        _HOOKED = True


def _before_optimizer_step(optimizer, args, kwargs) -> None:
    # Adopt after the step only what the optimizer copied from our own buffer: a .grad that
    # someone replaced (gradient surgery writing combined grads, a caller's tensor) may hold
    # values outside the rows we track.
    for module in list(_WATCHED):
        module._check_before_step()


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for module in list(_WATCHED):
        module._adopt_stepped_grad(optimizer, held)


# ---- Linear layers whose weight gradients go straight into the optimizer's memory ------------
# With set_to_none=True autograd allocates every weight gradient afresh each step, and the
# flat-buffer AdamW then copies it into its flat grad buffer (and, under bf16 autocast, the bf16
# gradient is first cast into yet another fp32 tensor). `linear()` instead writes grad_W and
# grad_b (mm(out=) / a cast copy) into a buffer per parameter installed as p.grad; after an
# optimizer step the buffer becomes the optimizer's own grad view (same adoption as the word
# embedding), so later steps neither allocate nor copy. Existing grads are accumulated into,
# as autograd does. Same values as F.linear's backward (under autocast grad_b is the
# low-precision column sum, cast once: see _bias_grad). Used only when
# a gradient is recorded, outside torch.distributed, and with `FUSED_LINEAR_GRADS` True; the
# caveat of BertEmbeddings (old .grad references get reused) applies. The backward asks the
# autograd engine whether the graph task being run wants each parameter (_grad_route), so
# torch.autograd.grad and .backward(inputs=...) behave as with nn.Linear.
FUSED_LINEAR_GRADS = True
# Under autocast, linear() keeps each weight's low-precision copy and the low-precision weight
# gradient in buffers of its own instead of fresh tensors every step: on this CPU fresh
# megabyte-sized tensors cost page faults, and the casts ran up to 8x slower than into a kept
# buffer (bf16 training steps 5-10% faster). Costs one bf16 copy of every Linear weight. Under
# smarter_fast.optim.AdamW the copy is the optimizer's low_precision_copy, which its fused step
# rewrites: no cast pass at all (about 2% net: benchmarks/README.md).
KEEP_CAST_BUFFERS = True


_will_engine_execute_node = getattr(torch._C, "_will_engine_execute_node", None)


def _grad_route(ctx, index: int) -> str:
    """Where the gradient of input `index` of a node that writes parameter gradients itself
    (the sinks here, the word embedding above) goes in the graph task being run:
    - "sink": a .backward() that reaches the parameter: write p.grad, as autograd accumulates;
    - "skip": the parameter is not wanted: torch.autograd.grad, or .backward(inputs=...), for
      other tensors (SMART's adversarial ascent asks for the perturbation's gradient alone):
      no GEMM, and p.grad is left as it is;
    - "return": torch.autograd.grad asks for this parameter: hand the gradient to autograd.
    Without the engine query (older torch) everything goes to the sink, as before."""
    node = ctx.next_functions[index][0]
    if node is None:
        return "skip"
    if _will_engine_execute_node is None:
        return "sink"
    try:
        return "sink" if _will_engine_execute_node(node) else "skip"
    except RuntimeError:  # raised for a leaf that torch.autograd.grad captures
        return "return"


class _GradSink:
    """Where a fresh gradient of one parameter is written (see above)."""

    __slots__ = ("buf", "fresh", "__weakref__")

    def __init__(self):
        self.buf, self.fresh = None, False

    def write(self, p, value_fn, out_fn=None) -> None:
        """p.grad = value (into the kept buffer) or p.grad += value. out_fn(buf) may compute
        the value straight into buf (same dtype)."""
        g = p.grad
        if g is None:
            buf = self.buf
            if (buf is None or buf.shape != p.shape or buf.dtype != p.dtype
                    or buf.device != p.device or not buf.is_contiguous()):
                buf = self.buf = torch.empty_like(p, memory_format=torch.contiguous_format)
            if out_fn is not None:
                out_fn(buf)
            else:
                buf.copy_(value_fn())
            p.grad = buf
            self.fresh = True
        else:
            g.add_(value_fn())
            self.fresh = self.fresh and g is self.buf


class _LinearGrads:
    """The sinks of one nn.Linear (weight, bias), in _SINKS (not on the module, so copies and
    pickles of the model do not share them)."""

    def __init__(self, module: nn.Linear):
        self.module = weakref.ref(module)
        self.weight, self.bias = _GradSink(), _GradSink()
        self._cast = self._cast_key = self._scratch = None
        self._own = None  # our cast buffer, while _cast is the optimizer's copy
        _watch_optimizer_steps(self)

    def cast_weight(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """w.to(dtype), in a buffer kept from step to step. Refreshed after every optimizer step
        (torch.optim hooks) and whenever w is replaced or modified in place (data pointer,
        version); a second forward between two steps, as SMART's, reuses it. Like autocast's own
        weight cache it assumes nothing else rewrites weights behind autograd's back (through
        `.data`) between two steps. A refresh while an earlier graph still holds the buffer makes
        that graph's backward fail with autograd's in-place error, never use the new values.

        After a step of smarter_fast.optim.AdamW the buffer is the optimizer's low-precision copy
        (see _adopt_stepped_grad), already cast. It is a view sharing one version counter with
        every other layer's copy, so a refresh between two steps goes into our own buffer: an
        in-place cast there would also bump the copies other layers saved for backward."""
        key = (w._version, w.data_ptr(), dtype)
        if self._cast_key != key:
            c = self._cast
            if self._own is not None:  # leave the optimizer's copy
                c, self._own = self._own, None
            if c is None or c.shape != w.shape or c.dtype != dtype or c.device != w.device:
                c = torch.empty(w.shape, dtype=dtype, device=w.device)
            c.copy_(w)
            self._cast, self._cast_key = c, key
        return self._cast

    def scratch(self, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A kept buffer shaped like `like` in dtype, for a value used only inside backward."""
        b = self._scratch
        if b is None or b.shape != like.shape or b.dtype != dtype or b.device != like.device:
            b = self._scratch = torch.empty(like.shape, dtype=dtype, device=like.device)
        return b

    def _check_before_step(self) -> None:
        m = self.module()
        for p, sink in (((m.weight, self.weight), (m.bias, self.bias)) if m is not None else ()):
            sink.fresh = sink.fresh and p is not None and p.grad is sink.buf

    def _adopt_stepped_grad(self, optimizer=None, held=None) -> None:
        m = self.module()
        if m is None:
            self._cast_key = None
            return
        self._adopt_cast(m.weight, optimizer, held)
        for p, sink in ((m.weight, self.weight), (m.bias, self.bias)):
            if p is None:
                continue
            g, buf = p.grad, sink.buf
            if (sink.fresh and buf is not None and g is not None and g is not buf
                    and g.shape == buf.shape and g.dtype == buf.dtype and g.device == buf.device
                    and g.is_contiguous()):
                sink.buf = g
            sink.fresh = False

    def _adopt_cast(self, w: torch.Tensor, optimizer, held) -> None:
        """After optimizer.step(): is our cast of w still w.to(dtype)? A step of an optimizer
        that does not hold w (ids in `held`) left it alone. One that holds it may have changed
        it without bumping its version: cast again, unless it is smarter_fast.optim.AdamW, which
        hands out its copy, rewritten in the same pass as the update (low_precision_copy)."""
        c = self._cast
        if held is not None and id(w) not in held:
            pass  # e.g. another model's optimizer
        elif not hasattr(optimizer, "low_precision_copy"):  # a torch optimizer: cast again
            self._cast_key = None
        else:
            copy = optimizer.low_precision_copy(w, c.dtype) if c is not None else None
            if copy is None:
                self._cast_key = None
            else:
                if self._own is None:
                    self._own = c
                self._cast, self._cast_key = copy, (w._version, w.data_ptr(), c.dtype)


def _bias_grad(g2: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The bias gradient g2.sum(0) of a (rows, out) output gradient, in `dtype` (into `out`).
    A bf16 g2 is summed in bf16 (fp32 accumulation inside, one rounding) and then cast, as
    autocast's F.linear backward does; sum(dtype=float32) would first cast all of g2 (4x slower
    at (400, 1536))."""
    if g2.dtype == dtype:
        return torch.sum(g2, 0, out=out) if out is not None else g2.sum(0)
    s = g2.sum(0)
    return out.copy_(s) if out is not None else s.to(dtype)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, sinks, dtype, act):
        if dtype is not None:  # autocast: compute in its dtype, as F.linear would
            x = x.to(dtype)
            weight = sinks.cast_weight(weight, dtype) if KEEP_CAST_BUFFERS else weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        pre = x
        if act is not None:  # x is the activation's input: linear(act(x))
            x = _FUSED_ACTIVATIONS[act](pre)
            ctx.save_for_backward(x, weight, pre)
        else:
            ctx.save_for_backward(x, weight)
        ctx.sinks, ctx.has_bias, ctx.act = sinks, bias is not None, act
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors[:2]
        gy = gy.to(w.dtype)
        gx = gy @ w if ctx.needs_input_grad[0] else None
        if gx is not None and ctx.act is not None:
            # The activation's backward in place, into the buffer just allocated for gx: one
            # (tokens, I) tensor fewer per layer than a separate activation node.
            pre = ctx.saved_tensors[2]
            if ctx.act == "relu":
                gx.masked_fill_(pre <= 0, 0.0)
            else:
                approximate = "tanh" if ctx.act == "gelu_tanh" else "none"
                torch.ops.aten.gelu_backward.grad_input(gx, pre, approximate=approximate,
                                                        grad_input=gx)
        g2 = gy.reshape(-1, gy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        m = ctx.sinks.module()
        w_route = _grad_route(ctx, 1) if m.weight.requires_grad else "skip"
        b_route = _grad_route(ctx, 2) if ctx.has_bias and m.bias.requires_grad else "skip"
        gw = gb = None
        with torch.no_grad():
            if w_route == "sink":
                def into(buf):  # the fp32 gradient of a bf16 GEMM goes through a kept buffer
                    if buf.dtype == g2.dtype:
                        torch.mm(g2.t(), x2, out=buf)
                    elif KEEP_CAST_BUFFERS:
                        buf.copy_(torch.mm(g2.t(), x2, out=ctx.sinks.scratch(buf, g2.dtype)))
                    else:
                        buf.copy_(g2.t() @ x2)
                ctx.sinks.weight.write(m.weight, lambda: g2.t() @ x2, into)
            elif w_route == "return":
                gw = (g2.t() @ x2).to(m.weight.dtype)
            if b_route == "sink":
                ctx.sinks.bias.write(m.bias, lambda: _bias_grad(g2, m.bias.dtype),
                                     lambda buf: _bias_grad(g2, buf.dtype, out=buf))
            elif b_route == "return":
                gb = _bias_grad(g2, m.bias.dtype)
        return gx, gw, gb, None, None, None


_SINKS: "weakref.WeakKeyDictionary[nn.Linear, _LinearGrads]" = weakref.WeakKeyDictionary()


class _ClsQKV(torch.autograd.Function):
    """The last layer's QKV projection when only [CLS] is read out: the query of token 0 alone
    (rows :H of the fused weight), keys and values of every token (rows H:). One node, whose
    weight gradient is written into the sink in two row blocks (slicing the weight under
    autograd would zero-fill and add a full-size gradient per slice)."""

    @staticmethod
    def forward(ctx, x, weight, bias, sinks, dtype):
        if dtype is not None:
            x, bias = x.to(dtype), bias.to(dtype)
            weight = sinks.cast_weight(weight, dtype) if KEEP_CAST_BUFFERS else weight.to(dtype)
        H = x.shape[-1]
        x0 = x[:, 0]
        ctx.save_for_backward(x, weight)
        ctx.sinks = sinks
        return F.linear(x0, weight[:H], bias[:H]), F.linear(x, weight[H:], bias[H:])

    @staticmethod
    def backward(ctx, gq, gkv):
        x, w = ctx.saved_tensors
        H = x.shape[-1]
        gq, gkv = gq.to(w.dtype), gkv.to(w.dtype)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = gkv @ w[H:]
            gx[:, 0] += gq @ w[:H]
        gkv2, x2, x0 = gkv.reshape(-1, gkv.shape[-1]), x.reshape(-1, H), x[:, 0]
        m = ctx.sinks.module()
        w_route = _grad_route(ctx, 1) if m.weight.requires_grad else "skip"
        b_route = _grad_route(ctx, 2) if m.bias.requires_grad else "skip"
        gw = gb = None
        with torch.no_grad():
            if w_route == "sink":
                def into(buf):
                    for rows, (a, b) in ((slice(None, H), (gq, x0)), (slice(H, None), (gkv2, x2))):
                        if buf.dtype == a.dtype:
                            torch.mm(a.t(), b, out=buf[rows])
                        else:
                            buf[rows].copy_(a.t() @ b)
                ctx.sinks.weight.write(m.weight, lambda: torch.cat([gq.t() @ x0, gkv2.t() @ x2]),
                                       into)
            elif w_route == "return":
                gw = torch.cat([gq.t() @ x0, gkv2.t() @ x2]).to(m.weight.dtype)
            if b_route == "sink":
                def bias_into(buf):
                    _bias_grad(gq, buf.dtype, out=buf[:H])
                    _bias_grad(gkv2, buf.dtype, out=buf[H:])
                ctx.sinks.bias.write(m.bias, lambda: torch.cat(
                    [_bias_grad(gq, m.bias.dtype), _bias_grad(gkv2, m.bias.dtype)]), bias_into)
            elif b_route == "return":
                gb = torch.cat([_bias_grad(gq, m.bias.dtype), _bias_grad(gkv2, m.bias.dtype)])
        return gx, gw, gb, None, None


def _fused_grads(module: nn.Linear, x: torch.Tensor):
    """(sinks, autocast dtype) if module's gradients can be written into the optimizer's memory
    (see above), else None."""
    w = module.weight
    if not (FUSED_LINEAR_GRADS and torch.is_grad_enabled() and w.requires_grad
            and w.layout == torch.strided and not _distributed()):
        return None
    sinks = _SINKS.get(module)
    if sinks is None:
        sinks = _SINKS[module] = _LinearGrads(module)
    dtype = None
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    return sinks, dtype


def linear(module: nn.Linear, x: torch.Tensor, act: str | None = None) -> torch.Tensor:
    """module(x), or module(act(x)) for act in _FUSED_ACTIVATIONS, with the weight and bias
    gradients written into the optimizer's memory."""
    fused = _fused_grads(module, x)
    if fused is None:
        return module(_FUSED_ACTIVATIONS[act](x) if act is not None else x)
    return _Linear.apply(x, module.weight, module.bias, *fused, act)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class _WordEmbedding(torch.autograd.Function):
    """weight[ids] whose backward writes the weight gradient straight into weight.grad (see
    BertEmbeddings._word_lookup); returns no gradient through autograd for the weight."""

    @staticmethod
    def forward(ctx, ids, weight, owner):
        ctx.save_for_backward(ids)
        ctx.owner = owner
        return F.embedding(ids, weight, owner.word.padding_idx)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        route = _grad_route(ctx, 1)
        if route == "sink":
            ctx.owner._accumulate_word_grad(ids, grad)
        elif route == "return":
            w = ctx.owner.word
            pad = -1 if w.padding_idx is None else w.padding_idx
            return None, torch.ops.aten.embedding_dense_backward(
                grad.to(w.weight.dtype), ids, w.num_embeddings, pad, False), None
        return None, None, None


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
        W, b = self.qkv.weight, self.qkv.bias
        fused = _fused_grads(self.qkv, x) if b is not None else None
        if fused is not None:
            q, kv = _ClsQKV.apply(x, W, b, *fused)
        else:
            q, kv = F.linear(x[:, 0], W[:H], b[:H]), F.linear(x, W[H:], b[H:])
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
