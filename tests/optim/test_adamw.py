"""smarter_fast.optim.AdamW against an independent float64 reference, torch-like usage included."""

import copy
import io
import math

import pytest
import torch

from smarter_fast.optim import AdamW

BACKENDS = ["ref", "cpp"]
TOL = 1e-6  # relative error allowed per step (fp32 optimizer vs float64 reference)


def _cpp_reason():
    from smarter_fast.ops import OPS

    return OPS["adamw"].backends["cpp"].availability()


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "cpp":
        why = _cpp_reason()
        if why is not None:
            pytest.skip(f"cpp backend of adamw unavailable: {why}")
    return request.param


# ---- independent reference: one tensor at a time, float64, the formulas spelled out --------

def ref_step(p, g, m, v, t, lr, beta1, beta2, eps, wd, correct_bias):
    """Returns new (p, m, v) in float64 for one AdamW step number t (CS224N minBERT)."""
    p, g, m, v = (x.detach().to(torch.float64).clone() for x in (p, g, m, v))
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    if correct_bias:
        alpha = lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
    else:
        alpha = lr
    p = p - alpha * m / (torch.sqrt(v) + eps)
    p = p - lr * wd * p
    return p, m, v


def rel_err(a, b):
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return ((a - b).norm() / b.norm()).item()


def rand(*shape, gen, scale=1.0):
    """Random values bounded away from zero (never zeros)."""
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    x = torch.where(x.abs() < 0.05, x.sign() * 0.05 + x, x)
    x = torch.where(x == 0, torch.full_like(x, 0.1), x)
    return (x * scale).to(torch.float32)


ODD_SHAPES = [(7,), (3, 5), (13, 1, 3), (1,), (33,), (2, 3, 11)]


def make_params(gen, shapes=ODD_SHAPES):
    return [torch.nn.Parameter(rand(*s, gen=gen)) for s in shapes]


def snapshot(opt, p):
    """(p, m, v, step) of one parameter before a step (zeros and 0 when no state yet)."""
    st = opt.state.get(p)
    if not st:
        return p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p), 0
    return (p.detach().clone(), st["exp_avg"].detach().clone(),
            st["exp_avg_sq"].detach().clone(), int(st["step"]))


def checked_step(opt, params, grads, hp, tol=TOL):
    """Assigns grads (None: no grad), steps, and checks every parameter against ref_step.
    `hp`: the hyper-parameters, or a list of them (one per parameter)."""
    hps = hp if isinstance(hp, list) else [hp] * len(params)
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    before = [snapshot(opt, p) for p in params]
    opt.step()
    for p, g, (p0, m0, v0, t0), hp in zip(params, grads, before, hps):
        st = opt.state.get(p)
        if g is None:  # untouched
            assert torch.equal(p.detach(), p0)
            if st:
                assert int(st["step"]) == t0
                assert torch.equal(st["exp_avg"], m0) and torch.equal(st["exp_avg_sq"], v0)
            continue
        pr, mr, vr = ref_step(p0, g, m0, v0, t0 + 1, **hp)
        assert int(st["step"]) == t0 + 1
        assert st["exp_avg"].shape == p.shape
        assert rel_err(p, pr) <= tol, rel_err(p, pr)
        assert rel_err(st["exp_avg"], mr) <= tol
        assert rel_err(st["exp_avg_sq"], vr) <= tol


def hp_of(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True):
    return dict(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, wd=weight_decay,
                correct_bias=correct_bias)


# ---- steps against the reference ------------------------------------------------------------

@pytest.mark.parametrize("wd,correct_bias,betas,eps", [
    (0.0, True, (0.9, 0.999), 1e-6),
    (0.07, True, (0.8, 0.99), 1e-3),
    (0.3, False, (0.9, 0.999), 1e-6),
])
def test_matches_reference(backend, wd, correct_bias, betas, eps):
    gen = torch.Generator().manual_seed(1)
    params = make_params(gen)
    opt = AdamW(params, lr=3e-3, betas=betas, eps=eps, weight_decay=wd,
                correct_bias=correct_bias, backend=backend)
    hp = hp_of(3e-3, betas, eps, wd, correct_bias)
    assert len(opt.flat_buffers()) == 1
    for _ in range(5):
        checked_step(opt, params, [rand(*p.shape, gen=gen, scale=0.3) for p in params], hp)


