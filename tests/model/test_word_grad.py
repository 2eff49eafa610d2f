"""The word-embedding gradient written straight into weight.grad (BertEmbeddings._word_lookup)
equals autograd's dense embedding gradient, across steps, accumulation and padding rows."""

import torch

from smarter_fast.model.bert import BertConfig, BertEmbeddings


def _pair():
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=20, hidden_dropout_prob=0.0)
    torch.manual_seed(0)
    fast = BertEmbeddings(cfg)
    slow = BertEmbeddings(cfg)
    slow.load_state_dict(fast.state_dict())
    slow.fused_word_grad = False
    return fast, slow


def test_word_grad_matches_autograd_over_steps_and_accumulation():
    fast, slow = _pair()
    for step in range(4):
        for m in (fast, slow):
            m.zero_grad(set_to_none=True)
        n_backward = 2 if step == 2 else 1  # accumulate two batches before a step
        for k in range(n_backward):
            ids = torch.randint(0, 50, (3, 7 + step))
            ids[0, -2:] = 0  # padding rows get no gradient
            g = torch.randn(3, 7 + step, 16)
            for m in (fast, slow):
                m(ids).backward(g)
        torch.testing.assert_close(fast.word.weight.grad, slow.word.weight.grad)
        assert torch.count_nonzero(fast.word.weight.grad[0]) == 0
        torch.testing.assert_close(fast.position.weight.grad, slow.position.weight.grad)
        with torch.no_grad():  # an optimizer step that detaches the gradient, like ours
            for m in (fast, slow):
                m.word.weight -= 0.1 * m.word.weight.grad


def test_word_grad_adds_into_an_existing_grad_and_no_grad_mode():
    fast, slow = _pair()
    for m in (fast, slow):
        m.word.weight.grad = torch.ones_like(m.word.weight)
        m(torch.tensor([[1, 2, 2, 5]])).sum().backward()
    torch.testing.assert_close(fast.word.weight.grad, slow.word.weight.grad)
    with torch.no_grad():
        torch.testing.assert_close(fast(torch.tensor([[3, 4]])), slow(torch.tensor([[3, 4]])))
