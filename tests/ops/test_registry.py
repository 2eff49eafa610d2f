"""Backend selection: fallback with logged reasons, explicit requests, SMARTER_FAST_BACKEND."""

import logging

import pytest
import torch

from smarter_fast.ops import registry
from smarter_fast.ops.registry import Backend, BackendUnavailableError, Op, resolve_request


def _calls(record):
    def fn(*args):
        record.append(args)
        return "ran"
    return fn


@pytest.fixture
def toy_op():
    """An op whose first two backends can be switched off."""
    state = {"triton": "no CUDA device", "cpp": None}
    op = Op("toy")
    for name in ("triton", "cpp", "ref"):
        op.register(Backend(
            name, fn=lambda *a, n=name: n,
            devices=lambda: ("cpu",),
            dtypes=(torch.float32,) if name != "ref" else registry.FLOAT_DTYPES,
            availability=(lambda n=name: state.get(n)),
        ))
    return op, state


def test_auto_takes_first_usable_and_logs_reasons_once(toy_op, caplog):
    op, state = toy_op
    x = torch.randn(3)
    with caplog.at_level(logging.INFO, logger="smarter_fast"):
        assert op.select("auto", (x,)).name == "cpp"
        assert op.select("auto", (x,)).name == "cpp"
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["toy: using the cpp backend (triton passed over: no CUDA device)"]


def test_unavailable_backend_falls_back_to_ref_with_reason(toy_op, caplog):
    op, state = toy_op
    state["cpp"] = "C++ extension not built: no C++ compiler found"
    with caplog.at_level(logging.INFO, logger="smarter_fast"):
        assert op.select(None, (torch.randn(2),)).name == "ref"
    assert "cpp passed over: C++ extension not built: no C++ compiler found" in caplog.text


def test_dtype_and_device_reasons(toy_op):
    op, _ = toy_op
    x = torch.randn(3, dtype=torch.float64)
    assert op.select("auto", (x,)).name == "ref"
    reasons = op.backends["cpp"].not_supported_reasons((x,))
    assert reasons == ["supports float32, not float64"]
    meta = torch.empty(3, device="meta")
    assert op.backends["cpp"].not_supported_reasons((meta,)) == ["runs on cpu, not meta"]


def test_explicit_request_raises_listing_reasons(toy_op):
    op, state = toy_op
    state["cpp"] = "extension not built"
    with pytest.raises(BackendUnavailableError, match=r"toy: backend 'cpp' was requested .*extension not built"):
        op.select("cpp", (torch.randn(2),))
    with pytest.raises(BackendUnavailableError, match="no CUDA device"):
        op.select("triton", (torch.randn(2),))


def test_environment_variable_sets_default(toy_op, monkeypatch):
    op, _ = toy_op
    monkeypatch.setenv("SMARTER_FAST_BACKEND", "ref")
    assert op.select("auto", (torch.randn(2),)).name == "ref"
    assert op.select(None, (torch.randn(2),)).name == "ref"
    assert op.select("cpp", (torch.randn(2),)).name == "cpp"  # an explicit argument wins
    monkeypatch.setenv("SMARTER_FAST_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match="no CUDA device"):
        op.select("auto", (torch.randn(2),))


def test_invalid_backend_names():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        resolve_request("cuda")


def test_env_invalid_value(monkeypatch):
    monkeypatch.setenv("SMARTER_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="environment variable SMARTER_FAST_BACKEND"):
        resolve_request("auto")


def test_real_ops_are_registered_with_all_backends():
    from smarter_fast.ops import OPS

    for name in ("attention", "attention_varlen", "adamw", "smart_noise", "smart_mse"):
        assert [b.name for b in OPS[name].ordered()] == ["triton", "cpp", "ref"]
        assert OPS[name].backends["ref"].is_available()


def test_auto_never_picks_the_triton_interpreter_for_cpu_tensors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    op = Op("toy_interp")
    for name in ("triton", "ref"):
        op.register(Backend(name, fn=None, devices=registry.triton_devices,
                            dtypes=registry.FLOAT_DTYPES, availability=lambda: None))
    x = torch.randn(3)
    assert op.select("auto", (x,)).name == "ref"
    assert op.select("triton", (x,)).name == "triton"  # explicit: runs in the interpreter


def test_request_for_a_backend_the_op_lacks_falls_back_to_auto(caplog):
    """`--backend triton` applies to the whole model; an op with no triton implementation at all
    (dropout_add_layer_norm) chooses automatically and logs it once, instead of failing."""
    op = Op("cpp-and-ref-only")
    for name in ("cpp", "ref"):
        op.register(Backend(name, fn=lambda n=name: n, devices=lambda: ("cpu",),
                            dtypes=registry.FLOAT_DTYPES, availability=lambda: None))
    x = torch.randn(3)
    with caplog.at_level(logging.INFO, logger="smarter_fast"):
        assert op.select("triton", (x,)).name == "cpp"
        assert op.select("triton", (x,)).name == "cpp"
    assert sum("no triton backend; choosing automatically" in r.getMessage() for r in caplog.records) == 1
    # a backend the op has but that cannot run the inputs is still an error
    with pytest.raises(BackendUnavailableError, match="float64"):
        Op.select(_only_float32_cpp(), "cpp", (torch.randn(2, dtype=torch.float64),))


def _only_float32_cpp():
    op = Op("f32")
    op.register(Backend("cpp", fn=lambda: None, devices=lambda: ("cpu",), dtypes=(torch.float32,),
                        availability=lambda: None))
    return op
