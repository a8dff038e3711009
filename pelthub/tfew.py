"""The T-Few recipe (Liu et al. 2022): (IA)³ trained with three losses over answer choices.

    L = L_LM + λ_UL·L_UL + λ_LN·L_LN      (the paper: λ = 1)

- L_LM: mean negative log-likelihood of the right choice's tokens;
- L_UL: unlikelihood, −mean log(1 − p(token)) over the tokens of the wrong choices, which
  pushes probability off answers the model should not give;
- L_LN: cross-entropy over the choices, each scored by its length-normalised log-likelihood
  (mean over its tokens), the score rank classification (`evaluate(..., metrics=["rank"])`)
  predicts with, so training and inference read the same number.

`choice_batches` encodes every (example, choice) pair as one row, so one forward scores all
choices of a batch; `tfew_loss` reads the three losses from it. Any loop trains with them:

    for batch in itertools.islice(choice_batches(model, data, tok), 1000):
        tfew_loss(model, batch).total.backward(); optimizer.step(); optimizer.zero_grad()

The paper's defaults: 1,000 steps, lr 3e-3, batch 8 examples.
"""
from __future__ import annotations

from typing import Any, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .generative import _encoder_decoder, _task_ids
from .modules import IA3
from .tasks.generative import IGNORE, encode, generative_examples, with_choices

UL_MAX_LOG_P = -1e-6  # log p is capped here in L_UL: log(1 − p) is −inf at p = 1


def tfew_ia3() -> IA3:
    """T-Few's (IA)³: ones-initialised vectors on keys and values (self and cross attention) and the FFN.

    The FFN vector scales the input of its down projection (T5's wo, Llama's down_proj), which
    is the paper's l_ff ⊙ γ(W₁x) and, in gated FFNs, the output of wi_1 / up. GPT-2 fuses q, k
    and v into c_attn, so there the query is scaled as well.
    """
    return IA3(targets=None, feedforward=("down",))


class TFewLoss(NamedTuple):
    """The weighted total and its three parts (each a scalar tensor)."""

    total: torch.Tensor
    lm: torch.Tensor
    unlikelihood: torch.Tensor
    length_norm: torch.Tensor


def choice_batches(model: nn.Module, data: Any, tokenizer: Any, batch_size: int = 8, shuffle: bool = True,
                   seed: int = 0, max_length: int = 128) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches (one pass in order when shuffle=False) of `batch_size` examples, one row
    per (example, choice) with the choice as target, plus `choice_owner` (each row's example in the
    batch) and `choice_answer` (each example's right choice). Every example needs `choices`."""
    examples = generative_examples(data)
    with_choices(examples)  # checks every example has choices before the first batch
    task_ids = _task_ids(model, examples)
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=generator) if shuffle else torch.arange(len(examples))
        for idx in order.split(batch_size):
            rows, owner, answer = with_choices([examples[i] for i in idx.tolist()])
            batch = encode(tokenizer, rows, _encoder_decoder(model), max_length)
            if task_ids is not None:
                batch["task_ids"] = task_ids[idx][owner]
            yield {**batch, "choice_owner": owner, "choice_answer": answer}
        if not shuffle:
            return


def token_log_probs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, T) log-probability of each label token under `model` and the (rows, T) mask of real labels."""
    labels = batch["labels"]
    if _encoder_decoder(model):  # the labels give the decoder its inputs
        logits = model(**batch).logits
    else:  # prompts prepended to a causal LM's input lengthen the logits at the front
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, -labels.shape[1]:]
        logits, labels = logits[:, :-1], labels[:, 1:]
    picked = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked, labels != IGNORE


def tfew_loss(model: nn.Module, batch: dict[str, torch.Tensor], unlikelihood: float = 1.0,
              length_norm: float = 1.0) -> TFewLoss:
    """T-Few's L_LM + unlikelihood·L_UL + length_norm·L_LN on a `choice_batches` batch (see the module docstring)."""
    owner, answer = batch["choice_owner"], batch["choice_answer"]
    inputs = {k: v for k, v in batch.items() if k not in ("choice_owner", "choice_answer")}
    logp, mask = token_log_probs(model, inputs)
    place = torch.arange(len(owner), device=owner.device) - torch.searchsorted(owner, owner)  # choice index
    right = place == answer[owner]
    summed = torch.where(mask, logp, 0.0).sum(-1)
    lm = -summed[right].sum() / mask[right].sum()
    wrong = mask & ~right.unsqueeze(1)
    log_not = torch.log(-torch.expm1(logp.clamp(max=UL_MAX_LOG_P)))
    ul = -torch.where(wrong, log_not, 0.0).sum() / wrong.sum().clamp(min=1)
    scores = logp.new_full((len(answer), int(place.max()) + 1), float("-inf"))
    scores = scores.index_put((owner, place), summed / mask.sum(-1))
    ln = F.cross_entropy(scores, answer.to(scores.device))
    return TFewLoss(lm + unlikelihood * ul + length_norm * ln, lm, ul, ln)
