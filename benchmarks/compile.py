"""torch.compile per module kind and routed method, MiniLM geometry: graphs per forward, graph breaks, speed.

    PYTHONPATH=. python -m benchmarks.compile                  # batch 16 x 64, 10 rounds, every case
    PYTHONPATH=. python -m benchmarks.compile --quick          # batch 4 x 32, 5 rounds
    PYTHONPATH=. python -m benchmarks.compile --only poly arrow --clock cpu

A randomly initialised BERT with MiniLM's sizes (hidden 384, 6 layers), 2 threads, no download;
plain kinds (LoRA, IA3, a soft prompt) and the routed methods (Poly, UniPELT, ATTEMPT, Arrow,
PerTask) over two tasks with a mixed batch. Per case, in one run:

- graphs: how many graphs dynamo compiles for one forward (counted by the backend, the public
  `torch.compile(backend=...)` API), and graph breaks (`torch._dynamo.explain`);
- recompiles: graphs compiled by the timed calls after the first (new task ids every call);
- inference: the `torch.no_grad` forward, eager and compiled (inductor), and compiled / eager;
- training: forward + backward of the loss (train mode: dropout, Poly's sampled routing), eager and
  compiled, and compiled / eager.

The compiled outputs (inference) are checked against eager (1e-4) before timing. Contenders alternate
round by round (benchmarks/common.py protocol); the tables give medians. "ratio" is compiled / eager:
below 1, compiling paid.
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch

import pelthub as ph
from benchmarks.common import interleaved, load_average, median, minilm_classifier, print_table, setup

D = 384  # MiniLM's width


def lora_sources() -> list[ph.ModularModel]:
    """Three LoRAs (r = 4 on q, v) off their init, for Arrow."""
    out = []
    for i in range(3):
        source = ph.attach(minilm_classifier(seed=i), ph.LoRA(r=4, targets=("q", "v")))
        perturb(source, seed=i)
        out.append(source)
    return out


CASES: dict[str, Callable[[], Any]] = {
    "lora": lambda: ph.LoRA(r=8),
    "ia3": lambda: ph.IA3(),
    "prompt": lambda: ph.Prompt(length=10),
    "poly": lambda: ph.Poly(tasks=("a", "b"), skills=4, rank=8),
    "unipelt": lambda: ph.UniPELT(lora=ph.LoRA(r=8), adapter=ph.Bottleneck(reduction=16)),
    "attempt": lambda: ph.AttentionMix({f"s{i}": torch.randn(10, D) for i in range(3)}, target=ph.Prompt(length=10),
                                       tasks=["a", "b"]),
    "arrow": lambda: ph.Arrow(lora_sources(), top_k=2),
    "per_task": lambda: ph.PerTask((ph.LoRA(r=8),), tasks=["a", "b"]),
}
ROUTED_BY_TASK = ("poly", "attempt", "per_task")


def perturb(model: ph.ModularModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.module_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


class Counting:
    """A dynamo backend that counts the graphs it is handed and compiles each with inductor."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        from torch._inductor.compile_fx import compile_fx
        self.graphs += 1
        return compile_fx(gm, example_inputs)


def case(kind: str, batch: int, length: int, repeats: int, clock: str) -> dict[str, Any]:
    torch._dynamo.reset()
    model = ph.compose(minilm_classifier(), CASES[kind](), head=True).eval()  # head=True: its own (random) head
    perturb(model)
    g = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(1000, 30000, (batch, length), generator=g),
              "attention_mask": torch.ones(batch, length, dtype=torch.long)}
    routes = [torch.randint(0, 2, (batch,), generator=g) for _ in range(4)] if kind in ROUTED_BY_TASK else [None]
    labels = torch.randint(0, 2, (batch,), generator=g)
    calls = iter(range(10 ** 9))

    def args() -> dict[str, Any]:  # new task ids on every call
        ids = routes[next(calls) % len(routes)]
        return inputs if ids is None else {**inputs, "task_ids": ids}

    with torch.no_grad():
        breaks = torch._dynamo.explain(model)(**args()).graph_break_count
    torch._dynamo.reset()
    backend = Counting()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        start = time.perf_counter()
        first = args()
        got = compiled(**first).logits
        compile_s = time.perf_counter() - start
        torch.testing.assert_close(got, model(**first).logits, rtol=1e-4, atol=1e-4)
        graphs = backend.graphs
        infer = interleaved({"eager": lambda: model(**args()), "compiled": lambda: compiled(**args())},
                            repeats=repeats, warmup_steps=2, clock=clock)
    recompiles = backend.graphs - graphs

    def step(run: Any) -> Callable[[], None]:
        def go() -> None:
            model.zero_grad(set_to_none=True)
            run(**args(), labels=labels).loss.backward()
        return go
    model.train()
    train = interleaved({"eager": step(model), "compiled": step(compiled)}, repeats=repeats, warmup_steps=2, clock=clock)
    row = {"case": kind, "graphs": graphs, "breaks": breaks, "recompiles": recompiles, "compile_s": compile_s}
    # "ratio" (inference) is the key `python -m benchmarks` collects
    for mode, times, ratio in (("infer", infer, "ratio"), ("train", train, "train_ratio")):
        eager, fast = median(times["eager"]), median(times["compiled"])
        row.update({f"{mode}_eager": eager, f"{mode}_compiled": fast, ratio: fast / eager})
    return row


def run(quick: bool = False, only: list[str] | None = None, clock: str = "wall") -> list[dict[str, Any]]:
    setup()
    batch, length, repeats = (4, 32, 5) if quick else (16, 64, 10)
    print(f"torch.compile (inductor) vs eager, batch {batch} x {length}, MiniLM geometry, {clock} clock, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; {load_average()}", flush=True)
    rows = []
    for kind in only or CASES:  # a line per case: a full run takes a while on a loaded machine
        rows.append(case(kind, batch, length, repeats, clock))
        print(f"{kind}: {rows[-1]['graphs']} graph(s), {rows[-1]['breaks']} break(s), inference ratio "
              f"{rows[-1]['ratio']:.2f}, training ratio {rows[-1]['train_ratio']:.2f}", flush=True)
    print(f"({load_average()} at the end)")
    print_table(rows, [("case", "kind"), ("graphs", "graphs per forward"), ("breaks", "graph breaks"),
                       ("recompiles", "recompiles (new task ids)"), ("compile_s", "compile s (first call)"),
                       ("infer_eager", "inference eager ms"), ("infer_compiled", "compiled ms"),
                       ("ratio", "ratio"), ("train_eager", "training eager ms"),
                       ("train_compiled", "compiled ms"), ("train_ratio", "ratio")],
                digits={"compile_s": 1, "infer_eager": 1, "infer_compiled": 1, "train_eager": 1,
                        "train_compiled": 1})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 4 x 32 and fewer rounds")
    parser.add_argument("--only", nargs="+", choices=list(CASES), help="these cases only")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time, robust when others share the cores")
    args = parser.parse_args()
    run(args.quick, args.only, args.clock)


if __name__ == "__main__":
    main()
