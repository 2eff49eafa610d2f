"""The GPU compile check (smarter_fast.ops.gpu_compile): every Triton launch the package makes,
compiled ahead of time for sm_80 and sm_90 on this CPU machine, within shared memory and without
register spills on the fixed launch paths (at most 512 bytes for autotune candidates).

The compile runs in a subprocess without TRITON_INTERPRET (CI sets it for the other tests, and
Triton decides at import whether it compiles or interprets)."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from smarter_fast.ops import gpu_compile as gc  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
at = importlib.import_module("smarter_fast.ops.attention.triton")


def _nvidia_backend_reason():
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the Triton build
        return f"Triton without its NVIDIA backend: {e}"
    return None


def test_rules_flag_what_a_gpu_compiler_would_refuse():
    def row(**kw):
        base = dict(kernel="k", config="c", case={}, target=80, autotuned=False, shared=1024,
                    registers=64, spill_stores=0)
        return gc.Compiled(**{**base, **kw})

    assert gc.check(row()) == []
    assert "shared memory" in gc.check(row(shared=170 * 1024))[0]
    assert gc.check(row(shared=170 * 1024, target=90)) == []  # sm_90 has 227 KiB
    assert "without autotuning" in gc.check(row(spill_stores=4))[0]
    assert gc.check(row(spill_stores=512, autotuned=True)) == []
    assert "candidate spills 513" in gc.check(row(spill_stores=513, autotuned=True))[0]
    assert "does not compile" in gc.check(row(error="boom"))[0]


def test_the_recorder_sees_every_launch_site_and_expands_the_pruned_candidates():
    """One attention case, autotuned: a forward and a backward launch, each expanded to the
    candidates of its precision class and head dim (the attention module's _TILES), no taller
    than the length bucket."""
    case = dict(op="attention", dtype="bf16", head_dim=64, bucket=32, varlen=False, dropout=0.0,
                autotune=True)
    launches = gc.record_launches([case])
    names = [getattr(l.kernel, "fn", l.kernel).__name__ for l in launches]
    assert names == ["_attn_fwd_kernel", "_attn_bwd_kernel"]
    fwd = {(o["BLOCK_M"], w) for _, o, w, _, tuned in gc.expand(launches[0]) if tuned}
    bwd = {(o["BLOCK"], w) for _, o, w, _, tuned in gc.expand(launches[1]) if tuned}
    tiles = at._TILES[("lowp", 64)]
    assert fwd == {c for c in tiles["fwd_tune"] if c[0] <= 32}
    assert bwd == {c for c in tiles["bwd_tune"] if c[0] <= 32}
    fixed = gc.record_launches([{**case, "autotune": False}])
    assert [gc.expand(l)[0][2:4] for l in fixed] == [(tiles["fwd"][1], 2), (tiles["bwd"][1], 1)]
    other = gc.record_launches([dict(op="adamw", mode="host-step", correct_bias=True),
                                dict(op="smart", dtype="bf16")])
    assert [l.kernel.__name__ for l in other] == [
        "_adamw_kernel", "_noise_kernel", "_mse_partial_kernel", "_mse_final_kernel",
        "_mse_backward_kernel"]


def test_a_bucket_with_a_tile_of_its_own_launches_it():
    """Fixed paths: a short bucket shrinks the class's tile, unless `fwd_at` / `bwd_at` give it one."""
    tiles = at._TILES[("lowp", 64)]
    assert 16 in tiles["bwd_at"] and 32 not in tiles.get("bwd_at", {})
    for bucket in (16, 32):
        case = dict(op="attention", dtype="bf16", head_dim=64, bucket=bucket, varlen=True,
                    dropout=0.0, autotune=False)
        _, bwd = gc.record_launches([case])
        want = tiles["bwd_at"].get(bucket, (min(tiles["bwd"][0], bucket), tiles["bwd"][1]))
        assert (bwd.kwargs["BLOCK"], gc.expand(bwd)[0][2]) == want


def test_ci_compiles_the_fixed_paths_at_every_bucket():
    cases = gc.attention_cases(full=False)
    fixed = {(c["dtype"], c["head_dim"], c["bucket"]) for c in cases if not c["autotune"]}
    assert {b for _, _, b in fixed} == {16, 32, 64, 128}
    assert {c["bucket"] for c in cases if c["autotune"]} == {128}


def test_tiles_follow_the_precision_class():
    assert at._precision_class(torch.bfloat16) == at._precision_class(torch.float16) == "lowp"
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert at._precision_class(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert at._precision_class(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    assert set(at._TILES) == {(c, d) for c in ("lowp", "tf32", "ieee") for d in at.HEAD_DIMS}


@pytest.mark.skipif(_nvidia_backend_reason() is not None, reason=str(_nvidia_backend_reason()))
def test_every_launch_compiles_for_sm80_and_sm90_within_the_rules(tmp_path):
    out = tmp_path / "gpu-compile.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(REPO), TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, "-m", "smarter_fast.selfcheck", "--compile", "--out",
                        str(out)], env=env, capture_output=True, text=True, timeout=1500)
    rows = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else []
    assert r.returncode == 0, (r.stdout[-6000:], r.stderr[-3000:])
    assert {row["target"] for row in rows} == {80, 90}
    kernels = {row["kernel"] for row in rows}
    assert {"_attn_fwd_kernel", "_attn_bwd_kernel", "_adamw_kernel", "_adamw_device_step_kernel",
            "_noise_kernel", "_mse_partial_kernel", "_mse_final_kernel",
            "_mse_backward_kernel"} <= kernels
    assert all(row["registers"] for row in rows)  # ptxas reported on every launch
    assert any(not row["autotuned"] for row in rows if row["kernel"] == "_attn_fwd_kernel")
    assert not [row for row in rows if row["problems"]]
