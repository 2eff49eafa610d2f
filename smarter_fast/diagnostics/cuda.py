"""The CUDA self-check behind `python -m smarter_fast.selfcheck` (its docstring lists the rows):
the CUDA tests, then the hot paths timed against PyTorch and Hugging Face, as a markdown table.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..tasks import SST  # the task the timed steps train

REPO = Path(__file__).resolve().parents[2]

MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512,
              attention_probs_dropout_prob=0.1)  # as the real checkpoint; both kernels do dropout


# ---- timing -------------------------------------------------------------------------------

def cuda_time_ms(fn, warmup: int = 5, reps: int = 20) -> float:
    """Median milliseconds of fn() by CUDA events, after warm-up, synchronised."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class Table:
    def __init__(self):
        self.sections: list[tuple[str, list[str], list[list[str]]]] = []
        self.notes: list[str] = []

    def section(self, title, header):
        self.sections.append((title, header, []))

    def row(self, *cells):
        self.sections[-1][2].append([str(c) for c in cells])
        print("  " + " | ".join(str(c) for c in cells), flush=True)

    def markdown(self) -> str:
        out = []
        for title, header, rows in self.sections:
            out += [f"### {title}", "", "| " + " | ".join(header) + " |",
                    "|" + "|".join("---" for _ in header) + "|"]
            out += ["| " + " | ".join(r) + " |" for r in rows]
            out.append("")
        if self.notes:
            out += ["Notes:", ""] + [f"- {n}" for n in self.notes] + [""]
        return "\n".join(out)


# ---- sections -----------------------------------------------------------------------------

def run_cuda_tests(table: Table, timeout: int) -> None:
    tests = REPO / "tests" / "cuda"
    table.section("CUDA tests (every backend vs ref, opcheck)", ["command", "result", "seconds"])
    if not tests.is_dir():
        table.row("pytest tests/cuda", "not run: tests/ not found (not a source checkout)", "-")
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("TRITON_INTERPRET", None)
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", str(tests), "-q", "-p",
                            "no:cacheprovider"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=timeout)
        lines = [ln for ln in r.stdout.strip().splitlines() if ln.strip()]
        summary = lines[-1] if lines else f"exit {r.returncode}"
        if r.returncode != 0:
            print(r.stdout[-8000:], r.stderr[-3000:], sep="\n")
            failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
            table.notes += failed[:20]
    except subprocess.TimeoutExpired:
        summary = f"timed out after {timeout} s"
    table.row("pytest tests/cuda -q", summary, f"{time.time() - t0:.0f}")


def bench_attention(table: Table) -> None:
    import torch.nn.functional as F

    from ..ops import OPS, attention

    table.section("Attention forward+backward, bf16, B=32 H=12, lengths U[L/2, L]",
                  ["L", "D", "backend", "ms", "vs SDPA (masked)"])
    B, H = 32, 12
    for L in (64, 128):
        for D in (32, 64):
            torch.manual_seed(L + D)
            q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16,
                                   requires_grad=True) for _ in range(3))
            lengths = torch.randint(L // 2, L + 1, (B,), device="cuda")
            lengths[0] = L
            mask = torch.arange(L, device="cuda")[None, :] < lengths[:, None]
            g = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
            sdpa_mask = mask[:, None, None, :]

            def sdpa():
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask)
                torch.autograd.grad(out, (q, k, v), g)

            base = cuda_time_ms(sdpa)
            table.row(L, D, "torch SDPA + mask", f"{base:.3f}", "1.00x")
            for b in OPS["attention"].ordered():
                if "cuda" not in b.devices():  # without loading (building) a CPU extension
                    table.row(L, D, b.name, "-", f"runs on {'/'.join(b.devices())} only")
                    continue
                reasons = b.not_supported_reasons((q, k, v), dropout_p=0.0)
                if reasons:
                    table.row(L, D, b.name, "-", "unavailable: " + "; ".join(reasons))
                    continue

                def ours(name=b.name):
                    out = attention(q, k, v, mask, backend=name)
                    torch.autograd.grad(out, (q, k, v), g)

                try:
                    ms = cuda_time_ms(ours)
                    compiled = ("; " + compiled_stats("attention")) if b.name == "triton" else ""
                    table.row(L, D, b.name, f"{ms:.3f}", f"{base / ms:.2f}x{compiled}")
                except Exception as e:  # report, keep going
                    table.row(L, D, b.name, "-", f"failed: {type(e).__name__}: {e}"[:200])


