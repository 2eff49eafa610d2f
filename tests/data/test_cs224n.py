"""CS224N readers: malformed rows skipped and reported exactly, strict mode, file discovery, real data."""

import logging
from pathlib import Path

import pytest

from smarter_fast.data import (
    DataError,
    PairExample,
    SentenceExample,
    find_data_files,
    load_cs224n,
    read_quora,
    read_sst,
    read_sts,
)

DATA = Path(__file__).parents[2].parent / "shared/data/cs224n"


def write(path: Path, lines: list) -> Path:
    """Writes lines (str, or bytes for deliberately bad encodings) joined by newlines."""
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


SST_BAD = [
    "\tid\tsentence\tsentiment",            # line 1
    "0\ta0\t Good movie .\t3",               # 2 ok
    "1\ta1\tToo high .\t7",                  # 3 out of range
    "2\ta2\t   \t2",                         # 4 empty sentence
    "3\ta3\tNo label field",                 # 5 too few fields
    "4\ta4\tWords\tthree",                   # 6 unparseable
    "5\ta5\tHalf .\t2.5",                    # 7 not an integer
    "6\ta6\tExtra .\t1\tsurplus",            # 8 too many fields
    b"7\ta7\tCaf\xe9 latin-1 .\t2",          # 9 invalid UTF-8
    "8\ta8\t Fine .\t0",                     # 10 ok
    "9\ta9\tEmpty label .\t",                # 11 missing label
    "10\ta10\tNegative .\t-1",               # 12 out of range
    "11\ta11\t\"Quoted, \"\"inner\"\" .\"\t4",  # 13 ok: CSV quoting
    "12\ta12\tInteger-valued float .\t4.0",  # 14 ok
]


def test_sst_malformed_rows(tmp_path, caplog):
    path = write(tmp_path / "ids-sst-train.csv", SST_BAD)
    with caplog.at_level(logging.WARNING, logger="smarter_fast"):
        examples, report = read_sst(path)
    assert examples == [
        SentenceExample("a0", "Good movie .", 3),
        SentenceExample("a8", "Fine .", 0),
        SentenceExample("a11", 'Quoted, "inner" .', 4),
        SentenceExample("a12", "Integer-valued float .", 4),
    ]
    assert (report.rows_read, report.rows_kept, report.rows_skipped) == (13, 4, 9)
    expected = [  # one line per reason, in order of first occurrence
        "skipped 3 of 13 rows in ids-sst-train.csv: sentiment not an integer 0-4 (lines 3, 7, 12)",
        "skipped 1 of 13 rows in ids-sst-train.csv: empty sentence (lines 4)",
        "skipped 2 of 13 rows in ids-sst-train.csv: wrong number of fields (lines 5, 8)",
        "skipped 1 of 13 rows in ids-sst-train.csv: unparseable sentiment (lines 6)",
        "skipped 1 of 13 rows in ids-sst-train.csv: invalid UTF-8 (lines 9)",
        "skipped 1 of 13 rows in ids-sst-train.csv: missing sentiment (lines 11)",
    ]
    assert report.messages() == expected
    assert [r.getMessage() for r in caplog.records] == expected


def test_quora_unbalanced_quotes_like_real_file(tmp_path):
    # Shapes of the two bad rows in the real quora-train.csv: an opening quote doubled, so the field
    # ends early and the label (or the second sentence and the label) are left empty.
    path = write(tmp_path / "quora-train.csv", [
        "\tid\tsentence1\tsentence2\tis_duplicate",
        "1\tq1\tHow do I learn?\tHow can I learn?\t1.0",
        '2\tq2\tAny idea?\t"""Where can I find a dress?"\t',
        '3\tq3\t"""Given a set of intervals?"\t\t',
        "4\tq4\tA\tB\t0.5",
        "5\tq5\tA\tB\t0",
        "6\tq6\tA\tB\t2.0",
        '7\tq7\t"open quote never closed\tB\t1.0',
        "8\tq8\tswallowed\trow\t0.0",
        '9\tq9\tends here"\tB\t1.0',
        "10\tq10\tC\tD\t0.0",
    ])  # 10 data lines, 8 records: the open quote on line 8 runs to line 10, reported at its end
    examples, report = read_quora(path)
    assert examples == [PairExample("q1", "How do I learn?", "How can I learn?", 1),
                        PairExample("q5", "A", "B", 0), PairExample("q10", "C", "D", 0)]
    assert report.messages() == [
        "skipped 1 of 8 rows in quora-train.csv: missing is_duplicate (lines 3)",
        "skipped 1 of 8 rows in quora-train.csv: empty sentence2 (lines 4)",
        "skipped 2 of 8 rows in quora-train.csv: is_duplicate not 0 or 1 (lines 5, 7)",
        "skipped 1 of 8 rows in quora-train.csv: unbalanced quotes (field spans lines) (lines 10)",
    ]


