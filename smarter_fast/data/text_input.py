"""Sentences to predict on, as `python -m smarter_fast.predict` reads them: a CSV/TSV file with a
header naming its sentence columns (CS224N files as they are), JSON lines, or plain lines (one
sentence, or two separated by a tab, per line).

Ids: the `id` column (CSV) or key (JSON) where there is one, else the row's number from 0 (for
plain lines: the line number from 0, so ids stay aligned with the input lines). Malformed rows are
skipped, counted per reason and reported in the project's format (`skipped N of M rows in FILE:
<reason> (lines a, b, ...)`, physical line numbers from 1); strict=True raises instead, naming the
file, line and field.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .. import tasks as registry
from .cs224n import DataError, PairExample, ReadReport, SentenceExample, row_problem

FORMATS = ("auto", "csv", "jsonl", "lines")
ID = "id"


def _has_bad_bytes(text: str) -> bool:
    # undecodable bytes arrive as lone surrogates (errors='surrogateescape')
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def detect_format(first_line: str, columns) -> str:
    """'jsonl' when the first line is a JSON object, 'csv' when it is a header holding the text
    columns (tab- or comma-separated), else 'lines'."""
    line = first_line.strip()
    if line.startswith("{"):
        return "jsonl"
    fields = {f.strip() for f in line.replace("\t", ",").split(",")}
    return "csv" if set(columns) <= fields else "lines"


def read_inputs(stream, task: str, fmt: str = "auto", columns=None, strict: bool = False,
                name: str = "<stdin>"):
    """Reads the inputs of `task` from a text stream (opened with errors='surrogateescape' so
    bad bytes are caught) -> (examples, ReadReport). columns: the sentence column(s) or JSON
    key(s) (default: the task's CS224N columns, `sentence` or `sentence1`, `sentence2`)."""
    spec = registry.task(task)
    columns = tuple(columns) if columns else spec.text_columns
    if len(columns) != len(spec.text_columns):
        raise DataError(f"{spec.title} takes {len(spec.text_columns)} text column(s) "
                        f"({', '.join(spec.text_columns)}), got {len(columns)}: {', '.join(columns)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown input format {fmt!r}; expected one of {', '.join(FORMATS)}")
    text = stream.read()
    if fmt == "auto":
        fmt = detect_format(text.split("\n", 1)[0], columns)
    report = ReadReport(Path(name))
    reader = {"csv": _read_csv, "jsonl": _read_jsonl, "lines": _read_lines}[fmt]
    examples = []
    for line, row_id, texts, problem in reader(text, columns, name):
        report.rows_read += 1
        if problem is not None:
            column, reason = problem
            if strict:
                raise DataError(f"{name}: line {line}: field {column!r}: {reason}")
            report.skipped.setdefault(reason, []).append(line)
            continue
        examples.append(PairExample(row_id, *texts, None) if spec.is_pair
                        else SentenceExample(row_id, texts[0], None))
    report.rows_kept = len(examples)
    return examples, report


def _read_csv(text: str, columns, name: str):
    header_line = text.split("\n", 1)[0]
    delimiter = "\t" if "\t" in header_line else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [h.strip() for h in reader.fieldnames or []]
    except csv.Error as e:
        raise DataError(f"{name}: line 1: unreadable header: {e}") from None
    reader.fieldnames = header
    absent = [c for c in columns if c not in header]
    if absent:
        raise DataError(f"{name}: header lacks column(s) {', '.join(absent)} (found: {', '.join(header)})")
    id_column = ID if ID in header else None
    n = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{name}: line {reader.line_num}: unreadable CSV: {e}") from None
        problem = row_problem(row, columns, None, id_column)
        texts = [] if problem else [row[c].strip() for c in columns]
        yield reader.line_num, row[id_column].strip() if id_column and not problem else str(n), texts, problem
        n += 1


def _read_jsonl(text: str, columns, name: str):
    n = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():  # blank lines hold no record
            continue
        problem, texts, row_id = None, [], str(n)
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record, problem = None, ("(line)", "invalid JSON")
        if problem is None and not isinstance(record, dict):
            problem = ("(line)", "not a JSON object")
        if problem is None:
            for c in columns:
                value = record.get(c)
                if value is None:
                    problem = (c, f"missing {c}")
                elif not isinstance(value, str):
                    problem = (c, f"{c} is not a string")
                elif _has_bad_bytes(value):
                    problem = (c, "invalid UTF-8")
                elif not value.strip():
                    problem = (c, f"empty {c}")
                if problem:
                    break
                texts.append(value.strip())
            if problem is None and record.get(ID) is not None:
                row_id = str(record[ID])
        elif _has_bad_bytes(line):
            problem = ("(line)", "invalid UTF-8")
        yield number, row_id, texts, problem
        n += 1


def _read_lines(text: str, columns, name: str):
    lines = text.split("\n")
    if lines and lines[-1] == "":  # the final newline ends the last line, it starts none
        lines.pop()
    for index, line in enumerate(lines):
        fields = line.rstrip("\r").split("\t")
        problem = None
        if _has_bad_bytes(line):
            problem = ("(line)", "invalid UTF-8")
        elif len(fields) != len(columns):
            problem = ("(line)", f"expected {' and '.join(columns)} separated by a tab, "
                                 f"got {len(fields)} field(s)" if len(columns) > 1 else
                                 "a tab in a one-sentence line (two sentences are for pair tasks)")
        else:
            empty = [c for c, f in zip(columns, fields) if not f.strip()]
            if empty:
                problem = (empty[0], f"empty {empty[0]}")
        yield index + 1, str(index), [] if problem else [f.strip() for f in fields], problem


def open_text(path) -> io.TextIOBase:
    """A file opened as read_inputs expects it (UTF-8 with or without BOM, bad bytes kept)."""
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")


def stdin_text(stream) -> io.TextIOBase:
    """Standard input (its byte buffer) decoded as read_inputs expects."""
    return io.TextIOWrapper(stream.buffer, encoding="utf-8-sig", errors="surrogateescape", newline="")


__all__ = ["FORMATS", "detect_format", "open_text", "read_inputs", "stdin_text"]