def test_first_step_hand_computed(backend):
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-6
    g = torch.tensor([0.5, -2.0, 3e-3, -1e-4, 7.0])
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.25, 2.0, -3.0]))
    p0 = p.detach().clone().double()
    opt = AdamW([p], lr=lr, betas=(b1, b2), eps=eps, backend=backend)
    p.grad = g.clone()
    opt.step()
    # t = 1: m = (1-b1) g, v = (1-b2) g^2, so the update is lr * g / (|g| + eps / sqrt(1-b2))
    gd = g.double()
    expected = p0 - lr * gd / (gd.abs() + eps / math.sqrt(1 - b2))
    assert rel_err(p, expected) <= TOL
    # ... which is about lr * sign(g) for |g| >> eps
    big = gd.abs() > 0.1
    torch.testing.assert_close((p0 - p.detach().double())[big], lr * gd.sign()[big],
                               rtol=1e-3, atol=0)
    st = opt.state[p]
    assert int(st["step"]) == 1
    torch.testing.assert_close(st["exp_avg"].double(), (1 - b1) * gd, rtol=1e-6, atol=0)
    torch.testing.assert_close(st["exp_avg_sq"].double(), (1 - b2) * gd * gd, rtol=1e-6, atol=0)


def test_weight_decay_after_update(backend):
    # Large lr and decay so that decaying before / after the update differ visibly.
    lr, wd, eps = 0.1, 0.5, 1e-6
    p = torch.nn.Parameter(torch.tensor([2.0, -3.0, 0.5]))
    g = torch.tensor([1.0, 1.0, -1.0])
    opt = AdamW([p], lr=lr, weight_decay=wd, eps=eps, backend=backend)
    p.grad = g.clone()
    opt.step()
    update = lr * g.double() / (g.double().abs() + eps / math.sqrt(1 - 0.999))
    p0 = torch.tensor([2.0, -3.0, 0.5], dtype=torch.float64)
    after = (p0 - update) * (1 - lr * wd)
    before = p0 * (1 - lr * wd) - update
    assert rel_err(p, after) <= TOL
    assert rel_err(p, before) > 1e-3


def test_correct_bias_false_first_step(backend):
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-6
    p = torch.nn.Parameter(torch.tensor([1.0, -0.5, 3.0]))
    g = torch.tensor([0.2, -4.0, 1e-2])
    opt = AdamW([p], lr=lr, betas=(b1, b2), eps=eps, correct_bias=False, backend=backend)
    p.grad = g.clone()
    opt.step()
    gd = g.double()
    expected = torch.tensor([1.0, -0.5, 3.0], dtype=torch.float64) - lr * (1 - b1) * gd / (
        math.sqrt(1 - b2) * gd.abs() + eps)
    assert rel_err(p, expected) <= TOL


# ---- groups, missing grads, assigned grads, frozen params ------------------------------------

def test_param_groups_and_add_param_group(backend):
    gen = torch.Generator().manual_seed(2)
    a, b = make_params(gen, [(5, 3)]), make_params(gen, [(9,), (2, 7)])
    c = make_params(gen, [(11,)])
    opt = AdamW([{"params": a}, {"params": b, "lr": 5e-3, "weight_decay": 0.2}],
                lr=2e-2, weight_decay=0.01, backend=backend)
    hps = [hp_of(2e-2, weight_decay=0.01)] + [hp_of(5e-3, weight_decay=0.2)] * 2
    for _ in range(2):
        checked_step(opt, a + b, [rand(*p.shape, gen=gen) for p in a + b], hps)
    opt.add_param_group({"params": c, "lr": 1e-3, "correct_bias": False})
    hps.append(hp_of(1e-3, weight_decay=0.01, correct_bias=False))
    assert [fb.group for fb in opt.flat_buffers()] == [0, 1, 2]
    for _ in range(2):
        checked_step(opt, a + b + c, [rand(*p.shape, gen=gen) for p in a + b + c], hps)
    assert int(opt.state[c[0]]["step"]) == 2 and int(opt.state[a[0]]["step"]) == 4
    with pytest.raises(ValueError):
        opt.add_param_group({"params": a})  # already in a group


