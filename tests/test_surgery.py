"""Gradient surgery: PCGrad and GradVac on toy vectors, and the per-task flat buffer on a model."""

import math

import numpy as np
import pytest
import torch

from smarter_fast.surgery import GradientSurgery, GradVac, pcgrad


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