def compiled_stats(op: str) -> str:
    """Registers, spill bytes and shared memory of the Triton kernels of `op` compiled so far on
    this device, as the driver reports them (the largest over each kernel's variants): what the
    GPU compile check (selfcheck --compile) predicts, seen on the real device."""
    import importlib

    import triton

    module = importlib.import_module(f"smarter_fast.ops.{op}.triton")
    parts = []
    for name in sorted(vars(module)):
        fn = getattr(module, name)
        if not isinstance(fn, triton.runtime.JITFunction):
            continue
        try:
            kernels = [k for caches in fn.device_caches.values() for k in caches[0].values()]
            for k in kernels:
                k._init_handles()  # fills n_regs / n_spills from the loaded binary
        except Exception as e:  # Triton versions differ in these internals
            parts.append(f"{name}: n/a ({type(e).__name__})")
            continue
        if kernels:
            parts.append(f"{name.strip('_')} x{len(kernels)}: regs<={max(k.n_regs for k in kernels)}"
                         f" spills<={max(k.n_spills for k in kernels)}"
                         f" smem<={max(k.metadata.shared for k in kernels) // 1024}KiB")
    return ", ".join(parts) or "no compiled kernels"


def bench_compiled(table: Table) -> None:
    """Every Triton kernel the timings compiled, as the device reports it."""
    table.section("Compiled Triton kernels (registers, spill bytes, shared memory: the driver's)",
                  ["op", "kernels"])
    for op in ("attention", "adamw", "smart"):
        table.row(op, compiled_stats(op))


def bench_adamw(table: Table, n: int) -> None:
    from ..ops import OPS
    from ..ops.adamw import triton as tri

    table.section(f"AdamW over {n / 1e6:.1f} M fp32 params (28 bytes/param)",
                  ["implementation", "ms", "GB/s", "share of copy", "vs torch fused"])
    src = torch.empty(n * 7, device="cuda")  # as many bytes as a step moves
    dst = torch.empty_like(src)
    copy_ms = cuda_time_ms(lambda: dst.copy_(src), warmup=3, reps=20)
    copy_gbs = 2 * src.numel() * 4 / copy_ms / 1e6
    table.row("device-to-device copy (read + write)", f"{copy_ms:.3f}", f"{copy_gbs:.0f}",
              "100%", "-")
    del src, dst
    p = torch.randn(n, device="cuda")
    g = torch.randn(n, device="cuda")
    m, v = torch.zeros(n, device="cuda"), torch.zeros(n, device="cuda")

    def gbs(ms):
        return 28 * n / ms / 1e6

    param = torch.nn.Parameter(torch.randn(n, device="cuda"))
    param.grad = torch.randn(n, device="cuda")
    fused = torch.optim.AdamW([param], lr=1e-3, eps=1e-6, weight_decay=0.01, fused=True)
    base = cuda_time_ms(fused.step)
    table.row("torch.optim.AdamW(fused=True)", f"{base:.3f}", f"{gbs(base):.0f}",
              f"{gbs(base) / copy_gbs:.0%}", "1.00x")
    del fused, param
    rows = []
    if not OPS["adamw"].backends["triton"].not_supported_reasons((p, g, m, v)):
        step = {"t": 0}

        def host_step():
            step["t"] += 1
            OPS["adamw"].backends["triton"].fn(p, g, m, v, 1e-3, 0.9, 0.999, 1e-6, 0.01,
                                               step["t"], True)

        step_t = torch.zeros((), device="cuda")

        def device_step():
            step_t.add_(1)
            tri.adamw_step_tensor_(p, g, m, v, 1e-3, 0.9, 0.999, 1e-6, 0.01, step_t)

        rows = [("triton adamw_step_ (host step)", host_step),
                ("triton adamw_step_tensor_ (device step, + step += 1)", device_step)]
    rows.append(("ref (PyTorch ops)", lambda: OPS["adamw"].backends["ref"].fn(
        p, g, m, v, 1e-3, 0.9, 0.999, 1e-6, 0.01, 1, True)))
    for name, fn in rows:
        ms = cuda_time_ms(fn)
        table.row(name, f"{ms:.3f}", f"{gbs(ms):.0f}", f"{gbs(ms) / copy_gbs:.0%}",
                  f"{base / ms:.2f}x")


