"""The predict command's inputs: CSV/TSV with a header, JSON lines, plain lines; bad rows counted
and reported with their line numbers, or (strict) an error naming file, line and field."""

import io

import pytest

from smarter_fast.data.cs224n import DataError
from smarter_fast.data.text_input import detect_format, open_text, read_inputs

SST, QUORA = "sst", "quora"


def read(text, task=SST, **kwargs):
    return read_inputs(io.StringIO(text, newline=""), task, name="in.txt", **kwargs)


def test_a_cs224n_file_reads_as_it_is(tmp_path):
    # a CS224N test-student file: a leading unnamed index column, tab-separated, no labels
    path = tmp_path / "quora-test-student.csv"
    path.write_bytes(b"\tid\tsentence1\tsentence2\n0\tq1\tHow are you?\tHow do you do?\n"
                     b"1\tq2\t\"Quoted, a comma\"\tplain\n")
    with open_text(path) as f:
        examples, report = read_inputs(f, QUORA, name=path.name)
    assert [(e.id, e.sentence1, e.sentence2) for e in examples] == [
        ("q1", "How are you?", "How do you do?"), ("q2", "Quoted, a comma", "plain")]
    assert report.rows_read == report.rows_kept == 2 and not report.messages()


def test_a_comma_csv_without_ids_numbers_its_rows_from_0():
    examples, _ = read("text,other\nfirst one,x\nsecond,y\n", columns=["text"], fmt="csv")
    assert [(e.id, e.sentence) for e in examples] == [("0", "first one"), ("1", "second")]


def test_plain_lines_one_or_two_sentences_ids_are_line_numbers():
    examples, report = read("a fine film\n\nawful\n")
    assert [(e.id, e.sentence) for e in examples] == [("0", "a fine film"), ("2", "awful")]
    assert report.messages() == ["skipped 1 of 3 rows in in.txt: empty sentence (lines 2)"]
    pairs, report = read("a\tb\nc\nd\te\tf\ng\th\n", QUORA)
    assert [(e.id, e.sentence1, e.sentence2) for e in pairs] == [("0", "a", "b"), ("3", "g", "h")]
    assert report.rows_skipped == 2 and report.rows_read == 4
    assert "expected sentence1 and sentence2 separated by a tab, got 1 field(s) (lines 2)" in report.messages()[0]


def test_json_lines_with_ids_and_bad_records():
    text = ('{"id": "x", "sentence": "good"}\n'
            'not json\n'
            '\n'
            '[1, 2]\n'
            '{"sentence": 5}\n'
            '{"other": "a"}\n'
            '{"sentence": "  "}\n'
            '{"sentence": "fine"}\n')
    examples, report = read(text)
    assert [(e.id, e.sentence) for e in examples] == [("x", "good"), ("6", "fine")]
    assert report.rows_read == 7 and report.rows_skipped == 5
    assert report.messages() == [
        "skipped 1 of 7 rows in in.txt: invalid JSON (lines 2)",
        "skipped 1 of 7 rows in in.txt: not a JSON object (lines 4)",
        "skipped 1 of 7 rows in in.txt: sentence is not a string (lines 5)",
        "skipped 1 of 7 rows in in.txt: missing sentence (lines 6)",
        "skipped 1 of 7 rows in in.txt: empty sentence (lines 7)"]


def test_strict_names_the_file_line_and_field():
    with pytest.raises(DataError, match=r"in.txt: line 3: field 'sentence2': empty sentence2"):
        read("sentence1\tsentence2\na\tb\nc\t \n", QUORA, strict=True)


def test_invalid_utf8_is_a_reported_row(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"good\nbad \xff byte\nalso good\n")
    with open_text(path) as f:
        examples, report = read_inputs(f, SST, name="in.txt")
    assert [e.sentence for e in examples] == ["good", "also good"]
    assert report.messages() == ["skipped 1 of 3 rows in in.txt: invalid UTF-8 (lines 2)"]


def test_a_header_without_the_columns_is_an_error():
    with pytest.raises(DataError, match="header lacks column"):
        read("id\ttext\n1\ta\n", fmt="csv")
    with pytest.raises(DataError, match="takes 2 text column"):
        read("a\tb\n", QUORA, columns=["only"])


@pytest.mark.parametrize("line, columns, fmt", [
    ('{"sentence": "a"}', ("sentence",), "jsonl"),
    ("\tid\tsentence\tsentiment", ("sentence",), "csv"),
    ("sentence1,sentence2", ("sentence1", "sentence2"), "csv"),
    ("a plain sentence", ("sentence",), "lines"),
    ("one\ttwo", ("sentence1", "sentence2"), "lines")])
def test_the_format_is_detected_from_the_first_line(line, columns, fmt):
    assert detect_format(line, columns) == fmt
