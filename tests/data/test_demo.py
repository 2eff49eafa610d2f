"""The built-in SYNTHETIC demo data: CS224N layout, readable without skips, deterministic."""

from smarter_fast.data import find_data_files, load_cs224n
from smarter_fast.data.demo import DEFAULT_SIZES, generate, is_demo_dir, write_demo_data


def test_demo_files_in_cs224n_layout(tmp_path):
    d = write_demo_data(tmp_path / "demo")
    files = find_data_files(d)
    assert all(files[t][s] is not None for t in files for s in ("train", "dev", "test"))
    assert is_demo_dir(d) and "SYNTHETIC" in (d / "SYNTHETIC.txt").read_text()
    for split in ("train", "dev", "test"):
        data = load_cs224n(d, split)
        assert not data.messages(), data.messages()  # nothing skipped
        key = "test-student" if split == "test" else split
        assert len(data.sst) == DEFAULT_SIZES["sst"][key]
        assert len(data.quora) == DEFAULT_SIZES["quora"][key]
        assert len(data.sts) == DEFAULT_SIZES["sts"][key]
    train = load_cs224n(d, "train")
    assert sorted({e.label for e in train.sst}) == [0, 1, 2, 3, 4]
    assert {e.label for e in train.quora} == {0, 1}
    assert all(0.0 <= e.label <= 5.0 for e in train.sts)
    assert len({e.id for e in train.sst}) == len(train.sst)
    assert all(e.label is None for e in load_cs224n(d, "test").sst)


def test_demo_deterministic_and_reused(tmp_path):
    assert generate() == generate()
    a = write_demo_data(tmp_path / "a")
    b = write_demo_data(tmp_path / "b")
    assert (a / "quora-train.csv").read_bytes() == (b / "quora-train.csv").read_bytes()
    mtime = (a / "sts-dev.csv").stat().st_mtime_ns
    write_demo_data(tmp_path / "a")  # same stamp: files kept
    assert (a / "sts-dev.csv").stat().st_mtime_ns == mtime


def test_demo_labels_follow_the_text():
    data = generate({"sst": {"train": 50, "dev": 1, "test-student": 1},
                     "quora": {"train": 200, "dev": 1, "test-student": 1},
                     "sts": {"train": 200, "dev": 1, "test-student": 1}})
    from smarter_fast.data.demo import SENTIMENT_WORDS
    for _, sentence, label in data["sst"]["train"]:
        assert any(f" {w} " in f" {sentence} " for w in SENTIMENT_WORDS[label])
    for _, s1, s2, label in data["quora"]["train"]:
        if label == "1.0":
            assert s1 != s2
    # identical STS pairs score high, disjoint ones low
    for _, s1, s2, score in data["sts"]["train"]:
        if s1 == s2:
            assert score >= 4.5
