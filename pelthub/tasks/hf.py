"""Examples from 🤗 datasets, and from files the CLI is handed: one conversion for every entry point.

`as_examples` turns a `datasets.Dataset`, a `DatasetDict` with a split name, or a list of
`Example` into a checked list of `Example` (`Examples`, which also carries the label names
when the data has them). The columns are found by their usual names, or given as
``columns={"text": ..., "text_pair": ..., "label": ...}``:

* text: the first of ``TEXT_COLUMNS`` present (text, sentence, sentence1, content, ...);
* text_pair: the first of ``PAIR_COLUMNS`` present (text_pair, sentence2, hypothesis, ...),
  none when absent; ``columns={"text_pair": None}`` turns the search off;
* label: the one of ``LABEL_COLUMNS`` present (label, labels, class, ...).

Only columns of the right type count (strings for text, integers, strings or a
`ClassLabel` for labels). When two candidates fit one role, or none does, a `DataError`
names the columns found and asks for ``columns=``: guessing wrong would train on the
wrong field without a trace. A `ClassLabel` feature gives the label names; string labels
are numbered as `load_jsonl` numbers them (order of first appearance unless
``label_names`` is given), so pass ``label_names`` to convert several splits alike.

`datasets` is imported only when a path to a saved dataset is read: the objects handed in
are recognised through `sys.modules`, so ``import pelthub`` stays light.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pelthub.errors import DataError
from pelthub.tasks.io import MAX_LABELS, Example, _BadRow, _LabelReader, load_csv, load_jsonl, open_regular

TEXT_COLUMNS = ("text", "sentence", "sentence1", "question1", "content", "question", "premise", "review",
                "document", "tweet", "query", "input")
PAIR_COLUMNS = ("text_pair", "sentence2", "question2", "hypothesis", "passage", "context")
LABEL_COLUMNS = ("label", "labels", "class", "category", "gold_label")
ROLES = ("text", "text_pair", "label")

# `pelthub rank --target` reads the whole target into memory as Example rows; ranking reads
# 128 of them (`eval_examples`), so 256 MiB (about a million short rows) is far beyond any real
# target, and a bigger input is a wrong path, not data.
MAX_DATA_BYTES = 256 * 2**20


class Examples(list):
    """A list of `Example`; ``label_names`` holds the names when the data gave them (else None)."""

    label_names: tuple[str, ...] | None = None


def _datasets_types(*names: str) -> tuple[type, ...]:
    """The named classes of `datasets` when it is imported (no object of them can exist otherwise);
    () when not, which isinstance() matches with nothing."""
    module = sys.modules.get("datasets")
    return tuple(getattr(module, n) for n in names if hasattr(module, n)) if module else ()


def is_dataset_dict(data: Any) -> bool:
    """True for a `datasets.DatasetDict` (a Mapping of splits, not of tasks)."""
    return isinstance(data, _datasets_types("DatasetDict", "IterableDatasetDict"))


def as_examples(data: Any, split: str | None = None, columns: Mapping[str, str | None] | None = None,
                label_names: Sequence[str] | None = None) -> Examples:
    """`data` as checked `Example` rows: a Dataset, a DatasetDict with `split`, or a list of Example.

    Raises DataError naming what is wrong: a missing split (with those there are), columns
    that cannot be decided (with those found), a row with no text or a bad label, or a
    label id of `MAX_LABELS` or more.
    """
    if is_dataset_dict(data):
        if split is None or split not in data:
            raise DataError(f"a DatasetDict needs split= one of {sorted(data)}, got {split!r}")
        data = data[split]
    elif split is not None:
        raise DataError(f"split={split!r} applies to a DatasetDict only, got {type(data).__name__}")
    if isinstance(data, _datasets_types("Dataset")):
        return _from_dataset(data, columns, label_names)
    if isinstance(data, _datasets_types("IterableDataset")):
        raise DataError("an IterableDataset may never end; take what you need first: "
                        "Dataset.from_list(list(data.take(n)))")
    if columns is not None:
        raise DataError("columns= applies to a datasets.Dataset; Example rows have fixed fields")
    if isinstance(data, (str, bytes, os.PathLike, Mapping)) or not isinstance(data, Sequence):
        raise DataError(f"expected a list of Example, a datasets.Dataset or a DatasetDict with split=, got "
                        f"{type(data).__name__}" + ("; read files with pelthub.tasks.load_examples"
                                                    if isinstance(data, (str, os.PathLike)) else ""))
    out = Examples(data)
    for i, e in enumerate(out):
        if not isinstance(e, Example):
            raise DataError(f"item {i} is a {type(e).__name__}, not an Example")
        if not isinstance(e.label, int) or isinstance(e.label, bool) or not 0 <= e.label < MAX_LABELS:
            raise DataError(f"item {i}: label {e.label!r} is not an integer id in [0, {MAX_LABELS})")
    out.label_names = tuple(label_names) if label_names is not None else getattr(data, "label_names", None)
    return out


def from_datasets(data: Any, split: str | None = None, columns: Mapping[str, str | None] | None = None) -> Any:
    """`data` with every 🤗 dataset in it (itself, or the values of a {task: data} mapping) as `Examples`.

    Anything else is passed through untouched, so each entry point keeps its own handling
    of Example lists (and of other kinds of examples, such as generative ones).
    """
    kinds = _datasets_types("Dataset", "DatasetDict", "IterableDataset", "IterableDatasetDict")
    if isinstance(data, kinds):
        return as_examples(data, split, columns)
    if isinstance(data, Mapping) and any(isinstance(v, kinds) for v in data.values()):
        return {task: as_examples(v, split, columns) if isinstance(v, kinds) else v for task, v in data.items()}
    if split is not None or columns is not None:
        raise DataError(f"split= and columns= apply to a datasets.Dataset or DatasetDict, got {type(data).__name__}")
    return data


def _is_string(feature: Any) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _is_label(feature: Any) -> bool:
    dtype = getattr(feature, "dtype", "")
    return type(feature).__name__ == "ClassLabel" or _is_string(feature) or dtype.startswith(("int", "uint"))


def _pick(role: str, names: Sequence[str], features: Mapping[str, Any], fits: Any, taken: set[str]) -> str | None:
    found = [n for n in names if n in features and n not in taken and fits(features[n])]
    if len(found) > 1:
        raise DataError(f"cannot tell which column is the {role}: {found} all fit (columns: {list(features)}); "
                        f"pass columns={{{role!r}: ...}}")
    return found[0] if found else None


def _columns(features: Mapping[str, Any], given: Mapping[str, str | None] | None) -> dict[str, str | None]:
    """role → column name (text_pair may be None), explicit ones checked, the rest found by name."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(ROLES))
    if unknown:
        raise DataError(f"columns= keys must be among {list(ROLES)}, got {unknown}")
    for role, name in given.items():
        if name is not None and name not in features:
            raise DataError(f"columns={{{role!r}: {name!r}}}: no such column; the dataset has {list(features)}")
    if given.get("text", "") is None or given.get("label", "") is None:
        raise DataError("columns= may set only 'text_pair' to None; text and label are required")
    out: dict[str, str | None] = {}
    taken = {n for n in given.values() if n is not None}
    for role, names, fits in (("text", TEXT_COLUMNS, _is_string), ("label", LABEL_COLUMNS, _is_label),
                              ("text_pair", PAIR_COLUMNS, _is_string)):
        out[role] = given[role] if role in given else _pick(role, names, features, fits, taken)
        taken.add(out[role])
    unused = [n for n in (*TEXT_COLUMNS, *PAIR_COLUMNS) if n in features and n not in taken and
              _is_string(features[n])]
    if out["text_pair"] is None and "text_pair" not in given and out["text"] is not None and unused:
        raise DataError(f"column {unused[0]!r} looks like text too (columns: {list(features)}); pass "
                        f"columns={{'text_pair': {unused[0]!r}}} for a pair task or {{'text_pair': None}}")
    for role in ("text", "label"):
        if out[role] is None:
            usual = TEXT_COLUMNS if role == "text" else LABEL_COLUMNS
            raise DataError(f"no {role} column found among {list(features)} (looked for {', '.join(usual)}); "
                            f"pass columns={{{role!r}: ...}}")
    for role in ("text", "text_pair"):
        if out[role] is not None and not _is_string(features[out[role]]):
            raise DataError(f"column {out[role]!r} ({role}) holds {features[out[role]]}, not strings")
    if not _is_label(features[out["label"]]):
        raise DataError(f"column {out['label']!r} (label) holds {features[out['label']]}; labels must be integer "
                        "ids, label names or a ClassLabel")
    return out


