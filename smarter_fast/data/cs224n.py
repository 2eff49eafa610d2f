"""Readers for the CS224N minBERT data: SST sentiment, Quora paraphrase and STS similarity files.

The files are tab-separated with CSV quoting, a header row and leading unnamed index column(s); they
are read by column name with `csv.DictReader(f, delimiter='\\t')` as the CS224N starter does. Real
files carry quirks (unbalanced quotes that swallow a field), so malformed rows are skipped and
counted per reason, with their physical line numbers, and reported as
`skipped N of M rows in FILE: <reason> (lines a, b, c, ...)`; `strict=True` raises instead.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .. import tasks as registry

log = logging.getLogger("smarter_fast")

TASKS = registry.TASK_NAMES
SPLITS = ("train", "dev", "test")
FILE_PATTERNS = {t.name: t.file_pattern for t in registry.TASKS}
SHOWN_LINES = 5  # line numbers listed per reason; the count covers all of them


class DataError(ValueError):
    """Unreadable or missing data: a missing file, a bad header, or (strict mode) a malformed row."""


@dataclass(frozen=True)
class SentenceExample:
    id: str
    sentence: str
    label: int | None  # SST sentiment 0-4; None in test files


@dataclass(frozen=True)
class PairExample:
    id: str
    sentence1: str
    sentence2: str
    label: float | None  # Quora: 0 or 1 (int); STS: similarity 0.0-5.0; None in test files


@dataclass
class ReadReport:
    """What reading one file gave: rows read, rows kept, and the skipped rows' line numbers per reason."""

    path: Path
    rows_read: int = 0
    rows_kept: int = 0
    skipped: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    @property
    def rows_skipped(self) -> int:
        return sum(len(lines) for lines in self.skipped.values())

    def messages(self) -> list[str]:
        """One line per reason: `skipped N of M rows in FILE: <reason> (lines a, b, c, ...)`."""
        out = []
        for reason, lines in self.skipped.items():
            shown = ", ".join(str(n) for n in lines[:SHOWN_LINES]) + (", ..." if len(lines) > SHOWN_LINES else "")
            out.append(f"skipped {len(lines)} of {self.rows_read} rows in {self.path.name}: {reason} (lines {shown})")
        return out


def _parse_label(task: registry.Task, text: str) -> int | float:
    """The gold label of `task` in `text`, or ValueError whose message is the skip reason (it names
    the column, e.g. "similarity out of range 0-5"). Classes and 0/1 labels are ints, scores floats."""
    column, (low, high) = task.label_column, task.label_range
    value = _number(text, column)
    if task.kind == "classification":
        if not value.is_integer() or not low <= value <= high:
            raise ValueError(f"{column} not an integer {low:g}-{high:g}")
        return int(value)
    if task.kind == "binary":
        if value not in (low, high):
            raise ValueError(f"{column} not {low:g} or {high:g}")
        return int(value)
    if not low <= value <= high:  # also rejects nan
        raise ValueError(f"{column} out of range {low:g}-{high:g}")
    return value


def _number(text: str, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"unparseable {column}") from None
    if math.isnan(value):
        raise ValueError(f"unparseable {column}")
    return value


def row_problem(row: dict, text_columns, label_column, id_column: str | None = "id") -> tuple[str, str] | None:
    """(field, reason) for the first problem in a DictReader row, or None when the row is well
    formed. id_column None: the file has no id column."""
    fields = [(column or "(index)", value) for column, value in row.items() if column is not None and value is not None]
    for column, value in fields:
        # No CS224N text spans lines: a line break inside a field means an open quote swallowed rows.
        if "\n" in value or "\r" in value:
            return column, "unbalanced quotes (field spans lines)"
    if None in row:  # more fields than header columns (DictReader's restkey)
        return "(extra)", "wrong number of fields"
    for column, value in row.items():
        if value is None:  # fewer fields than header columns (DictReader's restval)
            return column or "(index)", "wrong number of fields"
    for column, value in fields:
        # Undecodable bytes arrive as lone surrogates (errors='surrogateescape').
        if any("\udc80" <= ch <= "\udcff" for ch in value):
            return column, "invalid UTF-8"
    for column in ((id_column,) if id_column else ()) + tuple(text_columns):
        if not row[column].strip():
            return column, f"empty {column}"
    if label_column and not row[label_column].strip():
        return label_column, f"missing {label_column}"
    return None