def test_missing_grads_are_skipped_and_steps_are_per_param(backend):
    gen = torch.Generator().manual_seed(3)
    params = make_params(gen)
    opt = AdamW(params, lr=1e-2, weight_decay=0.1, backend=backend)
    hp = hp_of(1e-2, weight_decay=0.1)
    patterns = [
        [True, False, True, True, False, True],   # some never had a grad
        [True, True, True, True, False, True],    # param 1 starts later: step 1 beside step 2
        [False, True, False, True, True, True],
        [True] * 6,
        [False] * 6,                               # nothing to do
        [True, True, False, False, True, True],
    ]
    for pattern in patterns:
        opt.zero_grad()
        assert all(p.grad is None for p in params)
        grads = [rand(*p.shape, gen=gen) if on else None for p, on in zip(params, pattern)]
        checked_step(opt, params, grads, hp)
    steps = [int(opt.state[p]["step"]) for p in params]
    assert steps == [4, 4, 3, 4, 3, 5]


def test_caller_assigned_and_autograd_grads(backend):
    gen = torch.Generator().manual_seed(4)
    params = make_params(gen, [(4, 3), (5,)])
    opt = AdamW(params, lr=1e-2, backend=backend)
    hp = hp_of(1e-2)
    (fb,) = opt.flat_buffers()
    # assigned tensors (even non-contiguous ones) are copied in; p.grad becomes the flat view
    g0 = rand(3, 4, gen=gen).t()
    g1 = rand(5, gen=gen)
    before = [snapshot(opt, p) for p in params]
    params[0].grad, params[1].grad = g0, g1
    opt.step()
    for p, g, (p0, m0, v0, t0) in zip(params, (g0, g1), before):
        assert rel_err(p, ref_step(p0, g, m0, v0, 1, **hp)[0]) <= TOL
    off0, n0 = fb.offsets[0]
    assert params[0].grad.data_ptr() == fb.grad[off0:off0 + n0].data_ptr()
    assert torch.equal(params[0].grad, g0)
    # autograd writes into the existing views in place after zero_grad(set_to_none=False)
    opt.zero_grad(set_to_none=False)
    assert float(fb.grad.abs().sum()) == 0.0
    assert params[0].grad.data_ptr() == fb.grad.data_ptr() + off0 * 4
    loss = (params[0] ** 2).sum() + params[1].sum()
    loss.backward()
    assert params[0].grad.data_ptr() == fb.grad.data_ptr() + off0 * 4
    torch.testing.assert_close(fb.grad[off0:off0 + n0].view(4, 3), 2 * params[0].detach())
    grads = [p.grad.clone() for p in params]
    before = [snapshot(opt, p) for p in params]
    opt.step()
    for p, g, (p0, m0, v0, t0) in zip(params, grads, before):
        pr, mr, vr = ref_step(p0, g, m0, v0, t0 + 1, **hp)
        assert rel_err(p, pr) <= TOL and rel_err(opt.state[p]["exp_avg"], mr) <= TOL


def test_params_without_requires_grad(backend):
    gen = torch.Generator().manual_seed(5)
    params = make_params(gen, [(6,), (3, 3), (5,)])
    frozen = params[1]
    frozen.requires_grad_(False)
    frozen0 = frozen.detach().clone()
    opt = AdamW(params, lr=1e-2, backend=backend)
    (fb,) = opt.flat_buffers()
    assert all(p is not frozen for p in fb.params) and len(fb.params) == 2
    hp = hp_of(1e-2)
    for _ in range(3):
        opt.zero_grad()
        (sum((p ** 3).sum() for p in params)).backward()
        assert frozen.grad is None
        checked_step(opt, params, [p.grad for p in params], hp)
    assert torch.equal(frozen.detach(), frozen0) and frozen not in opt.state
    # unfrozen later: stepped on its own, with its own step count
    frozen.requires_grad_(True)
    checked_step(opt, params, [rand(*p.shape, gen=gen) for p in params], hp)
    assert int(opt.state[frozen]["step"]) == 1 and int(opt.state[params[0]]["step"]) == 4


def test_non_fp32_params_step_per_param():
    gen = torch.Generator().manual_seed(6)
    p64 = torch.nn.Parameter(rand(7, gen=gen).double())
    p32 = torch.nn.Parameter(rand(5, gen=gen))
    opt = AdamW([p64, p32], lr=1e-2, weight_decay=0.05, backend="ref")
    assert [fb.params for fb in opt.flat_buffers()] == [(p32,)]
    hp = hp_of(1e-2, weight_decay=0.05)
    for _ in range(3):
        checked_step(opt, [p64, p32], [rand(7, gen=gen).double(), rand(5, gen=gen)], hp)
    assert opt.state[p64]["exp_avg"].dtype == torch.float64


