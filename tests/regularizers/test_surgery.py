"""Gradient surgery: PCGrad and GradVac on toy vectors, and the per-task flat buffer on a model."""

import math

import numpy as np
import pytest
import torch

from smarter_fast.regularizers.surgery import GradientSurgery, GradVac, gram, pcgrad, pcgrad_reference


def test_pcgrad_makes_conflicting_gradients_non_conflicting():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    assert torch.dot(g[0], g[1]) < 0
    combined, proj = pcgrad(g, np.random.default_rng(0))
    # each projected gradient no longer conflicts with the other task's original gradient
    assert torch.dot(proj[0], g[1]) == pytest.approx(0.0, abs=1e-6)
    assert torch.dot(proj[1], g[0]) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(proj[0], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(proj[1], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(combined, proj.sum(0))
    assert torch.dot(combined, g[0]) >= 0 and torch.dot(combined, g[1]) >= 0


def test_pcgrad_leaves_agreeing_gradients_unchanged():
    g = torch.tensor([[1.0, 0.2, 0.0], [0.5, 1.0, 0.3], [0.1, 0.1, 2.0]])
    combined, proj = pcgrad(g, np.random.default_rng(1))
    torch.testing.assert_close(proj, g)
    torch.testing.assert_close(combined, g.sum(0))


def test_pcgrad_three_tasks_random_order_no_conflicts_remain_with_originals():
    torch.manual_seed(0)
    g = torch.randn(3, 50)
    _, proj = pcgrad(g, np.random.default_rng(2))
    # the last projection applied to each g_i leaves it orthogonal or agreeing with that g_j
    for i in range(3):
        assert sum(float(torch.dot(proj[i], g[j])) < -1e-4 for j in range(3) if j != i) <= 1


def test_gradvac_target_similarity_update_and_adjustment():
    gv = GradVac(2, beta=0.5)
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    phi = -1 / math.sqrt(2)
    # targets start at 0: the conflicting pair is moved to cosine 0 and targets move toward phi
    combined, adj = gv(g, np.random.default_rng(0))
    cos01 = float(torch.dot(adj[0], g[1]) / adj[0].norm() / g[1].norm())
    assert cos01 == pytest.approx(0.0, abs=1e-6)
    assert float(gv.target[0, 1]) == pytest.approx(0.5 * phi)
    assert float(gv.target[1, 0]) == pytest.approx(0.5 * phi)
    torch.testing.assert_close(combined, adj.sum(0))
    # now the target is 0.5 * phi < 0: a pair with cosine above it is left alone, target updated
    g2 = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    _, adj2 = gv(g2, np.random.default_rng(0))
    torch.testing.assert_close(adj2, g2)
    assert float(gv.target[0, 1]) == pytest.approx(0.5 * (0.5 * phi) + 0.5 * (1 / math.sqrt(2)))
    # a pair below a positive target is raised to exactly that target
    gv.target.fill_(0.5)
    _, adj3 = gv(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), np.random.default_rng(0))
    cos = float(torch.dot(adj3[0], torch.tensor([0.0, 1.0])) / adj3[0].norm())
    assert cos == pytest.approx(0.5, abs=1e-6)


def test_surgery_collects_encoder_grads_and_keeps_head_grads():
    from smarter_fast.model import BertConfig, BertModel, MultitaskBert
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=16)
    model = MultitaskBert(BertModel(cfg, backend="ref")).eval()
    s = GradientSurgery(model, ["sst", "quora"], "pcgrad")
    ids = torch.randint(1, 30, (2, 5))
    refs = {}
    for task, head in (("sst", "sentiment"), ("quora", "paraphrase")):
        model(head, ids).float().pow(2).sum().backward()
        refs[task] = torch.cat([p.grad.reshape(-1).clone() for p in model.bert.parameters()])
        s.collect(task)
        assert all(p.grad is None for p in model.bert.parameters())
    torch.testing.assert_close(s.buffer[0], refs["sst"])
    assert model.sentiment.weight.grad is not None and model.paraphrase.weight.grad is not None
    assert model.similarity.weight.grad is None
    s.combine()
    got = torch.cat([p.grad.reshape(-1) for p in model.bert.parameters()])
    want, _ = pcgrad(torch.stack([refs["sst"], refs["quora"]]), np.random.default_rng([0, 0x9C6]))
    torch.testing.assert_close(got, want)


# ---- the Gram-matrix form against the per-vector reference --------------------------------------

