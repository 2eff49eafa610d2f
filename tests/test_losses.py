"""Task losses (smarter_fast.tasks) against their definitions, label smoothing included."""

import pytest
import torch

from smarter_fast.tasks import task_loss


def test_sst_label_smoothing_matches_the_smoothed_target_cross_entropy():
    torch.manual_seed(3)
    logits, labels = torch.randn(7, 5), torch.randint(0, 5, (7,))
    for e in (0.0, 0.1, 0.35):
        target = torch.full((7, 5), e / 5).scatter_add_(1, labels[:, None], torch.full((7, 1), 1 - e))
        expected = -(target * logits.log_softmax(-1)).sum(-1).mean()
        torch.testing.assert_close(task_loss("sst", logits, labels, label_smoothing=e), expected)
    assert task_loss("sst", logits, labels, label_smoothing=0.1) != task_loss("sst", logits, labels)


@pytest.mark.parametrize("task", ["quora", "sts"])
def test_label_smoothing_leaves_the_other_tasks_alone(task):
    torch.manual_seed(4)
    out, labels = torch.randn(6), torch.rand(6) * (5 if task == "sts" else 1)
    labels = labels if task == "sts" else labels.round()
    assert torch.equal(task_loss(task, out, labels, label_smoothing=0.2), task_loss(task, out, labels))


def test_unknown_task_is_an_error():
    with pytest.raises(ValueError, match="unknown task"):
        task_loss("mnli", torch.zeros(2), torch.zeros(2))
