"""Compile every Triton launch of the package for real GPU targets, on a machine without a GPU.

The interpreter tests (TRITON_INTERPRET=1) check the kernels' arithmetic, not what a GPU compiler
enforces: shared memory per block, registers, spills. Here each op's launch site runs as the
model calls it, on CPU tensors, with `wrap_triton` replaced by a recorder; every recorded launch
(each autotune candidate expanded) is then compiled ahead of time with
`triton.compile(..., target=GPUTarget("cuda", cc, 32))`, and ptxas reports its registers and
spill stores. Run it in a process without TRITON_INTERPRET (Triton decides at import whether it
compiles or interprets):

    python -m smarter_fast.selfcheck --compile [--full] [--out compile.md]

The rules (docs/design.md, "GPU compile check"): every launch compiles; no launch needs more
shared memory than the target has; the launches made without autotuning spill nothing; no
autotune candidate spills more than MAX_CANDIDATE_SPILL bytes.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import torch

TARGETS = (80, 90)
# Shared memory a block may use (opt-in maximum), by compute capability.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
MAX_CANDIDATE_SPILL = 512
_MODULES = ("attention", "adamw", "smart")


@dataclass
class Launch:
    """One kernel launch as a launch site made it: the kernel (a JITFunction or an Autotuner),
    its arguments, and what the case was."""
    kernel: object
    args: tuple
    kwargs: dict
    case: dict


@dataclass
class Compiled:
    kernel: str
    config: str
    case: dict
    target: int
    autotuned: bool
    shared: int | None = None
    registers: int | None = None
    spill_stores: int | None = None
    error: str | None = None
    problems: list = field(default_factory=list)


class _Recorder:
    """Stands in for torch.library.wrap_triton: `wrap_triton(kernel)[grid](*args, **kwargs)`
    records the launch instead of running it."""

    def __init__(self, sink: list, case: dict):
        self.sink, self.case = sink, case

    def __call__(self, kernel):
        def launch(grid):
            def run(*args, **kwargs):
                self.sink.append(Launch(kernel, args, kwargs, dict(self.case)))
            return run
        return type("_Launcher", (), {"__getitem__": lambda _, grid: launch(grid)})()


def _triton_module(op: str):
    return importlib.import_module(f"smarter_fast.ops.{op}.triton")


@contextlib.contextmanager
def recording(sink: list, case: dict):
    """Within: every Triton launch of the package appends a Launch to `sink`, as the GPU path
    makes it (also where TRITON_INTERPRET=1 would choose the interpreter's small tiles)."""
    modules = [_triton_module(m) for m in _MODULES]
    saved = [(m, name, getattr(m, name)) for m in modules
             for name in ("wrap_triton", "triton_interpret") if hasattr(m, name)]
    rec = _Recorder(sink, case)
    for m, name, _ in saved:
        setattr(m, name, rec if name == "wrap_triton" else (lambda: False))
    try:
        yield rec
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


@contextlib.contextmanager
def _matmul_precision(tf32: bool):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@contextlib.contextmanager
def _autotune(enabled: bool):
    before = os.environ.get("SMARTER_FAST_TRITON_AUTOTUNE")
    os.environ["SMARTER_FAST_TRITON_AUTOTUNE"] = "1" if enabled else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SMARTER_FAST_TRITON_AUTOTUNE", None)
        else:
            os.environ["SMARTER_FAST_TRITON_AUTOTUNE"] = before


# ---- the launch sites, as the model and the optimizer call them ------------------------------

ATTENTION_DTYPES = {"fp32": torch.float32, "fp32-tf32": torch.float32,
                    "bf16": torch.bfloat16, "fp16": torch.float16}


def attention_cases(full: bool) -> list[dict]:
    """Attention forward and backward, autotuned (every candidate) and fixed, at head dims 32 and
    64. full: every dtype, length bucket, layout (padded, packed) and dropout setting. Otherwise
    (CI) fp32 (IEEE and TF32) and bf16, padded without dropout and packed with dropout (the two
    extremes of the kernels' code paths): the fixed launch paths at every length bucket (each
    bucket shrinks or replaces the tile) and the autotune candidates at bucket 128."""
    buckets = (16, 32, 64, 128)
    if full:
        grid = itertools.product(ATTENTION_DTYPES, (32, 64), buckets,
                                 ((False, 0.0), (False, 0.1), (True, 0.0), (True, 0.1)), (True, False))
    else:
        grid = [(d, hd, b, layout, at) for d, hd, b, layout, at in itertools.product(
                    ("fp32", "fp32-tf32", "bf16"), (32, 64), buckets, ((False, 0.0), (True, 0.1)),
                    (True, False)) if not at or b == 128]
    return [dict(op="attention", dtype=d, head_dim=hd, bucket=b, varlen=vl, dropout=p, autotune=at)
            for d, hd, b, (vl, p), at in grid]


def _record_attention(case: dict) -> None:
    at = _triton_module("attention")
    dtype = ATTENTION_DTYPES[case["dtype"]]
    heads, dim, n_seq = 12, case["head_dim"], 3
    length = case["bucket"] - 3 if case["bucket"] > 16 else 13
    g = torch.Generator().manual_seed(0)
    if case["varlen"]:
        lengths = torch.tensor([length, max(1, length // 2), length - 1])
        cu = torch.zeros(n_seq + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        shape, seq, max_len = (int(cu[-1]), heads, dim), cu, length
    else:
        shape, max_len = (n_seq, heads, length, dim), length
        seq = torch.tensor([length, length // 2, length - 1], dtype=torch.int32)
    q, k, v = (torch.randn(*shape, generator=g).to(dtype) for _ in range(3))
    with _matmul_precision(case["dtype"] == "fp32-tf32"), _autotune(case["autotune"]):
        out, lse = at._attention_fwd_op(q, k, v, seq, max_len, case["varlen"], case["dropout"], 7)
        at._attention_bwd_op(torch.randn_like(q), q, k, v, q.clone(), lse.float(), seq, max_len,
                             case["varlen"], case["dropout"], 7)


def _record_adamw(case: dict) -> None:
    ad = _triton_module("adamw")
    p, g, m, v = (torch.rand(4099) for _ in range(4))
    if case["mode"] == "host-step":
        ad._adamw_op(p, g, m, v, 1e-3, 0.9, 0.999, 1e-6, -1e-5)
    else:
        lr = torch.tensor(1e-3) if case["mode"] == "device-step-lr-tensor" else None
        ad._adamw_tensor_op(p, g, m, v, torch.tensor(3), lr, 1e-3, 0.9, 0.999, 1e-6, 0.01,
                            case["correct_bias"])


def _record_smart(case: dict) -> None:
    sm = _triton_module("smart")
    dtype = ATTENTION_DTYPES[case["dtype"]]
    x = torch.randn(5, 37, 64).to(dtype)
    sm._smart_noise_op(x, 0.05, 11)
    sm._smart_mse_op(x, x + 1)
    sm._smart_mse_backward_op(torch.tensor(1.0), x, x + 1)


def all_cases(full: bool = False) -> list[dict]:
    adamw = [dict(op="adamw", mode="host-step", correct_bias=True)] + [
        dict(op="adamw", mode=m, correct_bias=c)
        for m, c in itertools.product(("device-step", "device-step-lr-tensor"), (True, False))]
    smart = [dict(op="smart", dtype=d) for d in ("fp32", "bf16", "fp16")]
    return attention_cases(full) + adamw + smart


def record_launches(cases) -> list[Launch]:
    recorders = {"attention": _record_attention, "adamw": _record_adamw, "smart": _record_smart}
    launches: list[Launch] = []
    for case in cases:
        with recording(launches, case):
            recorders[case["op"]](case)
    return launches


# ---- compiling -------------------------------------------------------------------------------

_POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
            torch.int32: "*i32", torch.int64: "*i64", torch.uint8: "*u8", torch.bool: "*i1"}


def _signature(fn, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """(signature, constexprs) of a JITFunction for these arguments, as Triton's launcher would
    specialise them (tensors by dtype, ints by width)."""
    values = dict(zip(fn.arg_names, args))
    values.update(kwargs)
    sig, consts = {}, {}
    for param in fn.params:
        name = param.name
        value = values[name]
        if param.is_constexpr:
            sig[name], consts[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[name] = _POINTER[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        elif isinstance(value, float):
            sig[name] = "fp32"
        elif value is None:
            sig[name], consts[name] = "constexpr", None
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__}")
    return sig, consts


def expand(launch: Launch) -> list[tuple[object, dict, int, int, bool]]:
    """(JITFunction, constexpr overrides, num_warps, num_stages, autotuned) for each config the
    launch may run: every autotune candidate that survives the kernel's own pruning."""
    k = launch.kernel
    if hasattr(k, "configs"):  # an Autotuner
        configs = k.configs
        prune = getattr(k, "early_config_prune", None)
        if prune is not None:
            named = dict(zip(k.fn.arg_names, launch.args))
            named.update(launch.kwargs)
            configs = prune(configs, named)
        return [(k.fn, dict(c.kwargs), c.num_warps, c.num_stages, True) for c in configs]
    kw = dict(launch.kwargs)
    return [(k, {}, kw.pop("num_warps", 4), kw.pop("num_stages", 3), False)]


def _ptxas_report(ptx: str, capability: int) -> tuple[int | None, int | None, str | None]:
    """(registers, spill store bytes, error) from ptxas -v on the PTX, with the ptxas and the
    options Triton itself uses for that target."""
    from triton.backends.nvidia import compiler as nv

    arch = nv.sm_arch_from_capability(capability)
    getter = getattr(nv, "get_ptxas", None)
    ptxas = getter(capability).path if getter is not None else nv._path_to_binary("ptxas")[0]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src,
                            "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    if r.returncode != 0:
        return None, None, (r.stderr or r.stdout).strip()[-300:]
    log = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    return (int(regs.group(1)) if regs else None, int(spill.group(1)) if spill else 0, None)


def _describe(consts: dict, overrides: dict, warps: int, stages: int) -> str:
    keys = sorted(k for k in consts if k.startswith("BLOCK"))
    shown = {**{k: consts[k] for k in keys}, **overrides}
    return " ".join(f"{k}={v}" for k, v in sorted(shown.items())) + f" w{warps} s{stages}"


def compile_launch(launch: Launch, capability: int) -> list[Compiled]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    for fn, overrides, warps, stages, tuned in expand(launch):
        kwargs = {**launch.kwargs, **overrides}
        kwargs.pop("num_warps", None)
        kwargs.pop("num_stages", None)
        sig, consts = _signature(fn, launch.args, kwargs)
        row = Compiled(fn.__name__, _describe(consts, overrides, warps, stages), launch.case,
                       capability, tuned)
        try:
            c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                               target=GPUTarget("cuda", capability, 32),
                               options={"num_warps": warps, "num_stages": stages})
            row.shared = int(c.metadata.shared)
            row.registers, row.spill_stores, row.error = _ptxas_report(c.asm["ptx"], capability)
        except Exception as e:  # a compile error is a finding, reported in the table
            last = (str(e).strip().splitlines() or [""])[-1]
            row.error = f"{type(e).__name__}: {last[:300]}"
        rows.append(row)
    return rows


def check(row: Compiled) -> list[str]:
    """The rules a compiled launch must meet (see the module docstring)."""
    problems = []
    if row.error:
        problems.append(f"does not compile: {row.error}")
        return problems
    limit = SHARED_LIMIT[row.target]
    if row.shared is not None and row.shared > limit:
        problems.append(f"shared memory {row.shared} B > {limit} B of sm_{row.target}")
    if row.spill_stores:
        if not row.autotuned:
            problems.append(f"spills {row.spill_stores} B on a launch path without autotuning")
        elif row.spill_stores > MAX_CANDIDATE_SPILL:
            problems.append(f"autotune candidate spills {row.spill_stores} B "
                            f"(> {MAX_CANDIDATE_SPILL} B)")
    return problems


def _compile_cases(cases: list[dict], targets=TARGETS) -> list[Compiled]:
    rows = []
    for launch in record_launches(cases):
        for cc in targets:
            for row in compile_launch(launch, cc):
                row.problems = check(row)
                rows.append(row)
    return rows


def run(full: bool = False, targets=TARGETS, workers: int | None = None) -> list[Compiled]:
    """Records every launch of the cases and compiles each for every target, the cases spread
    over `workers` processes (default: one per CPU)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the compile check needs Triton's compiler: run it without "
                           "TRITON_INTERPRET")
    cases = all_cases(full)
    workers = max(1, min(workers or os.cpu_count() or 1, len(cases)))
    if workers == 1:
        return _compile_cases(cases, targets)
    import multiprocessing

    chunks = [cases[i::workers] for i in range(workers)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        parts = pool.starmap(_compile_cases, [(c, targets) for c in chunks])
    return [row for part in parts for row in part]


def table(rows: list[Compiled]) -> str:
    import triton

    head = (f"Triton {triton.__version__}, torch {torch.__version__}: {len(rows)} compiled "
            f"launches, {sum(bool(r.problems) for r in rows)} breaking a rule.\n\n"
            "| kernel | config | case | target | autotuned | shared KiB | registers | "
            "spill stores B | problems |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        case = " ".join(f"{k}={v}" for k, v in r.case.items() if k != "op")
        shared = "-" if r.shared is None else f"{r.shared / 1024:.1f}"
        lines.append(f"| {r.kernel} | {r.config} | {case} | sm_{r.target} | "
                     f"{'yes' if r.autotuned else 'no'} | {shared} | {r.registers or '-'} | "
                     f"{'-' if r.spill_stores is None else r.spill_stores} | "
                     f"{'; '.join(r.problems)} |")
    return "\n".join(lines) + "\n"


__all__ = ["Compiled", "Launch", "all_cases", "check", "compile_launch", "record_launches", "run",
           "table", "TARGETS", "SHARED_LIMIT", "MAX_CANDIDATE_SPILL"]
