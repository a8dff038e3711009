"""The naive baselines `rank_sources` offers beside its metrics: source_accuracy and embedding_cosine.

References are computed here: the accuracies written on the cards by hand, and the dataset embedding
as each example alone through the encoder (no padding), mean-pooled, normalised, averaged.
"""
from __future__ import annotations

import pytest
import torch
from transformers import BertTokenizer

import pelthub as ph
from pelthub.errors import ConfigError
from pelthub.tasks import Example
from pelthub.transfer import rank_sources
from tests import tiny

WORDS = ["cat", "dog", "tree", "leaf", "gear", "bolt", "wire", "code", "seven", "sum"]
LIVING = [Example(t, i % 2) for i, t in enumerate(["cat dog tree", "leaf", "dog dog cat tree leaf", "tree"])]
MACHINES = [Example(t, i % 2) for i, t in enumerate(["gear bolt wire", "code seven sum sum", "wire"])]
MIXED = [Example(t, i % 2) for i, t in enumerate(["cat gear", "leaf wire code", "dog"])]


@pytest.fixture(scope="module")
def tokenizer() -> BertTokenizer:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


@torch.no_grad()
def embedding(base: torch.nn.Module, data: list[Example], tokenizer: BertTokenizer) -> torch.Tensor:
    rows = [torch.nn.functional.normalize(base.bert(**tokenizer(e.text, return_tensors="pt")).last_hidden_state[0]
                                          .mean(0), dim=0) for e in data]
    return torch.stack(rows).mean(0)


def registry_sources(tmp_path, accuracies: dict[str, float | None]) -> tuple[ph.Registry, dict[str, str]]:
    reg = ph.Registry(tmp_path / "reg")
    refs = {}
    for i, (name, acc) in enumerate(accuracies.items()):
        torch.manual_seed(i)
        model = ph.attach(tiny.bert(), ph.Prompt(length=3), head=True)
        with torch.no_grad():
            model.adapters["default"]["prompt"].embeddings.normal_()
        refs[name] = reg.add(model, name=name, metrics={} if acc is None else {"accuracy": acc})
        model.detach()
    return reg, refs


def test_source_accuracy_orders_by_the_recorded_accuracy_and_excludes_what_has_none(tokenizer, tmp_path):
    reg, refs = registry_sources(tmp_path, {"low": 0.55, "high": 0.91, "mid": 0.7, "unscored": None})
    base = tiny.bert()
    ranking = rank_sources(base, LIVING, {**refs, "tensor": torch.randn(3, tiny.bert().config.hidden_size)}, "source_accuracy",
                           tokenizer=tokenizer, registry=reg)
    assert ranking.rows == [("high", 0.91), ("mid", 0.7), ("low", 0.55)]
    assert {n for n, _ in ranking.excluded} == {"unscored", "tensor"}
    assert all("metrics={'accuracy'" in reason for _, reason in ranking.excluded)
    torch.testing.assert_close(ranking.modules["high"].embeddings,
                               reg.load(refs["high"], tiny.bert()).adapters["default"]["prompt"].embeddings)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())


def test_embedding_cosine_is_the_cosine_of_mean_normalised_pooled_states(tokenizer, tmp_path):
    reg, refs = registry_sources(tmp_path, {"living": None, "machines": None, "mixed": None, "no-data": None})
    base = tiny.bert().eval()
    data = {"living": LIVING, "machines": MACHINES, "mixed": MIXED}
    ranking = rank_sources(base, LIVING[:2], refs, "embedding_cosine", tokenizer=tokenizer, registry=reg,
                           source_data=data)
    target = embedding(base, LIVING[:2], tokenizer)
    want = {n: float(torch.nn.functional.cosine_similarity(target, embedding(base, d, tokenizer), dim=0))
            for n, d in data.items()}
    assert [n for n, _ in ranking.rows] == sorted(want, key=lambda n: -want[n])
    for name, score in ranking.rows:
        assert score == pytest.approx(want[name], abs=1e-5)
    assert [n for n, _ in ranking.excluded] == ["no-data"]


def test_baseline_misuse_is_named(tokenizer, tmp_path):
    reg, refs = registry_sources(tmp_path, {"a": 0.6})
    base = tiny.bert()
    with pytest.raises(ConfigError, match="source_data="):
        rank_sources(base, LIVING, refs, "embedding_cosine", tokenizer=tokenizer, registry=reg)
    with pytest.raises(ConfigError, match="embedding_cosine' only"):
        rank_sources(base, LIVING, refs, "zero_shot", tokenizer=tokenizer, registry=reg, source_data={"a": LIVING})
    with pytest.raises(ConfigError, match="no target"):
        rank_sources(base, LIVING, refs, "source_accuracy", registry=reg, target=ph.Prompt(length=3))
