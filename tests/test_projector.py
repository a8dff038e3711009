"""Cross-model prompt projector (Su et al.): the formula, training on a frozen target, registry provenance."""
from __future__ import annotations

import copy
import re
from collections import Counter

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

import pelthub as ph
from pelthub.errors import ConfigError, IncompatibleModuleError
from pelthub.model.io import base_model_info
from pelthub.tasks import load_task
from pelthub.training import batches
from tests import tiny

L, H = 4, 16  # prompt length, projector hidden width


def wide(seed: int = 3, layers: int = 1) -> BertForSequenceClassification:
    """A target base of another width (48, the source tiny.bert is 32) and depth, without dropout."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tiny.VOCAB, hidden_size=48, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    base = BertForSequenceClassification(cfg).eval()
    base.config.name_or_path = "tiny/wide-bert"
    return base


def projector(seed: int = 0) -> ph.Projector:
    """A projector from tiny.bert (32) to `wide` (48) with its LayerNorm gain and bias moved off 1 and 0."""
    torch.manual_seed(seed)
    p = ph.Projector(ph.ProjectorConfig.between(tiny.bert(), wide(), L, hidden=H))
    with torch.no_grad():
        p.norm.weight.uniform_(0.5, 1.5)
        p.norm.bias.uniform_(-0.5, 0.5)
    return p


def hooked(base) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())


@pytest.fixture(scope="module")
def tokenizer() -> BertTokenizer:
    words = Counter(w for e in load_task("sentiment_movies", n_train=64).train for w in re.findall(r"[a-z]+", e.text.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(w for w, _ in words.most_common(tiny.VOCAB - 5))]
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def data(n: int = 32):
    return list(load_task("sentiment_movies", n_train=n, n_dev=0, n_test=0).train)


def test_config_reads_widths_and_refuses_bad_sizes():
    assert ph.ProjectorConfig.between(tiny.bert(), wide(), L) == ph.ProjectorConfig(L, 32, 48, 768)
    with pytest.raises(ConfigError, match="length"):
        ph.ProjectorConfig(0, 32, 48)
    with pytest.raises(ConfigError, match="hidden"):
        ph.ProjectorConfig(L, 32, 48, hidden=True)


def test_output_shape_one_prompt_and_a_stack():
    p = projector()
    assert p(torch.randn(L, 32)).shape == (L, 48)
    assert p(torch.randn(5, L, 32)).shape == (5, L, 48)


def test_projection_equals_the_formula():
    """P_t = LN(reshape_{l×d_t}(W₂·tanh(W₁·vec(P_s) + b₁) + b₂)), LN per row, computed here in float64."""
    p = projector()
    prompts = torch.randn(3, L, 32)
    w1, b1, w2, b2 = (t.double() for t in (p.up.weight, p.up.bias, p.down.weight, p.down.bias))
    expected = []
    for ps in prompts.double():
        y = (w2 @ torch.tanh(w1 @ ps.reshape(-1) + b1) + b2).reshape(L, 48)
        mean, var = y.mean(1, keepdim=True), y.var(1, unbiased=False, keepdim=True)
        expected.append((y - mean) / torch.sqrt(var + p.norm.eps) * p.norm.weight.double() + p.norm.bias.double())
    torch.testing.assert_close(p(prompts).double(), torch.stack(expected), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p(prompts[1]), p(prompts)[1])


def test_only_projector_parameters_get_gradients(tokenizer):
    p, target, source = projector(), wide(), torch.randn(L, 32)
    frozen = copy.deepcopy(target.state_dict())
    flags = {n: t.requires_grad for n, t in target.named_parameters()}
    before = {n: t.detach().clone() for n, t in p.named_parameters()}
    ph.train_projector(p, source, target, data(), tokenizer, steps=2, batch_size=8, lr=1e-2)
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in p.parameters())
    assert all(t.grad is None for t in target.parameters())
    assert all(not torch.equal(before[n], t) for n, t in p.named_parameters())
    assert all(torch.equal(frozen[n], t) for n, t in target.state_dict().items())
    assert {n: t.requires_grad for n, t in target.named_parameters()} == flags
    assert not hooked(target)  # nothing stays attached


def test_the_target_sees_the_projected_prompt(tokenizer):
    """The first loss equals the target's loss with P_t set as an ordinary soft prompt, on the same first batch."""
    p, target, source, examples = projector(), wide(), torch.randn(L, 32), data()
    with torch.no_grad():
        expected_prompt = p(source)
    reference = ph.attach(copy.deepcopy(target), ph.Prompt(length=L))
    with torch.no_grad():
        reference.adapters["default"]["prompt"].embeddings.copy_(expected_prompt)
        first = next(batches(examples, tokenizer, 8, seed=5))
        expected = reference(**first).loss.item()
    losses = ph.train_projector(p, source, target, examples, tokenizer, steps=1, batch_size=8, seed=5)
    assert losses[0] == pytest.approx(expected, rel=1e-5)


