"""Shared fixtures."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cs224n"


@pytest.fixture
def skip_unless_cpp():
    """Call with an op name: skips the test, with the reason, when its C++ kernels can't run."""
    from smarter_fast.ops import OPS

    def check(op_name: str) -> None:
        why = OPS[op_name].backends["cpp"].availability()
        if why is not None:
            pytest.skip(f"cpp backend of {op_name} unavailable: {why}")

    return check


@pytest.fixture(scope="session")
def make_tiny_run(tmp_path_factory):
    """Call with per-task file sizes (see smarter_fast.data.demo.write_demo_data): returns
    (checkpoint dir, data dir) for end-to-end CLI tests, a small random BERT over a character
    vocabulary and SYNTHETIC data in the CS224N layout. Keyword arguments go to BertConfig."""
    import string

    import torch

    from smarter_fast.data.demo import write_demo_data
    from smarter_fast.model import BertConfig, BertModel, save_checkpoint

    def make(sizes: dict, name: str = "tiny", **config):
        root = tmp_path_factory.mktemp(name)
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        vocab += list(string.ascii_lowercase + string.digits + ".,?!'-")
        vocab += ["##" + c for c in string.ascii_lowercase + string.digits]
        (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
        torch.manual_seed(0)
        cfg = BertConfig(**{"vocab_size": len(vocab), "hidden_size": 32, "num_hidden_layers": 2,
                            "num_attention_heads": 2, "intermediate_size": 64,
                            "max_position_embeddings": 128, **config})
        ckpt = save_checkpoint(BertModel(cfg), root / "ckpt", cfg, vocab_file=root / "vocab.txt")
        return ckpt, write_demo_data(root / "data", sizes=sizes)

    return make


@pytest.fixture(scope="session")
def make_head_checkpoint(tmp_path_factory):
    """Call with (encoder checkpoint dir, pooling, pair_features, pair_order, seed=0): a saved
    MultitaskBert over that encoder with random, far-from-zero heads and pooler (a random tiny
    encoder pools every row alike), so that outputs differ from row to row."""
    import torch

    from smarter_fast import tasks as registry
    from smarter_fast.model import MultitaskBert

    def make(encoder_dir, pooling, pair_features, pair_order, seed=0):
        torch.manual_seed(seed)
        model = MultitaskBert.from_pretrained(encoder_dir, pooling=pooling,
                                              pair_features=pair_features, pair_order=pair_order)
        with torch.no_grad():
            model.bert.pooler.weight.normal_(0, 1.0)
            for t in registry.TASKS:
                getattr(model, t.head).weight.normal_(0, 2.0)
                getattr(model, t.head).bias.normal_(0, 0.5)
        out = tmp_path_factory.mktemp(f"heads_{pooling}_{pair_features}_{pair_order}_{seed}")
        return model.save_pretrained(out, vocab_file=Path(encoder_dir) / "vocab.txt")

    return make
