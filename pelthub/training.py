"""A small training loop for examples and the demo: tokenise, batch, fit, evaluate.

Modules are ordinary parameters, so any loop (or `transformers.Trainer`)
works; this one exists so the README, examples and demo stay short. Mixed-task
data is given as {task name: examples}; each batch then mixes tasks and
carries `task_ids`. Every entry point also takes a 🤗 `datasets.Dataset`, or a
`DatasetDict` with ``split=``, with ``columns=`` when the usual names do not
find them (`pelthub.tasks.as_examples`).
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ConfigError
from . import generative
from .tasks import Example, from_datasets
from .tasks.generative import is_generative

if TYPE_CHECKING:
    import datasets

Data = Union[Sequence[Example], Mapping[str, Sequence[Example]], "datasets.Dataset", "datasets.DatasetDict"]
Columns = Mapping[str, Union[str, None]]


def param_groups(model: nn.Module, lr: float, lr_routing: float | None = None, weight_decay: float = 0.0,
                 lr_prefix_mlp: float | None = None) -> list[dict[str, Any]]:
    """Optimizer groups with each module's own learning-rate defaults, relative to the module lr `lr`.

    Modules declare groups through `lr_scales()` -> [(group, scale, parameters)]:
    - "routing": Poly / MHR routing logits at lr × 50 (the papers train routing 20-100×
      faster; at the skills' lr it stays uniform), ATTEMPT's attention network at lr × 1;
      `lr_routing` sets the lr of every routing parameter at once. No weight decay.
    - "prefix_mlp": a prefix's reparameterisation MLP at lr × 0.1 (at the module lr it
      blows up; see `Prefix`); `lr_prefix_mlp` overrides it.
    Parameters of other modules whose names contain "router" or "logits" count as routing
    (lr_routing, else lr); everything else trains at `lr` with `weight_decay`.
    """
    declared: dict[int, tuple[str, float]] = {}
    for module in model.modules():
        scales = getattr(module, "lr_scales", None)
        for group, scale, params in (scales() if callable(scales) else ()):
            declared.update({id(p): (group, scale) for p in params})
    overrides = {"routing": lr_routing, "prefix_mlp": lr_prefix_mlp}
    buckets: dict[tuple[str, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group, scale = declared.get(id(p), ("routing", 1.0) if ("router" in name or "logits" in name)
                                    else ("modules", 1.0))
        override = overrides.get(group)
        buckets.setdefault((group, lr * scale if override is None else override), []).append(p)
    return [{"params": params, "lr": group_lr, "weight_decay": 0.0 if group == "routing" else weight_decay,
             "name": group} for (group, group_lr), params in buckets.items()]


def encode(tokenizer: Any, examples: Sequence[Example], max_length: int = 64) -> dict[str, torch.Tensor]:
    """Tokenise texts (and text pairs, also when a batch mixes single texts and pairs) into padded tensors."""
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples]
    if all(p is None for p in pairs) or all(p is not None for p in pairs):
        enc = dict(tokenizer(texts, None if pairs[0] is None else pairs, padding=True, truncation=True,
                             max_length=max_length, return_tensors="pt"))
    else:
        rows = [tokenizer(t, p, truncation=True, max_length=max_length) for t, p in zip(texts, pairs)]
        enc = dict(tokenizer.pad(rows, return_tensors="pt"))
    enc["labels"] = torch.tensor([e.label for e in examples])
    return enc


def _flatten(data: Data, task_names: Sequence[str]) -> tuple[list[Example], list[int] | None]:
    if isinstance(data, Mapping):
        unknown = [t for t in data if t not in task_names]
        if unknown:
            raise ConfigError(f"tasks {unknown} are not routed by this model; its tasks are {list(task_names)}")
        pairs = [(e, task_names.index(t)) for t, examples in data.items() for e in examples]
        return [e for e, _ in pairs], [t for _, t in pairs]
    return list(data), None


def batches(data: Data, tokenizer: Any, batch_size: int, task_names: Sequence[str] = (), shuffle: bool = True,
            seed: int = 0, max_length: int = 64) -> Iterator[dict[str, Any]]:
    """Endless shuffled batches (or one pass when shuffle=False); `task_ids` when data is per task."""
    examples, task_ids = _flatten(data, task_names)
    if not examples:
        raise ConfigError("no examples to train or evaluate on")
    order = list(range(len(examples)))
    rng = random.Random(seed)
    while True:
        if shuffle:
            rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = encode(tokenizer, [examples[i] for i in idx], max_length)
            if task_ids is not None:
                batch["task_ids"] = torch.tensor([task_ids[i] for i in idx])
            yield batch
        if not shuffle:
            return


def fit(model: nn.Module, data: Data, tokenizer: Any, steps: int = 100, batch_size: int = 32, lr: float = 1e-3,
        lr_routing: float | None = None, weight_decay: float = 0.0, seed: int = 0, max_length: int = 64,
        progress: bool | str = True, *, split: str | None = None, columns: Columns | None = None) -> list[float]:
    """Train the trainable parameters of `model` for `steps` AdamW steps; returns the losses.

    Learning rates per group as in `param_groups`: routing logits and prefix MLPs get
    their own defaults relative to `lr` unless `lr_routing` is given.
    """
    data = data if is_generative(data) else from_datasets(data, split, columns)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(param_groups(model, lr, lr_routing, weight_decay))
    stream = (generative.batches(model, data, tokenizer, batch_size, seed=seed, max_length=max_length)
              if is_generative(data) else  # input/target examples: the LM loss over the target tokens
              batches(data, tokenizer, batch_size, getattr(model, "task_names", ()), seed=seed, max_length=max_length))
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc=progress if isinstance(progress, str) else "train", disable=not progress,
               leave=False)
    for _ in bar:
        batch = {k: v.to(device) for k, v in next(stream).items()}
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, data: Data, tokenizer: Any, batch_size: int = 64, max_length: int = 64, *,
             split: str | None = None, columns: Columns | None = None) -> float:
    """Share of examples whose argmax logit is the label."""
    data = from_datasets(data, split, columns)
    model.eval()
    device = next(model.parameters()).device
    right = total = 0
    for batch in batches(data, tokenizer, batch_size, getattr(model, "task_names", ()), shuffle=False,
                         max_length=max_length):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        right += (model(**batch).logits.argmax(-1) == labels).sum().item()
        total += labels.numel()
    return right / total


@torch.no_grad()
def probabilities(model: nn.Module, data: Data, tokenizer: Any, batch_size: int = 64, max_length: int = 64, *,
                  split: str | None = None, columns: Columns | None = None) -> torch.Tensor:
    """(n, labels) softmax of `model`'s logits on `data`, in order (fp32, CPU; no training)."""
    data = from_datasets(data, split, columns)
    model.eval()
    device = next(model.parameters()).device
    out = [model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}).logits.float().softmax(-1).cpu()
           for batch in batches(data, tokenizer, batch_size, getattr(model, "task_names", ()), shuffle=False,
                                max_length=max_length)]
    return torch.cat(out)


@torch.no_grad()
def mean_loss(model: nn.Module, data: Data, tokenizer: Any, batch_size: int = 64, max_length: int = 64, *,
              split: str | None = None, columns: Columns | None = None) -> float:
    """Average cross-entropy of `model` on `data` (no training)."""
    data = from_datasets(data, split, columns)
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches(data, tokenizer, batch_size, getattr(model, "task_names", ()), shuffle=False,
                         max_length=max_length):
        batch = {k: v.to(device) for k, v in batch.items()}
        n = batch["labels"].numel()
        total += model(**batch).loss.item() * n
        count += n
    return total / count
