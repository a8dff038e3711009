"""Poly benchmark: mixed-task inference over many task LoRAs, and Poly / MHR training steps.

    python -m benchmarks.poly            # MiniLM geometry, batch 64 x 64 (inference), 32 x 64 (training)
    python -m benchmarks.poly --quick    # smaller batches and fewer repeats
    python -m benchmarks.poly --adapt [--quick]   # accuracy: multi-task pre-training, then few-shot
                                                  # add_task vs LoRA (benchmarks/poly_adapt.py)

MiniLM geometry (BERT, hidden 384, 6 layers, 12 heads, FFN 1536) with random weights; 2 threads.

1. Inference, one forward of a batch whose examples belong to N distinct tasks, each task with
   its own LoRA (r = 8 on query and value): the base forward alone; pelthub hard routing
   (`Poly.from_modules(loras)`: every example gathers its task's A and B, two bmm per site);
   PEFT's mixed-batch LoRA (`adapter_names=`). The same LoRA weights in both, outputs checked equal.
2. Training step (forward, backward, AdamW) over 8 tasks, K = 8 skills, r = 8 on query and value:
   pelthub Poly (h = 1) and MHR (h = 8) against PEFT's Poly with the same config, and a single
   pelthub LoRA of the same rank.
"""
from __future__ import annotations

import argparse
import copy
from typing import Any, Callable

import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

try:
    from . import common
except ImportError:  # run as a script
    import common  # type: ignore[no-redef]

import pelthub as ph
from pelthub.sites import Sites
from pelthub.training import param_groups

MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512)
RANK = 8


def random_loras(base: torch.nn.Module, n: int) -> list[Any]:
    """n LoRA modules (r = 8, q and v) with random A and B."""
    sites, loras = Sites(base), []
    for _ in range(n):
        lora = ph.LoRA(r=RANK, alpha=16.0).build(base, sites)
        with torch.no_grad():
            for layer in lora.layers.values():
                layer.lora_b.normal_(0.0, 0.02)
        loras.append(lora)
    return loras


def peft_mixed(base: torch.nn.Module, loras: list[Any]) -> torch.nn.Module:
    """PEFT LoraModel holding the same LoRAs as adapters t0 … t{n-1}."""
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=RANK, lora_alpha=16, target_modules=["query", "value"])
    model = get_peft_model(base, cfg, adapter_name="t0")
    for i in range(1, len(loras)):
        model.add_adapter(f"t{i}", cfg)
    with torch.no_grad():
        for i, lora in enumerate(loras):
            for key, layer in lora.layers.items():
                target = model.base_model.model.get_submodule(key.replace("-", "."))
                target.lora_A[f"t{i}"].weight.copy_(layer.lora_a)
                target.lora_B[f"t{i}"].weight.copy_(layer.lora_b)
    return model.eval()


def inference(batch: int, length: int, counts: list[int], repeats: int, clock: str) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    base = BertModel(BertConfig(**MINILM)).eval()
    ids = torch.randint(1000, 30000, (batch, length))
    mask = torch.ones_like(ids)
    fns: dict[str, Callable[[], Any]] = {"base": lambda: base(input_ids=ids, attention_mask=mask)}
    checks = {}
    for n in counts:
        loras = random_loras(base, n)
        tasks = [f"t{i}" for i in range(n)]
        routed = ph.compose(copy.deepcopy(base), ph.Poly.from_modules(loras, tasks=tasks)).eval()
        peft = peft_mixed(copy.deepcopy(base), loras)
        names = [tasks[i % n] for i in range(batch)]
        fns[f"pelthub-{n}"] = lambda m=routed, t=names: m(input_ids=ids, attention_mask=mask, task_ids=t)
        fns[f"peft-{n}"] = lambda m=peft, t=names: m(input_ids=ids, attention_mask=mask, adapter_names=t)
        with torch.inference_mode():
            checks[n] = (fns[f"pelthub-{n}"]().last_hidden_state - fns[f"peft-{n}"]().last_hidden_state).abs().max()
    with torch.inference_mode():
        ms = common.summary(common.interleaved(fns, repeats, 2, clock))
    rows = [{"case": f"base forward {batch}x{length}", **ms["base"], "ratio": 1.0}]
    for n in counts:
        for who in ("pelthub", "peft"):
            label = "pelthub hard routing" if who == "pelthub" else "PEFT adapter_names"
            t = ms[f"{who}-{n}"]
            rows.append({"case": f"{label}, {n} task LoRAs", **t, "ratio": t["median"] / ms["base"]["median"],
                         "note": f"max |pelthub - PEFT| = {checks[n]:.1e}" if who == "peft" else ""})
    return rows


