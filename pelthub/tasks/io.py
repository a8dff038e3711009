"""Load and save labelled examples as JSONL or CSV.

Loading is strict on purpose: a silently skipped or mislabelled row poisons
training without a trace, so every bad row stops loading with a
`DataError` naming the file, the 1-based line number and the problem.

Fields are ``text`` (required), ``text_pair`` (optional; absent, null or
empty means "no second sentence") and ``label``. A label is either an integer
id or a label name:

* with ``label_names`` given, a name is looked up there and an integer must
  index into it;
* with ``label_names=None``, names are numbered in order of first appearance
  in the file (the first name seen becomes 0, the next new one 1, ...). A file
  may then not mix names and integers, since the numbering would be ambiguous.

In CSV every value is a string, so a label such as ``"2"`` that is not itself
one of ``label_names`` is read as the integer 2. Label ids must be below `MAX_LABELS`.

Only regular files are read (a FIFO or /dev/zero would block or never end), and
``max_bytes`` bounds their size where the caller sets it (the CLI does).
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

from pelthub.errors import DataError

_INT_RE = re.compile(r"[+-]?\d+")

# A head is a dense (hidden × labels) layer: at 100,000 labels and hidden size 768 it already
# holds 77 M parameters, far past any parameter-efficient setting, and one-hot label matrices
# (LEEP) grow with it. An id beyond it is a row id or a hash in the label column, not a class,
# and would allocate gigabytes before anything else went wrong.
MAX_LABELS = 100_000


@dataclass(frozen=True)
class Example:
    """One labelled input; ``text_pair`` is the second sentence of pair tasks."""

    text: str
    label: int
    text_pair: str | None = None


class _BadRow(Exception):
    """A row-level problem; the loader adds the file and line before raising DataError."""


class _LabelReader:
    """Turns raw label values into ids, remembering names seen so far in one file."""

    def __init__(self, label_names: Sequence[str] | None) -> None:
        self.names = list(label_names) if label_names is not None else None
        self.numbered: dict[str, int] = {}
        self.saw_int = False

    def __call__(self, raw: Any) -> int:
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            raise _BadRow("missing label")
        if isinstance(raw, str):
            raw = raw.strip()
            if _INT_RE.fullmatch(raw) and not (self.names and raw in self.names):
                return self._int(int(raw))
            return self._name(raw)
        if isinstance(raw, int) and not isinstance(raw, bool):
            return self._int(raw)
        raise _BadRow(f"non-integer label {raw!r}; use an integer id or a label name")

    def _int(self, value: int) -> int:
        if value < 0:
            raise _BadRow(f"negative label {value}; label ids start at 0")
        if value >= MAX_LABELS:
            raise _BadRow(f"label {value} is not below the maximum of {MAX_LABELS:,} classes; is this column a "
                          "row id rather than a label?")
        if self.names is not None and value >= len(self.names):
            raise _BadRow(f"label {value} is out of range for {len(self.names)} label names {self.names}")
        if self.names is None and self.numbered:
            raise _BadRow(_MIXED)
        self.saw_int = True
        return value

    def _name(self, name: str) -> int:
        if self.names is not None:
            if name not in self.names:
                raise _BadRow(f"unknown label name {name!r}; expected one of {self.names}")
            return self.names.index(name)
        if self.saw_int:
            raise _BadRow(_MIXED)
        return self.numbered.setdefault(name, len(self.numbered))


_MIXED = "the file mixes integer labels and label names; use one kind or pass label_names"


def _string(row: Mapping[str, Any], field: str) -> str | None:
    """The field's value, or None where it is absent, null or blank."""
    raw = row.get(field)
    if raw is not None and not isinstance(raw, str):
        raise _BadRow(f"{field!r} must be a string, got {type(raw).__name__}")
    return raw if raw and raw.strip() else None