def read_task_file(path, task: str, labeled: bool | None = None, strict: bool = False, limit: int | None = None):
    """Reads one CS224N file of `task` ('sst', 'quora' or 'sts'); returns (examples, ReadReport).

    labeled=None takes labels when the header has the label column (train/dev) and gives label None
    otherwise (test-student); labeled=True requires the column, labeled=False ignores it. `limit`
    stops after N kept rows. Line numbers are physical lines in the file (csv `line_num`: the header
    is line 1, a record that spans lines gets its last line). Skips are logged as warnings on the
    'smarter_fast' logger and returned in the report.
    """
    spec = registry.task(task)
    text_columns, label_column = spec.text_columns, spec.label_column
    path = Path(path)
    report = ReadReport(path)
    examples = []
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    # newline='' lets the csv module handle quoted fields; surrogateescape keeps bad bytes detectable.
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        try:
            header = reader.fieldnames or []
        except csv.Error as e:
            raise DataError(f"{path}: line 1: unreadable header: {e}") from None
        if labeled is None:
            labeled = label_column in header
        required = ["id", *text_columns] + ([label_column] if labeled else [])
        absent = [c for c in required if c not in header]
        if absent:
            raise DataError(f"{path}: header lacks column(s) {', '.join(absent)} (found: {', '.join(header)})")
        if not labeled:
            label_column = None

        while limit is None or len(examples) < limit:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:  # e.g. an open quote swallowing the rest of a large file
                raise DataError(f"{path}: line {reader.line_num}: unreadable CSV: {e}") from None
            report.rows_read += 1
            line = reader.line_num
            problem = row_problem(row, text_columns, label_column)
            label = None
            if problem is None and label_column:
                try:
                    label = _parse_label(spec, row[label_column].strip())
                except ValueError as e:
                    problem = (label_column, str(e))
            if problem is not None:
                column, reason = problem
                if strict:
                    raise DataError(f"{path}: line {line}: field {column!r}: {reason}")
                report.skipped[reason].append(line)
                continue
            texts = [row[c].strip() for c in text_columns]
            if spec.is_pair:
                examples.append(PairExample(row["id"].strip(), texts[0], texts[1], label))
            else:
                examples.append(SentenceExample(row["id"].strip(), texts[0], label))
    report.rows_kept = len(examples)
    report.skipped = dict(report.skipped)
    for message in report.messages():
        log.warning(message)
    return examples, report


def read_sst(path, **kwargs):
    """SST sentiment file -> (list[SentenceExample], ReadReport). See read_task_file for options."""
    return read_task_file(path, registry.SST.name, **kwargs)


def read_quora(path, **kwargs):
    """Quora paraphrase file -> (list[PairExample] with int labels 0/1, ReadReport)."""
    return read_task_file(path, registry.QUORA.name, **kwargs)


def read_sts(path, **kwargs):
    """STS similarity file -> (list[PairExample] with float labels 0-5, ReadReport)."""
    return read_task_file(path, registry.STS.name, **kwargs)


def find_data_files(data_dir) -> dict[str, dict[str, Path | None]]:
    """Locates the CS224N files: {task: {split: path or None}}, splits 'train', 'dev', 'test'.

    Train and dev files are required for every task (DataError, one line, when any is missing);
    test-student files are optional and None when absent.
    """
    data_dir = Path(data_dir)
    expected = (", ".join(t.file_pattern.format("{train,dev}") for t in registry.TASKS)
                + " (test-student files optional)")
    if not data_dir.is_dir():
        raise DataError(f"CS224N data directory {data_dir} not found; expected it to hold {expected}")
    files = {t.name: {split: data_dir / t.file_name(split) for split in SPLITS} for t in registry.TASKS}
    missing = [p.name for t in TASKS for s in ("train", "dev") if not (p := files[t][s]).is_file()]
    if missing:
        raise DataError(f"CS224N data in {data_dir} lacks {', '.join(missing)}; expected {expected}")
    for task in TASKS:
        if not files[task]["test"].is_file():
            files[task]["test"] = None
    return files


@dataclass
class CS224NSplit:
    """One split of all three tasks, with a ReadReport per file read."""

    split: str
    sst: list[SentenceExample]
    quora: list[PairExample]
    sts: list[PairExample]
    reports: list[ReadReport]

    def messages(self) -> list[str]:
        return [m for r in self.reports for m in r.messages()]


def load_cs224n(data_dir, split: str, strict: bool = False, limit: int | None = None) -> CS224NSplit:
    """Reads `split` ('train', 'dev' or 'test'/'test-student') of SST, Quora and STS from `data_dir`.

    Train and dev rows must carry labels; test rows get label None. A missing optional test file
    gives an empty list. `limit` keeps the first N rows of each file.
    """
    split = "test" if split == "test-student" else split
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected train, dev or test")
    files = find_data_files(data_dir)
    data, reports = {}, []
    for task in TASKS:
        path = files[task][split]
        if path is None:
            data[task] = []
            continue
        # Test-student files carry no labels; a label column there is ignored.
        data[task], report = read_task_file(path, task, labeled=split != "test", strict=strict, limit=limit)
        reports.append(report)
    return CS224NSplit(split, *(data[t] for t in TASKS), reports)
