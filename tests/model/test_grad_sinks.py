"""Gradient sinks (smarter_fast.model.grad_sinks): the word-embedding gradient, the Linear
gradients and the kept bf16 weight copies equal plain autograd across steps, accumulation and
padding rows; the sinks are attached to one model and one optimizer, never process-wide."""

import copy
import logging
import pickle

import pytest
import torch

from smarter_fast.model.bert import BertConfig, BertEmbeddings
from smarter_fast.model.grad_sinks import attach_grad_sinks


def _pair():
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=20, hidden_dropout_prob=0.0)
    torch.manual_seed(0)
    fast = BertEmbeddings(cfg)
    slow = BertEmbeddings(cfg)
    slow.load_state_dict(fast.state_dict())
    attach_grad_sinks(fast)
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


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("sinks", [False, True])
def test_cls_only_last_layer_matches_full_encoder(bf16, sinks):
    """encode(cls_only=True) gives the full encoder's pooler output and [CLS] row, with the
    same gradients for the input and every parameter (the last layer's QKV weight gradient is
    written in two row blocks), on a padded batch (dropout off), fresh and accumulated."""
    from smarter_fast.model.bert import BertModel

    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=16, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(1)
    model = BertModel(cfg, backend="ref").train()
    if sinks:
        attach_grad_sinks(model)
    ids = torch.randint(1, 60, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 1:] = 0  # all but the first token padding
    E = model.embed(ids).detach()
    grads = []
    tol = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=1e-4, atol=1e-5)
    for cls_only in (False, True):
        model.zero_grad(set_to_none=True)
        for accumulate in range(2):  # the second backward adds into the first's gradients
            e = E.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model.encode(e, mask, cls_only=cls_only)
            (out["pooler_output"].float() ** 2).sum().backward()
            grads.append((out, e.grad, {n: p.grad.clone() for n, p in model.named_parameters()
                                        if n.startswith("layers.")}))
    for (full, g_full, w_full), (cls, g_cls, w_cls) in ((grads[0], grads[2]), (grads[1], grads[3])):
        torch.testing.assert_close(cls["pooler_output"], full["pooler_output"], **tol)
        torch.testing.assert_close(cls["last_hidden_state"][:, 0],
                                   full["last_hidden_state"][:, 0], **tol)
        torch.testing.assert_close(g_cls, g_full, **tol)
        assert w_cls.keys() == w_full.keys() and "layers.1.qkv.weight" in w_cls
        for n in w_full:  # bf16: within 3% of the gradient's largest entry
            scale = dict(atol=0.03 * float(w_full[n].abs().max()), rtol=0) if bf16 else tol
            torch.testing.assert_close(w_cls[n], w_full[n], **scale, msg=n)


def test_word_grad_with_flat_adamw_steps_like_autograd():
    """With smarter_fast.optim.AdamW the buffer becomes the optimizer's own flat grad view
    after the first step (no copy later), and parameters follow the autograd path exactly."""
    from smarter_fast.optim import AdamW

    fast, slow = _pair()
    opts = [AdamW(m.parameters(), lr=1e-2, backend="ref") for m in (fast, slow)]
    attach_grad_sinks(fast, opts[0])
    for step in range(4):
        ids = torch.randint(0, 50, (2, 6))
        g = torch.randn(2, 6, 16)
        for m, opt in zip((fast, slow), opts):
            m(ids).backward(g)
            if step == 3:
                view = m.word.weight.grad
            opt.step()
            if step == 3 and m is fast:
                assert m.word.weight.grad is view  # the adopted flat view: nothing copied
            opt.zero_grad(set_to_none=(step != 1))
    torch.testing.assert_close(fast.word.weight, slow.word.weight, rtol=0, atol=0)
    torch.testing.assert_close(fast.norm.weight, slow.norm.weight, rtol=0, atol=0)


def _tiny_bert(seed=0, hidden_act="gelu"):
    from smarter_fast.model.bert import BertModel

    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=12, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, hidden_act=hidden_act)
    torch.manual_seed(seed)
    return BertModel(cfg, backend="ref").train()


