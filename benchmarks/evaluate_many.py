"""Evaluate 16 LoRAs on one generative dataset: pelthub's one mixed pass against PEFT looping `set_adapter`.

    OMP_NUM_THREADS=2 PYTHONPATH=. .venv/bin/python -m benchmarks.evaluate_many            # 16 LoRAs
    OMP_NUM_THREADS=2 PYTHONPATH=. .venv/bin/python -m benchmarks.evaluate_many --quick    # 4 LoRAs, fewer examples

A small GPT-2 (4 layers, hidden 128, a 512-word vocabulary with a word-level tokenizer), random
weights, eval; N LoRAs (r = 8 on c_attn, c_proj, c_fc, random B) made in PEFT, saved, and read
into one pelthub model with `from_peft`, so both hold the same weights. Data: multiple-choice
examples (4 choices) with a target; three metrics, each timed on its own:

- loss: mean target-token negative log-likelihood (one forward per batch);
- rank: rank classification over the choices (one forward per batch of (example, choice) rows);
- exact match: greedy generation, a few new tokens.

Contenders, each through `pelthub.generative.evaluate` (the same encoding and arithmetic):
- PEFT loop: `peft_model.set_adapter(name)` then one evaluation, for each of the N adapters;
- pelthub loop: `model.set_adapter(name)` then one evaluation, for each set (the same loop in pelthub);
- pelthub one pass: `evaluate(..., adapters=names)`: each batch repeated once per set in one mixed
  forward / generate call.
Times are CPU seconds of this process (less sensitive than wall time to other processes on the
machine), the median of `--repeats` interleaved rounds (1 by default, so the run stays near 2 minutes
on 2 cores); "max diff" is the largest difference of any metric of any adapter to the PEFT loop's.
"""
from __future__ import annotations

import argparse
import copy
import random
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

try:
    from . import common
except ImportError:  # run as a script
    import common  # type: ignore[no-redef]

from pelthub.generative import evaluate
from pelthub.hub import from_peft
from pelthub.model import ModularModel
from pelthub.tasks.generative import GenerativeExample

VOCAB = 512
METRICS = {"loss": "loss", "rank": "rank", "exact match": "exact_match"}


def tokenizer() -> PreTrainedTokenizerFast:
    words = ["<pad>", "</s>", "<unk>", *(f"w{i}" for i in range(VOCAB - 3))]
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def data(n: int, seed: int = 0) -> list[GenerativeExample]:
    """Inputs of 8-16 words, 4 choices of 1-3 words, the first choice the target after a shuffle."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(VOCAB - 3)}" for _ in range(k))
    out = []
    for _ in range(n):
        choices = [words(rng.randint(1, 3)) for _ in range(4)]
        target = choices[0]
        rng.shuffle(choices)
        out.append(GenerativeExample(words(rng.randint(8, 16)), target, tuple(choices)))
    return out


def models_with(n: int, folder: Path) -> tuple[torch.nn.Module, ModularModel, list[str]]:
    """The same N LoRAs in a PEFT model and in one pelthub model (saved by PEFT, read by `from_peft`)."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=128, n_layer=4, n_head=4, n_positions=128,
                                      bos_token_id=1, eos_token_id=1, pad_token_id=0)).eval()
    names = [f"t{i}" for i in range(n)]
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    peft = get_peft_model(copy.deepcopy(base), cfg, adapter_name=names[0])
    for name in names[1:]:
        peft.add_adapter(name, cfg)
    with torch.no_grad():
        for key, p in peft.named_parameters():
            if "lora_B" in key:
                p.normal_(0.0, 0.05)
    peft.save_pretrained(folder, selected_adapters=names)
    ours = ModularModel(base)
    for name in names:
        from_peft(folder / name, ours, name=name)
    return peft.eval(), ours.eval(), names


def loop(model: Any, names: list[str], run: Callable[[Any], dict]) -> dict[str, dict]:
    out = {}
    for name in names:
        model.set_adapter(name)
        out[name] = run(model)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--loras", type=int, default=16)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="examples per batch")
    parser.add_argument("--new-tokens", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.loras, args.examples = 4, 8
    common.setup()
    tok, examples = tokenizer(), data(args.examples)
    with tempfile.TemporaryDirectory() as tmp:
        peft, ours, names = models_with(args.loras, Path(tmp))
    print(f"{args.loras} LoRAs, {args.examples} examples, batch {args.batch}, {args.new_tokens} new tokens; "
          f"{common.load_average()}", flush=True)
    rows = []
    for label, metric in METRICS.items():
        def run(model: Any, m: str = metric) -> dict:
            return evaluate(model, examples, tok, [m], batch_size=args.batch, max_new_tokens=args.new_tokens)
        results: dict[str, dict] = {}
        fns = {"peft": lambda: results.__setitem__("peft", loop(peft, names, run)),
               "loop": lambda: results.__setitem__("loop", loop(ours, names, run)),
               "pass": lambda: results.__setitem__("pass", evaluate(ours, examples, tok, [metric], adapters=names,
                                                                    batch_size=args.batch,
                                                                    max_new_tokens=args.new_tokens))}
        ours.set_adapter(None)
        times = common.summary(common.interleaved(fns, args.repeats, 0, "cpu"))
        ours.set_adapter(None)
        want = results["peft"]
        for who, case in (("peft", "PEFT loop over set_adapter"), ("loop", "pelthub loop over set_adapter"),
                          ("pass", "pelthub one mixed pass")):
            diff = max(abs(results[who][n][metric] - want[n][metric]) for n in names)
            rows.append({"metric": label, "case": case, "s": times[who]["median"] / 1000,
                         "speedup": times["peft"]["median"] / times[who]["median"], "diff": f"{diff:.1e}",
                         "mean": sum(results[who][n][metric] for n in names) / len(names)})
    common.print_table(rows, [("metric", "metric"), ("case", "contender"), ("s", "CPU s"), ("speedup", "× PEFT"),
                              ("mean", "mean over LoRAs"), ("diff", "max diff to PEFT")],
                       digits={"s": 2, "speedup": 2, "mean": 4})


if __name__ == "__main__":
    main()
