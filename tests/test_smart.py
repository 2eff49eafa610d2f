"""Simple SMART: the consistency term reaches both branches and vanishes for sigma = 0."""

import pytest
import torch

from smarter_fast.losses import task_loss
from smarter_fast.model import BertConfig, BertModel, MultitaskBert
from smarter_fast.smart import SmartNotImplemented, check_mode, smart_simple_loss, step_seed


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return MultitaskBert(BertModel(cfg, backend="ref")).train()


def batch(task, B=4, L=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.int64)
    mask[0, 5:] = 0
    ids[0, 5:] = 0
    types = torch.zeros(B, L, dtype=torch.int64)
    types[:, 3:] = 1
    labels = {"sst": torch.tensor([0, 1, 4, 2]), "quora": torch.tensor([0.0, 1.0, 1.0, 0.0]),
              "sts": torch.tensor([0.5, 2.0, 4.5, 3.0])}[task][:B]
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}


def capture_head_outputs(model, task):
    head = getattr(model, {"sst": "sentiment", "quora": "paraphrase", "sts": "similarity"}[task])
    outs = []

    def hook(module, inputs, output):
        output.retain_grad()
        outs.append(output)
    return head.register_forward_hook(hook), outs


@pytest.mark.parametrize("task", ["sst", "quora", "sts"])
def test_term_reaches_clean_and_perturbed_branches(task):
    model = tiny_model()
    handle, outs = capture_head_outputs(model, task)
    total, loss, term, clean = smart_simple_loss(model, task, batch(task), sigma=0.5, lam=10.0, seed=7)
    handle.remove()
    assert len(outs) == 2  # clean, then perturbed, through the same head
    assert term.item() > 0
    torch.testing.assert_close(total, loss + 10.0 * term)
    term.backward()
    clean_grad, noisy_grad = outs[0].grad, outs[1].grad
    assert clean_grad is not None and clean_grad.abs().sum() > 0
    assert noisy_grad is not None and noisy_grad.abs().sum() > 0
    torch.testing.assert_close(clean_grad, -noisy_grad)  # d/da (a-b)^2 = -d/db
    # the shared embeddings get gradient (through both branches)
    assert model.bert.embeddings.word.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("task", ["sst", "quora", "sts"])
def test_term_vanishes_for_sigma_zero(task):
    model = tiny_model()
    b = batch(task)
    total, loss, term, clean = smart_simple_loss(model, task, b, sigma=0.0, lam=10.0, seed=7)
    assert term.item() == 0.0
    torch.testing.assert_close(total, loss)
    # and the task loss equals the plain forward's
    type_ids = b["token_type_ids"] if task != "sst" else None
    head = {"sst": "sentiment", "quora": "paraphrase", "sts": "similarity"}[task]
    plain = task_loss(task, model(head, b["input_ids"], b["attention_mask"], type_ids), b["labels"])
    torch.testing.assert_close(loss, plain)


def test_same_seed_same_term_new_seed_new_term():
    model = tiny_model()
    b = batch("sts")
    t1 = smart_simple_loss(model, "sts", b, 0.1, 1.0, seed=step_seed(11711, 3))[2]
    t2 = smart_simple_loss(model, "sts", b, 0.1, 1.0, seed=step_seed(11711, 3))[2]
    t3 = smart_simple_loss(model, "sts", b, 0.1, 1.0, seed=step_seed(11711, 4))[2]
    assert t1.item() == t2.item()
    assert t1.item() != t3.item()
    assert step_seed(1, 0) != step_seed(1, 1) != step_seed(2, 1)


def test_term_grows_with_sigma():
    model = tiny_model()
    b = batch("sst")
    small = smart_simple_loss(model, "sst", b, 0.01, 1.0, seed=5)[2].item()
    large = smart_simple_loss(model, "sst", b, 0.5, 1.0, seed=5)[2].item()
    assert 0 < small < large


def test_modes():
    check_mode("off")
    check_mode("simple")
    with pytest.raises(SmartNotImplemented, match="not implemented yet"):
        check_mode("full")
    with pytest.raises(ValueError):
        check_mode("nope")
