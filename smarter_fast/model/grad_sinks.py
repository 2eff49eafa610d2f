"""Gradient sinks: parameter gradients written straight into the optimizer's memory.

With `zero_grad(set_to_none=True)` autograd allocates every weight gradient afresh each step,
and the flat-buffer AdamW (smarter_fast.optim) then copies it into its flat grad buffer; the
word embedding's backward zero-fills a dense (vocab, H) gradient for the few hundred rows a
batch touches; under bf16 autocast every Linear weight is cast again each forward. Fresh
megabyte-sized tensors cost page faults on a CPU, so each of these is a measurable share of a
step (docs/design.md, "Gradient sinks").

`attach_grad_sinks(model, optimizer)` switches this on for one model and one optimizer. The
encoder calls `linear`, `cls_qkv` and `word_embedding` below; without an attached sink they are
plain `nn.Linear` / `F.linear` / `nn.Embedding` calls. With one:
- `linear` writes grad_W and grad_b into a buffer per parameter installed as `p.grad` (added
  into an existing `.grad`, as autograd accumulates); after an optimizer step the buffer becomes
  the optimizer's own grad view, so later steps neither allocate nor copy;
- `word_embedding` adds the touched rows into a kept (vocab, H) buffer and re-zeroes only the
  rows it held last time;
- under autocast, each weight's low-precision copy is kept from step to step; under
  smarter_fast.optim.AdamW it is the optimizer's `low_precision_copy`, which the fused step
  rewrites, so no cast pass remains.
Values equal autograd's (tests/model/test_grad_sinks.py). Caveats: a caller that keeps a
reference to an old `.grad` across `p.grad = None` and a new backward sees it reused (copy it,
as the optimizer and gradient surgery do); a caller that writes other rows of the word
embedding's `.grad` in place and then sets it to None must zero it instead.

Under torch.distributed the sinks stand aside (with one message): DDP's reducer hooks on
autograd's own gradient accumulation, which a sink bypasses.
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..optim import AdamW

log = logging.getLogger(__name__)

# the function each activation name of BertConfig.hidden_act maps to, applied inside linear()
ACTIVATION_FNS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
                  "relu": F.relu}

_will_engine_execute_node = getattr(torch._C, "_will_engine_execute_node", None)
_told_distributed = False


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _under_distributed() -> bool:
    """True under torch.distributed, where the sinks stand aside; says why, once."""
    global _told_distributed
    if not _distributed():
        return False
    if not _told_distributed:
        log.info("gradient sinks off under torch.distributed: DDP's gradient hooks need "
                 "autograd's own accumulation (plain autograd gradients from here on)")
        _told_distributed = True
    return True


def _usable(sink, weight: torch.Tensor) -> bool:
    """Whether a sink should take this call's gradient: one is attached, a gradient is being
    recorded for a dense weight, and no process group wants autograd's accumulation."""
    return (sink is not None and torch.is_grad_enabled() and weight.requires_grad
            and weight.layout == torch.strided and not _under_distributed())


def _none():
    return None


class _Detached:
    """Base of the per-module sinks: a copy (EMA, SMART teacher) or a pickle of the model does
    not share them, it gets none."""

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (_none, ())


def _grad_route(ctx, index: int) -> str:
    """Where the gradient of input `index` of a node that writes parameter gradients itself goes
    in the graph task being run:
    - "sink": a .backward() that reaches the parameter: write p.grad, as autograd accumulates;
    - "skip": the parameter is not wanted: torch.autograd.grad, or .backward(inputs=...), for
      other tensors (SMART's adversarial ascent asks for the perturbation's gradient alone):
      no GEMM, and p.grad is left as it is;
    - "return": torch.autograd.grad asks for this parameter: hand the gradient to autograd.
    Without the engine query (older torch) everything goes to the sink."""
    node = ctx.next_functions[index][0]
    if node is None:
        return "skip"
    if _will_engine_execute_node is None:
        return "sink"
    try:
        return "sink" if _will_engine_execute_node(node) else "skip"
    except RuntimeError:  # raised for a leaf that torch.autograd.grad captures
        return "return"


def _adopted(fresh: bool, buf, g):
    """The buffer after an optimizer step: if the optimizer moved our buffer's values into a
    gradient of its own (our AdamW copies stray grads into its flat grad buffer and re-points
    .grad at its view), that tensor, which holds values where ours did, becomes the buffer: the
    next backward writes into the optimizer's memory."""
    if (fresh and buf is not None and g is not None and g is not buf and g.shape == buf.shape
            and g.dtype == buf.dtype and g.device == buf.device and g.is_contiguous()):
        return g
    return buf


