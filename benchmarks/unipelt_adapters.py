"""pelthub's UniPELT training step against AdapterHub `adapters`' UniPELT.

`adapters` (1.3.0) pins transformers 4.57, which cannot share a virtualenv with
pelthub's transformers 5.x, so each library runs in its own worker process and
its own interpreter:

    pelthub   : this repository's .venv (sys.executable by default)
    adapters  : a separate venv, made with
                python3 -m venv /tmp/adapters-venv
                /tmp/adapters-venv/bin/pip install -c <(echo torch==2.13.0) torch==2.13.0
                /tmp/adapters-venv/bin/pip install -c <(echo torch==2.13.0) adapters

The driver alternates rounds between the two workers (order reversed every
other round, so slow drift of the machine hits both alike). Every worker run
builds the model, does 2 warmup steps, then times N training steps and prints
JSON (per-step wall and process-CPU milliseconds, trainable parameter count).
The table reports the median over all timed steps of all rounds.

Both cores are used by each worker: timings are meaningless while another
CPU-heavy process runs (a step at 8 x 32 went from ~180 ms to ~7 s under a
concurrent benchmark on the 2-core reference VM); check `uptime` first.

Model: BertForSequenceClassification with MiniLM geometry (BertConfig vocab
30522, hidden 384, 6 layers, 12 heads, FFN 1536, 2 labels), random init, train
mode (dropout on, as in training; both sides). Batch 32 x 64 tokens
(`--quick`: 8 x 32). torch.set_num_threads(2). Training step = forward with
labels + backward + AdamW step (lr 1e-4) on the trainable parameters.

Configs. adapters' `UniPELTConfig()` defaults (adapters 1.3.0) are
  - LoRA:   r=8, alpha=2, dropout 0, on attention q and v (selfattn_lora), gated
            (use_gating=True), init 'lora'
  - Prefix: prefix_length=10, flat=False (MLP reparameterisation, bottleneck_size
            512, tanh), dropout 0, gated (use_gating=True, shared_gating=True)
  - Bottleneck: SeqBnConfig = Pfeiffer (output_adapter only, after the FFN),
            reduction_factor=16, relu, residual_before_ln=True, gated
pelthub's side matches them: ph.LoRA(r=8, alpha=2) (pelthub's default alpha is
16; alpha only scales, it does not change the cost), ph.Prefix(length=10,
hidden=512), ph.Bottleneck(reduction=16) (placement 'pfeiffer', relu), all
three gated by ph.UniPELT. Head: pelthub composes with head=True (classifier
trained); adapters' train_adapter leaves the model's own classifier trainable
as well (see the trainable-parameter column; the counts differ in gate and
prefix-MLP details, e.g. adapters' per-layer gates vs pelthub's).
Other differences that remain: transformers version (5.x vs 4.57) and hence
the attention implementation each side uses (printed per worker), and the two
libraries' prefix handling (adapters injects prefixes through its own
attention hooks).

Ratio = pelthub / adapters (below 1: pelthub's step is faster).

    .venv/bin/python benchmarks/unipelt_adapters.py [--quick] [--adapters-python /tmp/adapters-venv/bin/python]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# --------------------------------------------------------------------------- workers
def _base_model(seed: int = 0):
    import torch
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512, num_labels=2)
    return BertForSequenceClassification(cfg)


def _batch(batch: int, seq: int, seed: int = 1):
    import torch
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, 30522, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch,), generator=g)}


def _build_pelthub():
    sys.path.insert(0, ROOT)
    import pelthub as ph
    base = _base_model()
    cfg = ph.UniPELT(lora=ph.LoRA(r=8, alpha=2), prefix=ph.Prefix(length=10, hidden=512),
                     adapter=ph.Bottleneck(reduction=16))
    model = ph.compose(base, cfg, head=True)
    model.train()
    return model, base


def _build_adapters():
    import adapters  # never imports pelthub
    model = _base_model()
    adapters.init(model)
    model.add_adapter("u", config=adapters.UniPELTConfig())
    model.train_adapter("u")
    model.train()
    return model, model


def worker(lib: str, batch: int, seq: int, steps: int, warmup: int, threads: int) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import gc
    import torch
    torch.set_num_threads(threads)
    model, hf = _build_pelthub() if lib == "pelthub" else _build_adapters()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    data = _batch(batch, seq)

    def step() -> None:
        model(**data).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    wall, cpu = [], []
    gc.collect()
    gc.disable()
    for _ in range(steps):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append((time.perf_counter() - w0) * 1000.0)
        cpu.append((time.process_time() - c0) * 1000.0)
    gc.enable()
    import transformers
    print(json.dumps({
        "lib": lib, "wall_ms": wall, "cpu_ms": cpu,
        "trainable": sum(p.numel() for p in params),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "attn": getattr(getattr(hf, "config", None), "_attn_implementation", None),
        "threads": torch.get_num_threads(),
    }), flush=True)


# --------------------------------------------------------------------------- driver
def run_worker(python: str, lib: str, args: argparse.Namespace) -> dict:
    cmd = [python, os.path.abspath(__file__), "--worker", lib, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq),
           "--threads", str(args.threads)]
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # each worker sees only its own venv (+ ROOT for pelthub, added in-process)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/tmp")
    if out.returncode != 0:
        raise SystemExit(f"{lib} worker failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", choices=["pelthub", "adapters"])
    ap.add_argument("--quick", action="store_true", help="batch 8 x 32, fewer rounds")
    ap.add_argument("--adapters-python", default="/tmp/adapters-venv/bin/python")
    ap.add_argument("--pelthub-python", default=sys.executable)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.batch = args.batch or (8 if args.quick else 32)
    args.seq = args.seq or (32 if args.quick else 64)
    args.steps = args.steps or (5 if args.quick else 6)
    args.rounds = args.rounds or (3 if args.quick else 4)
    if args.worker:
        worker(args.worker, args.batch, args.seq, args.steps, args.warmup, args.threads)
        return

    pythons = {"pelthub": args.pelthub_python, "adapters": args.adapters_python}
    results: dict[str, list[dict]] = {"pelthub": [], "adapters": []}
    order = ["pelthub", "adapters"]
    for r in range(args.rounds):
        for lib in (order if r % 2 == 0 else order[::-1]):
            res = run_worker(pythons[lib], lib, args)
            results[lib].append(res)
            print(f"round {r + 1}/{args.rounds} {lib}: median {statistics.median(res['wall_ms']):.1f} ms",
                  file=sys.stderr, flush=True)

    rows = {}
    for lib, runs in results.items():
        wall = [t for run in runs for t in run["wall_ms"]]
        cpu = [t for run in runs for t in run["cpu_ms"]]
        rows[lib] = {"trainable": runs[0]["trainable"], "wall": statistics.median(wall),
                     "min": min(wall), "cpu": statistics.median(cpu), "info": runs[0]}
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    print(f"UniPELT training step, batch {args.batch} x {args.seq}, {args.threads} threads, "
          f"{args.rounds} rounds x {args.steps} steps (warmup {args.warmup}); load average {load}\n")
    print("| library | trainable params | median step ms | min step ms | median CPU ms | ratio pelthub/adapters |")
    print("|---|---:|---:|---:|---:|---:|")
    ref = rows["adapters"]["wall"]
    for lib in ("pelthub", "adapters"):
        r = rows[lib]
        i = r["info"]
        name = f"{lib} (transformers {i['transformers']}, attn {i['attn']})"
        print(f"| {name} | {r['trainable']:,} | {r['wall']:.1f} | {r['min']:.1f} | {r['cpu']:.1f} | "
              f"{r['wall'] / ref:.2f} |")


if __name__ == "__main__":
    main()
