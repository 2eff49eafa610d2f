"""CUDA-only: every backend that runs on CUDA against ref, opcheck of the Triton ops, a CUDA
graph capture of the device-step AdamW, and the model end to end. Skips without CUDA.

Tolerances (the interpreter tests state the same rule): for attention the error of a backend
against a higher-precision reference (float64 for fp32 inputs, fp32 for bf16 / fp16 inputs,
computed from the same inputs) must be at most 2x the error of the same-precision PyTorch
reference plus atol (fp32 2e-5, bf16 2e-2, fp16 2e-3). AdamW: atol 1e-6 / rtol 1e-5.
smart_mse: rtol 1e-5 (fp32), 1e-2 (bf16 / fp16).

Most tests run with SMARTER_FAST_TRITON_AUTOTUNE=0 (one fixed config per shape) to keep
compilation within the self-check's time; test_attention_autotuned covers the tuned kernels.
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from smarter_fast import ops  # noqa: E402
from smarter_fast.ops import OPS  # noqa: E402

ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
DEV = "cuda"


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("SMARTER_FAST_TRITON_AUTOTUNE", "0")
    monkeypatch.delenv("SMARTER_FAST_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def backends_for(op_name, tensors, **options):
    """(name, reasons) for every non-ref backend that runs on CUDA (checked first, so a
    CPU-only backend does not build the C++ extension): runnable ones have no reasons."""
    return [(b.name, b.not_supported_reasons(tensors, **options))
            for b in OPS[op_name].ordered() if b.name != "ref" and "cuda" in b.devices()]


def check_rule(got, want_hi, want_lowp, dtype, what):
    err = (got.double() - want_hi.double()).abs().max().item()
    ref_err = (want_lowp.double() - want_hi.double()).abs().max().item()
    assert err <= 2 * ref_err + ATOL[dtype], f"{what}: error {err:.3g}, ref's {ref_err:.3g}"


def _attention_case(B, H, L, D, dtype, lengths, backend):
    q, k, v, g = (torch.randn(B, H, L, D, device=DEV).to(dtype) for _ in range(4))
    mask = torch.arange(L, device=DEV)[None, :] < torch.tensor(lengths, device=DEV)[:, None]
    hi = torch.float64 if dtype == torch.float32 else torch.float32
    res = {}
    for name, cast, be in (("got", None, backend), ("hi", hi, "ref"), ("low", None, "ref")):
        xs = [(x.to(cast) if cast else x).clone().requires_grad_() for x in (q, k, v)]
        out = ops.attention(*xs, mask, backend=be)
        res[name] = (out.detach(), *torch.autograd.grad(out, xs, g.to(out.dtype)))
    for i, what in enumerate(("out", "dq", "dk", "dv")):
        check_rule(res["got"][i], res["hi"][i], res["low"][i], dtype,
                   f"{backend} {what} {dtype} L={L} D={D}")
    pad = ~mask[:, None, :, None]
    if pad.any():  # padded query rows: zero output, no gradient; padded keys: zero dk, dv
        for t in res["got"]:
            assert t.masked_select(pad).abs().max().item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [32, 64, 128])
def test_attention_dtypes_head_dims(dtype, D):
    torch.manual_seed(D)
    q = torch.empty(3, 4, 77, D, device=DEV, dtype=dtype)
    for name, reasons in backends_for("attention", (q, q, q), dropout_p=0.0):
        if reasons:
            continue
        _attention_case(3, 4, 77, D, dtype, [77, 40, 1], name)


@pytest.mark.parametrize("L", [1, 17, 128, 200])
def test_attention_lengths(L):
    torch.manual_seed(L)
    _attention_case(3, 2, L, 64, torch.bfloat16, [L, max(1, L // 3), 0], "triton")


def test_attention_autotuned(monkeypatch):
    monkeypatch.setenv("SMARTER_FAST_TRITON_AUTOTUNE", "1")
    torch.manual_seed(0)
    _attention_case(4, 3, 64, 64, torch.bfloat16, [64, 50, 33, 2], "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_varlen(dtype):
    torch.manual_seed(1)
    lengths = [5, 1, 130, 64, 17]
    cu = torch.tensor([0] + lengths, device=DEV).cumsum(0).to(torch.int32)
    T, H, D = int(cu[-1]), 3, 64
    q, k, v, g = (torch.randn(T, H, D, device=DEV).to(dtype) for _ in range(4))
    hi = torch.float64 if dtype == torch.float32 else torch.float32
    res = {}
    for name, cast, be in (("got", None, "triton"), ("hi", hi, "ref"), ("low", None, "ref")):
        xs = [(x.to(cast) if cast else x).clone().requires_grad_() for x in (q, k, v)]
        out = ops.attention_varlen(*xs, cu, max(lengths), backend=be)
        res[name] = (out.detach(), *torch.autograd.grad(out, xs, g.to(out.dtype)))
    for i, what in enumerate(("out", "dq", "dk", "dv")):
        check_rule(res["got"][i], res["hi"][i], res["low"][i], dtype, f"varlen {what} {dtype}")


def test_attention_opcheck():
    from smarter_fast.ops.attention import triton as tri  # noqa: F401 (registers the ops)
    q, k, v = (torch.randn(2, 3, 17, 32, device=DEV, requires_grad=True) for _ in range(3))
    lens = torch.tensor([17, 9], device=DEV, dtype=torch.int32)
    torch.library.opcheck(torch.ops.smarter_fast_triton.attention_fwd.default,
                          (q, k, v, lens, 17, False))
    qp, kp, vp = (torch.randn(26, 3, 32, device=DEV, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 17, 26], device=DEV, dtype=torch.int32)
    torch.library.opcheck(torch.ops.smarter_fast_triton.attention_fwd.default,
                          (qp, kp, vp, cu, 17, True))


def test_attention_torch_compile():
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 3, 33, 64, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    mask = torch.arange(33, device=DEV)[None, :] < torch.tensor([33, 20], device=DEV)[:, None]
    f = torch.compile(lambda q, k, v, m: ops.attention(q, k, v, m, backend="triton"),
                      fullgraph=False)
    torch.testing.assert_close(f(q, k, v, mask), ops.attention(q, k, v, mask, backend="triton"))


# ---- SMART --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 1031, 1 << 20])
def test_smart_mse(dtype, n):
    a0, b0 = torch.randn(n, device=DEV).to(dtype), torch.randn(n, device=DEV).to(dtype)
    for name, reasons in backends_for("smart_mse", (a0, b0)):
        if reasons:
            continue
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        a2, b2 = a0.float().requires_grad_(), b0.float().requires_grad_()
        got, want = ops.smart_mse(a, b, backend=name), ops.smart_mse(a2, b2, backend="ref")
        rtol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.float(), want, rtol=rtol, atol=0)
        got.backward()
        want.backward()
        torch.testing.assert_close(a.grad.float(), a2.grad, rtol=rtol, atol=1e-6)
        assert torch.equal(b.grad, -a.grad)
        assert torch.equal(got, ops.smart_mse(a0, b0, backend=name))  # deterministic


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smart_noise(dtype):
    x = torch.randn(4, 1000, 33, device=DEV).to(dtype).requires_grad_()
    for name, reasons in backends_for("smart_noise", (x,)):
        if reasons:
            continue
        y = ops.smart_noise(x, 0.25, 99, backend=name)
        z = ((y - x).detach().float() / 0.25)
        assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
        assert torch.equal(y, ops.smart_noise(x, 0.25, 99, backend=name))
        g = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, g)
        assert torch.equal(gx, g)


def test_smart_opcheck():
    from smarter_fast.ops.smart import triton as tri  # noqa: F401
    a, b = (torch.randn(1031, device=DEV, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.smarter_fast_triton.smart_mse.default, (a, b))
    torch.library.opcheck(torch.ops.smarter_fast_triton.smart_noise.default, (a, 0.1, 5))


# ---- AdamW --------------------------------------------------------------------------------

def _adam_state(n):
    g = torch.Generator(device=DEV).manual_seed(n)
    return (torch.randn(n, device=DEV, generator=g), torch.randn(n, device=DEV, generator=g) * .1,
            torch.rand(n, device=DEV, generator=g) * .01)


@pytest.mark.parametrize("n", [1, 1031, (1 << 20) + 3])
def test_adamw(n):
    from smarter_fast.ops.adamw import ref
    from smarter_fast.ops.adamw import triton as tri
    p, m, v = _adam_state(n)
    want, got, got_t = ([t.clone() for t in (p, m, v)] for _ in range(3))
    step_t = torch.zeros((), device=DEV)
    for step in (1, 2, 3):
        grad = torch.randn(n, device=DEV)
        ref.adamw_step_(want[0], grad, want[1], want[2], 1e-3, 0.9, 0.999, 1e-6, 0.01, step)
        ops.adamw_step_(got[0], grad, got[1], got[2], lr=1e-3, weight_decay=0.01, step=step,
                        backend="triton")
        step_t += 1
        tri.adamw_step_tensor_(got_t[0], grad, got_t[1], got_t[2], 1e-3, 0.9, 0.999, 1e-6,
                               0.01, step_t)
    for a, b, c in zip(got, want, got_t):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(c, b, atol=1e-6, rtol=1e-5)


def test_adamw_opcheck():
    from smarter_fast.ops.adamw import triton as tri  # noqa: F401
    p, m, v = _adam_state(1031)
    g = torch.randn_like(p)
    torch.library.opcheck(torch.ops.smarter_fast_triton.adamw_step_.default,
                          (p, g, m, v, 1e-3, 0.9, 0.999, 1e-6, -1e-5))
    step = torch.ones((), device=DEV)
    lr = torch.full((), 1e-3, device=DEV)
    torch.library.opcheck(torch.ops.smarter_fast_triton.adamw_step_tensor_.default,
                          (p, g, m, v, step, lr, 0.0, 0.9, 0.999, 1e-6, 0.01, True))


def test_adamw_device_step_in_cuda_graph():
    """The device-step AdamW captures into a CUDA graph and replays with a changing step."""
    from smarter_fast.ops.adamw import ref
    from smarter_fast.ops.adamw import triton as tri
    n = 4099
    p, m, v = _adam_state(n)
    want = [t.clone() for t in (p, m, v)]
    grad = torch.randn(n, device=DEV)
    step = torch.zeros((), device=DEV)
    lr = torch.full((), 1e-3, device=DEV)

    def one_step():
        step.add_(1)
        tri.adamw_step_tensor_(p, grad, m, v, lr, 0.9, 0.999, 1e-6, 0.01, step)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (compiles) outside the capture, then undo it
        saved = [t.clone() for t in (p, m, v)]
        one_step()
        for t, u in zip((p, m, v), saved):
            t.copy_(u)
        step.zero_()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        one_step()
    for t in range(1, 4):
        graph.replay()
        ref.adamw_step_(want[0], grad, want[1], want[2], 1e-3, 0.9, 0.999, 1e-6, 0.01, t)
    torch.cuda.synchronize()
    for a, b in zip((p, m, v), want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_optimizer_on_triton():
    optim = pytest.importorskip("smarter_fast.optim")
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(33, 65), torch.nn.Linear(65, 3)).to(DEV)
              for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01, backend=b)
            for m, b in zip(models, ("triton", "ref"))]
    x = torch.randn(8, 33, device=DEV)
    for _ in range(3):
        for mdl, opt in zip(models, opts):
            opt.zero_grad()
            mdl(x).square().mean().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---- the model end to end -----------------------------------------------------------------

@pytest.mark.parametrize("sinks", [False, True])
def test_model_triton_matches_ref(sinks):
    """The encoder on the triton backend against ref, with plain autograd and with gradient
    sinks (the path training takes) writing the weight and word-embedding gradients."""
    from smarter_fast.model.bert import BertConfig, BertModel
    from smarter_fast.model.grad_sinks import attach_grad_sinks
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1000, hidden_size=384, num_hidden_layers=2,
                     num_attention_heads=12, intermediate_size=1536,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertModel(cfg).to(DEV).train()
    if sinks:
        attach_grad_sinks(model)
    ids = torch.randint(1, 1000, (4, 40), device=DEV)
    mask = (torch.arange(40, device=DEV)[None, :] < torch.tensor([40, 31, 7, 20], device=DEV)[:, None])
    outs, grads = [], []
    for backend in ("triton", "ref"):
        model.backend = backend
        model.zero_grad(set_to_none=True)
        out = model(ids, mask.long())["last_hidden_state"]
        (out * mask[..., None]).square().mean().backward()
        outs.append(out.detach())
        grads.append([model.layers[0].qkv.weight.grad.clone(),
                      model.embeddings.word.weight.grad.clone()])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
