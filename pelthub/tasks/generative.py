"""Generative (text-to-text) examples and their encoding for causal LMs and seq2seq models.

A `GenerativeExample` is an input the model reads and a target it should write, with
answer choices for multiple-choice tasks and a task name for routed modules (Poly,
PerTask). `generative_examples` turns lists, {task: examples} mappings and 🤗 `datasets`
tables into them; `encode` turns them into tensors.

Input and target are tokenised apart and then joined, so the boundary between them is
exact (a joint tokenisation could merge the last input token with the first target token
and put the loss mask one token off). Every target ends with the tokenizer's EOS token,
so a model learns where to stop and a choice's score includes stopping there.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from pelthub.errors import ConfigError, DataError

IGNORE = -100  # the label transformers' losses skip
COLUMNS = {"input": "input", "target": "target", "choices": "choices", "task": "task"}


@dataclass(frozen=True)
class GenerativeExample:
    """The model reads `input` and should write `target`.

    `choices` are a multiple-choice task's candidate answers (`target` is one of them);
    `task` names the example's task for routed modules; `chat` renders `input` through
    the tokenizer's chat template (as one user turn) when it is encoded.
    """

    input: str
    target: str
    choices: tuple[str, ...] | None = None
    task: str | None = None
    chat: bool = False

    def __post_init__(self) -> None:
        for field in ("input", "target"):
            if not isinstance(getattr(self, field), str):
                raise DataError(f"{field} must be a string, got {getattr(self, field)!r}")
        if self.choices is not None:
            if isinstance(self.choices, str) or not all(isinstance(c, str) for c in self.choices):
                raise DataError(f"choices must be a list of strings, got {self.choices!r}")
            object.__setattr__(self, "choices", tuple(self.choices))
            if self.target not in self.choices:
                raise DataError(f"target {self.target!r} is not one of the choices {list(self.choices)}; "
                                "the target must be the right choice")


def _rows(data: Any) -> Iterable[Any]:
    """The rows of a list or of a 🤗 `datasets` table (anything with `column_names`)."""
    return (dict(row) for row in data) if hasattr(data, "column_names") else data


def generative_examples(data: Any, columns: Mapping[str, str] | None = None,
                        chat: bool | None = None) -> list[GenerativeExample]:
    """`GenerativeExample`s from examples, rows (dicts or a 🤗 `datasets` table) or {task: those}.

    `columns` maps the fields `input`, `target`, `choices`, `task` to the table's column names
    where they differ (e.g. {"input": "question", "target": "answer"}); `chat` sets every
    example's `chat` flag when given.
    """
    if isinstance(data, Mapping) and not hasattr(data, "column_names"):
        return [replace(e, task=task) for task, part in data.items() for e in generative_examples(part, columns, chat)]
    names = {**COLUMNS, **(columns or {})}
    unknown = set(names) - set(COLUMNS)
    if unknown:
        raise ConfigError(f"columns names unknown fields {sorted(unknown)}; fields are {list(COLUMNS)}")
    out = []
    for i, row in enumerate(_rows(data)):
        if isinstance(row, GenerativeExample):
            out.append(row if chat is None else replace(row, chat=chat))
            continue
        if not isinstance(row, Mapping):
            raise DataError(f"row {i} is a {type(row).__name__}; give GenerativeExample objects or rows with "
                            f"{names['input']!r} and {names['target']!r} columns")
        missing = [names[f] for f in ("input", "target") if row.get(names[f]) is None]
        if missing:
            raise DataError(f"row {i} has no {missing} column(s); its columns are {sorted(row)}; "
                            "map yours with columns={'input': ..., 'target': ...}")
        try:
            out.append(GenerativeExample(row[names["input"]], row[names["target"]], row.get(names["choices"]),
                                         row.get(names["task"]), bool(chat)))
        except DataError as e:
            raise DataError(f"row {i}: {e}") from None
    return out


def is_generative(data: Any) -> bool:
    """Whether `data` holds generative examples (or rows/columns with an input and a target)."""
    if hasattr(data, "column_names"):
        return {"input", "target"} <= set(data.column_names)
    if isinstance(data, Mapping):
        return is_generative(next(iter(data.values()), ()))
    first = next(iter(data), None) if isinstance(data, Sequence) else None
    return isinstance(first, GenerativeExample) or (isinstance(first, Mapping) and {"input", "target"} <= set(first))


def pad_id(tokenizer: Any) -> int:
    """The id that pads: the tokenizer's pad token, else its EOS token (GPT-2 and Llama have no pad)."""
    found = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if found is None:
        raise ConfigError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first")
    return found


