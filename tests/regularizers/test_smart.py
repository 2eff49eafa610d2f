"""Simple SMART: the consistency term reaches both branches and vanishes for sigma = 0."""

import pytest
import torch

from smarter_fast.tasks import task_loss
from smarter_fast.model import BertConfig, BertModel, MultitaskBert
import torch.nn.functional as F

from smarter_fast.regularizers.smart import (EmaTeacher, adversarial_perturbation, check_mode, smart_full_loss,
                                smart_simple_loss, step_seed, symmetric_divergence)


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
def test_fused_2b_batch_matches_two_passes(task):
    """The clean and perturbed passes as one batch of 2B (the CUDA default) give the same loss
    and gradients as two passes of B (no dropout here, so both are deterministic)."""
    results = []
    for fuse in (False, True):
        model = tiny_model()
        total, loss, term, clean = smart_simple_loss(model, task, batch(task), sigma=0.3,
                                                     lam=10.0, seed=7, fuse_batch=fuse)
        total.backward()
        results.append((total.detach(), term.detach(), clean.detach(),
                        [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (t0, m0, c0, g0), (t1, m1, c1, g1) = results
    torch.testing.assert_close(t1, t0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m1, m0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(c1, c0, rtol=1e-5, atol=1e-6)
    assert len(g0) == len(g1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


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
    check_mode("full")
    with pytest.raises(ValueError):
        check_mode("nope")


# ---- full SMART --------------------------------------------------------------------------------------
def test_symmetric_kl_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    P, Q = a.softmax(-1), b.softmax(-1)
    direct = ((P * (P / Q).log()).sum(-1) + (Q * (Q / P).log()).sum(-1)).mean()
    torch.testing.assert_close(symmetric_divergence("sst", a, b), direct)
    via_torch = (F.kl_div(b.log_softmax(-1), P, reduction="batchmean")
                 + F.kl_div(a.log_softmax(-1), Q, reduction="batchmean"))
    torch.testing.assert_close(symmetric_divergence("sst", a, b), via_torch)
    x, y = torch.randn(8, generator=g), torch.randn(8, generator=g)
    p, q = torch.sigmoid(x), torch.sigmoid(y)
    kl = lambda p, q: p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()  # noqa: E731
    torch.testing.assert_close(symmetric_divergence("quora", x, y), (kl(p, q) + kl(q, p)).mean())
    torch.testing.assert_close(symmetric_divergence("sts", x, y), ((x - y) ** 2).mean())
    assert symmetric_divergence("sst", a, a).item() == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(symmetric_divergence("sst", a, b), symmetric_divergence("sst", b, a))


@pytest.mark.parametrize("task", ["sst", "quora", "sts"])
@pytest.mark.parametrize("epsilon", [None, 1e-2])
def test_adversarial_step_increases_inner_loss(task, epsilon):
    model = tiny_model()
    b = batch(task)
    type_ids = b["token_type_ids"] if task != "sst" else None
    E = model.bert.embed(b["input_ids"], type_ids)
    head = {"sst": "sentiment", "quora": "paraphrase", "sts": "similarity"}[task]
    clean = model.heads_from_embeddings(head, E, b["attention_mask"])
    # epsilon=None: mt-dnn's per-token L-inf normalised step; else projected ascent in the ball
    delta, losses = adversarial_perturbation(
        model, task, E, b["attention_mask"], clean, sigma=1e-3, eta=1e-2 if epsilon is None else 1e-3,
        steps=2, epsilon=epsilon, generator=torch.Generator().manual_seed(0), return_losses=True)
    assert len(losses) == 3
    assert losses[1] > losses[0] and losses[2] > losses[1]
    assert not delta.requires_grad
    assert (delta[0, 5:] == 0).all()  # padding is never perturbed
    if epsilon is not None:
        assert delta.abs().max() <= epsilon + 1e-9
    else:
        # each real token's perturbation has L-inf norm ~1 (normalised per token)
        torch.testing.assert_close(delta[1].abs().amax(-1), torch.ones(7), atol=1e-4, rtol=0)


def test_smart_full_loss_gradients_and_dropout_mode():
    model = tiny_model()
    model.dropout.p = 0.3
    b = batch("sst")
    total, loss, term, clean = smart_full_loss(model, "sst", b, sigma=1e-5, eta=1e-3, steps=1, lam=2.0,
                                               seed=3)
    assert model.training  # the adversarial passes restore the training mode
    assert term.item() > 0
    torch.testing.assert_close(total, loss + 2.0 * term)
    total.backward()
    assert model.bert.embeddings.word.weight.grad.abs().sum() > 0
    # same seed: same perturbation, same term (dropout off in the adversarial passes)
    torch.manual_seed(0)
    t1 = smart_full_loss(model, "sst", b, seed=3)[2]
    torch.manual_seed(0)
    t2 = smart_full_loss(model, "sst", b, seed=3)[2]
    assert t1.item() == t2.item()


def test_ema_teacher_bregman_term():
    model = tiny_model()
    teacher = EmaTeacher(model, beta=0.5)
    b = batch("quora")
    # identical teacher: the Bregman term is 0, total = loss + lam * adv
    total, loss, term, _ = smart_full_loss(model, "quora", b, lam=1.0, seed=1, teacher=teacher, mu=1.0)
    torch.testing.assert_close(total, loss + term)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    before = [p.clone() for p in teacher.model.parameters()]
    teacher.update(model)
    for p0, pt, ps in zip(before, teacher.model.parameters(), model.parameters()):
        torch.testing.assert_close(pt, 0.5 * p0 + 0.5 * ps)
    total, loss, term, _ = smart_full_loss(model, "quora", b, lam=1.0, seed=1, teacher=teacher, mu=1.0)
    assert (total - loss - term).item() > 0