class _GradSink:
    """Where a fresh gradient of one parameter is written."""

    __slots__ = ("buf", "fresh")

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

    def before_step(self, p) -> None:
        # Adopt after the step only what the optimizer copied from our own buffer: a .grad
        # that someone replaced (gradient surgery writing combined grads) is not ours.
        self.fresh = self.fresh and p is not None and p.grad is self.buf

    def after_step(self, p) -> None:
        self.buf, self.fresh = _adopted(self.fresh, self.buf, p.grad), False


class LinearSinks(_Detached):
    """The sinks of one nn.Linear (weight, bias) and its kept low-precision weight."""

    def __init__(self, module: nn.Linear, keep_cast_buffers: bool = True):
        self.module = weakref.ref(module)
        self.weight, self.bias = _GradSink(), _GradSink()
        self.keep_cast_buffers = keep_cast_buffers
        self._cast = self._cast_key = self._scratch = None
        self._own = None  # our cast buffer, while _cast is the optimizer's copy

    def cast_weight(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """w.to(dtype), in a buffer kept from step to step (or a fresh cast without
        keep_cast_buffers). Refreshed after every optimizer step and whenever w is replaced or
        modified in place (data pointer, version); a second forward between two steps, as
        SMART's, reuses it. Like autocast's own weight cache it assumes nothing rewrites weights
        behind autograd's back (through `.data`) between two steps. A refresh while an earlier
        graph still holds the buffer makes that graph's backward fail with autograd's in-place
        error, never use the new values.

        After a step of smarter_fast.optim.AdamW the buffer is the optimizer's low-precision copy,
        already cast. That copy is a view sharing one version counter with every other layer's,
        so a refresh between two steps goes into our own buffer: an in-place cast there would
        also bump the copies other layers saved for backward."""
        if not self.keep_cast_buffers:
            return w.to(dtype)
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
        """A buffer shaped like `like` in dtype, for a value used only inside backward."""
        if not self.keep_cast_buffers:
            return torch.empty(like.shape, dtype=dtype, device=like.device)
        b = self._scratch
        if b is None or b.shape != like.shape or b.dtype != dtype or b.device != like.device:
            b = self._scratch = torch.empty(like.shape, dtype=dtype, device=like.device)
        return b

    def before_step(self) -> None:
        m = self.module()
        if m is not None:
            self.weight.before_step(m.weight)
            self.bias.before_step(m.bias)

    def after_step(self, held: set, low_precision_copy) -> None:
        m = self.module()
        if m is None:
            self._cast_key = None
            return
        self._adopt_cast(m.weight, held, low_precision_copy)
        for p, sink in ((m.weight, self.weight), (m.bias, self.bias)):
            if p is not None:
                sink.after_step(p)

    def _adopt_cast(self, w: torch.Tensor, held: set, low_precision_copy) -> None:
        """After optimizer.step(): is our cast of w still w.to(dtype)? A step that does not hold
        w left it alone. One that holds it may have changed it without bumping its version:
        cast again, unless the optimizer hands out its own copy, rewritten in the same pass as
        the update (smarter_fast.optim.AdamW.low_precision_copy)."""
        c = self._cast
        if id(w) not in held:
            return
        copy = low_precision_copy(w, c.dtype) if (c is not None and low_precision_copy) else None
        if copy is None:
            self._cast_key = None
            return
        if self._own is None:
            self._own = c
        self._cast, self._cast_key = copy, (w._version, w.data_ptr(), c.dtype)


class WordSink(_Detached):
    """The word embedding's gradient buffer: the rows a backward touched are added into it, and
    only those rows are re-zeroed before the next fresh gradient. Same values as F.embedding's
    backward (padding_idx rows get none)."""

    def __init__(self, module: nn.Embedding):
        self.module = weakref.ref(module)
        self.buf, self.rows, self.fresh = None, None, False

    @torch.no_grad()
    def accumulate(self, ids: torch.Tensor, grad: torch.Tensor) -> None:
        m = self.module()
        w = m.weight
        ids = ids.reshape(-1)
        g = grad.reshape(-1, w.shape[1]).to(w.dtype)
        if m.padding_idx is not None:
            keep = ids != m.padding_idx
            ids, g = ids[keep], g[keep]
        buf = self.buf
        if w.grad is None:
            if buf is None or buf.shape != w.shape or buf.dtype != w.dtype or buf.device != w.device:
                buf = torch.zeros_like(w, memory_format=torch.contiguous_format)
            elif self.rows.numel():
                buf.index_fill_(0, self.rows, 0.0)
            self.buf, self.rows = buf, ids
            w.grad = buf
        elif w.grad is buf:  # a second backward before the step: more rows to clear later
            rows = torch.cat([self.rows, ids])
            self.rows = rows.unique() if rows.numel() > w.shape[0] else rows
        # weight.grad now holds values on self.rows only (what after_step needs)
        self.fresh = w.grad is buf
        w.grad.index_add_(0, ids, g)

    def before_step(self) -> None:
        m = self.module()
        self.fresh = self.fresh and m is not None and self.buf is not None and m.weight.grad is self.buf

    def after_step(self, held: set, low_precision_copy) -> None:
        m = self.module()  # the adopted gradient is nonzero on our rows only, as the buffer was
        self.buf = _adopted(self.fresh, self.buf, m.weight.grad if m is not None else None)
        self.fresh = False


class GradSinks(_Detached):
    """The sinks of one model, stepped by one optimizer (or none: gradients only). Returned by
    attach_grad_sinks; `detach()` restores plain autograd. Attaching again replaces them."""

    def __init__(self, model: nn.Module, optimizer=None, keep_cast_buffers: bool = True):
        previous = model.__dict__.get("_grad_sinks")
        if previous is not None:
            previous.detach()
        model._grad_sinks = self
        _under_distributed()  # says now, once, why they will stand aside
        self.sinks = []
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m._grad_sink = LinearSinks(m, keep_cast_buffers)
            elif isinstance(m, nn.Embedding):
                m._grad_sink = WordSink(m)
            else:
                continue
            self.sinks.append(m._grad_sink)
        self._modules = [weakref.ref(m) for m in model.modules() if hasattr(m, "_grad_sink")]
        # Only our AdamW offers low-precision copies it rewrites itself; any other optimizer's
        # step means: cast again.
        self.low_precision_copy = (optimizer.low_precision_copy
                                   if isinstance(optimizer, AdamW) else None)
        self._hooks = []
        if optimizer is not None:
            self._hooks = [optimizer.register_step_pre_hook(self._before_step),
                           optimizer.register_step_post_hook(self._after_step)]

    def _before_step(self, optimizer, args, kwargs) -> None:
        for s in self.sinks:
            s.before_step()

    def _after_step(self, optimizer, args, kwargs) -> None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for s in self.sinks:
            s.after_step(held, self.low_precision_copy)

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for ref in self._modules:
            m = ref()
            if m is not None and getattr(m, "_grad_sink", None) in self.sinks:
                m._grad_sink = None
        self.sinks = []


def attach_grad_sinks(model: nn.Module, optimizer=None, *,
                      keep_cast_buffers: bool = True) -> GradSinks:
    """Let `model`'s encoder write its gradients into `optimizer`'s memory (see above). Call it
    once, after the optimizer is built, with the optimizer that steps the model (the Trainer's
    step does): only that optimizer's steps refresh the kept bf16 weights and hand over its
    buffers; attaching again replaces the sinks. optimizer=None: gradients only, for code that
    steps the weights itself; weights are then cast afresh each forward, since no step hook says
    when they changed. keep_cast_buffers=False casts afresh in any case (for comparison)."""
    return GradSinks(model, optimizer, keep_cast_buffers and optimizer is not None)


# ---- the calls the encoder makes ---------------------------------------------------------------

def _sink(module):
    return module.__dict__.get("_grad_sink")


def linear(module: nn.Linear, x: torch.Tensor, act: str | None = None) -> torch.Tensor:
    """module(x), or module(act(x)) for act in ACTIVATION_FNS, with the weight and bias
    gradients written by the module's sink when one is attached."""
    sinks = _sink(module)
    if not _usable(sinks, module.weight):
        return module(ACTIVATION_FNS[act](x) if act is not None else x)
    return _Linear.apply(x, module.weight, module.bias, sinks, _autocast_dtype(x), act)


def cls_qkv(module: nn.Linear, x: torch.Tensor):
    """The fused QKV projection when only [CLS] is read out: (query of token 0 (B, H), keys and
    values of every token (B, L, 2H)); rows :H of the weight are the query's."""
    H = x.shape[-1]
    W, b = module.weight, module.bias
    sinks = _sink(module)
    if b is None or not _usable(sinks, W):
        return F.linear(x[:, 0], W[:H], None if b is None else b[:H]), \
            F.linear(x, W[H:], None if b is None else b[H:])
    return _ClsQKV.apply(x, W, b, sinks, _autocast_dtype(x))


def word_embedding(module: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """module(ids), its weight gradient added into the sink's buffer when one is attached."""
    sink = _sink(module)
    if not _usable(sink, module.weight):
        return module(ids)
    return _WordEmbedding.apply(ids, module.weight, sink)


def _autocast_dtype(x: torch.Tensor):
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def bias_grad(g2: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The bias gradient g2.sum(0) of a (rows, out) output gradient, in `dtype` (into `out`).
    A bf16 g2 is summed in bf16 (fp32 accumulation inside, one rounding) and then cast, as
    autocast's F.linear backward does; sum(dtype=float32) would first cast all of g2
    (benchmarks/bench_bf16_casts.py)."""
    if g2.dtype == dtype:
        return torch.sum(g2, 0, out=out) if out is not None else g2.sum(0)
    s = g2.sum(0)
    return out.copy_(s) if out is not None else s.to(dtype)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, sinks, dtype, act):
        if dtype is not None:  # autocast: compute in its dtype, as F.linear would
            x = x.to(dtype)
            weight = sinks.cast_weight(weight, dtype)
            bias = bias.to(dtype) if bias is not None else None
        pre = x
        if act is not None:  # x is the activation's input: linear(act(x))
            x = ACTIVATION_FNS[act](pre)
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
        sinks = ctx.sinks
        m = sinks.module()
        w_route = _grad_route(ctx, 1) if m.weight.requires_grad else "skip"
        b_route = _grad_route(ctx, 2) if ctx.has_bias and m.bias.requires_grad else "skip"
        gw = gb = None
        with torch.no_grad():
            if w_route == "sink":
                def into(buf):  # the fp32 gradient of a bf16 GEMM goes through a kept buffer
                    if buf.dtype == g2.dtype:
                        torch.mm(g2.t(), x2, out=buf)
                    else:
                        buf.copy_(torch.mm(g2.t(), x2, out=sinks.scratch(buf, g2.dtype)))
                sinks.weight.write(m.weight, lambda: g2.t() @ x2, into)
            elif w_route == "return":
                gw = (g2.t() @ x2).to(m.weight.dtype)
            if b_route == "sink":
                sinks.bias.write(m.bias, lambda: bias_grad(g2, m.bias.dtype),
                                 lambda buf: bias_grad(g2, buf.dtype, out=buf))
            elif b_route == "return":
                gb = bias_grad(g2, m.bias.dtype)
        return gx, gw, gb, None, None, None


class _ClsQKV(torch.autograd.Function):
    """cls_qkv as one node, whose weight gradient is written into the sink in two row blocks
    (slicing the weight under autograd would zero-fill and add a full-size gradient per
    slice)."""

    @staticmethod
    def forward(ctx, x, weight, bias, sinks, dtype):
        if dtype is not None:
            x, bias = x.to(dtype), bias.to(dtype)
            weight = sinks.cast_weight(weight, dtype)
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
                    bias_grad(gq, buf.dtype, out=buf[:H])
                    bias_grad(gkv2, buf.dtype, out=buf[H:])
                ctx.sinks.bias.write(m.bias, lambda: torch.cat(
                    [bias_grad(gq, m.bias.dtype), bias_grad(gkv2, m.bias.dtype)]), bias_into)
            elif b_route == "return":
                gb = torch.cat([bias_grad(gq, m.bias.dtype), bias_grad(gkv2, m.bias.dtype)])
        return gx, gw, gb, None, None


class _WordEmbedding(torch.autograd.Function):
    """weight[ids] whose backward adds the weight gradient into the sink (see WordSink);
    returns no gradient through autograd for the weight unless torch.autograd.grad asks."""

    @staticmethod
    def forward(ctx, ids, weight, sink):
        ctx.save_for_backward(ids)
        ctx.sink = sink
        return F.embedding(ids, weight, sink.module().padding_idx)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        route = _grad_route(ctx, 1)
        if route == "sink":
            ctx.sink.accumulate(ids, grad)
        elif route == "return":
            w = ctx.sink.module()
            pad = -1 if w.padding_idx is None else w.padding_idx
            return None, torch.ops.aten.embedding_dense_backward(
                grad.to(w.weight.dtype), ids, w.num_embeddings, pad, False), None
        return None, None, None


__all__ = ["GradSinks", "attach_grad_sinks", "linear", "cls_qkv", "word_embedding",
           "ACTIVATION_FNS"]