def test_replaced_param_data_is_adopted(backend):
    gen = torch.Generator().manual_seed(7)
    params = make_params(gen, [(4,), (6,)])
    opt = AdamW(params, lr=1e-2, backend=backend)
    hp = hp_of(1e-2)
    checked_step(opt, params, [rand(*p.shape, gen=gen) for p in params], hp)
    params[0].data = rand(4, gen=gen)  # caller replaces the data (not a view of ours any more)
    checked_step(opt, params, [rand(*p.shape, gen=gen) for p in params], hp)
    (fb,) = opt.flat_buffers()
    assert params[0].data_ptr() == fb.param.data_ptr()
    # moved to another dtype: leaves the bucket with its state and keeps stepping correctly
    if backend == "ref":
        params[1].data = params[1].data.double()
        checked_step(opt, params, [rand(4, gen=gen), rand(6, gen=gen).double()], hp)
        assert opt.flat_buffers()[0].params == (params[0],)


# ---- low-precision copies ---------------------------------------------------------------------

def _bits(t):
    return t.detach().contiguous().view(torch.int16)


def test_low_precision_copies_follow_every_step(backend):
    """low_precision_copy(p) equals p.to(bfloat16) bit for bit after every step: requested
    before the first step and later (the copy buffer grows), for params that get no gradient
    in a step, after in-place changes and replaced data; the steps themselves are unchanged
    (checked against the reference)."""
    gen = torch.Generator().manual_seed(11)
    params = make_params(gen)
    opt = AdamW(params, lr=1e-2, weight_decay=0.1, backend=backend)
    hp = hp_of(1e-2, weight_decay=0.1)
    wanted = [params[2], params[4]]
    for p in wanted:
        assert _bits(opt.low_precision_copy(p)).equal(_bits(p.bfloat16()))
    patterns = [[True] * 6, [True, False, True, True, False, True], [False, True, True, False, True, True],
                [True] * 6, [True] * 6]
    for k, pattern in enumerate(patterns):
        grads = [rand(*p.shape, gen=gen) if on else None for p, on in zip(params, pattern)]
        checked_step(opt, params, grads, hp)
        if k == 1:
            wanted.append(params[0])  # before the others: the buffer grows downwards
        if k == 2:
            with torch.no_grad():
                params[2].mul_(1.5)  # changed outside step(): a new version
            params[4].data = rand(*params[4].shape, gen=gen)  # replaced data
        for p in wanted:
            copy = opt.low_precision_copy(p)
            assert copy.shape == p.shape and copy.dtype == torch.bfloat16
            assert _bits(copy).equal(_bits(p.bfloat16())), f"step {k}"


def test_low_precision_copy_version_and_unsupported(backend):
    gen = torch.Generator().manual_seed(12)
    params = make_params(gen, [(5, 3), (7,)])
    loose = torch.nn.Parameter(rand(4, gen=gen).double())  # stepped on its own: no copy
    opt = AdamW(params + [loose], lr=1e-2, backend=backend)
    assert opt.low_precision_copy(loose) is None
    assert opt.low_precision_copy(params[0], torch.float16) is None
    assert opt.low_precision_copy(torch.nn.Parameter(torch.ones(3))) is None
    copy = opt.low_precision_copy(params[0])
    saved = copy._version
    checked_step(opt, params, [rand(5, 3, gen=gen), rand(7, gen=gen)], hp_of(1e-2))
    assert copy._version > saved  # a graph that saved the old copy fails in backward
    assert _bits(copy).equal(_bits(params[0].bfloat16()))


# ---- state dict -----------------------------------------------------------------------------

def _mlp(gen):
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))


def _train(model, opt, batches, set_to_none=True):
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)


