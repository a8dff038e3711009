"""Many task LoRAs in one batch: inference and training against the base, PEFT and the FLOP limit.

    OMP_NUM_THREADS=2 python -m benchmarks.grouped            # batches 64x64 and 8x512, 1/16/64/256 LoRAs
    OMP_NUM_THREADS=2 python -m benchmarks.grouped --quick    # 32x64 only, 1/16/64 LoRAs, 3 repeats

MiniLM geometry (BERT, hidden 384, 6 layers, FFN 1536), random weights, eval. Every LoRA has r = 8 on
every linear layer of the encoder (query, key, value, attention output, FFN up and down), random B.

1. Inference, one forward of a batch whose examples cycle through N distinct LoRAs:
   - base: the bare model;
   - hard Poly: `Poly.from_modules(loras)` (the LoRAs stacked once; a one-task batch runs as a plain LoRA,
     a mixed one gathers each example's A, B into one fused bmm per site);
   - adapter_names: N plain module sets (`model.add`), `model(..., adapter_names=...)` (stacked per call);
   - PEFT `adapter_names` on the same weights (outputs checked equal);
   - FLOP limit: 1 + LoRA FLOPs / base FLOPs (matmuls only), what a perfect kernel would cost.
   Memory: the forward's peak of tensor memory above what was allocated before it (torch.profiler memory
   events), and the LoRA weights the contender holds.
2. Kernels (`--only kernels`), one site (384 → 1536, r = 8), mixed batch of N tasks: the gathered fused bmm
   (what pelthub runs) against sorting the examples by task and one matmul per group present (a Python
   loop over groups, the segment-grouped form of S-LoRA / Punica), and against the one-task path.
3. Training step (forward, backward, AdamW) on one batch: one LoRA; N task LoRAs at once (`PerTask`,
   example i trains task i mod N, loss = sum of task means); N sequential PEFT runs (each steps on its
   own task's examples of the batch). Examples per second of each.
"""
from __future__ import annotations

import argparse
import copy
from typing import Any, Callable

import torch
from torch.nn import functional as F
from transformers import BertConfig, BertForSequenceClassification, BertModel

try:
    from . import common
except ImportError:  # run as a script
    import common  # type: ignore[no-redef]

import pelthub as ph
from pelthub.model import ModularModel
from pelthub.routing.tasks import PerTask, sum_of_task_means
from pelthub.sites import Sites

MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512)
RANK = 8
TARGETS = ("q", "k", "v", "o", "up", "down")
PEFT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
LORA = ph.LoRA(r=RANK, alpha=16.0, targets=TARGETS)


def random_loras(base: torch.nn.Module, n: int) -> list[Any]:
    sites, loras = Sites(base), []
    for _ in range(n):
        lora = LORA.build(base, sites)
        with torch.no_grad():
            for layer in lora.layers.values():
                layer.lora_b.normal_(0.0, 0.02)
        loras.append(lora)
    return loras


def plain_sets(base: torch.nn.Module, loras: list[Any]) -> ModularModel:
    model = ModularModel(base)
    for i, lora in enumerate(loras):
        model.add(f"t{i}", [LORA], init=False)
        model.adapters[f"t{i}"]["lora"].load_state_dict(lora.state_dict())
    return model.eval()


def peft_mixed(base: torch.nn.Module, loras: list[Any]) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=RANK, lora_alpha=16, target_modules=PEFT_TARGETS)
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


def flop_limit(base: torch.nn.Module, length: int) -> float:
    """1 + (LoRA matmul FLOPs) / (base matmul FLOPs) per token, attention scores included."""
    sites = Sites(base)
    linear = sum(m.in_features * m.out_features for n, m in sites.names.items()
                 if isinstance(m, torch.nn.Linear) and ".encoder." in f".{n}")
    g = sites.geometry
    attention = g.layers * 2 * length * g.hidden
    lora = sum(RANK * (m.in_features + m.out_features) for found in sites.resolve(TARGETS, linear=True).values()
               for m in (sites.names[n] for n in found))
    return 1.0 + lora / (linear + attention)