def test_sts_ranges_and_many_lines(tmp_path):
    rows = ["\tid\tsentence1\tsentence2\tsimilarity", "0\ts0\tA\tB\t4.2", "1\ts1\tA\tB\tnan"]
    rows += [f"{i}\ts{i}\tA\tB\t{v}" for i, v in enumerate(["5.5", "-0.1", "9", "6", "inf", "1e9", "5.0"], start=2)]
    examples, report = read_sts(write(tmp_path / "sts-dev.csv", rows))
    assert [e.label for e in examples] == [4.2, 5.0]
    assert report.messages() == [
        "skipped 1 of 9 rows in sts-dev.csv: unparseable similarity (lines 3)",
        "skipped 6 of 9 rows in sts-dev.csv: similarity out of range 0-5 (lines 4, 5, 6, 7, 8, ...)",
    ]


def test_empty_sentences_and_ids(tmp_path):
    path = write(tmp_path / "sts-train.csv", [
        "\tid\tsentence1\tsentence2\tsimilarity",
        "0\t\tA\tB\t1.0",
        "1\ts1\t \tB\t1.0",
        "2\ts2\tA\t\t1.0",
        "3\ts3\tA\tB\t1.0",
    ])
    examples, report = read_sts(path)
    assert [e.id for e in examples] == ["s3"]
    assert report.messages() == [
        "skipped 1 of 4 rows in sts-train.csv: empty id (lines 2)",
        "skipped 1 of 4 rows in sts-train.csv: empty sentence1 (lines 3)",
        "skipped 1 of 4 rows in sts-train.csv: empty sentence2 (lines 4)",
    ]


def test_strict_names_file_line_field(tmp_path):
    path = write(tmp_path / "ids-sst-train.csv", SST_BAD)
    with pytest.raises(DataError, match=r"ids-sst-train\.csv: line 3: field 'sentiment': sentiment not an integer 0-4"):
        read_sst(path, strict=True)
    path = write(tmp_path / "quora-dev.csv", [
        "\tid\tsentence1\tsentence2\tis_duplicate", "1\tq1\tA\tB\t1.0", b"2\tq2\tA\t\xff\xfe\t0.0"])
    with pytest.raises(DataError, match=r"quora-dev\.csv: line 3: field 'sentence2': invalid UTF-8"):
        read_quora(path, strict=True)
    assert issubclass(DataError, ValueError)


def test_limit_keeps_first_rows(tmp_path):
    path = write(tmp_path / "ids-sst-train.csv", SST_BAD)
    examples, report = read_sst(path, limit=2)
    assert [e.id for e in examples] == ["a0", "a8"]
    assert report.rows_read == 9 and report.rows_kept == 2
    assert read_sst(path, limit=0)[0] == []


def test_header_problems(tmp_path):
    path = write(tmp_path / "ids-sst-train.csv", ["\tid\ttext\tsentiment", "0\ta\tb\t1"])
    with pytest.raises(DataError, match="header lacks column"):
        read_sst(path)
    unlabeled = write(tmp_path / "ids-sst-dev.csv", ["\tid\tsentence", "0\ta\tb"])
    with pytest.raises(DataError, match="sentiment"):
        read_sst(unlabeled, labeled=True)
    assert read_sst(unlabeled)[0] == [SentenceExample("a", "b", None)]