@pytest.mark.parametrize("bf16,act", [(False, "gelu"), (True, "gelu"), (False, "gelu_new"),
                                      (False, "relu"), (True, "relu")])
def test_fused_linear_grads_match_autograd_over_adamw_steps(bf16, act):
    """grad_sinks.linear (grads written into the optimizer's buffers, the FFN activation's
    backward in place inside linear(ffn_out)) against nn.Linear and the activation under
    autograd, over AdamW steps, with accumulation (two backwards in one step) and set_to_none
    both ways."""
    from smarter_fast.optim import AdamW

    fast, slow = _tiny_bert(hidden_act=act), _tiny_bert(hidden_act=act)
    slow.load_state_dict(fast.state_dict())
    opts = [AdamW(m.parameters(), lr=1e-2, backend="ref") for m in (fast, slow)]
    attach_grad_sinks(fast, opts[0])
    ids = torch.randint(1, 40, (5, 3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    for step in range(4):
        for model, opt, fused in ((fast, opts[0], True), (slow, opts[1], False)):
            for k in range(2 if step == 2 else 1):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = model(ids[step + k], mask)
                (out["pooler_output"].float() ** 2).sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            opt.step()
            opt.zero_grad(set_to_none=(step != 1))
            if fused:
                fast_grads = grads
            else:
                slow_grads = grads
        tol = dict(rtol=2e-2, atol=2e-3) if bf16 else dict(rtol=1e-5, atol=1e-6)
        for n in slow_grads:
            torch.testing.assert_close(fast_grads[n], slow_grads[n], **tol, msg=n)
    if not bf16:
        for (n, a), b in zip(fast.named_parameters(), slow.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_word_grad_not_adopted_when_grad_replaced_before_step():
    """A .grad replaced between backward and step (gradient surgery writes combined grads)
    holds rows we do not track: it must not become the buffer."""
    from smarter_fast.optim import AdamW

    fast, slow = _pair()
    opts = [AdamW(m.parameters(), lr=1e-2, backend="ref") for m in (fast, slow)]
    attach_grad_sinks(fast, opts[0])
    for step in range(3):
        ids = torch.randint(1, 50, (2, 5))
        g = torch.randn(2, 5, 16)
        for m, opt in zip((fast, slow), opts):
            m(ids).backward(g)
            if step == 0:  # e.g. surgery: every row nonzero
                m.word.weight.grad = torch.ones_like(m.word.weight)
            opt.step()
            opt.zero_grad()
    for a, b in zip(fast.parameters(), slow.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["ref", "cpp", "torch"])
def test_kept_cast_buffers_give_the_same_bf16_steps(backend, skip_unless_cpp):
    """Under bf16 autocast, linear() with kept cast buffers (keep_cast_buffers: after the
    first step our AdamW's low-precision copies, rewritten by its steps; a cast of our own
    under a torch optimizer) trains bit for bit like fresh casts: two forwards per step (as
    SMART's), optimizer steps between, and a third model's optimizer stepping in between
    (which must not make anyone cast again)."""
    from smarter_fast.optim import AdamW

    if backend == "cpp":
        skip_unless_cpp("adamw")

    def make_opt(params):
        if backend == "torch":
            return torch.optim.AdamW(params, lr=1e-2, foreach=False)
        return AdamW(params, lr=1e-2, backend=backend)

    models = [_tiny_bert(seed=3), _tiny_bert(seed=3)]
    opts = [make_opt(m.parameters()) for m in models]
    for model, opt, keep in zip(models, opts, (True, False)):
        attach_grad_sinks(model, opt, keep_cast_buffers=keep)
    other = torch.nn.Linear(3, 2)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    ids = torch.randint(1, 40, (4, 3, 7))
    for step in range(4):
        other(torch.randn(4, 3)).sum().backward()
        other_opt.step()
        for model, opt in zip(models, opts):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                a = model(ids[step])["pooler_output"].float()
                b = model(ids[(step + 1) % 4])["pooler_output"].float()
            ((a - b) ** 2).sum().backward()
            opt.step()
            opt.zero_grad()
    for (n, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    if backend == "torch":
        return
    # the kept buffers are our AdamW's copies (not a cast of their own), also after another
    # optimizer's step
    other_opt.step()
    for layer in models[0].layers:
        w = layer.ffn_in.weight
        sinks = layer.ffn_in._grad_sink
        assert sinks._cast.data_ptr() == opts[0].low_precision_copy(w).data_ptr()
        assert sinks._cast_key == (w._version, w.data_ptr(), torch.bfloat16)
        assert torch.equal(sinks._cast, w.bfloat16())


def test_optimizer_step_between_forward_and_backward_fails_loudly():
    """The forward saved the optimizer's bf16 copy of a weight; a step rewrites it: the
    backward raises autograd's in-place error rather than using the new values."""
    from smarter_fast.optim import AdamW

    model = _tiny_bert(seed=5)
    opt = AdamW(model.parameters(), lr=1e-2, backend="ref")
    attach_grad_sinks(model, opt)
    ids = torch.randint(1, 40, (2, 5))
    for _ in range(2):  # the first step hands the copies to the layers
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids)["pooler_output"].float().sum()
        loss.backward()
        opt.step()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids)["pooler_output"].float().sum()
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_kept_cast_buffer_refreshed_under_a_pending_graph_fails_loudly():
    """A weight changed between a bf16 forward and its backward, with a second forward in
    between: the kept copy is refreshed, and the first graph's backward raises autograd's
    in-place error rather than using the new weights."""
    model = _tiny_bert(seed=4)
    attach_grad_sinks(model, torch.optim.SGD(model.parameters(), lr=0.1))
    ids = torch.randint(1, 40, (2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = model(ids)["pooler_output"].float().sum()
        with torch.no_grad():
            model.layers[0].ffn_in.weight.mul_(1.5)
        model(ids)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.backward()


@pytest.mark.parametrize("rows", [1, 37, 403])
def test_linear_bf16_gradients_equal_autocast_f_linear_bit_for_bit(rows):
    """Under bf16 autocast, grad_sinks.linear's weight and bias gradients (written into fp32 buffers)
    equal nn.Linear's under autograd exactly: the bf16 GEMM / column sum, cast once. Odd row
    counts; fresh random inputs."""
    from smarter_fast.model.grad_sinks import linear

    torch.manual_seed(rows)
    fast, slow = torch.nn.Linear(29, 53), torch.nn.Linear(29, 53)
    slow.load_state_dict(fast.state_dict())
    attach_grad_sinks(fast)
    x = torch.randn(rows, 29)
    gy = torch.randn(rows, 53)
    for model, fn in ((fast, lambda m, x: linear(m, x)), (slow, lambda m, x: m(x))):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(model, xi)
        y.backward(gy.to(y.dtype))
        model.x_grad = xi.grad
    for name in ("weight", "bias"):
        a, b = getattr(fast, name).grad, getattr(slow, name).grad
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(fast.x_grad, slow.x_grad, rtol=0, atol=0)


def _global_optimizer_hooks():
    from torch.optim import optimizer as torch_optimizer

    return (len(torch_optimizer._global_optimizer_pre_hooks),
            len(torch_optimizer._global_optimizer_post_hooks))


def test_sinks_hook_only_their_own_optimizer():
    """attach_grad_sinks registers hooks on the optimizer it is given, none process-wide: a
    torch optimizer stepping another model's parameters leaves the sinks alone, and the model
    trains with any optimizer after detach() exactly like plain autograd."""
    from smarter_fast.optim import AdamW

    before = _global_optimizer_hooks()
    fast, slow = _tiny_bert(seed=6), _tiny_bert(seed=6)
    opts = [AdamW(m.parameters(), lr=1e-2, backend="ref") for m in (fast, slow)]
    sinks = attach_grad_sinks(fast, opts[0])
    assert _global_optimizer_hooks() == before
    assert len(opts[0]._optimizer_step_pre_hooks) == len(opts[0]._optimizer_step_post_hooks) == 1
    assert not opts[1]._optimizer_step_pre_hooks
    ids = torch.randint(1, 40, (3, 2, 6))
    for step in range(3):
        if step == 2:
            sinks.detach()
            assert not opts[0]._optimizer_step_pre_hooks
            assert fast.layers[0].qkv._grad_sink is None
        for m, opt in zip((fast, slow), opts):
            (m(ids[step])["pooler_output"] ** 2).sum().backward()
            if step == 1 and m is fast:  # the sink's own buffer, adopted from the optimizer
                assert fast.layers[0].ffn_in.weight.grad is fast.layers[0].ffn_in._grad_sink.weight.buf
            opt.step()
            opt.zero_grad()
    for (n, a), b in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)


def test_attaching_again_replaces_the_sinks():
    from smarter_fast.optim import AdamW

    model = _tiny_bert(seed=7)
    opt = AdamW(model.parameters(), lr=1e-2, backend="ref")
    first = attach_grad_sinks(model, opt)
    second = attach_grad_sinks(model, opt)
    assert first.sinks == [] and second.sinks
    assert len(opt._optimizer_step_pre_hooks) == 1
    assert model.layers[1].ffn_out._grad_sink in second.sinks


def test_copies_and_pickles_of_a_model_have_no_sinks():
    """The EMA and the SMART teacher deep-copy the model: the copy must neither share the
    original's buffers nor write into them."""
    model = _tiny_bert(seed=8)
    attach_grad_sinks(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.layers[0].qkv._grad_sink is None and clone._grad_sinks is None
        assert clone.embeddings.word._grad_sink is None
        ids = torch.randint(1, 40, (2, 5))
        (clone(ids)["pooler_output"] ** 2).sum().backward()
        assert model.layers[0].qkv.weight.grad is None
        assert clone.layers[0].qkv.weight.grad is not None


def test_sinks_stand_aside_under_torch_distributed(tmp_path, caplog):
    """Under an initialized process group (DDP hooks autograd's accumulation) the model falls
    back to plain autograd gradients and says why, once."""
    import torch.distributed as dist
    import smarter_fast.model.grad_sinks as gs

    fast, slow = _tiny_bert(seed=9), _tiny_bert(seed=9)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        gs._told_distributed = False
        with caplog.at_level(logging.INFO, logger="smarter_fast"):
            attach_grad_sinks(fast)
            ids = torch.randint(1, 40, (2, 5))
            for m in (fast, slow):
                (m(ids)["pooler_output"] ** 2).sum().backward()
    finally:
        dist.destroy_process_group()
    told = [r for r in caplog.records if "gradient sinks off under torch.distributed" in r.message]
    assert len(told) == 1
    assert fast.layers[0].qkv._grad_sink.weight.buf is None  # nothing went through the sink
    for (n, a), b in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=n)


def test_sinks_without_an_optimizer_cast_afresh_under_bf16():
    """attach_grad_sinks(model) without the optimizer: nothing says when our AdamW rewrote the
    weights (its flat-buffer update leaves p._version alone), so the sinks must cast afresh each
    forward rather than keep a copy: bf16 training equals plain autograd bit for bit."""
    from smarter_fast.optim import AdamW

    fast, slow = _tiny_bert(seed=10), _tiny_bert(seed=10)
    opts = [AdamW(m.parameters(), lr=1e-2, backend="ref") for m in (fast, slow)]
    attach_grad_sinks(fast)
    ids = torch.randint(1, 40, (4, 3, 7))
    for step in range(4):
        for m, opt in zip((fast, slow), opts):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(ids[step])["pooler_output"].float()
            (out ** 2).sum().backward()
            opt.step()
            opt.zero_grad()
    for (n, a), b in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
