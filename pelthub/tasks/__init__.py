"""Built-in text-classification tasks and loaders for your own data.

`load_task` gives deterministic, offline tasks grouped into families of
related tasks (see `families`), so transfer between modules can be tested and
benchmarked anywhere. `load_jsonl` / `load_csv` read user data into the same
`Example` rows, and `save_jsonl` writes them back. `as_examples` turns a 🤗
`datasets.Dataset` (or a `DatasetDict` split) into them, `load_examples` reads
any of these from a path, and `as_task` makes a `Task` of a `DatasetDict`.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pelthub.errors import ConfigError, DataError
from pelthub.tasks.hf import Examples, as_examples, from_datasets, is_dataset_dict, load_examples
from pelthub.tasks.io import MAX_LABELS, Example, load_csv, load_jsonl, save_jsonl
from pelthub.tasks.suite import SPECS

__all__ = ["Example", "Examples", "MAX_LABELS", "Task", "as_examples", "as_task", "families", "from_datasets",
           "list_tasks", "load_csv", "load_examples", "load_jsonl", "load_task", "save_jsonl"]


@dataclass(frozen=True)
class Task:
    """A labelled dataset split three ways; immutable so it can be shared safely."""

    name: str
    family: str
    label_names: tuple[str, ...]
    train: tuple[Example, ...]
    dev: tuple[Example, ...]
    test: tuple[Example, ...]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def to_jsonl(self, dir: str | Path) -> Path:
        """Write train.jsonl, dev.jsonl and test.jsonl into ``dir`` (created if missing)."""
        out = Path(dir)
        for split in ("train", "dev", "test"):
            save_jsonl(getattr(self, split), out / f"{split}.jsonl")
        return out

    def sample(self, n_train: int | None = None, n_dev: int | None = None, n_test: int | None = None,
               seed: int = 0) -> Task:
        """This task with at most n examples of each split (None: all), drawn by a shuffle seeded as in
        `load_task` (crc32 of name and seed), so a few-shot draw is the same on any machine."""
        rng = random.Random(zlib.crc32(f"{self.name}:sample:{seed}".encode()))
        parts = []
        for rows, n in ((self.train, n_train), (self.dev, n_dev), (self.test, n_test)):
            rows = list(rows)
            rng.shuffle(rows)
            parts.append(tuple(rows if n is None else rows[:n]))
        return Task(self.name, self.family, self.label_names, *parts)


def as_task(data: Any, name: str, family: str | None = None,
            splits: Sequence[str] = ("train", "validation", "test"),
            columns: Mapping[str, str | None] | None = None) -> Task:
    """A `Task` of a 🤗 `DatasetDict` whose `splits` name its train, dev and test splits.

    Only the train split must exist (a missing dev or test split gives an empty one); all
    three share the train split's label numbering. `family` (default: `name`) groups
    related tasks for the transfer study.
    """
    if not is_dataset_dict(data):
        raise DataError(f"as_task needs a DatasetDict of splits, got {type(data).__name__}; split a Dataset "
                        "first, e.g. data.train_test_split(test_size=0.2, seed=0)")
    train_split, dev_split, test_split = splits
    train = as_examples(data, train_split, columns)
    if not train:
        raise DataError(f"split {train_split!r} is empty; a task needs training examples")
    names = train.label_names
    dev, test = (as_examples(data, s, columns, label_names=names) if s in data else () for s in (dev_split, test_split))
    if names is None:
        names = tuple(str(i) for i in range(max(e.label for e in (*train, *dev, *test)) + 1))
    return Task(name, family or name, tuple(names), tuple(train), tuple(dev), tuple(test))


def families() -> dict[str, list[str]]:
    """Family name -> its task names, both sorted."""
    out: dict[str, list[str]] = {}
    for name in sorted(SPECS):
        out.setdefault(SPECS[name].family, []).append(name)
    return dict(sorted(out.items()))


def list_tasks(family: str | None = None) -> list[str]:
    """Task names, sorted; only those of ``family`` when given."""
    if family is None:
        return sorted(SPECS)
    if family not in families():
        raise ConfigError(f"unknown task family {family!r}; available families: {', '.join(families())}")
    return families()[family]


_PATIENCE = 2000  # consecutive duplicate draws after which a label's templates count as used up


def _balanced(n: int, k: int) -> list[int]:
    """Per-label counts for n examples: equal, the first n % k labels one more."""
    return [n // k + (label < n % k) for label in range(k)]


def load_task(name: str, n_train: int = 256, n_dev: int = 128, n_test: int = 256, seed: int = 0) -> Task:
    """Generate a built-in task with balanced labels in every split.

    The same arguments give the same data on any machine: the random stream is
    seeded from crc32 of name and seed, not the per-process salted hash().
    No text appears twice in the task, so no split leaks into another.
    """
    spec = SPECS.get(name)
    if spec is None:
        raise ConfigError(f"unknown task {name!r}; available tasks: {', '.join(sorted(SPECS))}")
    k = len(spec.label_names)
    for field, n, least in (("n_train", n_train, k), ("n_dev", n_dev, 0), ("n_test", n_test, 0)):
        if not isinstance(n, int) or isinstance(n, bool) or n < least:
            raise ConfigError(f"{field} must be an integer >= {least} for task {name!r}, got {n!r}")
    rng = random.Random(zlib.crc32(f"{name}:{seed}".encode()))
    counts = [_balanced(n, k) for n in (n_train, n_dev, n_test)]
    seen: set[str] = set()
    pools: list[list[Example]] = []
    for label in range(k):
        need = sum(split[label] for split in counts)
        pool: list[Example] = []
        misses = 0  # a template space that is used up must fail, not spin
        while len(pool) < need and misses < _PATIENCE:
            example = spec.draw(rng, label)
            if example.text in seen:
                misses += 1
            else:
                misses = 0
                seen.add(example.text)
                pool.append(example)
        if len(pool) < need:
            raise ConfigError(f"task {name!r} can only generate {len(pool)} distinct examples of label "
                              f"{spec.label_names[label]!r} but {need} were asked for; ask for fewer")
        pools.append(pool)
    splits = []
    for split in counts:
        part = [pools[label].pop() for label in range(k) for _ in range(split[label])]
        rng.shuffle(part)
        splits.append(tuple(part))
    return Task(name, spec.family, spec.label_names, *splits)