def test_training_lowers_the_target_loss(tokenizer):
    p, target = projector(), wide()
    with torch.no_grad():  # a frozen head of std 0.02 gives logits near 0 whatever the prompt does
        target.classifier.weight.normal_(0.0, 1.0)
    losses = ph.train_projector(p, torch.randn(L, 32), target, data(64), tokenizer, steps=40, batch_size=16, lr=3e-3)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05


def source_modules(reg: ph.Registry, source) -> list[str]:
    refs = []
    for i, task in enumerate(("movies", "news")):
        model = tiny.trained(ph.Prompt(length=L), seed=i, base=source, name="tiny/bert")
        refs.append(reg.add(model, name=f"src-{task}", task=task, tags=["demo"]))
        model.detach()
    return refs


def test_projected_modules_in_the_registry(tmp_path):
    reg, source, target, p = ph.Registry(tmp_path / "reg"), tiny.bert(), wide(), projector()
    refs = source_modules(reg, source)
    made = ph.project_prompts(p, refs, reg, source, target)
    assert list(made) == refs
    for ref, new in made.items():
        parent, card = reg.get(ref), reg.get(new)
        assert card.name == f"{parent.name}-projected" and card.task == parent.task
        assert card.tags == ["demo", "projected"]
        assert card.parents == [{"ref": ref, "sha256": parent.digest}]
        assert card.base_model["fingerprint"] == base_model_info(target)["fingerprint"]
        assert card.source["projected_from"]["fingerprint"] == base_model_info(source)["fingerprint"]
        assert card.base_sha != card.source["projected_from"]["fingerprint"]["sha256"]
        assert card.source["projector"] == {"length": L, "source_hidden": 32, "target_hidden": 48, "hidden": H}
        loaded = reg.load(ref, source)
        with torch.no_grad():
            expected = p(loaded.adapters["default"]["prompt"].embeddings)
        loaded.detach()
        projected = reg.load(new, target)
        torch.testing.assert_close(projected.adapters["projected"]["prompt"].embeddings, expected)
        projected.detach()
        with pytest.raises(IncompatibleModuleError):
            reg.load(new, source)
    assert reg.graph().has_edge(refs[0], made[refs[0]])


def test_bad_inputs_get_pelthub_errors(tmp_path, tokenizer):
    p, target = projector(), wide()
    with pytest.raises(ConfigError, match=r"4 tokens x width 32.*got \(5, 32\)"):
        p(torch.randn(5, 32))
    with pytest.raises(ConfigError, match=r"got \(4, 48\)"):
        ph.train_projector(p, torch.randn(L, 48), target, data(), tokenizer, steps=1)
    narrow = tiny.bert()  # width 32, not the projector's 48
    with pytest.raises(ConfigError, match="width 32, this projector makes width 48"):
        ph.train_projector(p, torch.randn(L, 32), narrow, data(), tokenizer, steps=1)
    assert all(t.requires_grad for t in narrow.parameters()) and not hooked(narrow)
    with pytest.raises(ConfigError, match="plain target base"):
        ph.train_projector(p, torch.randn(L, 32), ph.attach(wide(), ph.LoRA()), data(), tokenizer, steps=1)
    reg = ph.Registry(tmp_path / "reg")
    refs = source_modules(reg, tiny.bert())
    with pytest.raises(IncompatibleModuleError):  # the sources were trained on tiny.bert, not on `target`
        ph.project_prompts(p, refs, reg, target, target)
    long = ph.Projector(ph.ProjectorConfig(L + 1, 32, 48, hidden=H))
    with pytest.raises(ConfigError, match="5 tokens x width 32"):
        ph.project_prompts(long, refs, reg, tiny.bert(), target)
    assert len(reg) == 2  # nothing was added