def _example(row: Mapping[str, Any], labels: _LabelReader) -> Example:
    text = _string(row, "text")
    if text is None:
        raise _BadRow("empty 'text'" if "text" in row and row["text"] is not None else "missing 'text' field")
    if "label" not in row:
        raise _BadRow("missing label: no 'label' field")
    return Example(text=text, label=labels(row["label"]), text_pair=_string(row, "text_pair"))


def _fail(path: Path, line: int, problem: str) -> DataError:
    return DataError(f"{path}, line {line}: {problem}")


def open_regular(path: Path, max_bytes: int | None = None) -> int:
    """A read-only fd of `path`, refused with DataError unless it is a regular file of at most `max_bytes`.

    Opened non-blocking and checked with fstat on the open fd: open() on a FIFO blocks until a
    writer comes, /dev/zero never ends, and a check made before opening races a swap.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None
    info = os.fstat(fd)
    problem = "is not a regular file (a device, FIFO or socket)" if not stat.S_ISREG(info.st_mode) else \
        f"is {info.st_size:,} bytes, over the {max_bytes:,}-byte maximum" \
        if max_bytes is not None and info.st_size > max_bytes else None
    if problem:
        os.close(fd)
        raise DataError(f"{path} {problem}; give a JSONL or CSV file or a saved dataset folder")
    return fd


def _read_text(path: Path, max_bytes: int | None) -> str:
    with open(open_regular(path, max_bytes), "rb") as f:
        raw = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(raw) > max_bytes:  # it grew after the check
        raise DataError(f"{path} is over the {max_bytes:,}-byte maximum")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def load_jsonl(path: str | os.PathLike[str], label_names: Sequence[str] | None = None,
               max_bytes: int | None = None) -> list[Example]:
    """Read one JSON object per line; blank lines are skipped, anything else must be a valid row."""
    path = Path(path)
    labels = _LabelReader(label_names)
    examples = []
    # split on "\n" only: str.splitlines would also break at U+2028 inside JSON strings
    for number, line in enumerate(_read_text(path, max_bytes).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(path, number, f"invalid JSON ({e.msg} at column {e.colno})") from None
        except (ValueError, RecursionError) as e:  # an integer of thousands of digits; nesting that exhausts the stack
            raise _fail(path, number, f"unreadable JSON ({type(e).__name__}: {str(e)[:80]})") from None
        if not isinstance(row, dict):
            raise _fail(path, number, f"expected a JSON object, got {type(row).__name__}")
        try:
            examples.append(_example(row, labels))
        except _BadRow as e:
            raise _fail(path, number, str(e)) from None
    if not examples:
        raise DataError(f"{path}: the file is empty; expected one JSON object per line")
    return examples


def load_csv(path: str | os.PathLike[str], label_names: Sequence[str] | None = None,
             max_bytes: int | None = None) -> list[Example]:
    """Read a CSV file whose header names the columns ``text``, ``label`` and optionally ``text_pair``."""
    path = Path(path)
    labels = _LabelReader(label_names)
    examples = []
    reader = csv.DictReader(StringIO(_read_text(path, max_bytes), newline=""))
    if not reader.fieldnames:
        raise DataError(f"{path}: the file is empty; expected a header row with 'text' and 'label'")
    reader.fieldnames = [name.strip() for name in reader.fieldnames]
    for column in ("text", "label"):
        if column not in reader.fieldnames:
            raise _fail(path, 1, f"missing column {column!r}; the header has {reader.fieldnames}")
    for row in reader:
        try:
            if None in row:
                raise _BadRow(f"more fields than the {len(reader.fieldnames)} header columns")
            examples.append(_example(row, labels))
        except _BadRow as e:
            raise _fail(path, reader.line_num, str(e)) from None
    if not examples:
        raise DataError(f"{path}: no rows below the header")
    return examples


def save_jsonl(examples: Iterable[Example], path: str | os.PathLike[str]) -> Path:
    """Write examples as JSONL atomically, so a crash never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for ex in examples:
        row: dict[str, Any] = {"text": ex.text, "label": ex.label}
        if ex.text_pair is not None:
            row["text_pair"] = ex.text_pair
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(rows)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; datasets are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