def _prompt_texts(tokenizer: Any, examples: Sequence[GenerativeExample]) -> list[str]:
    if any(e.chat for e in examples) and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("examples ask for a chat template (chat=True) but the tokenizer has none; "
                          "set tokenizer.chat_template or use chat=False")
    return [tokenizer.apply_chat_template([{"role": "user", "content": e.input}], add_generation_prompt=True,
                                          tokenize=False) if e.chat else e.input for e in examples]


def _prompt_ids(tokenizer: Any, examples: Sequence[GenerativeExample]) -> list[list[int]]:
    """Token ids of each input; special tokens (BOS, T5's EOS) are added unless a chat template rendered them."""
    texts = _prompt_texts(tokenizer, examples)
    ids: list[list[int]] = [[] for _ in examples]
    for chat in (False, True):
        rows = [i for i, e in enumerate(examples) if e.chat == chat]
        if rows:
            for i, found in zip(rows, tokenizer([texts[i] for i in rows], add_special_tokens=not chat)["input_ids"]):
                ids[i] = list(found)
    return ids


def _target_ids(tokenizer: Any, targets: Sequence[str]) -> list[list[int]]:
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return [list(ids) + eos for ids in tokenizer(list(targets), add_special_tokens=False)["input_ids"]]


def _pad(rows: Sequence[Sequence[int]], value: int, left: bool) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([[value] * (width - len(r)) + list(r) if left else list(r) + [value] * (width - len(r))
                         for r in rows], dtype=torch.long)


def encode(tokenizer: Any, examples: Sequence[GenerativeExample], encoder_decoder: bool, max_length: int = 128,
           targets: bool = True) -> dict[str, torch.Tensor]:
    """Padded `input_ids`, `attention_mask` and (with `targets`) `labels` for a batch of examples.

    Causal LMs (`encoder_decoder=False`) read input and target as one sequence; `labels` hold
    the target tokens and -100 under the input and the padding, so the loss counts target
    tokens only. Seq2seq models read the input; `labels` are the target, padded with -100.
    With `targets=False` only the inputs are encoded, left-padded for a causal LM so that
    batched generation continues every input right at its end. Over `max_length`, a causal
    LM's input loses its first tokens (the target is kept) and a seq2seq input its last ones.
    """
    if not examples:
        raise DataError("no examples to encode")
    pad = pad_id(tokenizer)
    prompts = _prompt_ids(tokenizer, examples)
    if not targets:
        prompts = [p[:max_length] if encoder_decoder else p[-max_length:] for p in prompts]
        ids = _pad(prompts, pad, left=not encoder_decoder)
        return {"input_ids": ids, "attention_mask": _pad([[1] * len(p) for p in prompts], 0, left=not encoder_decoder)}
    answers = [t[:max_length] for t in _target_ids(tokenizer, [e.target for e in examples])]
    if encoder_decoder:
        prompts = [p[:max_length] for p in prompts]
        return {"input_ids": _pad(prompts, pad, left=False),
                "attention_mask": _pad([[1] * len(p) for p in prompts], 0, left=False),
                "labels": _pad(answers, IGNORE, left=False)}
    prompts = [p[len(p) - min(len(p), max_length - len(a)):] for p, a in zip(prompts, answers)]
    return {"input_ids": _pad([p + a for p, a in zip(prompts, answers)], pad, left=False),
            "attention_mask": _pad([[1] * (len(p) + len(a)) for p, a in zip(prompts, answers)], 0, left=False),
            "labels": _pad([[IGNORE] * len(p) + a for p, a in zip(prompts, answers)], IGNORE, left=False)}


def with_choices(examples: Sequence[GenerativeExample]) -> tuple[list[GenerativeExample], torch.Tensor, torch.Tensor]:
    """One row per (example, choice) with the choice as target, each row's example index, and each answer's index."""
    bare = [i for i, e in enumerate(examples) if not e.choices]
    if bare:
        raise DataError(f"rank classification needs answer choices; examples {bare[:5]} have none")
    rows = [replace(e, target=c) for e in examples for c in e.choices]
    owner = torch.tensor([i for i, e in enumerate(examples) for _ in e.choices])
    answer = torch.tensor([e.choices.index(e.target) for e in examples])
    return rows, owner, answer
