"""AdamW with the CS224N minBERT semantics, stepping flat buffers in one fused call per group.

Semantics (docs/design.md, "Ops and their contracts"), per parameter with its own step count t:

    m = beta1 m + (1 - beta1) g
    v = beta2 v + (1 - beta2) g^2
    p -= lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps)    (lr if not correct_bias)
    p -= lr * weight_decay * p                                          (after the update)

Layout (what makes it fast). For each parameter group, the parameters that
require grad and are dense fp32 are packed per device into one *bucket*: four contiguous flat
buffers (params, grads, exp_avg, exp_avg_sq). At construction each parameter's data is copied
into the flat param buffer and `p.data` re-pointed to a view of it; `state[p]['exp_avg']` and
`['exp_avg_sq']` are views of the flat moment buffers and `p.grad`, once the optimizer has seen
a gradient, a view of the flat grad buffer. A step is then one `smarter_fast.ops.adamw_step_`
call over the whole bucket (28 bytes of memory traffic per parameter).

Behaving like a torch optimizer whatever the caller does with gradients:
- A parameter whose `.grad` is None is skipped (its p, m, v and step untouched), as in torch.
- A `.grad` that is not the flat view (autograd allocated a fresh one after `zero_grad()` set
  grads to None, or the caller assigned `p.grad = tensor`) is copied into the flat grad buffer
  at `step()` (one `_foreach_copy_`) and `p.grad` re-pointed to the view. With the default
  `zero_grad(set_to_none=True)` this copy happens every step; it costs 8 bytes per parameter,
  less than zeroing plus accumulating in place that `set_to_none=False` implies.
- The fused call covers maximal runs of adjacent parameters that all have a gradient and the
  same step count: one call in the common case, a few slices when some parameters got no
  gradient or joined training later (their bias correction uses their own step).
- `p.data` replaced by the caller (same shape, dtype, device) is copied back into the flat
  buffer; a parameter moved to another dtype or device (e.g. `model.double()` after building
  the optimizer) leaves its bucket, keeps its state, and is stepped on its own from then on.

Everything else (parameters that did not require grad at construction, non-fp32 or sparse
layouts, zero-sized parameters, parameters whose memory overlaps another's) is stepped one call
per parameter with lazily created state, like torch's AdamW. Build the optimizer after moving
the model to its device and dtype to keep the fused path.

Low-precision copies (`low_precision_copy(p)`): a bf16 copy of a flat-buffered parameter that
every step rewrites in the same fused pass as the update. bf16 training casts every Linear
weight after each step; written here, the cast costs 2 bytes per element instead of a second
pass reading 4 and writing 2 (its gain: benchmarks/README.md).

`state_dict()` saves like any torch optimizer: per parameter `step` (a float32 scalar tensor,
as torch.optim.AdamW) and `exp_avg` / `exp_avg_sq` shaped like the parameter (copies, so the
result does not alias the live buffers and can be saved by any format); `load_state_dict()`
copies them into the flat buffers so every view stays valid.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch

from ..ops import adamw_step_
from ..ops.registry import BACKEND_NAMES

def _check_hparams(lr, betas, eps, weight_decay, backend) -> None:
    lr_value = float(lr) if torch.is_tensor(lr) else lr
    if not (isinstance(lr_value, numbers.Real) and lr_value >= 0.0):
        raise ValueError(f"Invalid learning rate: {lr!r} (must be a number >= 0)")
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))") from None
    for i, b in enumerate((beta1, beta2)):
        if not (isinstance(b, numbers.Real) and 0.0 <= b < 1.0):
            raise ValueError(f"Invalid beta parameter at index {i}: {b!r} "
                             f"(must be in [0, 1))")
    if not (isinstance(eps, numbers.Real) and eps >= 0.0):
        raise ValueError(f"Invalid epsilon value: {eps!r} (must be >= 0)")
    if not (isinstance(weight_decay, numbers.Real) and weight_decay >= 0.0):
        raise ValueError(f"Invalid weight_decay value: {weight_decay!r} (must be >= 0)")
    if backend is not None and backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(f"Invalid backend: {backend!r} "
                         f"(expected one of: auto, {', '.join(BACKEND_NAMES)})")


def _as_int_step(step) -> int:
    if torch.is_tensor(step):
        step = step.item()
    return int(round(float(step)))


@dataclass(eq=False)
class _Entry:
    """One parameter inside a bucket: where it lives in the flat buffers."""

    param: torch.Tensor
    offset: int
    numel: int
    shape: torch.Size
    data_ptr: int  # of the flat param view, to notice when the caller replaces p.data
    view: torch.Tensor  # flat param slice shaped like p
    grad_view: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    attached: bool = True  # False once the parameter left the bucket (moved dtype/device)


@dataclass(eq=False)
class _Bucket:
    device: torch.device
    dtype: torch.dtype
    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    entries: list = field(default_factory=list)
    # bf16 copies (low_precision_copy): one buffer over flat elements [copy_lo, copy_lo +
    # copy.numel()) spanning every requested entry; copy_marks[id(entry)] = (p._version,
    # p.data_ptr()) when that entry's copy was last written, to notice changes made elsewhere.
    copy: torch.Tensor | None = None
    copy_lo: int = 0
    copy_marks: dict = field(default_factory=dict)
    index: dict = field(default_factory=dict)  # id(param) -> its entry


@dataclass(eq=False)
class _Layout:
    """How one parameter group is stored: flat buckets plus loose parameters."""

    buckets: list = field(default_factory=list)
    loose: list = field(default_factory=list)
    known: set = field(default_factory=set)  # ids of the group's params seen so far


@dataclass(frozen=True)
class FlatBuffers:
    """One group's flat buffers for one device/dtype (see `AdamW.flat_buffers`).

    `params[i]` is `param[offsets[i][0] : offsets[i][0] + offsets[i][1]]` viewed as its shape;
    so are its gradient (once the optimizer has seen one: `p.grad` is then the view of `grad`),
    `exp_avg` and `exp_avg_sq`; parameters follow each other without gaps. Slices
    of parameters whose `.grad` is None hold stale values; call `AdamW.sync_grads()` before
    working on `grad` directly so that gradients the caller or autograd left elsewhere are in it.
    """

    group: int
    device: torch.device
    dtype: torch.dtype
    params: tuple
    offsets: tuple  # (offset, numel) per parameter
    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor


class AdamW(torch.optim.Optimizer):
    """AdamW (CS224N minBERT semantics) over flat fp32 buffers; see the module docstring.

    Args: params (iterable of tensors or of dicts defining parameter groups), lr, betas, eps,
    weight_decay (decoupled, applied after the Adam update), correct_bias (Kingma & Ba's
    "efficient" bias correction), backend ("auto" | "ref" | "cpp" | "triton", for
    `smarter_fast.ops.adamw_step_`; "auto" defers to SMARTER_FAST_BACKEND). Groups may
    override every hyper-parameter, `correct_bias` and `backend` included.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True, backend: str = "auto"):
        _check_hparams(lr, betas, eps, weight_decay, backend)
        self._layouts: list[_Layout] = []
        # numpy scalars become Python floats: state_dict() must load with weights_only=True
        lr = lr if torch.is_tensor(lr) else float(lr)
        defaults = dict(lr=lr, betas=tuple(float(b) for b in betas), eps=float(eps),
                        weight_decay=float(weight_decay), correct_bias=correct_bias, backend=backend)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("correct_bias", True)
            group.setdefault("backend", "auto")
        if "_layouts" not in self.__dict__:  # unpickled or deep-copied: lay the params out again
            self._layouts = [self._build_layout(g["params"]) for g in self.param_groups]
            self._adopt_state()

    # ---- groups and layout ------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        _check_hparams(merged["lr"], merged["betas"], merged["eps"], merged["weight_decay"],
                       merged["backend"])
        super().add_param_group(param_group)
        self._layouts.append(self._build_layout(self.param_groups[-1]["params"]))

    @staticmethod
    def _flattenable(p: torch.Tensor) -> bool:
        return (p.requires_grad and p.dtype == torch.float32 and p.layout == torch.strided
                and p.device.type in ("cpu", "cuda") and p.numel() > 0
                and type(p.data) is torch.Tensor)

    def _build_layout(self, params) -> _Layout:
        layout = _Layout()
        seen, unique = set(), []
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                unique.append(p)
        layout.known = seen
        candidates = [p for p in unique if self._flattenable(p)]
        overlapping = _overlapping(candidates)
        per_device: dict = {}
        for p in unique:
            if self._flattenable(p) and id(p) not in overlapping:
                per_device.setdefault(p.device, []).append(p)
            else:
                layout.loose.append(p)
        for device, plist in per_device.items():
            layout.buckets.append(self._build_bucket(device, torch.float32, plist))
        return layout

    def _build_bucket(self, device, dtype, plist) -> _Bucket:
        offsets, total = [], 0
        for p in plist:
            offsets.append(total)
            total += p.numel()
        flat = torch.zeros(total, dtype=dtype, device=device)
        bucket = _Bucket(device, dtype, flat, torch.zeros_like(flat), torch.zeros_like(flat),
                         torch.zeros_like(flat))
        for p, off in zip(plist, offsets):
            n = p.numel()

            def piece(buf, off=off, n=n, shape=p.shape):
                return buf[off:off + n].view(shape)

            view = piece(flat)
            with torch.no_grad():
                view.copy_(p.data)
            p.data = view
            entry = _Entry(p, off, n, p.shape, view.data_ptr(), view, piece(bucket.grad),
                           piece(bucket.exp_avg), piece(bucket.exp_avg_sq))
            if p.grad is not None:  # optimizer built after a backward: adopt that gradient
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                entry.grad_view.copy_(p.grad)
                p.grad = entry.grad_view
            bucket.entries.append(entry)
            bucket.index[id(p)] = entry
        return bucket

    def _adopt_new_params(self, group, layout: _Layout) -> None:
        """Parameters appended to group['params'] behind the optimizer's back: step them loose."""
        for p in group["params"]:
            if id(p) not in layout.known:
                layout.known.add(id(p))
                layout.loose.append(p)

    def _check_data(self, layout: _Layout, bucket: _Bucket, e: _Entry) -> bool:
        """True when e.param still lives in the bucket (re-attaching replaced data if it can)."""
        p = e.param
        if p.data_ptr() == e.data_ptr and p.dtype == bucket.dtype and p.shape == e.shape:
            return True
        data = p.data
        if (data.dtype == bucket.dtype and data.device == bucket.device
                and data.shape == e.shape and data.layout == torch.strided):
            with torch.no_grad():
                e.view.copy_(data)
            p.data = e.view
            if id(e) in bucket.copy_marks:  # new values, same data_ptr and version: cast again
                bucket.copy_marks[id(e)] = None
            return True
        # The parameter moved to another dtype/device: it leaves the bucket with its state.
        e.attached = False
        st = self.state.get(p)
        if st:
            for key in ("exp_avg", "exp_avg_sq"):
                st[key] = st[key].to(device=data.device, dtype=data.dtype,
                                     copy=True).reshape(data.shape)
        layout.loose.append(p)
        return False

    # ---- gradients ------------------------------------------------------------------------

    def _sync_bucket(self, layout: _Layout, bucket: _Bucket) -> list:
        """Copies stray gradients into the flat grad buffer and re-points p.grad at the views.
        Returns the attached entries that have a gradient."""
        active, dst, src = [], [], []
        for e in bucket.entries:
            if not e.attached or not self._check_data(layout, bucket, e):
                continue
            p = e.param
            g = p.grad
            if g is None:
                continue
            if g is not e.grad_view:
                if g.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                if not (g.data_ptr() == e.grad_view.data_ptr() and g.shape == e.shape
                        and g.dtype == bucket.dtype and g.is_contiguous()):
                    dst.append(e.grad_view)
                    src.append(g)
                p.grad = e.grad_view
            active.append(e)
        if dst:
            with torch.no_grad():
                if hasattr(torch, "_foreach_copy_"):
                    torch._foreach_copy_(dst, src)
                else:  # pragma: no cover - older torch
                    for d, s in zip(dst, src):
                        d.copy_(s)
        return active

    @torch.no_grad()
    def sync_grads(self) -> None:
        """Brings every gradient of a flat-buffered parameter into its group's flat grad buffer
        (`p.grad` becomes the view). `step()` does this itself; call it before reading or
        changing `flat_buffers()[i].grad` directly (all-reduce, gradient surgery)."""
        for group, layout in zip(self.param_groups, self._layouts):
            self._adopt_new_params(group, layout)
            for bucket in layout.buckets:
                self._sync_bucket(layout, bucket)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's: grads become None (default), or existing grads are zeroed in place; for
        flat-buffered parameters that is one fill of the flat grad buffer per bucket."""
        if set_to_none:
            super().zero_grad(set_to_none=True)
            return
        with torch.no_grad():
            for group, layout in zip(self.param_groups, self._layouts):
                self._adopt_new_params(group, layout)
                others = list(layout.loose)
                for bucket in layout.buckets:
                    bucket.grad.zero_()
                    for e in bucket.entries:
                        g = e.param.grad
                        if e.attached and g is not None and g is not e.grad_view:
                            others.append(e.param)
                for p in others:
                    g = p.grad
                    if g is None:
                        continue
                    if g.grad_fn is not None:
                        g.detach_()
                    else:
                        g.requires_grad_(False)
                    g.zero_()

    # ---- the step -------------------------------------------------------------------------

    @staticmethod
    def _hparams(group) -> dict:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        return dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2),
                    eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                    correct_bias=bool(group.get("correct_bias", True)),
                    backend=group.get("backend", "auto"))

    def _next_step(self, e_param, make_state) -> int:
        st = self.state[e_param]
        if not st:
            make_state(st)
        st["step"] = _as_int_step(st["step"]) + 1
        return st["step"]

    def _step_bucket(self, layout: _Layout, bucket: _Bucket, hp: dict) -> None:
        active = self._sync_bucket(layout, bucket)
        if not active:
            return
        runs = []  # [start, stop, step]: adjacent parameters with a gradient and equal step
        prev = None
        for e in active:
            def make_state(st, e=e):
                e.exp_avg.zero_()
                e.exp_avg_sq.zero_()
                st["step"] = 0
                st["exp_avg"] = e.exp_avg
                st["exp_avg_sq"] = e.exp_avg_sq

            step = self._next_step(e.param, make_state)
            if runs and prev is not None and runs[-1][2] == step and _adjacent(prev, e):
                runs[-1][1] = e.offset + e.numel
            else:
                runs.append([e.offset, e.offset + e.numel, step])
            prev = e
        total = bucket.param.numel()
        copy = bucket.copy
        for start, stop, step in runs:
            if start == 0 and stop == total:  # the whole bucket: one call on the flat buffers
                bufs = (bucket.param, bucket.grad, bucket.exp_avg, bucket.exp_avg_sq)
            else:
                bufs = tuple(b[start:stop] for b in (bucket.param, bucket.grad,
                                                     bucket.exp_avg, bucket.exp_avg_sq))
            extra = {}
            if copy is not None:  # the part of the bf16 copy inside this run, written in the pass
                lo = max(start, bucket.copy_lo)
                hi = min(stop, bucket.copy_lo + copy.numel())
                if lo < hi:
                    extra = dict(copy=copy[lo - bucket.copy_lo:hi - bucket.copy_lo],
                                 copy_offset=lo - start)
            adamw_step_(*bufs, step=step, **extra, **hp)
        if copy is not None:
            for e in active:
                if id(e) in bucket.copy_marks:
                    bucket.copy_marks[id(e)] = (e.param._version, e.param.data_ptr())
            # as an in-place cast would: a graph that saved the old copy fails loudly in backward
            torch.autograd.graph.increment_version(copy)

    def _step_loose(self, p: torch.Tensor, hp: dict) -> None:
        g = p.grad
        if g is None:
            return
        if g.is_sparse:
            raise RuntimeError("AdamW does not support sparse gradients")

        def make_state(st):
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)

        step = self._next_step(p, make_state)
        st = self.state[p]
        adamw_step_(p.detach(), g.detach(), st["exp_avg"], st["exp_avg_sq"], step=step, **hp)

    @torch.no_grad()
    def step(self, closure=None):
        """One optimisation step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, layout in zip(self.param_groups, self._layouts):
            self._adopt_new_params(group, layout)
            hp = self._hparams(group)
            for bucket in layout.buckets:
                self._step_bucket(layout, bucket, hp)
            for p in layout.loose:
                self._step_loose(p, hp)
        return loss

    # ---- low-precision copies -------------------------------------------------------------

    @torch.no_grad()
    def low_precision_copy(self, p: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
        """A `dtype` copy of parameter p (shaped like p, equal to p.to(dtype) now) that every
        later step() rewrites as it updates p, in the same pass; None where that is not offered
        (dtype other than bfloat16, p not in this optimizer's flat buffers).

        Ask again after every step: asking for a new parameter can move the copies, and the
        tensors handed out earlier then keep their values but are no longer written. A copy whose
        parameter was changed outside step() (an in-place op, `p.data = ...`) is cast again here.
        Each step bumps the copies' version counter, so a graph that saved one before the step
        fails in backward instead of using the new values."""
        if dtype != torch.bfloat16:
            return None
        found = self._find_entry(p)
        if found is None:
            return None
        bucket, e = found
        if id(e) not in bucket.copy_marks:
            self._cover(bucket, e)
        lo = e.offset - bucket.copy_lo
        view = bucket.copy[lo:lo + e.numel].view(e.shape)
        mark = (p._version, p.data_ptr())
        if bucket.copy_marks[id(e)] != mark:
            view.copy_(e.view)
            bucket.copy_marks[id(e)] = mark
        return view

    def _find_entry(self, p):
        for layout in self._layouts:
            for bucket in layout.buckets:
                e = bucket.index.get(id(p))
                if e is not None and e.param is p:
                    ok = e.attached and self._check_data(layout, bucket, e)
                    return (bucket, e) if ok else None
        return None

    @staticmethod
    def _cover(bucket: _Bucket, e: _Entry) -> None:
        """Grows the bucket's copy to span entry e too (cast afresh from the flat params)."""
        old, old_lo = bucket.copy, bucket.copy_lo
        lo, hi = e.offset, e.offset + e.numel
        if old is not None:
            lo, hi = min(lo, old_lo), max(hi, old_lo + old.numel())
        if old is None or lo < old_lo or hi > old_lo + old.numel():
            bucket.copy = bucket.param[lo:hi].to(torch.bfloat16)
            bucket.copy_lo = lo
        bucket.copy_marks[id(e)] = None  # cast by the caller

    # ---- state dict -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        sd = super().state_dict()
        packed = {}
        for key, st in sd["state"].items():
            new = {}
            for name, value in st.items():
                if name == "step":
                    value = torch.tensor(float(_as_int_step(value)), dtype=torch.float32)
                elif torch.is_tensor(value):
                    value = value.clone(memory_format=torch.contiguous_format)
                new[name] = value
            packed[key] = new
        sd["state"] = packed
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._adopt_state()

    def _adopt_state(self) -> None:
        """Copies per-parameter exp_avg / exp_avg_sq into the flat buffers (state then holds the
        views) and makes every step a Python int."""
        for layout in self._layouts:
            for bucket in layout.buckets:
                for e in bucket.entries:
                    if not e.attached:
                        continue
                    st = self.state.get(e.param)
                    if not st:
                        continue
                    for name, view in (("exp_avg", e.exp_avg), ("exp_avg_sq", e.exp_avg_sq)):
                        src = st.get(name)
                        if src is None:
                            view.zero_()
                        else:
                            if src.numel() != e.numel:
                                raise ValueError(
                                    f"loaded {name} has {src.numel()} elements, its parameter "
                                    f"{tuple(e.shape)} has {e.numel}")
                            with torch.no_grad():
                                view.copy_(src.reshape(e.shape))
                        st[name] = view
                    st["step"] = _as_int_step(st.get("step", 0))
            for p in layout.loose:
                st = self.state.get(p)
                if st:
                    st["step"] = _as_int_step(st.get("step", 0))
                    for name in ("exp_avg", "exp_avg_sq"):
                        if name not in st:
                            st[name] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                        else:
                            st[name] = st[name].contiguous()

    # ---- introspection --------------------------------------------------------------------

    def flat_buffers(self) -> list[FlatBuffers]:
        """Per group and device/dtype, the flat param/grad/exp_avg/exp_avg_sq buffers and where
        each parameter lives in them (parameters stepped on their own are not listed)."""
        out = []
        for gi, layout in enumerate(self._layouts):
            for b in layout.buckets:
                entries = [e for e in b.entries if e.attached]
                out.append(FlatBuffers(gi, b.device, b.dtype, tuple(e.param for e in entries),
                                       tuple((e.offset, e.numel) for e in entries),
                                       b.param, b.grad, b.exp_avg, b.exp_avg_sq))
        return out


def _overlapping(params) -> set:
    """ids of the parameters whose memory overlaps another's (aliases must stay aliases, so
    those are stepped on their own). Disjoint views of one storage (e.g. the flat buffers of an
    earlier optimizer over the same model) are fine to re-flatten."""
    spans = []
    for p in params:
        extent = 1 + sum((n - 1) * s for n, s in zip(p.shape, p.stride()))
        start = p.data_ptr()
        spans.append((p.device, start, start + extent * p.element_size(), id(p)))
    spans.sort(key=lambda t: (str(t[0]), t[1]))
    out, prev = set(), None
    for span in spans:
        if prev is not None and span[0] == prev[0] and span[1] < prev[2]:
            out.add(span[3])
            out.add(prev[3])
        if prev is None or span[0] != prev[0] or span[2] > prev[2]:
            prev = span
    return out


def _adjacent(prev: _Entry, e: _Entry) -> bool:
    """e starts where prev ends in the flat buffers (no parameter in between)."""
    return e.offset == prev.offset + prev.numel


__all__ = ["AdamW", "FlatBuffers"]