def test_state_dict_round_trip_continues_identically(backend):
    gen = torch.Generator().manual_seed(8)
    batches = [(rand(5, 7, gen=gen), rand(5, 3, gen=gen)) for _ in range(6)]
    model = _mlp(gen)
    params = list(model.parameters())
    opt = AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 3e-3}], lr=1e-2,
                weight_decay=0.01, backend=backend)
    _train(model, opt, batches[:3])
    # as a checkpoint would: through torch.save / torch.load
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    sd = opt.state_dict()
    assert set(sd["state"]) == {0, 1, 2, 3}
    for i, p in enumerate(params):
        st = sd["state"][i]
        assert st["exp_avg"].shape == p.shape and st["exp_avg_sq"].shape == p.shape
        assert torch.is_tensor(st["step"]) and float(st["step"]) == 3.0
        assert st["exp_avg"].untyped_storage().data_ptr() != \
            opt.state[p]["exp_avg"].untyped_storage().data_ptr()  # a copy, not the live buffer
    assert sd["param_groups"][1]["lr"] == 3e-3
    _train(model, opt, batches[3:])

    buf.seek(0)
    ck = torch.load(buf)
    model2 = _mlp(gen)  # different initial weights, overwritten by the checkpoint
    params2 = list(model2.parameters())
    opt2 = AdamW([{"params": params2[:2]}, {"params": params2[2:]}], lr=0.5, backend=backend)
    _train(model2, opt2, batches[:1])  # some unrelated state first: must be replaced
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    assert opt2.param_groups[1]["lr"] == 3e-3
    (fb,) = opt2.flat_buffers()[:1]
    assert params2[0].data_ptr() == fb.param.data_ptr()  # views still valid
    assert opt2.state[params2[0]]["exp_avg"].data_ptr() == fb.exp_avg.data_ptr()
    _train(model2, opt2, batches[3:])
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg"], opt2.state[q]["exp_avg"])
        assert torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])
        assert int(opt.state[p]["step"]) == int(opt2.state[q]["step"]) == 6


def test_state_dict_loads_into_torch_shaped_state():
    """A state dict with 'step' as a tensor and missing entries (torch's own format) loads."""
    gen = torch.Generator().manual_seed(9)
    params = make_params(gen, [(3, 2), (5,)])
    opt = AdamW(params, lr=1e-2, backend="ref")
    hp = hp_of(1e-2)
    checked_step(opt, params, [rand(*p.shape, gen=gen) for p in params], hp)
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][1]  # param 1 had no state in the checkpoint: it restarts from zero
    opt.load_state_dict(sd)
    assert params[1] not in opt.state or not opt.state[params[1]]
    checked_step(opt, params, [rand(*p.shape, gen=gen) for p in params], hp)
    assert int(opt.state[params[0]]["step"]) == 2 and int(opt.state[params[1]]["step"]) == 1


# ---- validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1e-3), "learning rate"),
    (dict(lr=float("nan")), "learning rate"),
    (dict(eps=-1e-8), "epsilon"),
    (dict(betas=(1.0, 0.999)), "beta"),
    (dict(betas=(0.9, -0.1)), "beta"),
    (dict(betas=(0.9,)), "betas"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(backend="cuda"), "backend"),
])
def test_invalid_hyper_parameters(kwargs, match):
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=match):
        AdamW([p], **kwargs)
    opt = AdamW([p])
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], **kwargs})
    assert len(opt.param_groups) == 1


# ---- a model trained the usual way ----------------------------------------------------------

class RefAdamW:
    """The reference as an optimizer: float64 state, one tensor at a time."""

    def __init__(self, params, lr, weight_decay):
        self.params, self.lr, self.wd = list(params), lr, weight_decay
        self.state = {}

    def step(self):
        for p in self.params:
            if p.grad is None:
                continue
            m, v, t = self.state.get(p, (torch.zeros_like(p, dtype=torch.float64),
                                         torch.zeros_like(p, dtype=torch.float64), 0))
            pn, m, v = ref_step(p, p.grad, m, v, t + 1, self.lr, 0.9, 0.999, 1e-6, self.wd, True)
            self.state[p] = (m, v, t + 1)
            with torch.no_grad():
                p.copy_(pn)

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


@pytest.mark.parametrize("set_to_none", [True, False])
def test_model_training_matches_reference(backend, set_to_none):
    gen = torch.Generator().manual_seed(10)
    batches = [(rand(9, 7, gen=gen), rand(9, 3, gen=gen)) for _ in range(6)]
    model = _mlp(gen)
    ref_model = copy.deepcopy(model)
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, backend=backend)
    _train(model, opt, batches, set_to_none=set_to_none)
    _train(ref_model, RefAdamW(ref_model.parameters(), 1e-2, 0.01), batches)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(p, q) <= 1e-5  # 6 steps of fp32 rounding in the forward and backward
    (fb,) = opt.flat_buffers()
    for p, (off, n) in zip(fb.params, fb.offsets):
        assert p.data_ptr() == fb.param[off:].data_ptr()
        if not set_to_none:
            assert p.grad.data_ptr() == fb.grad[off:].data_ptr()