def _from_dataset(data: Any, columns: Mapping[str, str | None] | None,
                  label_names: Sequence[str] | None) -> Examples:
    roles = _columns(data.features, columns)
    label_feature = data.features[roles["label"]]
    feature_names = getattr(label_feature, "names", None) if type(label_feature).__name__ == "ClassLabel" else None
    if feature_names is not None and label_names is not None and list(label_names) != list(feature_names):
        raise DataError(f"label_names {list(label_names)} differ from the ClassLabel names {feature_names} of "
                        f"column {roles['label']!r}; drop label_names=")
    names = feature_names if feature_names is not None else label_names
    labels = _LabelReader(names)
    wanted = [c for c in dict.fromkeys(roles.values()) if c is not None]
    rows = data.select_columns(wanted).with_format(None).to_dict()
    texts, pairs = rows[roles["text"]], rows[roles["text_pair"]] if roles["text_pair"] else None
    out = Examples()
    for i, (text, raw) in enumerate(zip(texts, rows[roles["label"]])):
        if not text or not text.strip():
            raise DataError(f"row {i}: empty text in column {roles['text']!r}")
        try:
            label = labels(raw)
        except _BadRow as e:
            raise DataError(f"row {i} of column {roles['label']!r}: {e}") from None
        pair = pairs[i] if pairs is not None else None
        out.append(Example(text, label, pair if pair and pair.strip() else None))
    out.label_names = tuple(names) if names is not None else tuple(labels.numbered) or None
    return out


