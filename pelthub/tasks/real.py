"""Real-text tasks: WordNet glosses, Debian package descriptions and Python code, shipped as built files.

The files in ``real_data/`` are built by ``python -m pelthub.tasks.build_real`` from sources any Debian
machine installs with apt, and committed, so loading needs no apt package and no network. Each file
fixes which split a text belongs to (by a hash of the text), so the splits are disjoint and the same
everywhere; ``load_real_task`` only draws a balanced, seeded sample from each split. Task families
share label semantics across sources (``bio_tech``: biology vs technology in glosses and in package
descriptions); a task alone in its family is held apart. See each file's header (``real_task_info``)
for its sources, versions and licence.
"""
from __future__ import annotations

import gzip
import json
import random
import zlib
from functools import cache
from pathlib import Path
from typing import Any

from pelthub.errors import ConfigError
from pelthub.tasks import Task
from pelthub.tasks.io import Example

DATA_DIR = Path(__file__).with_name("real_data")
SPLITS = ("train", "dev", "test")


@cache
def _read(name: str) -> tuple[dict[str, Any], dict[str, list[list[Example]]]]:
    """The header and, per split, one pool of examples per label."""
    path = DATA_DIR / f"{name}.jsonl.gz"
    if not path.is_file():
        raise ConfigError(f"unknown real task {name!r}; available real tasks: {', '.join(list_real_tasks())}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        header = json.loads(next(f))["header"]
        pools: dict[str, list[list[Example]]] = {s: [[] for _ in header["label_names"]] for s in SPLITS}
        for line in f:
            row = json.loads(line)
            pools[row["split"]][row["label"]].append(Example(row["text"], row["label"]))
    return header, pools


def real_task_info(name: str) -> dict[str, Any]:
    """A task's header: family, labels and the source categories behind them, counts, provenance, licence."""
    return _read(name)[0]


def real_families() -> dict[str, list[str]]:
    """Family name -> its real task names, both sorted; a family of one is a held-apart task."""
    out: dict[str, list[str]] = {}
    for name in list_real_tasks():
        out.setdefault(real_task_info(name)["family"], []).append(name)
    return dict(sorted(out.items()))


def list_real_tasks(family: str | None = None) -> list[str]:
    """Real task names, sorted; only those of ``family`` when given."""
    names = sorted(p.name.removesuffix(".jsonl.gz") for p in DATA_DIR.glob("*.jsonl.gz"))
    if family is None:
        return names
    if family not in real_families():
        raise ConfigError(f"unknown real task family {family!r}; available families: {', '.join(real_families())}")
    return real_families()[family]


def load_real_task(name: str, n_train: int | None = None, n_dev: int | None = None, n_test: int | None = None,
                   seed: int = 0) -> Task:
    """A balanced sample of each split of a real task; ``seed`` picks which examples, never which split.

    A size left as None takes the most balanced examples the split holds (real tasks differ in size:
    see ``real_task_info(name)["counts"]``). The same arguments give the same data on any machine (the
    sample is seeded from crc32 of name and seed). Asking for more than a split holds raises
    `ConfigError` with the most it can give.
    """
    header, pools = _read(name)
    k = len(header["label_names"])
    rng = random.Random(zlib.crc32(f"{name}:{seed}".encode()))
    splits = []
    for split, n, least in (("train", n_train, k), ("dev", n_dev, 0), ("test", n_test, 0)):
        most = k * min(map(len, pools[split]))
        n = most if n is None else n
        if not isinstance(n, int) or isinstance(n, bool) or n < least:
            raise ConfigError(f"n_{split} must be None or an integer >= {least} for real task {name!r}, got {n!r}")
        if n > most:
            raise ConfigError(f"real task {name!r} holds {most} balanced {split} examples but n_{split}={n} "
                              f"were asked for; ask for {most} or fewer")
        part = [ex for label, pool in enumerate(pools[split]) for ex in rng.sample(pool, n // k + (label < n % k))]
        rng.shuffle(part)
        splits.append(tuple(part))
    return Task(name, header["family"], tuple(header["label_names"]), *splits)
