"""LR schedules (warm-up, linear, cosine) and layer-wise LR decay."""

import math

import pytest
import torch

from smarter_fast.optim.lr_schedule import LRSchedule, lr_factor, param_groups, warmup_steps
from smarter_fast.model import BertConfig, BertModel, MultitaskBert
from smarter_fast.optim import AdamW


def test_factors():
    assert [lr_factor(s, 10, 0, "constant") for s in range(10)] == [1.0] * 10
    assert lr_factor(0, 10, 0, "linear") == 1.0 and lr_factor(5, 10, 0, "linear") == 0.5
    assert lr_factor(10, 10, 0, "linear") == 0.0
    assert lr_factor(5, 10, 0, "cosine") == pytest.approx(0.5)
    assert lr_factor(0, 10, 0, "cosine") == 1.0
    assert lr_factor(2, 12, 2, "cosine") == 1.0  # first step after warm-up: full lr
    assert [lr_factor(s, 100, 3, "linear") for s in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    assert lr_factor(7, 12, 2, "linear") == pytest.approx(0.5)
    assert warmup_steps(200, 0.1) == 20 and warmup_steps(200, 0.1, steps=7) == 7
    with pytest.raises(ValueError):
        lr_factor(0, 1, 0, "nope")


def test_layer_decay_groups_and_schedule():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=16)
    model = MultitaskBert(BertModel(cfg, backend="ref"))
    groups = param_groups(model, 1e-3, layer_decay=0.5)
    assert [g["depth"] for g in groups] == [0, 1, 2, 3]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3 / 8, 1e-3 / 4, 1e-3 / 2, 1e-3])
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(model.parameters()))
    assert any(p is model.sentiment.weight for p in groups[-1]["params"])
    assert any(p is model.bert.embeddings.word.weight for p in groups[0]["params"])
    opt = AdamW(groups, lr=1e-3)
    sched = LRSchedule(opt, total_steps=10, warmup=0, kind="cosine")
    sched.apply(5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 / 16, 1e-3 / 8, 1e-3 / 4, 1e-3 / 2])
    assert len(param_groups(model, 1e-3)) == 1


def test_time_budget_factors_follow_progress():
    from smarter_fast.optim.lr_schedule import lr_factor_at
    assert lr_factor_at(0.0, 0.1, "linear") == pytest.approx(0.01)  # never 0
    assert lr_factor_at(0.05, 0.1, "linear") == pytest.approx(0.5)
    assert lr_factor_at(0.1, 0.1, "linear") == pytest.approx(1.0)
    assert lr_factor_at(0.55, 0.1, "linear") == pytest.approx(0.5)
    assert lr_factor_at(1.0, 0.1, "linear") == 0.0
    assert lr_factor_at(1.7, 0.1, "linear") == 0.0  # past the budget's end
    assert lr_factor_at(0.55, 0.1, "cosine") == pytest.approx(0.5)
    assert lr_factor_at(0.3, 0.0, "constant") == 1.0


def test_time_budget_schedule_ends_at_whichever_comes_first():
    import torch
    from smarter_fast.optim.lr_schedule import LRSchedule
    opt = torch.optim.SGD([torch.nn.Parameter(torch.randn(3))], lr=0.2)
    budget_only = LRSchedule(opt, None, kind="linear", warmup_fraction=0.0)
    assert budget_only.apply(5, progress=0.25) == pytest.approx(0.75)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.15)
    with pytest.raises(ValueError, match="needs progress"):
        budget_only.factor(5)
    both = LRSchedule(opt, 100, kind="linear")
    assert both.factor(80, progress=0.25) == pytest.approx(0.2)  # the steps end first
    assert both.factor(10, progress=0.5) == pytest.approx(0.5)  # the budget ends first
    stepped_warmup = LRSchedule(opt, None, warmup=4, kind="linear")
    assert stepped_warmup.factor(1, progress=0.0) == pytest.approx(2 / 5)