def load_saved(path: str | os.PathLike[str], max_bytes: int = MAX_DATA_BYTES) -> Any:
    """The Dataset or DatasetDict in a folder written by `save_to_disk`, refused (DataError) unless it
    is one, holds only regular files and at most `max_bytes` in all."""
    path = Path(path)
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        raise DataError(f"{path} is a folder but not a saved dataset (no state.json or dataset_dict.json from "
                        "Dataset.save_to_disk); give a JSONL or CSV file or such a folder")
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            fd = open_regular(Path(root) / name, max_bytes)
            total += os.fstat(fd).st_size
            os.close(fd)
    if total > max_bytes:
        raise DataError(f"{path} holds {total:,} bytes, over the {max_bytes:,}-byte maximum")
    import datasets
    try:
        return datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: cannot load the saved dataset ({type(e).__name__}: {e})") from None


def load_examples(path: str | os.PathLike[str], split: str | None = None,
                  columns: Mapping[str, str | None] | None = None, label_names: Sequence[str] | None = None,
                  max_bytes: int = MAX_DATA_BYTES) -> Examples:
    """Read a .jsonl/.json, .csv or a saved dataset folder (with `split` for a DatasetDict).

    Anything else is refused with a DataError before a byte is read: devices such as
    /dev/zero, FIFOs, folders that are not saved datasets, and inputs over `max_bytes`.
    """
    path = Path(path)
    if path.is_dir():
        return as_examples(load_saved(path, max_bytes), split, columns, label_names)
    if split is not None or columns is not None:
        raise DataError(f"{path}: split and columns apply to saved dataset folders; JSONL and CSV files use the "
                        "fields text, text_pair and label")
    loader = {".jsonl": load_jsonl, ".json": load_jsonl, ".ndjson": load_jsonl, ".csv": load_csv}.get(
        path.suffix.lower())
    if loader is None:
        os.close(open_regular(path, max_bytes))  # a device or FIFO is named as such, whatever its name
        raise DataError(f"{path}: unknown format {path.suffix or '(no suffix)'}; give a .jsonl or .csv file or a "
                        "folder written by Dataset.save_to_disk")
    return as_examples(loader(path, label_names, max_bytes), label_names=label_names)