def make_dataset(root: Path, with_test: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write(root / "ids-sst-train.csv", ["\tid\tsentence\tsentiment", "0\tt0\tGood\t4", "1\tt1\tBad\t0"])
    write(root / "ids-sst-dev.csv", ["\tid\tsentence\tsentiment", "0\td0\tOkay\t2"])
    for task, label in (("quora", "is_duplicate"), ("sts", "similarity")):
        for split in ("train", "dev"):
            header = f"\tid\tsentence1\tsentence2\t{label}"
            write(root / f"{task}-{split}.csv", [header, f"0\t{task}{split}\tA\tB\t1.0"])
    if with_test:  # the real SST test file has two leading index columns
        write(root / "ids-sst-test-student.csv", ["0\t\tid\tsentence", "1\t0.0\tx0\tHidden"])
        write(root / "sts-test-student.csv", ["\tid\tsentence1\tsentence2", "0\ty0\tA\tB"])
    return root


def test_find_and_load(tmp_path):
    root = make_dataset(tmp_path / "data")
    files = find_data_files(root)
    assert files["sst"]["test"].name == "ids-sst-test-student.csv" and files["quora"]["test"] is None
    train = load_cs224n(root, "train")
    assert [e.label for e in train.sst] == [4, 0] and train.quora[0].label == 1 and train.sts[0].label == 1.0
    assert train.messages() == [] and len(train.reports) == 3
    test = load_cs224n(root, "test-student")
    assert test.sst == [SentenceExample("x0", "Hidden", None)] and test.quora == []
    assert test.sts == [PairExample("y0", "A", "B", None)]
    assert len(load_cs224n(root, "train", limit=1).sst) == 1


def test_missing_files_one_line_error(tmp_path):
    with pytest.raises(DataError) as e:
        find_data_files(tmp_path / "nowhere")
    assert "\n" not in str(e.value) and "nowhere" in str(e.value) and "quora-{train,dev}.csv" in str(e.value)
    root = make_dataset(tmp_path / "data", with_test=False)
    (root / "sts-dev.csv").unlink()
    (root / "ids-sst-train.csv").unlink()
    with pytest.raises(DataError) as e:
        load_cs224n(root, "dev")
    message = str(e.value)
    assert "\n" not in message and "lacks ids-sst-train.csv, sts-dev.csv;" in message
    assert "test-student files optional" in message


@pytest.mark.real_data
def test_real_data_counts():
    if not DATA.is_dir():
        pytest.skip(f"real CS224N data not found at {DATA}")
    train, dev, test = (load_cs224n(DATA, s) for s in ("train", "dev", "test"))
    assert (len(train.sst), len(train.quora), len(train.sts)) == (7544, 15998, 5440)
    assert (len(dev.sst), len(dev.quora), len(dev.sts)) == (1000, 2107, 600)
    assert (len(test.sst), len(test.quora), len(test.sts)) == (2210, 0, 1725)
    # The two Quora rows whose unbalanced quotes swallowed fields, and nothing else anywhere.
    assert train.messages() == [
        "skipped 1 of 16000 rows in quora-train.csv: missing is_duplicate (lines 6940)",
        "skipped 1 of 16000 rows in quora-train.csv: empty sentence2 (lines 14624)",
    ]
    assert dev.messages() == [] and test.messages() == []
    assert {e.label for e in train.sst} == {0, 1, 2, 3, 4} and {e.label for e in train.quora} == {0, 1}
    assert all(0.0 <= e.label <= 5.0 for e in train.sts)
    assert all(e.label is None for e in test.sst + test.sts)


def test_open_quote_past_csv_field_limit(tmp_path):
    # An open quote that swallows more than csv's field size limit is a broken file, not a row to skip.
    rows = ["\tid\tsentence\tsentiment", '0\ta0\t"never closed\t1']
    rows += [f"{i}\ta{i}\t{'w' * 100}\t1" for i in range(1, 2000)]
    with pytest.raises(DataError, match=r"ids-sst-train\.csv: line \d+: unreadable CSV"):
        read_sst(write(tmp_path / "ids-sst-train.csv", rows))