def test_shared_storage_params_grads_before_construction_and_closure(backend):
    gen = torch.Generator().manual_seed(11)
    base = rand(12, gen=gen)
    a = torch.nn.Parameter(base[:7])  # two parameters overlapping in memory: stepped on
    b = torch.nn.Parameter(base[5:])  # their own, in order, as torch would
    c = torch.nn.Parameter(rand(3, 3, gen=gen))
    gc = rand(3, 3, gen=gen)
    c.grad = gc.clone()  # a gradient that exists before the optimizer: adopted, not lost
    p0 = c.detach().clone()
    opt = AdamW([a, b, c], lr=1e-2, backend="ref" if backend == "ref" else "auto")
    (fb,) = opt.flat_buffers()
    assert len(fb.params) == 1 and fb.params[0] is c
    assert torch.equal(c.grad, gc)

    def closure():
        opt.zero_grad()
        loss = (a * a).sum() + b.sum() + (c * gc).sum()
        loss.backward()
        return loss

    a0, base0 = a.detach().clone(), base.clone()
    loss = opt.step(closure)
    assert torch.is_tensor(loss)
    hp = hp_of(1e-2)
    z = torch.zeros(7)
    a1 = ref_step(a0, 2 * a0, z, z, 1, **hp)[0]
    b0 = torch.cat([a1[5:], base0[7:].double()])  # b sees a's update of the shared elements
    assert rel_err(a[:5], a1[:5]) <= TOL  # a[5:] is b[:2], updated again by b's step
    assert rel_err(b, ref_step(b0, torch.ones(7), z, z, 1, **hp)[0]) <= TOL
    assert rel_err(c, ref_step(p0, gc, torch.zeros(3, 3), torch.zeros(3, 3), 1, **hp)[0]) <= TOL


def test_deepcopy_gives_an_independent_working_optimizer(backend):
    gen = torch.Generator().manual_seed(12)
    batches = [(rand(4, 7, gen=gen), rand(4, 3, gen=gen)) for _ in range(4)]
    model = _mlp(gen)
    opt = AdamW(model.parameters(), lr=1e-2, backend=backend)
    _train(model, opt, batches[:2])
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.flat_buffers()[0].params == tuple(model2.parameters())
    _train(model, opt, batches[2:])
    _train(model2, opt2, batches[2:])
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
        assert torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])


def test_second_optimizer_over_the_same_model_keeps_the_fused_path(backend):
    gen = torch.Generator().manual_seed(13)
    batches = [(rand(4, 7, gen=gen), rand(4, 3, gen=gen)) for _ in range(4)]
    model = _mlp(gen)
    ref_model = copy.deepcopy(model)
    _train(model, AdamW(model.parameters(), lr=1e-2, backend=backend), batches[:2])
    _train(ref_model, RefAdamW(ref_model.parameters(), 1e-2, 0.0), batches[:2])
    # params are now disjoint views of the first optimizer's buffer: re-flattened, not loose
    opt = AdamW(model.parameters(), lr=1e-2, backend=backend)
    (fb,) = opt.flat_buffers()
    assert len(fb.params) == 4 and fb.param.data_ptr() == next(model.parameters()).data_ptr()
    _train(model, opt, batches[2:])
    _train(ref_model, RefAdamW(ref_model.parameters(), 1e-2, 0.0), batches[2:])
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(p, q) <= 1e-5


def test_adamw_takes_numpy_hyperparameters_and_saves_plain_floats():
    import io

    import numpy as np

    from smarter_fast.optim import AdamW
    lin = torch.nn.Linear(5, 3)
    opt = AdamW(lin.parameters(), lr=np.float32(1e-3), betas=(np.float32(0.9), np.float64(0.999)),
                eps=np.float32(1e-6), weight_decay=np.float64(0.01))
    lin(torch.randn(2, 5)).sum().backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    group = torch.load(buf, weights_only=True)["param_groups"][0]
    assert isinstance(group["lr"], float) and all(isinstance(b, float) for b in group["betas"])
