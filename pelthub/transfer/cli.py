"""`pelthub rank`: rank the registry's soft prompts for a new task's data.

    pelthub rank --base MODEL --target DATA [--split S] [--column ROLE=NAME] [--metric zero_shot] [--top 5] [--json]

DATA is a .jsonl or .csv file (fields text, label, optional text_pair) or a folder written by
`Dataset.save_to_disk` / `DatasetDict.save_to_disk` (with --split; columns found by name or set
with --column text=... --column label=...). Anything else is refused before it is read: devices
such as /dev/zero, FIFOs, other folders, and inputs over `MAX_DATA_BYTES` (256 MiB).

Wiring: `pelthub.cli` registers `Command(help, add_arguments, run)`; its common
options supply `args.registry` (registry directory) and `args.json`. The base
model is loaded with `AutoModelForSequenceClassification` and as many labels
as the data has; candidates are the registry's prompt modules for that base
(or the `--source` refs). Progress bars go to stderr, so `--json` output on
stdout stays parseable.
"""
from __future__ import annotations

import argparse
import json

from ..errors import ConfigError, DataError
from ..tasks import load_examples
from ..tasks.hf import ROLES
from .rank import METRICS, rank_sources


def _layers(text: str | None) -> slice | list[int] | None:
    """"3:6" → slice(3, 6); "4,5" → [4, 5]; "-2:" → the last two layers."""
    if text is None:
        return None
    try:
        if ":" in text:
            start, _, stop = text.partition(":")
            return slice(int(start) if start else None, int(stop) if stop else None)
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--layers {text!r}: give START:STOP (e.g. 3:6 or -2:) or a comma list (e.g. 4,5)") from None


def _columns(pairs: list[str]) -> dict[str, str | None] | None:
    """["text=sentence", "text_pair="] → {"text": "sentence", "text_pair": None}; None when none given."""
    out: dict[str, str | None] = {}
    for pair in pairs:
        role, eq, name = pair.partition("=")
        if not eq or role not in ROLES:
            raise DataError(f"--column {pair!r}: give ROLE=NAME with ROLE one of {', '.join(ROLES)} "
                            "(an empty NAME: no text_pair)")
        out[role] = name or None
    return out or None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="base model: a local path or a Hugging Face Hub id")
    p.add_argument("--target", required=True, metavar="DATA",
                   help="labelled examples of the new task: a .jsonl or .csv file (fields text, label, optional "
                        "text_pair) or a folder written by Dataset.save_to_disk")
    p.add_argument("--split", default=None, help="the split to read from a saved DatasetDict folder")
    p.add_argument("--column", action="append", default=[], metavar="ROLE=NAME",
                   help="which column of a saved dataset is the text, text_pair or label (repeat); default: "
                        "found by the usual names")
    p.add_argument("--metric", default="zero_shot", choices=METRICS + ("source_accuracy",),
                   help="transferability metric (default: zero_shot, the one above random order in both the real-text "
                        "and the synthetic study; adjusted_leep reads each source's own head and tunes nothing; "
                        "source_accuracy reads the accuracy on each registry card)")
    p.add_argument("--top", type=int, default=None, metavar="K", help="show only the K best")
    p.add_argument("--source", action="append", default=[], metavar="REF",
                   help="rank only these registry refs (repeat); default: every prompt module for the base")
    p.add_argument("--steps", type=int, default=50, help="prompt-tuning steps for the target's task prompt "
                                                         "(not for the leeps or source_accuracy)")
    p.add_argument("--lr", type=float, default=0.03, help="learning rate of the target's task prompt")
    p.add_argument("--layers", help="ON / activation_cosine layer window: START:STOP or a comma list")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..registry import Registry
    data = load_examples(args.target, args.split, _columns(args.column))
    if not data:
        raise DataError(f"{args.target} holds no examples")
    if args.top is not None and args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    labels = max(len(data.label_names or ()), max(e.label for e in data) + 1)
    base = AutoModelForSequenceClassification.from_pretrained(args.base, num_labels=labels)
    reg = Registry(getattr(args, "registry", None))
    refs = args.source or [c.ref for c in reg.search(kind="prompt", base_model=base)]
    if not refs:
        print("no prompt modules for this base in the registry; add some with Registry.add or `pelthub pull`")
        return 1
    ranking = rank_sources(base, data, refs, args.metric, tokenizer=tokenizer, target_steps=args.steps, lr=args.lr,
                           layers=_layers(args.layers), registry=reg, seed=args.seed, progress=True)
    ranking.rows = ranking.rows[:args.top]
    if getattr(args, "json", False):
        print(json.dumps(ranking.to_dict(), indent=2))
    else:
        print(ranking.table())
    return 0 if ranking.rows else 1
