"""Schedules: exact counts per epoch, coverage of the split parts, determinism, interleaving."""

import numpy as np
import pytest

from smarter_fast.data.schedules import Schedule, resolve_split_parts, split_indices


def lengths(n, seed=0):
    return np.random.default_rng(seed).integers(5, 60, size=n)


SIZES = {"sst": 37, "quora": 101, "sts": 23}


def make(name, parts=1, bs=8, seed=3, interleave=False):
    return Schedule(name, {t: lengths(n, i) for i, (t, n) in enumerate(SIZES.items())}, bs,
                    seed=seed, parts=parts, interleave=interleave)


def per_task(steps):
    out = {"sst": [], "quora": [], "sts": []}
    for task, idx in steps:
        out[task] += idx
    return out


def test_baseline_every_set_in_full_in_task_order():
    s = make("baseline")
    for epoch in range(3):
        steps = s.epoch_steps(epoch)
        seen = per_task(steps)
        for t, n in SIZES.items():
            assert sorted(seen[t]) == list(range(n))
        tasks = [t for t, _ in steps]
        assert tasks == sorted(tasks, key=["sst", "quora", "sts"].index)  # SST, then Quora, then STS
        assert all(1 <= len(ix) <= 8 for _, ix in steps)
        assert len(steps) == sum(-(-n // 8) for n in SIZES.values())
        assert s.epoch_counts(epoch) == SIZES


@pytest.mark.parametrize("parts", [1, 2, 4, 7])
def test_split1_parts_cover_quora_once_over_n_epochs(parts):
    s = make("split1", parts=parts)
    union = []
    for epoch in range(parts):
        seen = per_task(s.epoch_steps(epoch))
        assert sorted(seen["sst"]) == list(range(SIZES["sst"]))
        assert sorted(seen["sts"]) == list(range(SIZES["sts"]))
        assert len(seen["quora"]) in (SIZES["quora"] // parts, -(-SIZES["quora"] // parts))
        assert len(set(seen["quora"])) == len(seen["quora"])
        union += seen["quora"]
        # epoch e and e + N use the same part
        assert sorted(per_task(s.epoch_steps(epoch + parts))["quora"]) == sorted(seen["quora"])
    assert sorted(union) == list(range(SIZES["quora"]))


def test_split2_also_splits_sts():
    s = make("split2", parts=3)
    union_q, union_s = [], []
    for epoch in range(3):
        seen = per_task(s.epoch_steps(epoch))
        assert sorted(seen["sst"]) == list(range(SIZES["sst"]))
        union_q += seen["quora"]
        union_s += seen["sts"]
        c = s.epoch_counts(epoch)
        assert c["quora"] == len(seen["quora"]) and c["sts"] == len(seen["sts"])
    assert sorted(union_q) == list(range(SIZES["quora"]))
    assert sorted(union_s) == list(range(SIZES["sts"]))


def test_limit_200_split_4_counts():
    s = Schedule("split1", {t: lengths(200) for t in SIZES}, 8, seed=11711, parts=4)
    assert s.epoch_counts(0) == {"sst": 200, "quora": 50, "sts": 200}
    assert sum(len(ix) for _, ix in s.epoch_steps(0)) == 450


def test_deterministic_and_seed_dependent():
    a, b = make("split1", parts=3), make("split1", parts=3)
    assert a.epoch_steps(1) == b.epoch_steps(1)
    assert a.epoch_steps(0) != a.epoch_steps(1) or SIZES["quora"] < 2
    c = make("split1", parts=3, seed=4)
    assert c.epoch_steps(1) != a.epoch_steps(1)


def test_batches_are_length_bucketed():
    s = Schedule("baseline", {"sst": np.arange(400) % 97 + 3, "quora": [], "sts": []}, 8, seed=0)
    steps = s.epoch_steps(0)
    lens = s.lengths["sst"]
    spread = np.mean([lens[ix].max() - lens[ix].min() for _, ix in steps])
    assert spread < 10  # random batches would spread over most of 3..99


def test_interleave_alternates_tasks():
    s = make("baseline", interleave=True)
    steps = s.epoch_steps(0)
    assert [t for t, _ in steps[:6]] == ["sst", "quora", "sts"] * 2
    seen = per_task(steps)
    for t, n in SIZES.items():
        assert sorted(seen[t]) == list(range(n))


def test_resolve_split_parts():
    assert resolve_split_parts("auto", 8544, 141506) == 17  # the report's 17
    assert resolve_split_parts("auto", 100, 250) == 3  # half up
    assert resolve_split_parts("auto", 100, 20) == 1
    assert resolve_split_parts(5, 1, 1) == 5
    with pytest.raises(ValueError):
        resolve_split_parts(0, 1, 1)


def test_split_indices_disjoint_cover():
    parts = split_indices(10, 3, seed=1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))
    assert [len(p) for p in parts] == [4, 3, 3]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule("nope", {}, 8)
    with pytest.raises(ValueError):
        Schedule("split1", {}, 8, parts=0)


# ---- task samplers -----------------------------------------------------------------------------------
from smarter_fast.data.schedules import SAMPLERS, sampler_alpha, task_probabilities  # noqa: E402


def test_sampler_probabilities():
    sizes = {"sst": 100, "quora": 400, "sts": 25}
    p = task_probabilities(sizes, 1.0)
    assert p == pytest.approx({"sst": 100 / 525, "quora": 400 / 525, "sts": 25 / 525})
    p = task_probabilities(sizes, 0.5)
    assert p == pytest.approx({"sst": 10 / 35, "quora": 20 / 35, "sts": 5 / 35})
    assert task_probabilities(sizes, 0.0) == pytest.approx({t: 1 / 3 for t in sizes})
    assert task_probabilities({"sst": 4, "quora": 0, "sts": 4}, 1.0)["quora"] == 0
    assert sampler_alpha("proportional") == 1 and sampler_alpha("sqrt") == 0.5
    assert sampler_alpha("annealed", 0) == 1 and sampler_alpha("annealed", 1) == pytest.approx(0.2)
    assert sampler_alpha("annealed", 0.5) == pytest.approx(0.6)


def test_annealed_goes_from_proportional_to_alpha_02():
    s = make("annealed")
    s.epochs = 3
    n = sum(s.n_batches(0).values())
    sizes = {t: n_ for t, n_ in SIZES.items()}
    assert s.task_probs(0, 0) == pytest.approx(task_probabilities(sizes, 1.0))
    assert s.task_probs(2, n - 1) == pytest.approx(task_probabilities(sizes, 0.2))


@pytest.mark.parametrize("name", SAMPLERS)
def test_samplers_deterministic_batch_interleaved(name):
    a, b, c = make(name), make(name), make(name, seed=4)
    steps = a.epoch_steps(0)
    assert steps == b.epoch_steps(0)
    assert steps != c.epoch_steps(0) or name == "round-robin"
    assert steps != a.epoch_steps(1)
    assert len(steps) == sum(-(-n // 8) for n in SIZES.values())  # as many steps as batches
    for task, idx in steps:
        assert 0 < len(idx) <= 8 and max(idx) < SIZES[task] and len(set(idx)) == len(idx)
    if name == "round-robin":
        assert [t for t, _ in steps[:6]] == ["sst", "quora", "sts"] * 2
    counts = a.epoch_counts(0)
    assert sum(counts.values()) == sum(len(ix) for _, ix in steps)


def test_sampler_frequencies_follow_probabilities():
    s = Schedule("proportional", {"sst": lengths(800), "quora": lengths(3200), "sts": lengths(400)}, 4, seed=1)
    tasks = [t for t, _ in s.epoch_steps(0)]
    freq = {t: tasks.count(t) / len(tasks) for t in ("sst", "quora", "sts")}
    assert freq == pytest.approx({"sst": 800 / 4400, "quora": 3200 / 4400, "sts": 400 / 4400}, abs=0.03)
    s = Schedule("sqrt", {"sst": lengths(800), "quora": lengths(3200), "sts": lengths(200)}, 4, seed=1)
    tasks = [t for t, _ in s.epoch_steps(0)]
    z = 800 ** 0.5 + 3200 ** 0.5 + 200 ** 0.5
    assert tasks.count("sts") / len(tasks) == pytest.approx(200 ** 0.5 / z, abs=0.03)


@pytest.mark.parametrize("name", ["baseline", "split1", "proportional"])
def test_group_steps_one_batch_of_every_task(name):
    s = make(name, parts=2)
    groups = s.group_steps(0)
    assert len(groups) == -(-len(s.epoch_steps(0)) // 3)
    for g in groups:
        assert set(g) == {"sst", "quora", "sts"}
        for t, ix in g.items():
            assert 0 < len(ix) <= 8 and max(ix) < SIZES[t]
    assert groups == make(name, parts=2).group_steps(0)
    w = s.task_weights(0)
    assert sum(w.values()) == pytest.approx(3.0)
