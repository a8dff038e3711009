"""ATTEMPT: solve a new task with an input-dependent attention mixture of trained source prompts.

    python examples/attempt_mix.py           # the real MiniLM, offline (~4.5 min: 271 s on 2 shared cores, load 12)
    python examples/attempt_mix.py --tiny    # a tiny random BERT built from a config (seconds; for tests)

Two source prompts are trained by plain prompt tuning (movie reviews, news topics); then
`AttentionMix` keeps them frozen and trains only a target prompt and a small attention
module on a few hotel reviews. `last_attention()` shows, per example, how much each
source (and the target prompt itself) contributed.
"""
from __future__ import annotations

import argparse
import os

from _setup import load  # sets offline mode and the import path, so it comes first

import torch  # noqa: E402

import pelthub as ph  # noqa: E402
from pelthub.tasks import load_task  # noqa: E402
from pelthub.training import accuracy, encode, fit  # noqa: E402

SOURCES = ["sentiment_movies", "topic_news"]
TARGET = "sentiment_hotels"
LENGTH = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("PELTHUB_EXAMPLE_TINY") == "1",
                        help="tiny random model and a few steps (also PELTHUB_EXAMPLE_TINY=1)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per prompt (default 60, tiny 4)")
    args = parser.parse_args()
    steps = args.steps or (4 if args.tiny else 60)
    tokenizer, base = load(args.tiny)

    # 1. Source prompts: plain prompt tuning, one per source task (a registry would keep them for reuse).
    sources = {}
    for name in SOURCES:
        task = load_task(name, n_train=256, n_test=128)
        model = ph.attach(base(task.num_labels), ph.Prompt(length=LENGTH), head=True)
        fit(model, task.train, tokenizer, steps=steps, batch_size=16, lr=0.05, progress=name)
        sources[name] = model
        print(f"source {name:<18} accuracy {accuracy(model, task.test, tokenizer):.3f}")

    # 2. ATTEMPT on the target: the sources stay frozen; a target prompt and the attention module train.
    target = load_task(TARGET, n_train=32, n_test=128)
    mix = ph.AttentionMix(sources, target=ph.Prompt(length=LENGTH))
    model = ph.compose(base(target.num_labels), mix, head=True)
    print(f"ATTEMPT over {list(sources)}: {model.trainable_parameters()}")
    fit(model, target.train, tokenizer, steps=steps, batch_size=16, lr=0.05, progress="ATTEMPT")
    print(f"target {TARGET} (32 examples): accuracy {accuracy(model, target.test, tokenizer):.3f}")

    # 3. The attention weights of the last forward: one row per example, one column per candidate.
    module = model.adapters["composed"]["attention_mix"]
    inputs = encode(tokenizer, target.test[:4])
    inputs.pop("labels")
    with torch.no_grad():
        model(**inputs)
    print(f"{'attention':<30}" + "".join(f"{c:>18}" for c in module.candidates))
    for example, row in zip(target.test[:4], module.last_attention()):
        print(f"{example.text[:28]:<30}" + "".join(f"{a:>18.3f}" for a in row.tolist()))


if __name__ == "__main__":
    main()
