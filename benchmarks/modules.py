"""pelthub module kinds against PEFT: training-step and inference time, side by side.

Model: MiniLM geometry (BertConfig: vocab 30522, hidden 384, 6 layers, 12 heads,
FFN 1536, 512 positions), BertForSequenceClassification with 2 labels, random
init (no downloads). Batch 32 x 64 tokens (`--quick`: 8 x 32, fewer repeats).

Training step = forward (with labels) + backward + AdamW step on the trainable
parameters. Both libraries train the classifier copy as well (pelthub
`head=True`, PEFT `task_type=SEQ_CLS` which adds it to modules_to_save), so the
trainable sets are the same. Fairness:

- every model is a deepcopy of one base (same weights), every call gets the same batch;
- pelthub and PEFT steps alternate within each round (order reversed every
  other round), after a warmup; the median of the rounds is reported;
- inference runs under `torch.inference_mode()` in eval mode;
- before timing, each pair is checked to compute the same logits when given
  the same module weights (so both sides do the same work at the same sites).

The "merged vs base" row runs two structurally identical models (the merged
base has no hooks left), so its distance from 1.00 shows the timing noise of
the machine: read the other ratios against it.

Ratio = pelthub / PEFT (lower is better). Run:

    PYTHONPATH=. .venv/bin/python -m benchmarks.modules [--quick]
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

try:  # run as `python -m benchmarks.modules` or as a script
    from .common import fmt, interleaved, load_average, make_batch, minilm_classifier, print_table, setup, summary
except ImportError:  # pragma: no cover
    from common import fmt, interleaved, load_average, make_batch, minilm_classifier, print_table, setup, summary  # type: ignore  # noqa: E501

import pelthub as ph

# ----- model and inputs -----


# ----- the two sides of each case -----

# PEFT's list form ["key", "value", "output.dense"] also matches `attention.output.dense`
# (suffix match), i.e. 24 sites instead of pelthub's 18. These regexes (full match) select
# exactly pelthub's IA3 defaults: k, v and the FFN down projection `layer.N.output.dense`,
# the latter scaled on its input (feedforward).
IA3_TARGETS = r".*layer\.\d+\.(attention\.self\.(key|value)|output\.dense)"
IA3_FEEDFORWARD = r".*layer\.\d+\.output\.dense"


def peft_config(kind: str) -> Any:
    import peft
    seq_cls = peft.TaskType.SEQ_CLS
    if kind == "lora":
        return peft.LoraConfig(task_type=seq_cls, r=8, lora_alpha=16, lora_dropout=0.0,
                               target_modules=["query", "value"])
    if kind == "prompt":
        return peft.PromptTuningConfig(task_type=seq_cls, num_virtual_tokens=20)
    if kind == "prefix":
        return peft.PrefixTuningConfig(task_type=seq_cls, num_virtual_tokens=10, prefix_projection=False)
    if kind == "prefix_proj":
        return peft.PrefixTuningConfig(task_type=seq_cls, num_virtual_tokens=10, prefix_projection=True,
                                       encoder_hidden_size=512)
    if kind == "ia3":
        return peft.IA3Config(task_type=seq_cls, target_modules=IA3_TARGETS, feedforward_modules=IA3_FEEDFORWARD)
    if kind == "ln":
        return peft.LNTuningConfig(task_type=seq_cls, target_modules=["LayerNorm"])
    raise KeyError(kind)


PELTHUB_CONFIGS: dict[str, Callable[[], ph.modules.ModuleConfig]] = {
    "lora": lambda: ph.LoRA(r=8, alpha=16.0),
    "prompt": lambda: ph.Prompt(length=20),
    "prefix": lambda: ph.Prefix(length=10, hidden=None),
    "prefix_proj": lambda: ph.Prefix(length=10, hidden=512),
    "ia3": lambda: ph.IA3(),
    "ln": lambda: ph.LNTuning(),
    "bottleneck": lambda: ph.Bottleneck(placement="pfeiffer"),
    "compacter": lambda: ph.Compacter(),
}


def build_pelthub(base: nn.Module, kind: str, head: bool = True) -> nn.Module:
    return ph.attach(copy.deepcopy(base), PELTHUB_CONFIGS[kind](), name="bench", head=head)


def build_peft(base: nn.Module, kind: str) -> nn.Module:
    import peft
    return peft.get_peft_model(copy.deepcopy(base), peft_config(kind))


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    peft: bool = True
    target: float | None = 1.0


TRAIN_CASES = [
    Case("lora", "train: LoRA r=8 (q, v)"),
    Case("prompt", "train: prompt L=20"),
    Case("prefix", "train: prefix L=10, no projection"),
    Case("prefix_proj", "train: prefix L=10, projection 512"),
    Case("ia3", "train: IA3 (k, v, FFN down)"),
    Case("ln", "train: LN-tuning"),
    Case("bottleneck", "train: Bottleneck (pfeiffer, reduction 16)", peft=False, target=None),
    Case("compacter", "train: Compacter (houlsby, n=4)", peft=False, target=None),
]


# ----- equivalence check: same module weights => same logits -----


@torch.no_grad()
def copy_weights(kind: str, pel: nn.Module, pm: nn.Module) -> None:
    """Give pelthub random (non-identity) module weights and copy them into the PEFT model."""
    g = torch.Generator().manual_seed(7)
    mod = pel.adapters["bench"][kind.replace("_proj", "")]
    for p in mod.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if kind == "ia3" else 0.0))
    inner = pm.get_base_model()
    if kind == "lora":
        for key, layer in mod.layers.items():
            target = inner.get_submodule(ph.modules.base.site_name(key))
            target.lora_A["default"].weight.copy_(layer.lora_a)
            target.lora_B["default"].weight.copy_(layer.lora_b)
    elif kind == "ia3":
        for key, scale in mod.scales.items():
            target = inner.get_submodule(ph.modules.base.site_name(key))
            target.ia3_l["default"].copy_(scale.view_as(target.ia3_l["default"]))
    elif kind == "ln":
        for name, param, delta in mod._targets():
            target = inner.get_submodule(name).ln_tuning_layers["default"]
            getattr(target, param).add_(delta)
    elif kind == "prompt":
        pm.prompt_encoder["default"].embedding.weight.copy_(mod.embeddings)
    elif kind == "prefix":
        pm.prompt_encoder["default"].embedding.weight.copy_(mod.values)
    elif kind == "prefix_proj":
        enc = pm.prompt_encoder["default"]
        enc.embedding.weight.copy_(mod.embedding)
        enc.transform.load_state_dict(mod.mlp.state_dict())


def check_equivalence(base: nn.Module, kind: str, batch: dict[str, torch.Tensor]) -> float:
    """Max |logit difference| between pelthub and PEFT holding the same module weights."""
    pel, pm = build_pelthub(base, kind), build_peft(base, kind)
    copy_weights(kind, pel, pm)
    pel.eval()
    pm.eval()
    inputs = {k: v[:4] for k, v in batch.items() if k != "labels"}
    with torch.inference_mode():
        a, b = pel(**inputs).logits, pm(**inputs).logits
    return float((a - b).abs().max())


def ia3_sites(pel: nn.Module, pm: nn.Module) -> tuple[dict[str, bool], dict[str, bool]]:
    """{site: scaled on input} on each side."""
    mod = pel.adapters["bench"]["ia3"]
    ours = {ph.modules.base.site_name(k): v for k, v in mod.on_input.items()}
    theirs = {n: bool(m.is_feedforward) for n, m in pm.get_base_model().named_modules() if hasattr(m, "ia3_l")}
    return ours, theirs


# ----- timing -----


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_step_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    model.train()
    opt = torch.optim.AdamW(trainable(model), lr=1e-4)

    def step() -> None:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def forward_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def fwd() -> None:
        with torch.inference_mode():
            model(**inputs)
    return fwd


def _row(case: str, ours: dict[str, float], theirs: dict[str, float] | None, target: float | None,
         **extra: Any) -> dict[str, Any]:
    """One table row from `summary` entries: median ms (reported) and min ms (cross-check)."""
    ratio = ours["median"] / theirs["median"] if theirs else None
    return {"case": case, "pelthub_ms": ours["median"], "peft_ms": theirs["median"] if theirs else None,
            "ratio": ratio, "target": None if target is None else f"≤ {target:.2f}",
            "meets": None if ratio is None or target is None else ratio <= target,
            "pelthub_min_ms": ours["min"], "peft_min_ms": theirs["min"] if theirs else None,
            "ratio_min": ours["min"] / theirs["min"] if theirs else None, **extra}


def _timed(fns: dict[str, Callable[[], None]], reps: int, warm: int, clock: str) -> dict[str, dict[str, float]]:
    return summary(interleaved(fns, reps, warm, clock))


def _describe(r: dict[str, Any]) -> str:
    text = f"  {r['case']}: median {fmt(r['pelthub_ms'], 1)}"
    if r["peft_ms"] is not None:
        text += f" vs {fmt(r['peft_ms'], 1)} ms (ratio {fmt(r['ratio'], 3)}; by min: " \
                f"{fmt(r['pelthub_min_ms'], 1)} vs {fmt(r['peft_min_ms'], 1)}, ratio {fmt(r['ratio_min'], 3)})"
    else:
        text += f" ms (min {fmt(r['pelthub_min_ms'], 1)})"
    return text


def run(quick: bool, repeats: int | None = None, warmup_steps: int | None = None,
        only: list[str] | None = None, verbose: bool = True, clock: str = "wall") -> list[dict]:
    """Time every case; return the table rows (also printed progressively when verbose).

    `clock="cpu"` measures process CPU time instead of wall time: use it on a
    machine shared with other jobs, where wall time mostly measures the queue.
    """
    setup()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # transformers, via PEFT
    warnings.filterwarnings("ignore", message="Unsupported layer type.*LayerNorm")  # PEFT LN-tuning on BERT
    b, n = (8, 32) if quick else (32, 64)
    reps = repeats or (5 if quick else 10)
    warm = warmup_steps if warmup_steps is not None else (2 if quick else 3)
    base = minilm_classifier()
    batch = make_batch(b, n)
    rows: list[dict] = []
    log = print if verbose else (lambda *a, **k: None)
    log(f"# pelthub vs PEFT, MiniLM-L6 geometry, batch {b}x{n}, {torch.get_num_threads()} threads, "
        f"median of {reps} (warmup {warm}), {clock} clock; {load_average()}", flush=True)

    # same sites for IA3
    ours, theirs = ia3_sites(build_pelthub(base, "ia3"), build_peft(base, "ia3"))
    if ours != theirs:
        raise AssertionError(f"IA3 sites differ: pelthub {sorted(ours.items())} vs PEFT {sorted(theirs.items())}")
    log(f"IA3 sites identical on both sides: {len(ours)} ({sum(ours.values())} feedforward)", flush=True)

    t0 = time.perf_counter()
    # ----- training steps, pelthub vs PEFT -----
    solo = []
    for case in TRAIN_CASES:
        if only and case.key not in only:
            continue
        if not case.peft:
            solo.append(case)
            continue
        diff = check_equivalence(base, case.key, batch)
        if diff > 1e-4:
            log(f"WARNING: {case.key}: pelthub and PEFT logits differ by {diff:.1e} with the same weights")
        pel, pm = build_pelthub(base, case.key), build_peft(base, case.key)
        n_pel, n_peft = sum(p.numel() for p in trainable(pel)), sum(p.numel() for p in trainable(pm))
        times = _timed({"pelthub": train_step_fn(pel, batch), "peft": train_step_fn(pm, batch)}, reps, warm, clock)
        row = _row(case.label, times["pelthub"], times["peft"], case.target, kind=case.key, phase="train",
                   max_logit_diff=diff, trainable_pelthub=n_pel, trainable_peft=n_peft)
        rows.append(row)
        log(f"{_describe(row)}; trainable {n_pel:,} vs {n_peft:,}; max |Δlogit| {diff:.1e} "
            f"[{time.perf_counter() - t0:.0f}s]", flush=True)
        del pel, pm
    # ----- pelthub-only kinds, interleaved among themselves -----
    if solo:
        models = {c.key: build_pelthub(base, c.key) for c in solo}
        times = _timed({k: train_step_fn(m, batch) for k, m in models.items()}, reps, warm, clock)
        for c in solo:
            n_pel = sum(p.numel() for p in trainable(models[c.key]))
            rows.append(_row(c.label, times[c.key], None, None, kind=c.key, phase="train", trainable_pelthub=n_pel))
            log(f"{_describe(rows[-1])}; trainable {n_pel:,} [{time.perf_counter() - t0:.0f}s]", flush=True)
        del models

    # ----- inference -----
    if not only or "infer" in only:
        inf_reps, inf_warm = 2 * reps, warm
        pel, pm = build_pelthub(base, "lora"), build_peft(base, "lora")
        copy_weights("lora", pel, pm)
        times = _timed({"pelthub": forward_fn(pel, batch), "peft": forward_fn(pm, batch)}, inf_reps, inf_warm, clock)
        rows.append(_row("infer: LoRA unmerged forward", times["pelthub"], times["peft"], 1.0,
                         kind="lora", phase="infer"))
        merged, plain = pel.merge_and_unload(), copy.deepcopy(base)
        times = _timed({"pelthub": forward_fn(merged, batch), "base": forward_fn(plain, batch)}, inf_reps, inf_warm, clock)
        rows.append(_row("infer: LoRA merged (merge_and_unload) vs base model [PEFT col = base]",
                         times["pelthub"], times["base"], 1.02, kind="lora", phase="infer"))
        for r in rows[-2:]:
            log(f"{_describe(r)} [{time.perf_counter() - t0:.0f}s]", flush=True)
    log(f"# done; {load_average()}", flush=True)
    return rows


COLUMNS = [("case", "case"), ("pelthub_ms", "pelthub ms"), ("peft_ms", "PEFT ms"), ("ratio", "ratio"),
           ("target", "target")]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 8x32 and fewer repeats")
    parser.add_argument("--repeats", type=int, default=None, help="measured rounds per case")
    parser.add_argument("--only", nargs="*", default=None,
                        help="case keys to run: lora prompt prefix prefix_proj ia3 ln bottleneck compacter infer")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time (default) or process CPU time (for a machine shared with other jobs)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = run(args.quick, repeats=args.repeats, only=args.only, clock=args.clock)
    print()
    print_table(rows, COLUMNS, digits={"pelthub_ms": 1, "peft_ms": 1, "ratio": 3})
    print(f"\n(total {time.perf_counter() - start:.0f}s; ratio = pelthub / PEFT, lower is better)")
    return rows


if __name__ == "__main__":
    main()
