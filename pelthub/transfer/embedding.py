"""Dataset-embedding cosine: the cheap, target-aware baseline a source ranking has to beat.

A task is summarised by the mean sentence embedding of its inputs under the frozen encoder
(each input mean-pooled over its tokens and L2-normalised, as sentence-transformers pools
MiniLM), and a source is scored by the cosine of its summary with the target's. It reads
only inputs: no labels, no trained module, no tuning, so it tells how alike two datasets
look, not whether a source's module helps. The transferability literature finds such
similarities often match LEEP-style metrics; `benchmarks/real_evidence.py` measures that.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ConfigError
from ..tasks import as_examples
from ..training import batches


@torch.no_grad()
def dataset_embedding(base: nn.Module, data: Any, tokenizer: Any, batch_size: int = 64,
                      max_length: int = 64) -> torch.Tensor:
    """(hidden,) mean over the examples of their normalised mean-pooled last hidden states.

    base: a transformers model with an encoder (its `base_model`, e.g. the BertModel inside a
    sequence classifier, gives the hidden states; the head is never used). data: `Example`s or a
    🤗 dataset (see `pelthub.tasks.as_examples`); text pairs are encoded as pairs.
    """
    examples = as_examples(data)
    if not examples:
        raise ConfigError("dataset_embedding needs at least one example; got an empty dataset")
    encoder = getattr(base, "base_model", base)
    encoder.eval()
    device = next(encoder.parameters()).device
    total = torch.zeros(encoder.config.hidden_size, dtype=torch.float64)
    for batch in batches(examples, tokenizer, batch_size, shuffle=False, max_length=max_length):
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        hidden = encoder(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        total += nn.functional.normalize(pooled, dim=-1).sum(0).double().cpu()
    return (total / len(examples)).float()


def embedding_cosine(base: nn.Module, target_data: Any, sources: Mapping[str, Any], tokenizer: Any,
                     batch_size: int = 64, max_length: int = 64) -> dict[str, float]:
    """{source name: cosine of its dataset embedding with the target's}, for source datasets by name."""
    if not isinstance(sources, Mapping) or not sources:
        raise ConfigError(f"sources must be a non-empty {{name: examples}} mapping, got {type(sources).__name__}"
                          f"{' (empty)' if isinstance(sources, Mapping) else ''}")
    target = dataset_embedding(base, target_data, tokenizer, batch_size, max_length)
    return {name: float(nn.functional.cosine_similarity(
        target, dataset_embedding(base, data, tokenizer, batch_size, max_length), dim=0))
        for name, data in sources.items()}