def peak_mb(fn: Callable[[], Any]) -> float:
    """Peak MB of tensor memory the call holds above what was allocated before it (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def module_mb(model: torch.nn.Module) -> float:
    """MB of the LoRA weights a contender holds (pelthub module tensors; PEFT's lora_ parameters)."""
    named = model.module_parameters() if isinstance(model, ModularModel) else model.named_parameters()
    return sum(p.numel() * p.element_size() for n, p in named if isinstance(model, ModularModel) or "lora_" in n) / 2**20


def inference(batch: int, length: int, counts: list[int], repeats: int, clock: str) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    base = BertModel(BertConfig(**MINILM)).eval()
    ids = torch.randint(1000, 30000, (batch, length))
    mask = torch.ones_like(ids)
    fns: dict[str, Callable[[], Any]] = {"base": lambda: base(input_ids=ids, attention_mask=mask)}
    notes, weights = {}, {"base": 0.0}
    for n in counts:
        loras = random_loras(base, n)
        tasks = [f"t{i}" for i in range(n)]
        names = [tasks[i % n] for i in range(batch)]
        routed = ph.compose(copy.deepcopy(base), ph.Poly.from_modules(loras, tasks=tasks)).eval()
        sets = plain_sets(copy.deepcopy(base), loras)
        peft = peft_mixed(copy.deepcopy(base), loras)
        task_ids = torch.arange(batch) % n
        fns[f"hard-{n}"] = lambda m=routed, t=task_ids: m(input_ids=ids, attention_mask=mask, task_ids=t)
        fns[f"sets-{n}"] = lambda m=sets, t=names: m(input_ids=ids, attention_mask=mask, adapter_names=t)
        fns[f"peft-{n}"] = lambda m=peft, t=names: m(input_ids=ids, attention_mask=mask, adapter_names=t)
        weights.update({f"hard-{n}": module_mb(routed), f"sets-{n}": module_mb(sets), f"peft-{n}": module_mb(peft)})
        with torch.inference_mode():
            ref = fns[f"peft-{n}"]().last_hidden_state
            notes[n] = max(float((fns[f"{w}-{n}"]().last_hidden_state - ref).abs().max()) for w in ("hard", "sets"))
    with torch.inference_mode():
        peaks = {name: peak_mb(fn) for name, fn in fns.items()}
        ms = common.summary(common.interleaved(fns, repeats, 1, clock))
    b = ms["base"]["median"]
    limit = flop_limit(base, length)
    rows = [{"case": f"base forward {batch}x{length}", **ms["base"], "ratio": 1.0, "peak": peaks["base"],
             "weights": 0.0}]
    labels = {"hard": "pelthub hard Poly", "sets": "pelthub adapter_names (plain sets)", "peft": "PEFT adapter_names"}
    for n in counts:
        for who, label in labels.items():
            t = ms[f"{who}-{n}"]
            rows.append({"case": f"{label}, {n} LoRAs", **t, "ratio": t["median"] / b, "peak": peaks[f"{who}-{n}"],
                         "weights": weights[f"{who}-{n}"],
                         "note": f"max diff to PEFT {notes[n]:.1e}" if who == "peft" else ""})
    rows.append({"case": "FLOP limit (matmuls)", "ratio": limit})
    return rows


def kernels(shapes: list[tuple[int, int]], tasks: int, repeats: int, clock: str) -> list[dict[str, Any]]:
    from pelthub.modules.grouped import RoutePlan, lora_into
    d, out_d = MINILM["hidden_size"], MINILM["intermediate_size"]
    a, b = torch.randn(tasks, RANK, d) / 20, torch.randn(tasks, out_d, RANK) / 20  # nn.Linear weight layout
    w = torch.randn(out_d, d) / 20
    rows = []
    for batch, length in shapes:
        x = torch.randn(batch, length, d)
        ids = torch.arange(batch) % tasks

        def grouped() -> torch.Tensor:
            out = F.linear(x, w)
            order = torch.argsort(ids, stable=True)
            counts = torch.bincount(ids, minlength=tasks).tolist()
            xs, res = x[order], torch.empty_like(out)
            start = 0
            for t, c in enumerate(counts):  # one matmul per group present
                if c:
                    seg = xs[start:start + c].reshape(-1, d)
                    res[order[start:start + c]] = (seg @ a[t].T @ b[t].T).view(c, length, out_d)
                    start += c
            return out + res

        fns = {"base": lambda: F.linear(x, w),
               "single": lambda: lora_into(F.linear(x, w), x, RoutePlan(ids, 0), lambda t: (a[t], b[t], 1.0)),
               "gathered": lambda: lora_into(F.linear(x, w), x, RoutePlan(ids, None), lambda t: (a, b, 1.0)),
               "grouped": grouped}
        with torch.inference_mode():
            torch.testing.assert_close(fns["gathered"](), grouped(), rtol=1e-4, atol=1e-4)
            ms = common.summary(common.interleaved(fns, repeats * 5, 2, clock))
        for name in ("single", "gathered", "grouped"):
            rows.append({"case": f"{name}, {batch}x{length}, {tasks} tasks", **ms[name],
                         "ratio": ms[name]["median"] / ms["base"]["median"]})
    return rows


def training(batch: int, length: int, tasks: int, repeats: int, clock: str) -> list[dict[str, Any]]:
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # AdamW's second moments of the zero-started B underflow: slow sqrt on CPU
    base = BertForSequenceClassification(BertConfig(**MINILM, num_labels=2)).eval()  # no dropout: same math
    inputs = common.make_batch(batch, length)
    labels = inputs.pop("labels")
    task_ids = torch.arange(batch) % tasks

    one = ph.attach(copy.deepcopy(base), LORA)
    one_opt = torch.optim.AdamW([p for p in one.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    many = ph.compose(copy.deepcopy(base), PerTask(LORA, tasks=tasks))
    many_opt = torch.optim.AdamW([p for p in many.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=RANK, lora_alpha=16, target_modules=PEFT_TARGETS),
                          adapter_name="t0")
    for t in range(1, tasks):
        peft.add_adapter(f"t{t}", LoraConfig(r=RANK, lora_alpha=16, target_modules=PEFT_TARGETS))
    peft_opts = [torch.optim.AdamW([p for n, p in peft.named_parameters() if f".t{t}." in n], lr=1e-4, foreach=True)
                 for t in range(tasks)]
    rows_of = [task_ids == t for t in range(tasks)]

    def step_one() -> None:
        F.cross_entropy(one(**inputs).logits, labels).backward()
        one_opt.step()
        one_opt.zero_grad(set_to_none=True)

    def step_many() -> None:
        losses = F.cross_entropy(many(**inputs, task_ids=task_ids).logits, labels, reduction="none")
        sum_of_task_means(losses, task_ids).backward()
        many_opt.step()
        many_opt.zero_grad(set_to_none=True)

    def step_peft_runs() -> None:
        for t, (rows, opt) in enumerate(zip(rows_of, peft_opts)):  # N separate runs, one after another
            peft.set_adapter(f"t{t}")
            part = {k: v[rows] for k, v in inputs.items()}
            F.cross_entropy(peft(**part).logits, labels[rows]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    fns = {"one": step_one, "many": step_many, "peft": step_peft_runs}
    ms = common.summary(common.interleaved(fns, repeats, 1, clock))
    rate = {k: batch / (v["median"] / 1000) for k, v in ms.items()}
    return [
        {"case": f"one LoRA, batch {batch}x{length}", **ms["one"], "rate": rate["one"], "ratio": 1.0},
        {"case": f"{tasks} task LoRAs at once (PerTask)", **ms["many"], "rate": rate["many"],
         "ratio": rate["many"] / rate["one"]},
        {"case": f"{tasks} sequential PEFT runs", **ms["peft"], "rate": rate["peft"], "ratio": rate["peft"] / rate["one"]},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 32x64 only, 1/16/64 LoRAs, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--clock", choices=tuple(common.CLOCKS), default="wall")
    parser.add_argument("--threads", type=int, default=common.THREADS)
    parser.add_argument("--only", choices=("inference", "kernels", "training"), default=None)
    args = parser.parse_args()
    common.setup(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    shapes = [(32, 64)] if args.quick else [(64, 64), (8, 512)]
    counts = [1, 16, 64] if args.quick else [1, 16, 64, 256]
    print(f"# Many task LoRAs in one batch: MiniLM geometry, all-linear r = {RANK}, {args.threads} threads, "
          f"median of {repeats}, {args.clock} clock; {common.load_average()}\n", flush=True)
    if args.only in (None, "inference"):
        for batch, length in shapes:
            print(f"## Inference, batch {batch} x {length}\n", flush=True)
            rows = inference(batch, length, counts, repeats, args.clock)
            common.print_table(rows, [("case", "case"), ("median", "median ms"), ("min", "min ms"),
                                      ("ratio", "x base"), ("peak", "forward peak MB"),
                                      ("weights", "module MB"), ("note", "check")], {"ratio": 3})
            print(flush=True)
    if args.only in (None, "kernels"):
        print("## One site, 384 -> 1536, gathered vs grouped by task\n", flush=True)
        rows = kernels([(64, 64), (256, 1)], 16, repeats, args.clock)
        common.print_table(rows, [("case", "case"), ("median", "median ms"), ("min", "min ms"),
                                  ("ratio", "x the base linear")], {"ratio": 3})
        print(flush=True)
    if args.only in (None, "training"):
        batch, length, tasks = (16, 64, 16) if args.quick else (32, 64, 16)
        print(f"## Training step (forward, backward, AdamW), {tasks} tasks\n", flush=True)
        rows = training(batch, length, tasks, repeats, args.clock)
        common.print_table(rows, [("case", "case"), ("median", "median ms"), ("rate", "examples/s"),
                                  ("ratio", "x one LoRA's examples/s")])


if __name__ == "__main__":
    main()