def _batch(B, L, vocab, device, min_len=None, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    lengths = torch.randint(min_len or L // 4, L + 1, (B,), generator=g)
    lengths[0] = L
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1000, vocab, (B, L), generator=g) * mask
    return ids.to(device), mask.to(device), torch.randint(0, 5, (B,), generator=g).to(device)


def _our_model(backend):
    from ..model.bert import BertConfig, BertModel
    from ..model.heads import MultitaskBert

    cfg = BertConfig(**MINILM)
    return MultitaskBert(BertModel(cfg, backend=backend)).cuda().train()


def _our_optimizer(model, backend):
    """The optimizer a training run uses, with the model's gradient sinks attached to it."""
    from ..model.grad_sinks import attach_grad_sinks

    try:
        from ..optim import AdamW
        opt = AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, backend=backend)
        name = f"smarter_fast.optim.AdamW(backend={backend!r})"
    except Exception as e:  # e.g. the requested backend cannot step these parameters
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        name = f"torch fused AdamW (smarter_fast.optim.AdamW unavailable: {e})"
    attach_grad_sinks(model, opt)
    return opt, name


def bench_smart(table: Table, backend: str) -> None:
    import torch.nn.functional as F

    from .. import ops

    table.section("SMART step vs plain step, MultitaskBert (MiniLM shapes), batch 8, L=64, "
                  "bf16 autocast", ["step", "ms", "vs plain"])
    torch.manual_seed(0)
    model = _our_model(backend)
    opt, opt_name = _our_optimizer(model, backend)
    ids, mask, labels = _batch(8, 64, MINILM["vocab_size"], "cuda")
    amp = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731

    def plain():
        with amp():
            loss = F.cross_entropy(model(SST.head, ids, mask).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()

    def smart_two_passes():
        try:
            from ..regularizers.smart import smart_simple_loss
            batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
            with amp():
                loss = smart_simple_loss(model, SST.name, batch, 1e-5, 1.0, 1234, backend=backend)[0]
        except ImportError:
            with amp():
                E = model.bert.embed(ids)
                clean = model.heads_from_embeddings(SST.head, E, mask)
                noisy = model.heads_from_embeddings(
                    SST.head, ops.smart_noise(E, 1e-5, 1234, backend=backend), mask)
                loss = F.cross_entropy(clean.float(), labels) + ops.smart_mse(
                    clean.float(), noisy.float(), backend=backend)
        loss.backward()
        opt.step()
        opt.zero_grad()

    def smart_one_batch_2b():
        # Clean and perturbed passes as one encoder batch of 2B (what the GPU path should do).
        with amp():
            E = model.bert.embed(ids)
            E2 = torch.cat([E, ops.smart_noise(E, 1e-5, 1234, backend=backend)])
            out = model.heads_from_embeddings(SST.head, E2, torch.cat([mask, mask]))
            clean, noisy = out[: ids.shape[0]], out[ids.shape[0]:]
            loss = F.cross_entropy(clean.float(), labels) + ops.smart_mse(
                clean.float(), noisy.float(), backend=backend)
        loss.backward()
        opt.step()
        opt.zero_grad()

    base = cuda_time_ms(plain, warmup=5, reps=30)
    table.row(f"plain step ({opt_name})", f"{base:.2f}", "1.00x")
    for name, fn in (("SMART, two encoder passes (smarter_fast.regularizers.smart)", smart_two_passes),
                     ("SMART, one encoder pass of 2B", smart_one_batch_2b)):
        try:
            ms = cuda_time_ms(fn, warmup=5, reps=30)
            table.row(name, f"{ms:.2f}", f"{ms / base:.2f}x")
        except Exception as e:
            table.row(name, "-", f"failed: {type(e).__name__}: {e}"[:200])


def bench_end_to_end(table: Table, backend: str, batch: int, length: int) -> None:
    import torch.nn.functional as F

    table.section(f"Training step, MiniLM shapes, batch {batch}, L={length} (lengths "
                  f"U[L/4, L]), bf16 autocast", ["model", "ms", "vs HF eager"])
    ids, mask, labels = _batch(batch, length, MINILM["vocab_size"], "cuda", seed=1)
    amp = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    results = {}
    try:
        import transformers
        from transformers import BertConfig as HFConfig
        from transformers import BertModel as HFBert
        for impl in ("eager", "sdpa"):
            torch.manual_seed(0)
            try:
                hf = HFBert(HFConfig(**MINILM, attn_implementation=impl)).cuda().train()
                used = getattr(hf.config, "_attn_implementation", impl)
            except Exception:  # older transformers: no attn_implementation setting
                if impl != "eager":
                    continue
                hf, used = HFBert(HFConfig(**MINILM)).cuda().train(), "default"
            if used != impl:
                continue
            head = torch.nn.Linear(MINILM["hidden_size"], 5).cuda()
            params = list(hf.parameters()) + list(head.parameters())
            hf_opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)

            def hf_step(hf=hf, head=head, hf_opt=hf_opt):
                with amp():
                    pooled = hf(input_ids=ids, attention_mask=mask).pooler_output
                    loss = F.cross_entropy(head(pooled).float(), labels)
                loss.backward()
                hf_opt.step()
                hf_opt.zero_grad()

            results[f"HF BertModel ({used} attention, transformers "
                    f"{transformers.__version__}) + torch AdamW"] = cuda_time_ms(hf_step, 3, 15)
            del hf, head, hf_opt, params
    except ImportError as e:
        table.notes.append(f"Hugging Face transformers not importable here ({e}): no HF "
                           "comparison")

    torch.manual_seed(0)
    model = _our_model(backend)
    opt, opt_name = _our_optimizer(model, backend)

    def our_step():
        with amp():
            loss = F.cross_entropy(model(SST.head, ids, mask).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()

    results[f"smarter_fast MultitaskBert (backend={backend}) + {opt_name}"] = \
        cuda_time_ms(our_step, 3, 15)

    # Packed: no padding anywhere (cu_seqlens), what length-bucketed training can use.
    lengths = mask.sum(1)
    cu = torch.zeros(batch + 1, dtype=torch.int32, device="cuda")
    cu[1:] = lengths.cumsum(0)
    packed = ids[mask.bool()]

    def packed_step():
        with amp():
            out = model.forward_packed(SST.head, packed, cu, int(lengths.max()))
            loss = F.cross_entropy(out.float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()

    try:
        results[f"smarter_fast packed (cu_seqlens, backend={backend})"] = \
            cuda_time_ms(packed_step, 3, 15)
    except Exception as e:
        table.notes.append(f"packed step failed: {type(e).__name__}: {e}"[:300])
    base = next((ms for name, ms in results.items() if "eager" in name), None)
    for name, ms in results.items():
        table.row(name, f"{ms:.2f}", f"{base / ms:.2f}x" if base else "-")


def run(out: str = "selfcheck.md", skip_tests: bool = False, tests_timeout: int = 170,
        no_autotune: bool = False, backend: str = "auto", adamw_params: int = 22_713_216) -> int:
    """Runs every section (one failing section does not hide the others), prints the table and
    writes it to `out`. Without CUDA it says so and returns 0."""
    if not torch.cuda.is_available():
        print("smarter_fast.selfcheck needs a CUDA device and found none "
              f"(torch {torch.__version__}); nothing to check here.")
        return 0
    if no_autotune:
        os.environ["SMARTER_FAST_TRITON_AUTOTUNE"] = "0"
    os.environ.pop("TRITON_INTERPRET", None)

    t0 = time.time()
    table = Table()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    header = (f"smarter_fast self-check on {torch.cuda.get_device_name(0)}: torch "
              f"{torch.__version__}, triton {triton_version}, python {sys.version.split()[0]}")
    print(header, flush=True)
    from ..ops import OPS
    info = []
    for op_name, op in OPS.items():  # like smarter_fast.info, but CPU-only backends unprobed
        for b in op.ordered():
            if "cuda" not in b.devices():
                info.append(f"{op_name} {b.name} not for CUDA (runs on "
                            f"{'/'.join(b.devices())})")
                continue
            why = b.availability()
            info.append(f"{op_name} {b.name} " + ("available" if why is None
                                                  else f"unavailable: {why}"))

    if not skip_tests:
        print("running the CUDA tests ...", flush=True)
        run_cuda_tests(table, tests_timeout)
    for name, fn in (("attention", lambda: bench_attention(table)),
                     ("adamw", lambda: bench_adamw(table, adamw_params)),
                     ("smart", lambda: bench_smart(table, backend)),
                     ("end to end", lambda: bench_end_to_end(table, backend, 32, 128)),
                     ("compiled kernels", lambda: bench_compiled(table))):
        print(f"timing {name} ...", flush=True)
        try:
            fn()
        except Exception as e:  # one failing section must not hide the others
            table.notes.append(f"{name} section failed: {type(e).__name__}: {e}"[:400])
            print(f"  {name} failed: {type(e).__name__}: {e}", flush=True)
        torch.cuda.empty_cache()
    table.notes.append(f"total self-check time {time.time() - t0:.0f} s")
    text = "\n".join([f"## {header}", "", "Backends:", "", *[f"    {ln}" for ln in info], "",
                      table.markdown()])
    Path(out).write_text(text + "\n")
    print()
    print(text)
    print(f"(written to {out})")
    return 0

