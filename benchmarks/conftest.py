"""Fixtures and report hooks of the benchmark suite; the helpers live in benchutil.py."""

from __future__ import annotations

import os
import platform

# As `python -m smarter_fast.train` does (it sets this before torch loads): torch's large CPU
# buffers in transparent huge pages. Set for the whole session, so every provider, the `hf`
# reference included, gets it.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import pytest
import torch

from benchutil import cs224n_dir, time_copy


@pytest.fixture(scope="session")
def results() -> dict:
    """(group, provider) -> mean seconds, for ratios to a peer measured earlier in the run."""
    return {}


@pytest.fixture(scope="session")
def copy_bandwidth() -> dict:
    """Copy bandwidth in GB/s per device, measured once in this session: `dst.copy_(src)` on
    fp32 buffers of 32M elements (128 MiB each, well beyond the caches); 2 * N * 4 bytes moved."""
    class Lookup(dict):
        def __missing__(self, device):
            n = 32 * 2 ** 20 if device == "cpu" else 256 * 2 ** 20
            self[device] = time_copy(device, n)
            return self[device]

    return Lookup()


@pytest.fixture(scope="session")
def sst_examples():
    """Tokenized SST training sentences: (ids, labels, data_dir, is_real). The first 400 rows
    of ids-sst-train.csv, read and encoded once per session."""
    from smarter_fast.data import encode_sentences, load_tokenizer, read_sst
    from smarter_fast.tasks import SST

    directory, real = cs224n_dir()
    examples, _ = read_sst(directory / SST.file_name("train"), limit=400)
    tok = load_tokenizer()
    ids, _ = encode_sentences(tok, [e.sentence for e in examples])
    labels = [int(e.label) for e in examples]
    return ids, labels, str(directory), real


# ---- report hooks ----------------------------------------------------------------------------

def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["platform"] = platform.platform()
    try:
        from smarter_fast.diagnostics.environment import cpu_flags  # the flags `python -m smarter_fast.info` shows

        machine_info["cpu_flags"] = cpu_flags()
    except Exception:
        pass
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                machine_info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        machine_info["cuda_device"] = torch.cuda.get_device_name()


_SKIPS: list = []


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPS.append({"test": report.nodeid.split("::")[-1], "reason": reason})


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Skipped benchmarks and their reasons go into the JSON too (to_markdown lists them)."""
    output_json["skipped"] = [s for s in _SKIPS
                              if not s["reason"].startswith("Skipping non-benchmark")]
