"""Quickstart: train a soft prompt on a built-in task, keep it in the registry, load it back.

    python examples/quickstart.py           # the real MiniLM, offline (~3 min: 193 s on 2 shared cores, load 6-12)
    python examples/quickstart.py --tiny    # a tiny random BERT built from a config (seconds; for tests)

The registry lives in $PELTHUB_HOME when set, else in a temporary folder that is removed at the end.
"""
from __future__ import annotations

import argparse
import os
import tempfile

from _setup import load  # sets offline mode and the import path, so it comes first


import pelthub as ph  # noqa: E402
from pelthub.tasks import load_task  # noqa: E402
from pelthub.training import accuracy, fit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("PELTHUB_EXAMPLE_TINY") == "1",
                        help="tiny random model and a few steps (also PELTHUB_EXAMPLE_TINY=1)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 100, tiny 5)")
    args = parser.parse_args()
    steps = args.steps or (5 if args.tiny else 100)
    tokenizer, base = load(args.tiny)
    task = load_task("sentiment_movies", n_train=256, n_test=128)

    # 1. Attach a 10-token soft prompt (and a trainable copy of the classifier head), then train.
    model = ph.attach(base(task.num_labels), ph.Prompt(length=10), head=True)
    print(model.trainable_parameters())
    fit(model, task.train, tokenizer, steps=steps, batch_size=16, lr=0.05)
    acc = accuracy(model, task.test, tokenizer)
    print(f"{task.name}: accuracy {acc:.3f} after {steps} steps")

    with tempfile.TemporaryDirectory() as tmp:
        # 2. Keep it in the registry, with its task and metrics on the card.
        registry = ph.Registry(os.environ.get("PELTHUB_HOME") or tmp)
        ref = registry.add(model, name="movies-prompt", task=task.name, metrics={"accuracy": acc})
        print(f"registered {ref} in {registry.root}")
        for card in registry.search(kind="prompt", task=task.name):
            print(f"  found {card.ref}: {card.metrics}")

        # 3. Load it onto a fresh copy of the base model: same accuracy.
        loaded = registry.load(ref, base(task.num_labels))
        print(f"loaded {ref}: accuracy {accuracy(loaded, task.test, tokenizer):.3f}")


if __name__ == "__main__":
    main()
