"""Train and evaluate causal LMs and seq2seq models on generative examples, many module sets in one pass.

`pelthub.training.fit` trains on `GenerativeExample`s through `batches` here (the loss is the
model's own cross-entropy over the target tokens). Evaluation reads three things:

- `loss` / `perplexity`: mean negative log-likelihood per target token (and its exp);
- `rank`: rank-classification accuracy, the choice with the highest length-normalised
  log-likelihood (mean over its tokens, as T-Few) against the target;
- `exact_match`: greedy generations equal to the target (whitespace-stripped).

Given `adapters=[...]` (plain module sets, PEFT's `adapter_names`) or `tasks=[...]` (the tasks
of a Poly / PerTask model), every batch is repeated once per set inside one mixed forward or
`generate` call, so N sets cost one pass over the data instead of N, with the same numbers.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .errors import ConfigError
from .tasks.generative import IGNORE, GenerativeExample, encode, generative_examples, pad_id, with_choices

METRICS = ("loss", "perplexity", "rank", "exact_match")
Sets = tuple[list[str], str | None, list[Any]]


def _encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def _task_ids(model: nn.Module, examples: Sequence[GenerativeExample]) -> torch.Tensor | None:
    """Each example's task index in `model.task_names`, or None when no example names a task."""
    named = [e.task for e in examples]
    if all(t is None for t in named):
        return None
    known = list(getattr(model, "task_names", ()))
    unknown = sorted({str(t) for t in named if t not in known})
    if unknown:
        raise ConfigError(f"examples name tasks {unknown[:5]} that the model does not route (its tasks: {known}); "
                          "give every example one of the model's tasks, or none")
    return torch.tensor([known.index(t) for t in named])


def batches(model: nn.Module, data: Any, tokenizer: Any, batch_size: int, shuffle: bool = True, seed: int = 0,
            max_length: int = 128, targets: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches (one pass in order when shuffle=False) with labels (unless `targets`
    is False: generation prompts) and, when examples name tasks, `task_ids`; the data is checked
    whole before the first batch."""
    examples = generative_examples(data)
    if not examples:
        raise ConfigError("no examples to train or evaluate on")
    task_ids = _task_ids(model, examples)
    encoder_decoder = _encoder_decoder(model)
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=generator) if shuffle else torch.arange(len(examples))
        for idx in order.split(batch_size):
            batch = encode(tokenizer, [examples[i] for i in idx.tolist()], encoder_decoder, max_length, targets)
            if task_ids is not None:
                batch["task_ids"] = task_ids[idx]
            yield batch
        if not shuffle:
            return


class GenerativeCollator:
    """`transformers.Trainer`'s `data_collator` for generative data: a list of rows (`GenerativeExample`s
    or dicts with input/target[/choices/task]) becomes one batch encoded as `fit` encodes it (labels on
    the target tokens only; `task_ids` when rows name tasks of a Poly / PerTask model). With a
    🤗 `datasets` table as `train_dataset`, pass `TrainingArguments(remove_unused_columns=False)` so
    Trainer keeps the text columns for the collator."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int = 128):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length

    def __call__(self, rows: Sequence[Any]) -> dict[str, torch.Tensor]:
        examples = generative_examples(list(rows))
        batch = encode(self.tokenizer, examples, _encoder_decoder(self.model), self.max_length)
        task_ids = _task_ids(self.model, examples)
        if task_ids is not None:
            batch["task_ids"] = task_ids
        return batch


def _sets(model: nn.Module, adapters: Sequence[str] | None, tasks: Sequence[str | int] | None) -> Sets:
    """(result names, routing keyword, each set's routing value); one unnamed set when neither is given."""
    if adapters is not None and tasks is not None:
        raise ConfigError("give adapters= (module sets) or tasks= (a routed model's tasks), not both")
    chosen = adapters if adapters is not None else tasks
    if chosen is None:
        return [""], None, [None]
    chosen = [chosen] if isinstance(chosen, (str, int)) else list(chosen)
    if not chosen or len(set(chosen)) != len(chosen):
        raise ConfigError(f"name each set to evaluate once (at least one), got {chosen}")
    if adapters is not None:
        return chosen, "adapter_names", chosen
    if not getattr(model, "task_names", None):
        raise ConfigError("tasks= needs a model routed over tasks (Poly, PerTask); this one routes none; "
                          "evaluate module sets with adapters= instead")
    ids = model.task_index(chosen).tolist()  # checks the names and indices
    return [model.task_names[i] for i in ids], "task_ids", ids


def _replicate(batch: dict[str, torch.Tensor], sets: Sets, device: torch.device) -> dict[str, Any]:
    """The batch once per set, set after set, each copy routed to its set, on `device`."""
    _, keyword, values = sets
    n, rows = len(values), batch["input_ids"].shape[0]
    out: dict[str, Any] = {k: v.repeat(n, *[1] * (v.dim() - 1)).to(device) for k, v in batch.items()}
    if keyword == "adapter_names":
        out[keyword] = [v for v in values for _ in range(rows)]
    elif keyword == "task_ids":
        out[keyword] = torch.tensor(values, device=device).repeat_interleave(rows)
    return out


