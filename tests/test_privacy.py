"""DP-SGD on module parameters (`pelthub.privacy`): per-example gradients, clipping, accounting, the card.

References: every example's gradient is taken alone with plain autograd (one backward per
example); clipping is done by hand from those; ε comes from Opacus' RDP analysis functions
called here directly with the run's (σ, q, steps); the base's tensors are compared with a
copy taken before training.
"""
from __future__ import annotations

import hashlib
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.optimizers import DPOptimizer
from transformers import BertTokenizer

import pelthub as ph
from pelthub.errors import ConfigError, ModuleFormatError
from pelthub.model.io import read_description
from pelthub.privacy import Privacy, fit_private, set_grad_samples
from pelthub.registry.card import BOOKKEEPING, Card
from pelthub.tasks import Example
from tests import tiny

WORDS = ["good", "great", "fine", "nice", "happy", "bad", "awful", "poor", "sad", "dark"]
KINDS = {"lora": [ph.LoRA(r=2)], "prompt": [ph.Prompt(length=3)], "prefix": [ph.Prefix(length=2)],
         "ia3+bottleneck": [ph.IA3(), ph.Bottleneck(reduction=8)]}
# Opacus' RDPAccountant orders (written out: a change of the default changes ε, and this test says so)
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


@pytest.fixture(scope="module")
def tokenizer() -> BertTokenizer:
    return BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])})


def examples(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(2, 6))  # different lengths: padded batches
        out.append(Example(" ".join(words), int(sum(w in WORDS[:5] for w in words) * 2 > len(words))))
    return out


@pytest.fixture
def batches_seen(monkeypatch) -> list:
    """The batches fit_private computes per-example gradients on (None: an empty Poisson batch)."""
    seen = []

    def spy(model, batch, *rest):
        seen.append(batch)
        return set_grad_samples(model, batch, *rest)

    monkeypatch.setattr("pelthub.privacy.set_grad_samples", spy)
    return seen


def model_with(kinds: list, arch: str = "bert") -> ph.ModularModel:
    model = ph.attach(tiny.BUILDERS[arch](), *kinds, head=True)
    tiny.perturb(model, seed=2, scale=0.3)
    return model


def labelled(arch: str = "bert", b: int = 4) -> dict[str, torch.Tensor]:
    return {**tiny.batch(arch, b=b), "labels": torch.tensor([0, 1, 1, 0, 1, 0][:b])}


def alone(model: ph.ModularModel, batch: dict[str, torch.Tensor], params: list) -> list[list[torch.Tensor]]:
    """Each example's gradient, from a forward and backward of that example only."""
    out = []
    for i in range(len(batch["labels"])):
        row = {k: v[i:i + 1] for k, v in batch.items()}
        logits = model(**{k: v for k, v in row.items() if k != "labels"}).logits
        out.append(list(torch.autograd.grad(F.cross_entropy(logits, row["labels"]), params, allow_unused=True)))
    return [[torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)] for gs in out]


@pytest.mark.parametrize("arch,microbatch", [("bert", 1), ("bert", 4), ("roberta", 3)])
@pytest.mark.parametrize("kinds", KINDS)
def test_per_example_gradients_equal_each_example_taken_alone(arch, microbatch, kinds):
    """Microbatches of 1, of the whole batch, and 3 + 1 examples."""
    check_per_example_gradients(model_with(KINDS[kinds], arch).eval(), labelled(arch), microbatch)


def test_per_task_modules_train_on_their_own_tasks_examples(tokenizer, batches_seen):
    model = model_with([ph.PerTask(ph.LoRA(r=2), tasks=("a", "b"))]).eval()
    check_per_example_gradients(model, {**labelled(), "task_ids": torch.tensor([0, 1, 1, 0])}, microbatch=3)
    run = fit_private(model, {"b": examples(20)}, tokenizer, Privacy(1.0, 1.0), steps=3, batch_size=8, progress=False)
    assert run.sample_rate == 8 / 20
    assert all(b is None or (b["task_ids"] == 1).all() for b in batches_seen) and any(batches_seen)


