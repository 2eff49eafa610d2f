"""Property tests (hypothesis): kernels against their references on random shapes (length-1
sequences, all padding but [CLS], the maximum length 512), and the CS224N readers fed random
bytes, stray quotes and tabs (only DataError, in strict mode; counts always add up)."""

import string

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from smarter_fast import ops
from smarter_fast.data.cs224n import DataError, read_task_file
from smarter_fast.ops.adamw import ref as adamw_ref
from smarter_fast.ops.attention import ref as attn_ref
from smarter_fast.ops.smart import ref as smart_ref

FAST = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))


@st.composite
def attention_case(draw):
    L = draw(st.sampled_from([1, 2, 3, 7, 16, 33, 512]))
    B = draw(st.integers(1, 3)) if L < 512 else 1
    H = draw(st.integers(1, 2)) if L < 512 else 1
    D = draw(st.sampled_from([1, 4, 8, 16])) if L < 512 else 4
    kind = draw(st.sampled_from(["full", "cls_only", "random"]))
    lengths = [L if kind == "full" else 1 if kind == "cls_only" else draw(st.integers(1, L)) for _ in range(B)]
    return B, H, L, D, lengths, draw(st.integers(0, 2 ** 31 - 1))


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(attention_case())
@example((1, 1, 512, 4, [512], 0))  # the maximum length
@example((2, 1, 1, 8, [1, 1], 1))  # length-1 sequences
@example((2, 2, 9, 8, [1, 1], 2))  # all padding but [CLS]
def test_attention_matches_ref(case):
    B, H, L, D, lengths, seed = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g, requires_grad=True) for _ in range(3))
    mask = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).to(torch.int64)
    out = ops.attention(q, k, v, mask)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want = attn_ref.attention(q64, k64, v64, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
    gout = torch.randn(B, H, L, D, generator=g)
    got = torch.autograd.grad(out, (q, k, v), gout)
    ref = torch.autograd.grad(want, (q64, k64, v64), gout.double())
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, atol=5e-5, rtol=1e-3)
    pad = ~mask.bool()
    assert (out.detach().permute(0, 2, 1, 3)[pad] == 0).all()  # padded queries are zero


@FAST
@given(st.lists(st.integers(1, 9), min_size=1, max_size=3), st.integers(0, 2 ** 31 - 1))
def test_smart_mse_matches_ref(shape, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, generator=g, requires_grad=True)
    b = torch.randn(*shape, generator=g, requires_grad=True)
    got = ops.smart_mse(a, b)
    want = smart_ref.smart_mse(a.detach().double().requires_grad_(), b.detach().double().requires_grad_())
    torch.testing.assert_close(got.double(), want.detach(), atol=1e-6, rtol=1e-5)
    ga = torch.autograd.grad(got, (a, b))
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    gw = torch.autograd.grad(smart_ref.smart_mse(a64, b64), (a64, b64))
    for x, y in zip(ga, gw):
        torch.testing.assert_close(x.double(), y, atol=1e-6, rtol=1e-5)


@FAST
@given(st.integers(1, 5000), st.integers(1, 50), st.floats(1e-5, 1e-1), st.floats(0.0, 0.1),
       st.booleans(), st.integers(0, 2 ** 31 - 1))
def test_adamw_step_matches_ref(n, step, lr, wd, correct_bias, seed):
    g = torch.Generator().manual_seed(seed)
    p, grad, m = (torch.randn(n, generator=g) for _ in range(3))
    v = torch.rand(n, generator=g)
    ref = [x.double().clone() for x in (p, grad, m, v)]
    ops.adamw_step_(p, grad, m, v, lr=lr, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=wd, step=step,
                    correct_bias=correct_bias)
    adamw_ref.adamw_step_(*ref, lr, 0.9, 0.999, 1e-6, wd, step, correct_bias)
    for got, want in zip((p, m, v), (ref[0], ref[2], ref[3])):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


# ---- readers --------------------------------------------------------------------------------
HEADERS = {"sst": "\tid\tsentence\tsentiment", "quora": "\tid\tsentence1\tsentence2\tis_duplicate",
           "sts": "\tid\tsentence1\tsentence2\tsimilarity"}
FIELD = st.one_of(st.text(alphabet=string.ascii_letters + ' "\t\'\\,.', max_size=12),
                  st.sampled_from(['"', '""', '"a', 'b"', "\t", "0", "1", "4", "5.0", "7", "-1", "nan", "", " "]))


@st.composite
def file_bytes(draw):
    task = draw(st.sampled_from(sorted(HEADERS)))
    if draw(st.booleans()):  # rows of stray quotes, tabs and odd labels
        rows = draw(st.lists(st.lists(FIELD, min_size=1, max_size=6), max_size=8))
        text = HEADERS[task] + "\n" + "".join("\t".join(r) + draw(st.sampled_from(["\n", "\r\n", ""])) for r in rows)
        data = text.encode("utf-8")
        if draw(st.booleans()):
            data += draw(st.binary(max_size=40))
    else:  # random bytes, with or without a header
        data = (HEADERS[task].encode() + b"\n" if draw(st.booleans()) else b"") + draw(st.binary(max_size=200))
    return task, data


def _check_read(path, task, strict):
    try:
        examples, report = read_task_file(path, task, strict=strict)
    except DataError as e:
        assert str(path) in str(e)
        return None
    assert report.rows_kept == len(examples)
    assert report.rows_kept + report.rows_skipped == report.rows_read
    for m in report.messages():
        assert m.startswith("skipped ") and f" rows in {path.name}: " in m
    if strict:
        assert report.rows_skipped == 0
    return examples, report


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(file_bytes())
def test_readers_never_crash_and_counts_add_up(tmp_path_factory, case):
    task, data = case
    path = tmp_path_factory.mktemp("rd") / f"{task}-train.csv"
    path.write_bytes(data)
    lenient = _check_read(path, task, strict=False)
    strict = _check_read(path, task, strict=True)
    if lenient is not None and strict is not None:  # strict succeeds only on clean files
        assert lenient[1].rows_skipped == 0 and len(strict[0]) == len(lenient[0])
    if lenient is not None and lenient[1].rows_skipped:
        assert strict is None  # any skipped row is an error under --strict
    for e in (lenient or ([], None))[0]:
        if task == "sst":
            assert e.label in range(5)
        elif task == "quora":
            assert e.label in (0, 1)
        else:
            assert 0.0 <= e.label <= 5.0
