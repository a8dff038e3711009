"""Dataset-embedding cosine (`pelthub.transfer.embedding`): against a per-example reference, padding-free."""
from __future__ import annotations

import pytest
import torch
from transformers import BertTokenizer

from pelthub.errors import ConfigError
from pelthub.tasks import Example
from pelthub.transfer.embedding import dataset_embedding, embedding_cosine
from tests import tiny

WORDS = ["cat", "dog", "tree", "leaf", "gear", "bolt", "wire", "code", "seven", "sum"]


@pytest.fixture(scope="module")
def tokenizer() -> BertTokenizer:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def examples(texts: list[str]) -> list[Example]:
    return [Example(t, i % 2) for i, t in enumerate(texts)]


LIVING = examples(["cat dog tree", "leaf", "dog dog cat tree leaf", "tree"])
MACHINES = examples(["gear bolt wire", "code seven sum sum", "wire"])


@torch.no_grad()
def reference(base: torch.nn.Module, data: list[Example], tokenizer: BertTokenizer) -> torch.Tensor:
    """Each example alone (no padding at all): mean of its last hidden states, unit length; then the mean."""
    rows = []
    for e in data:
        enc = tokenizer(e.text, return_tensors="pt")
        hidden = base.bert(**enc).last_hidden_state[0]
        rows.append(torch.nn.functional.normalize(hidden.mean(0), dim=0))
    return torch.stack(rows).mean(0)


def test_the_embedding_is_the_mean_of_normalised_mean_pooled_states(tokenizer):
    base = tiny.bert().eval()
    for data in (LIVING, MACHINES):   # lengths differ within a batch: padding must not count
        got = dataset_embedding(base, data, tokenizer, batch_size=3)
        torch.testing.assert_close(got, reference(base, data, tokenizer), atol=1e-5, rtol=1e-5)


def test_cosine_scores_each_source_against_the_target(tokenizer):
    base = tiny.bert().eval()
    target = reference(base, LIVING[:2], tokenizer)
    want = {name: float(torch.nn.functional.cosine_similarity(target, reference(base, data, tokenizer), dim=0))
            for name, data in (("living", LIVING), ("machines", MACHINES), ("same", LIVING[:2][::-1]))}
    got = embedding_cosine(base, LIVING[:2], {"living": LIVING, "machines": MACHINES, "same": LIVING[:2][::-1]},
                           tokenizer)
    assert got.keys() == want.keys() and got["same"] == pytest.approx(1.0, abs=1e-6)
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-5)


def test_bad_input_is_named(tokenizer):
    base = tiny.bert()
    with pytest.raises(ConfigError, match="at least one example"):
        dataset_embedding(base, [], tokenizer)
    with pytest.raises(ConfigError, match="non-empty"):
        embedding_cosine(base, LIVING, {}, tokenizer)
    with pytest.raises(ConfigError, match="mapping"):
        embedding_cosine(base, LIVING, [LIVING], tokenizer)
