"""The real-text task suite at a glance: the README's table, and how hard and how related the tasks are.

    .venv/bin/python -m benchmarks.real_tasks

Prints (1) every real task with its family, source, labels, balanced split sizes and test accuracy
of a word-count naive Bayes trained on its train split (a floor any tuned model should beat; chance
is 1/labels), and (2) within each family, naive Bayes trained on one member and tested on another:
above chance only where the shared label names mean the same thing in both sources' words. Seconds
on one core; no model is loaded.
"""
from __future__ import annotations

import math
import re
from collections import Counter

from pelthub.tasks import Example
from pelthub.tasks.real import list_real_tasks, load_real_task, real_families, real_task_info

SOURCE = {"wordnet": "WordNet 3.0 glosses by lexicographer file",
          "debian": "Debian package descriptions by Section / debtags",
          "code": "Python functions with docstrings by module family"}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


class NaiveBayes:
    """Multinomial naive Bayes over lower-cased words, add-one smoothing: the simplest bag-of-words floor."""

    def __init__(self, train: tuple[Example, ...], k: int) -> None:
        self.counts = [Counter() for _ in range(k)]
        for ex in train:
            self.counts[ex.label].update(_words(ex.text))
        self.vocab = set().union(*self.counts)
        self.totals = [sum(c.values()) for c in self.counts]

    def accuracy(self, rows: tuple[Example, ...]) -> float:
        def score(label: int, words: list[str]) -> float:
            return sum(math.log((self.counts[label][w] + 1) / (self.totals[label] + len(self.vocab)))
                       for w in words if w in self.vocab)
        right = sum(max(range(len(self.counts)), key=lambda lab: score(lab, _words(ex.text))) == ex.label
                    for ex in rows)
        return right / len(rows)


def main() -> None:
    print("| task | family | source | labels | train / dev / test | naive Bayes test acc. |")
    print("| --- | --- | --- | --- | --- | --- |")
    families = real_families()
    for name in list_real_tasks():
        info, task = real_task_info(name), load_real_task(name)
        family = info["family"] if len(families[info["family"]]) > 1 else "held apart"
        labels = ", ".join(f"{n} ({' + '.join(info['label_sources'][n])})" for n in info["label_names"])
        acc = NaiveBayes(task.train, task.num_labels).accuracy(task.test)
        print(f"| {name} | {family} | {SOURCE[info['source']]} | {labels} | "
              f"{len(task.train)} / {len(task.dev)} / {len(task.test)} | {acc:.3f} (chance {1 / task.num_labels:.2f}) |")
    print("\nNaive Bayes trained on one family member (row), tested on another (column):")
    for family, members in families.items():
        if len(members) < 2:
            continue
        tasks = {name: load_real_task(name) for name in members}
        print(f"\n{family} | " + " | ".join(members))
        for src in members:
            model = NaiveBayes(tasks[src].train, tasks[src].num_labels)
            print(f"{src} | " + " | ".join(f"{model.accuracy(tasks[tgt].test):.3f}" for tgt in members))


if __name__ == "__main__":
    main()