def _conflicting(T: int, D: int, seed: int) -> torch.Tensor:
    """T random gradients of length D, about half the pairs in conflict, norms from 0.1 to 10."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(T, D, generator=g) * torch.logspace(-1, 1, T)[:, None]
    rows[1:] -= 0.5 * rows[0]  # pull the others against row 0: some dot products turn negative
    return rows


@pytest.mark.parametrize("T,D,block", [(2, 7, 3), (3, 1001, 64), (4, 4099, 1000), (3, 70_001, 1 << 16)])
def test_gram_matches_float64_products(T, D, block):
    g = _conflicting(T, D, seed=D)
    want = g.double() @ g.double().T
    scale = want.diagonal().sqrt()
    # float32 products per block: every entry within 1e-6 of |g_i| |g_j| (a cosine off by < 1e-6)
    err = (gram(g, block=block) - want).abs() / (scale[:, None] * scale[None, :])
    assert float(err.max()) < 1e-6


@pytest.mark.parametrize("T,D,seed", [(2, 5, 0), (3, 1001, 1), (4, 333, 2), (5, 2047, 3)])
def test_pcgrad_gram_form_matches_the_reference(T, D, seed):
    g = _conflicting(T, D, seed)
    K = g.double() @ g.double().T
    assert (K < 0).any(), "the inputs must contain conflicting pairs"
    combined, projected = pcgrad(g, np.random.default_rng(seed))
    want_combined, want_projected = pcgrad_reference(g, np.random.default_rng(seed))
    torch.testing.assert_close(projected, want_projected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(combined, want_combined, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,D,seed", [(2, 9, 0), (3, 1001, 1), (4, 515, 2)])
def test_gradvac_gram_form_matches_the_reference_over_several_steps(T, D, seed):
    fast, ref = GradVac(T, beta=0.3), GradVac(T, beta=0.3)
    start = torch.rand(T, T, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) - 0.5
    fast.target.copy_(start)
    ref.target.copy_(start)
    for step in range(3):  # the targets carry over: later steps see the updated ones
        g = _conflicting(T, D, seed=100 * seed + step)
        combined, adjusted = fast(g, np.random.default_rng(step))
        want_combined, want_adjusted = ref.reference(g, np.random.default_rng(step))
        torch.testing.assert_close(adjusted, want_adjusted, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(combined, want_combined, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast.target, ref.target, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["pcgrad", "gradvac"])
def test_surgery_combine_matches_reference_and_reuses_its_buffer(method):
    from smarter_fast.model import BertConfig, BertModel, MultitaskBert
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=16)
    model = MultitaskBert(BertModel(cfg, backend="ref")).eval()
    tasks = ["sst", "quora", "sts"]
    s = GradientSurgery(model, tasks, method)
    ref_rng, ref_gradvac = np.random.default_rng([0, 0x9C6]), GradVac(3)
    ptrs = set()
    for step in range(2):
        ids = torch.randint(1, 30, (2, 5))
        for task, head in zip(tasks, ("sentiment", "paraphrase", "similarity")):
            sign = -1.0 if task == "quora" else 1.0  # opposite objectives: conflicting gradients
            (sign * model(head, ids).float().pow(2).sum()).backward()
            s.collect(task)
        rows = s.buffer.clone()
        s.combine()
        got = torch.cat([p.grad.reshape(-1) for p in model.bert.parameters()])
        want, _ = (pcgrad_reference(rows, ref_rng) if method == "pcgrad"
                   else ref_gradvac.reference(rows, ref_rng))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        K = rows.double() @ rows.double().T
        n = K.diagonal().sqrt()
        torch.testing.assert_close(s.last_cosines, (K / n[:, None] / n[None, :]).float())
        ptrs.add(next(model.bert.parameters()).grad.data_ptr())
        model.zero_grad(set_to_none=True)
    assert len(ptrs) == 1  # the combined gradient lives in one buffer kept across steps


def test_surgery_non_finite_gradient_leaves_gradvac_targets_alone():
    from smarter_fast.model import BertConfig, BertModel, MultitaskBert
    cfg = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=16)
    model = MultitaskBert(BertModel(cfg, backend="ref")).eval()
    s = GradientSurgery(model, ["sst", "quora"], "gradvac")
    s.gradvac.target.fill_(0.25)
    s.buffer.normal_(generator=torch.Generator().manual_seed(0))
    s.buffer[1, 3] = float("nan")
    s.combine()
    torch.testing.assert_close(s.gradvac.target, torch.full((2, 2), 0.25, dtype=torch.float64))
    got = torch.cat([p.grad.reshape(-1) for p in model.bert.parameters()])
    assert not torch.isfinite(got).all()  # the trainer's check sees it and skips the step


def test_surgery_refuses_torchrun(monkeypatch, capsys):
    from smarter_fast.train import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        main(["--grad-surgery", "pcgrad", "--epochs", "1"])
    assert e.value.code == 2
    assert "--grad-surgery runs in one process" in capsys.readouterr().err
