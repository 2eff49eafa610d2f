"""--precision auto (smarter_fast.precision): bf16 only where the device runs it natively."""

import pytest
import torch

from smarter_fast.precision import native_bf16, resolve_precision

CPU = torch.device("cpu")


def _cpu(monkeypatch, **flags):
    caps = dict(torch.cpu.get_capabilities(), avx512_bf16=False, amx_bf16=False, cpu_name="TestCPU")
    caps.update(flags)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)


@pytest.mark.parametrize("flags,native", [({}, False), ({"avx512_bf16": True}, True), ({"amx_bf16": True}, True)])
def test_auto_picks_bf16_only_with_native_support(monkeypatch, flags, native):
    _cpu(monkeypatch, **flags)
    ok, why = native_bf16(CPU)
    assert ok is native
    chosen, message = resolve_precision("auto", CPU)
    assert chosen == ("bf16" if native else "fp32")
    assert message.startswith(f"precision auto -> {chosen}: ") and why in message
    assert ("AVX512-BF16" in why or "AMX-BF16" in why) if native else "TestCPU" in why


def test_explicit_choices_are_kept_and_bf16_without_support_warns(monkeypatch):
    _cpu(monkeypatch)
    assert resolve_precision("fp32", CPU) == ("fp32", None)
    chosen, message = resolve_precision("bf16", CPU)
    assert chosen == "bf16" and message.startswith("warning: --precision bf16") and "fp32 is faster" in message
    _cpu(monkeypatch, avx512_bf16=True)
    assert resolve_precision("bf16", CPU) == ("bf16", None)
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("fp16", CPU)


def test_unknown_capabilities_fall_back_to_fp32(monkeypatch):
    def broken():
        raise RuntimeError("no cpuinfo")
    monkeypatch.setattr(torch.cpu, "get_capabilities", broken)
    assert resolve_precision("auto", CPU)[0] == "fp32"