def check_per_example_gradients(model: ph.ModularModel, batch: dict[str, torch.Tensor], microbatch: int) -> None:
    names, params = zip(*model.module_parameters())
    losses = set_grad_samples(model, batch, params, microbatch)
    want = alone(model, batch, params)
    assert losses.shape == (4,)
    for j, p in enumerate(params):
        assert p.grad_sample.shape == (4, *p.shape)
        for i in range(4):
            torch.testing.assert_close(p.grad_sample[i], want[i][j], atol=1e-6, rtol=1e-4)
    assert all(p.grad_sample.abs().sum() > 0 for n, p in zip(names, params) if n.startswith("adapters"))


def test_clipping_bounds_each_example_and_sums_them():
    """σ = 0 and SGD at lr 1: the step is −(1/B)·Σ_i g_i·min(1, C/‖g_i‖), the norm over all module tensors."""
    model = model_with(KINDS["lora"]).eval()
    batch = labelled(b=6)
    params = [p for _, p in model.module_parameters()]
    grads = alone(model, batch, params)
    norms = torch.stack([torch.cat([g.flatten() for g in gs]).norm() for gs in grads])
    clip = float(norms.median())  # some examples are clipped, some not
    assert (norms > clip).any() and (norms < clip).any()
    want = [sum(gs[j] * min(1.0, clip / float(n)) for gs, n in zip(grads, norms)) / 6 for j in range(len(params))]
    before = [p.detach().clone() for p in params]
    optimizer = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=clip,
                            expected_batch_size=6)
    set_grad_samples(model, batch, params)
    optimizer.step()
    for p, b, w in zip(params, before, want):
        torch.testing.assert_close(b - p.detach(), w, atol=1e-6, rtol=1e-4)


def test_training_changes_module_parameters_only_and_reports_the_rdp_epsilon(tokenizer, monkeypatch):
    model = model_with(KINDS["lora"])
    base = {k: v.clone() for k, v in model.base.state_dict().items()}
    modules = {k: v.detach().clone() for k, v in model.module_parameters()}
    settings = []

    class Recording(DPOptimizer):  # what fit_private asks Opacus for
        def __init__(self, optimizer, **kwargs):
            settings.append(kwargs)
            super().__init__(optimizer, **kwargs)

    monkeypatch.setattr("opacus.optimizers.DPOptimizer", Recording)
    run = fit_private(model, examples(40), tokenizer, Privacy(noise_multiplier=0.9, max_grad_norm=0.5, delta=1e-4),
                      steps=7, batch_size=8, lr=1e-2, progress=False)
    assert [{k: s[k] for k in ("noise_multiplier", "max_grad_norm", "expected_batch_size")} for s in settings] == [
        {"noise_multiplier": 0.9, "max_grad_norm": 0.5, "expected_batch_size": 8}]
    assert all(torch.equal(v, base[k]) for k, v in model.base.state_dict().items())
    assert all(not torch.equal(p, modules[k]) for k, p in model.module_parameters())
    rdp = compute_rdp(q=0.2, noise_multiplier=0.9, steps=7, orders=ORDERS)
    epsilon, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=1e-4)
    assert run.epsilon == pytest.approx(epsilon, rel=1e-12)
    assert (run.delta, run.steps, run.sample_rate, len(run.losses)) == (1e-4, 7, 0.2, 7)
    assert model.privacy == {"epsilon": run.epsilon, "delta": 1e-4, "noise_multiplier": 0.9, "max_grad_norm": 0.5,
                             "sample_rate": 0.2, "steps": 7, "accountant": "rdp", "sampling": "poisson"}