def _log_likelihoods(model: nn.Module, examples: Sequence[GenerativeExample], tokenizer: Any, sets: Sets,
                     batch_size: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sets, n) summed target-token log-probabilities and (n,) target token counts."""
    device, n_sets = next(model.parameters()).device, len(sets[2])
    sums, counts = [], []
    for batch in batches(model, examples, tokenizer, batch_size, shuffle=False, max_length=max_length):
        wide = _replicate(batch, sets, device)
        labels = wide["labels"]
        if _encoder_decoder(model):  # the labels give the decoder its inputs; the model's own loss goes unused
            logits = model(**wide).logits.float()
        else:  # prompts prepended to a causal LM's input lengthen the logits at the front
            logits = model(**{k: v for k, v in wide.items() if k != "labels"}).logits[:, -labels.shape[1]:].float()
            logits, labels = logits[:, :-1], labels[:, 1:]
        mask = labels != IGNORE
        picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        sums.append((picked * mask).sum(-1).view(n_sets, -1).cpu())
        counts.append(mask[:labels.shape[0] // n_sets].sum(-1).cpu())
    return torch.cat(sums, 1), torch.cat(counts)


def _results(sets: Sets, per_set: torch.Tensor | list[Any]) -> Any:
    """Per-set results keyed by set name, or the one result when no sets were asked for."""
    names, keyword, _ = sets
    return per_set[0] if keyword is None else dict(zip(names, per_set))


@torch.no_grad()
def choice_scores(model: nn.Module, data: Any, tokenizer: Any, adapters: Sequence[str] | None = None,
                  tasks: Sequence[str | int] | None = None, batch_size: int = 16, max_length: int = 128) -> Any:
    """(examples, most choices) length-normalised log-likelihood of every answer choice; -inf past an
    example's last choice. One tensor, or {set: tensor} with `adapters` / `tasks`."""
    model.eval()
    sets = _sets(model, adapters, tasks)
    rows, owner, _ = with_choices(generative_examples(data))
    sums, counts = _log_likelihoods(model, rows, tokenizer, sets, batch_size, max_length)
    return _results(sets, list(_choice_table(sums / counts, owner)))


def _choice_table(scores: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """(sets, rows) scores of (example, choice) rows as (sets, examples, most choices), -inf where no choice."""
    first = torch.searchsorted(owner, owner)  # rows are grouped by example: a row's place is its offset in it
    place = torch.arange(len(owner)) - first
    table = scores.new_full((scores.shape[0], int(owner.max()) + 1, int(place.max()) + 1), float("-inf"))
    table[:, owner, place] = scores
    return table


@torch.no_grad()
def generate_texts(model: nn.Module, data: Any, tokenizer: Any, adapters: Sequence[str] | None = None,
                   tasks: Sequence[str | int] | None = None, batch_size: int = 16, max_length: int = 128,
                   **generate_kwargs: Any) -> Any:
    """The decoded continuation of every input (greedy, 32 new tokens unless `generate_kwargs` say
    otherwise); a list, or {set: list} with `adapters` / `tasks`."""
    model.eval()
    sets = _sets(model, adapters, tasks)
    device, n_sets = next(model.parameters()).device, len(sets[2])
    kwargs = {"max_new_tokens": 32, "do_sample": False, "pad_token_id": pad_id(tokenizer),
              "eos_token_id": tokenizer.eos_token_id, **generate_kwargs}
    texts: list[list[str]] = [[] for _ in range(n_sets)]
    for batch in batches(model, data, tokenizer, batch_size, shuffle=False, max_length=max_length,
                         targets=False):
        wide = _replicate(batch, sets, device)
        out = model.generate(**wide, **kwargs)
        new = out if _encoder_decoder(model) else out[:, wide["input_ids"].shape[1]:]
        decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
        rows = len(decoded) // n_sets
        for s in range(n_sets):
            texts[s] += decoded[s * rows:(s + 1) * rows]
    return _results(sets, texts)


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, tokenizer: Any, metrics: Sequence[str] = ("loss", "perplexity"),
             adapters: Sequence[str] | None = None, tasks: Sequence[str | int] | None = None, batch_size: int = 16,
             max_length: int = 128, max_new_tokens: int = 32) -> Any:
    """{metric: value} of `model` on `data`, or {set: {metric: value}} for every set in `adapters` / `tasks`.

    All sets share each forward (the batch repeated once per set), so one call over N sets reads
    the data once; `batch_size` counts examples, a forward holds `batch_size` × N rows.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ConfigError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
    model.eval()
    examples = generative_examples(data)
    if not examples:
        raise ConfigError("no examples to evaluate on")
    sets = _sets(model, adapters, tasks)
    columns: dict[str, torch.Tensor] = {}
    if {"loss", "perplexity"} & set(metrics):
        sums, counts = _log_likelihoods(model, examples, tokenizer, sets, batch_size, max_length)
        columns["loss"] = -sums.sum(1) / counts.sum()
        columns["perplexity"] = columns["loss"].exp()
    if "rank" in metrics:
        rows, owner, answer = with_choices(examples)
        sums, counts = _log_likelihoods(model, rows, tokenizer, sets, batch_size, max_length)
        columns["rank"] = (_choice_table(sums / counts, owner).argmax(-1) == answer).double().mean(1)
    if "exact_match" in metrics:
        found = generate_texts(model, examples, tokenizer, batch_size=batch_size, max_length=max_length,
                               max_new_tokens=max_new_tokens, **_routing(sets))
        found = [found] if sets[1] is None else list(found.values())
        targets = [e.target.strip() for e in examples]
        columns["exact_match"] = torch.tensor([sum(t.strip() == w for t, w in zip(texts, targets)) / len(targets)
                                               for texts in found], dtype=torch.double)
    return _results(sets, [{m: float(columns[m][s]) for m in metrics} for s in range(len(sets[2]))])


def _routing(sets: Sets) -> dict[str, Any]:
    """The keyword that asks the public functions for the same sets again."""
    names, keyword, values = sets
    return {} if keyword is None else {"adapters": values} if keyword == "adapter_names" else {"tasks": values}
