"""Rank candidate source prompts for a new task, then start its prompt from the best one (SPoT).

    python examples/rank_sources.py           # the real MiniLM, offline (~8 min: 491 s on 2 shared cores, load 12-15)
    python examples/rank_sources.py --tiny    # a tiny random BERT built from a config (seconds; for tests)

Three source prompts are trained with their heads and kept in a registry. For the target
task (a few hotel reviews) `rank_sources` briefly tunes a target prompt and head on the
target examples, then scores every candidate by zero_shot (the default metric): the
likelihood of the target labels with the candidate's prompt in place of the target's;
the best candidate then initialises the target prompt (`init_from`) before training.
The registry lives in $PELTHUB_HOME when set, else in a temporary folder.
"""
from __future__ import annotations

import argparse
import os
import tempfile

from _setup import load  # sets offline mode and the import path, so it comes first


import pelthub as ph  # noqa: E402
from pelthub.tasks import load_task  # noqa: E402
from pelthub.training import accuracy, fit  # noqa: E402
from pelthub.transfer import init_from  # noqa: E402

SOURCES = ["sentiment_movies", "topic_news", "form_question"]
TARGET = "sentiment_hotels"
LENGTH = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("PELTHUB_EXAMPLE_TINY") == "1",
                        help="tiny random model and a few steps (also PELTHUB_EXAMPLE_TINY=1)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per prompt (default 40, tiny 3)")
    args = parser.parse_args()
    steps = args.steps or (3 if args.tiny else 40)
    tokenizer, base = load(args.tiny)

    with tempfile.TemporaryDirectory() as tmp:
        registry = ph.Registry(os.environ.get("PELTHUB_HOME") or tmp)

        # 1. Candidate source prompts, trained and registered (normally they are already in a registry).
        refs = []
        for name in SOURCES:
            task = load_task(name, n_train=256, n_test=0)
            model = ph.attach(base(task.num_labels), ph.Prompt(length=LENGTH), head=True)
            fit(model, task.train, tokenizer, steps=steps, batch_size=16, lr=0.05, progress=name)
            refs.append(registry.add(model, name=f"{name}-prompt", task=name))
        print(f"candidates in {registry.root}: {refs}")

        # 2. Rank them for the target, from 32 labelled examples.
        target = load_task(TARGET, n_train=32, n_test=128)
        ranking = ph.rank_sources(base(target.num_labels), target.train, refs, tokenizer=tokenizer, registry=registry)
        print(ranking.table())

        # 3. SPoT: start the target prompt from the best source, then train it on the target.
        model = init_from(ph.attach(base(target.num_labels), ph.Prompt(length=LENGTH), head=True), ranking.best)
        fit(model, target.train, tokenizer, steps=steps, batch_size=16, lr=0.05, progress=TARGET)
        print(f"{TARGET} from {ranking.names(1)[0]}: accuracy {accuracy(model, target.test, tokenizer):.3f}")


if __name__ == "__main__":
    main()