def test_poisson_batches_vary_and_an_empty_one_is_a_noise_only_step(tokenizer, batches_seen):
    """q = 1/40 over 40 examples: about a third of the batches are empty (loss NaN)."""
    run = fit_private(model_with(KINDS["lora"]), examples(40), tokenizer, Privacy(1.0, 1.0), steps=12, batch_size=1,
                      progress=False)
    seen = [0 if b is None else len(b["labels"]) for b in batches_seen]
    assert 0 in seen and len(set(seen)) > 1
    assert [math.isnan(x) for x in run.losses] == [n == 0 for n in seen]


def test_the_card_and_pelthub_json_record_epsilon_and_delta(tokenizer, tmp_path):
    model = model_with(KINDS["lora"])
    run = fit_private(model, examples(40), tokenizer, Privacy(1.1, 1.0, delta=1e-5), steps=3, batch_size=8,
                      progress=False)
    model.save_pretrained(tmp_path / "saved")
    assert read_description(tmp_path / "saved")["privacy"] == run.record()
    registry = ph.Registry(tmp_path / "reg")
    card = registry.get(registry.add(model, name="dp-lora"))
    assert (card.privacy["epsilon"], card.privacy["delta"]) == (run.epsilon, 1e-5)
    text = card.to_markdown()
    assert f"| privacy | (ε = {run.epsilon:.3g}, δ = 1e-05)-DP |" in text
    assert Card.from_markdown(text).privacy == run.record()


def plain_card() -> Card:
    return Card(name="m", version=1, kinds=["lora"], modules={"default": [{"kind": "lora"}]}, heads={},
                base_model={"name": "b", "revision": None, "fingerprint": {"sha256": "0" * 64}}, task=None,
                tags=[], metrics={}, trainable_parameters=1, files={"f": {"sha256": "1" * 64, "size": 1}},
                created="2026-01-01T00:00:00+00:00", pelthub_version="0")


def test_a_card_without_privacy_keeps_the_identity_it_had_before_the_field():
    card = plain_card()
    before = {k: v for k, v in card.to_dict().items() if k not in (*BOOKKEEPING, "privacy")}
    assert card.identity() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("privacy", [{"epsilon": math.inf, "delta": 1e-5}, {"epsilon": 1.0, "delta": 1.0},
                                     {"epsilon": 1.0}, {"epsilon": 1.0, "delta": 1e-5, "note": ["x"]}])
def test_a_malformed_privacy_record_is_refused_naming_the_field(privacy):
    card = plain_card()
    with pytest.raises(ModuleFormatError, match="field 'privacy'"):
        Card.from_dict({**card.to_dict(), "privacy": privacy})


@pytest.mark.parametrize("fields,match", [(dict(noise_multiplier=0.0, max_grad_norm=1.0), "noise_multiplier"),
                                          (dict(noise_multiplier=1.0, max_grad_norm=-1.0), "max_grad_norm"),
                                          (dict(noise_multiplier=1.0, max_grad_norm=1.0, delta=1.0), "delta"),
                                          (dict(noise_multiplier=True, max_grad_norm=1.0), "noise_multiplier")])
def test_bad_settings_are_refused(fields, match):
    with pytest.raises(ConfigError, match=match):
        Privacy(**fields)


def test_bad_calls_are_refused(tokenizer):
    settings = Privacy(1.0, 1.0)
    with pytest.raises(ConfigError, match="ModularModel"):
        fit_private(tiny.bert(), examples(8), tokenizer, settings, progress=False)
    model = model_with(KINDS["lora"])
    with pytest.raises(ConfigError, match="microbatch must be a positive integer"):
        fit_private(model, examples(8), tokenizer, settings, batch_size=4, microbatch=0, progress=False)
    with pytest.raises(ConfigError, match="exceeds the 8 examples"):
        fit_private(model, examples(8), tokenizer, settings, batch_size=16, progress=False)
    model.base.bert.embeddings.word_embeddings.weight.requires_grad_(True)
    with pytest.raises(ConfigError, match="base parameters require grad"):
        fit_private(model, examples(8), tokenizer, settings, batch_size=4, progress=False)
