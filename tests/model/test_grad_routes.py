"""Parameters whose gradients the model writes itself (grad_sinks.linear, the last layer's
[CLS] QKV, the word embedding) under every way of asking autograd for gradients: .backward(),
torch.autograd.grad of other tensors (SMART's adversarial ascent), torch.autograd.grad of the
parameters, and .backward(inputs=...). Each must give what plain autograd gives, and leave
p.grad alone where autograd would."""

import pytest
import torch

from smarter_fast.model import BertConfig, BertModel, MultitaskBert
from smarter_fast.model.grad_sinks import attach_grad_sinks


def _models():
    """(fast, slow): the same tiny MultitaskBert twice; fast writes gradients itself, slow is
    plain autograd (nn.Linear, nn.Embedding). Dropout off, so both compute the same function."""
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    fast = MultitaskBert(BertModel(cfg, backend="ref")).train()
    slow = MultitaskBert(BertModel(cfg, backend="ref")).train()
    slow.load_state_dict(fast.state_dict())
    attach_grad_sinks(fast)
    return fast, slow


def _batch(pairs: bool):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 40, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[2, 5:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if pairs:
        batch["token_type_ids"] = (torch.arange(7) >= 4).long().expand(3, 7).contiguous()
        batch["labels"] = torch.tensor([0.0, 1.0, 1.0])
    else:
        batch["labels"] = torch.tensor([0, 3, 4])
    return batch


def _run(model, fused: bool, fn):
    model.zero_grad(set_to_none=True)
    return fn(model)


def _grads(model):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def _assert_same_grads(got: dict, want: dict) -> None:
    """Per parameter name: None on both sides, or equal within 1e-5."""
    for n, g in want.items():
        if g is None:
            assert got[n] is None, n
        else:
            torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("task", ["sst", "quora"])
def test_smart_full_gradients_equal_plain_autograd(task):
    """The adversarial ascent's torch.autograd.grad(inner, delta) must not write the inner loss's
    weight gradients into p.grad (it did: up to 10% of the gradient here)."""
    from smarter_fast.regularizers.smart import smart_full_loss

    fast, slow = _models()
    batch = _batch(task != "sst")
    out = {}
    for model, fused in ((fast, True), (slow, False)):
        def step(m):
            total, *_ = smart_full_loss(m, task, batch, sigma=0.5, eta=0.5, lam=1.0, seed=1)
            total.backward()
        _run(model, fused, step)
        out[fused] = _grads(model)
    assert out[True]["bert.layers.0.qkv.weight"] is not None
    _assert_same_grads(out[True], out[False])  # None for the other tasks' heads


def test_autograd_grad_of_embedding_output_leaves_parameter_grads_alone():
    fast, slow = _models()
    batch = _batch(False)
    got = {}
    for model, fused in ((fast, True), (slow, False)):
        def grad_of_E(m):
            E = m.bert.embed(batch["input_ids"]).detach().requires_grad_()
            y = m.heads_from_embeddings("sentiment", E, batch["attention_mask"])
            return torch.autograd.grad(y.pow(2).sum(), E)[0]
        got[fused] = _run(model, fused, grad_of_E)
        assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(got[True], got[False], rtol=1e-5, atol=1e-7)


def test_autograd_grad_of_parameters_returns_them():
    fast, slow = _models()
    batch = _batch(True)
    got = {}
    for model, fused in ((fast, True), (slow, False)):
        def grad_of_params(m):
            y = m("paraphrase", batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            names, params = zip(*m.named_parameters())
            return dict(zip(names, torch.autograd.grad(y.pow(2).sum(), params, allow_unused=True)))
        got[fused] = _run(model, fused, grad_of_params)
        assert all(p.grad is None for p in model.parameters())
    _assert_same_grads(got[True], got[False])


def test_backward_with_inputs_fills_only_those():
    fast, slow = _models()
    batch = _batch(False)
    chosen = ("bert.layers.1.ffn_out.weight", "bert.layers.0.qkv.bias",
              "bert.embeddings.word.weight")
    got = {}
    for model, fused in ((fast, True), (slow, False)):
        def backward_some(m):
            params = dict(m.named_parameters())
            y = m("sentiment", batch["input_ids"], batch["attention_mask"])
            y.pow(2).sum().backward(inputs=[params[n] for n in chosen])
        _run(model, fused, backward_some)
        got[fused] = _grads(model)
    for n, g in got[False].items():
        if n in chosen:
            torch.testing.assert_close(got[True][n], g, rtol=1e-5, atol=1e-7, msg=n)
        else:
            assert g is None and got[True][n] is None, n