def training(batch: int, length: int, repeats: int, clock: str) -> list[dict[str, Any]]:
    from peft import PolyConfig, get_peft_model
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(**MINILM, num_labels=2))
    tasks, skills = 8, 8
    ids = torch.randint(1000, 30000, (batch, length))
    mask, labels = torch.ones_like(ids), torch.randint(0, 2, (batch,))
    task_ids = torch.arange(batch) % tasks

    def step_fn(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **kw: Any) -> Callable[[], None]:
        def step() -> None:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, **kw).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    fns = {}
    for name, heads in (("Poly", 1), ("MHR", 8)):
        ours = ph.compose(copy.deepcopy(base), ph.Poly(tasks=tasks, skills=skills, rank=RANK, heads=heads)).train()
        fns[f"pelthub {name}"] = step_fn(ours, torch.optim.AdamW(param_groups(ours, 1e-3)), task_ids=task_ids)
        peft = get_peft_model(copy.deepcopy(base), PolyConfig(r=RANK, target_modules=["query", "value"],
                                                              n_tasks=tasks, n_skills=skills, n_splits=heads))
        peft.train()
        params = [p for p in peft.parameters() if p.requires_grad]
        # PolyModel.forward passes task_ids to the Poly layers
        fns[f"PEFT {name}"] = step_fn(peft.base_model, torch.optim.AdamW(params, lr=1e-3), task_ids=task_ids)
    lora = ph.attach(copy.deepcopy(base), ph.LoRA(r=RANK, targets=("q", "v"))).train()
    fns["pelthub LoRA"] = step_fn(lora, torch.optim.AdamW(param_groups(lora, 1e-3)))
    ms = common.summary(common.interleaved(fns, repeats, 2, clock))
    lora = ms["pelthub LoRA"]["median"]
    rows = []
    for name in ("Poly", "MHR"):
        ours, theirs = ms[f"pelthub {name}"], ms[f"PEFT {name}"]
        rows.append({"case": f"pelthub {name} step", **ours, "ratio": ours["median"] / theirs["median"],
                     "ratio2": ours["median"] / lora})
        rows.append({"case": f"PEFT {name} step", **theirs, "ratio": 1.0, "ratio2": theirs["median"] / lora})
    rows.append({"case": f"single LoRA r={RANK} step", **ms["pelthub LoRA"], "ratio2": 1.0})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 16 x 32, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--clock", choices=tuple(common.CLOCKS), default="wall",
                        help="cpu: process CPU time, steadier when other processes share the cores")
    parser.add_argument("--threads", type=int, default=common.THREADS)
    parser.add_argument("--only", choices=("inference", "training"), default=None)
    parser.add_argument("--adapt", action="store_true",
                        help="run the papers' protocol on the real MiniLM instead of the timings (poly_adapt.py)")
    args = parser.parse_args()
    if args.adapt:
        from benchmarks.poly_adapt import main as adapt
        adapt([*(["--quick"] if args.quick else []), "--threads", str(args.threads)])
        return
    common.setup(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    inf_batch, train_batch, length = (16, 8, 32) if args.quick else (64, 32, 64)
    columns = [("case", "case"), ("median", "median ms"), ("min", "min ms")]
    print(f"# Poly benchmark: MiniLM geometry, {args.threads} threads, median of {repeats}, {args.clock} clock; "
          f"{common.load_average()}\n", flush=True)
    if args.only in (None, "inference"):
        print(f"## Mixed-task inference, batch {inf_batch} x {length}, r = {RANK} on q, v\n", flush=True)
        rows = inference(inf_batch, length, [16, 64], repeats, args.clock)
        common.print_table(rows, [*columns, ("ratio", "x base"), ("note", "check")])
    if args.only in (None, "training"):
        print(f"\n## Training step (forward + backward + AdamW), batch {train_batch} x {length}, 8 tasks, "
              f"K = 8, r = {RANK} on q, v\n", flush=True)
        rows = training(train_batch, length, repeats, args.clock)
        common.print_table(rows, [*columns, ("ratio", "x PEFT same config"), ("ratio2", "x single LoRA")])


if __name__ == "__main__":
    main()
