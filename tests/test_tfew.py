"""The T-Few recipe on a tiny T5 and a tiny Llama: losses against hand-computed log-likelihoods.

Every reference is read one example and one choice at a time from the unpadded input
(`target_logprobs`, as tests/test_generative.py computes it), and the losses are
formed from those by hand.
"""
import itertools
from dataclasses import replace

import pytest
import torch

import pelthub as ph
from pelthub.errors import DataError
from pelthub.generative import choice_scores
from pelthub.tasks.generative import GenerativeExample as G, encode
from pelthub.tfew import choice_batches, tfew_ia3, tfew_loss
from tests import tiny
from tests.test_generative import DATA, target_logprobs, tok  # noqa: F401  (tok: pytest fixture)

BUILDERS = {"t5": tiny.t5, "llama": tiny.llama}


def model_for(arch):
    model = ph.attach(BUILDERS[arch](), tfew_ia3()).eval()
    tiny.perturb(model, seed=5, scale=0.5)
    return model


def hand_losses(model, arch, tok, examples):  # noqa: F811
    """(L_LM, L_UL, L_LN) from per-token log-probabilities of every choice, computed one at a time."""
    right, wrong, ln = [], [], []
    for e in examples:
        per_choice = [target_logprobs(model, arch, tok, G(e.input, c)) for c in e.choices]
        answer = e.choices.index(e.target)
        right.append(per_choice[answer])
        wrong += [lp for i, lp in enumerate(per_choice) if i != answer]
        scores = torch.stack([lp.mean() for lp in per_choice])
        ln.append(-scores.log_softmax(0)[answer])
    wrong = torch.cat(wrong)
    return -torch.cat(right).mean(), -torch.log(1 - wrong.exp()).mean(), torch.stack(ln).mean()


def one_batch(model, tok, examples=DATA):  # noqa: F811
    return next(choice_batches(model, examples, tok, batch_size=len(examples), shuffle=False))


@pytest.mark.parametrize("arch", BUILDERS)
def test_losses_equal_the_hand_formulas_over_mixed_choice_counts(arch, tok):  # noqa: F811
    model = model_for(arch)
    with torch.no_grad():
        found = tfew_loss(model, one_batch(model, tok), unlikelihood=0.5, length_norm=2.0)
    lm, ul, ln = hand_losses(model, arch, tok, DATA)
    assert float(found.lm) == pytest.approx(float(lm), abs=1e-5)
    assert float(found.unlikelihood) == pytest.approx(float(ul), abs=1e-5)
    assert float(found.length_norm) == pytest.approx(float(ln), abs=1e-5)
    assert float(found.total) == pytest.approx(float(lm + 0.5 * ul + 2.0 * ln), abs=1e-5)
    # L_LN scores the choices as rank classification does
    scores = choice_scores(model, DATA, tok)
    want = torch.nn.functional.cross_entropy(scores, torch.tensor([e.choices.index(e.target) for e in DATA]))
    assert float(found.length_norm) == pytest.approx(float(want), abs=1e-5)


@pytest.mark.parametrize("arch", BUILDERS)
def test_zero_weights_give_the_plain_lm_loss(arch, tok):  # noqa: F811
    model = model_for(arch)
    with torch.no_grad():
        found = tfew_loss(model, one_batch(model, tok), unlikelihood=0.0, length_norm=0.0)
        plain = model(**encode(tok, DATA, arch == "t5")).loss
    assert float(found.total) == pytest.approx(float(plain), abs=1e-5)


def test_batches_split_by_example_and_shuffle(tok):  # noqa: F811
    model = model_for("llama")
    seen = [b for b in choice_batches(model, DATA, tok, batch_size=3, shuffle=False)]
    assert [b["choice_owner"].tolist() for b in seen] == [[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 0]]
    assert [b["choice_answer"].tolist() for b in seen] == [[0, 1, 0], [0]]
    drawn = next(choice_batches(model, DATA, tok, batch_size=4, seed=1))
    assert sorted(drawn["choice_answer"].tolist()) == [0, 0, 0, 1] and drawn["input_ids"].shape[0] == 11
    model.task_names = ["x", "y"]  # a routed model: every row carries its example's task
    named = [replace(e, task=t) for e, t in zip(DATA, "xyyx")]
    ids = [b["task_ids"].tolist() for b in choice_batches(model, named, tok, batch_size=3, shuffle=False)]
    assert ids == [[0, 0, 0, 1, 1, 1, 1, 1, 1], [0, 0]]


def test_ia3_preset_scales_keys_values_and_the_ffn_from_ones():
    module = ph.attach(tiny.t5(), tfew_ia3()).adapters["default"]["ia3"]
    outputs = sorted(k for k, on_input in module.on_input.items() if not on_input)
    inputs = sorted(k for k, on_input in module.on_input.items() if on_input)
    attentions = (("encoder", 0, "SelfAttention"), ("decoder", 0, "SelfAttention"), ("decoder", 1, "EncDecAttention"))
    assert outputs == sorted(f"{stack}-block-{i}-layer-{j}-{attention}-{kv}" for i in (0, 1) for kv in "kv"
                             for stack, j, attention in attentions)
    assert inputs == sorted(f"{stack}-block-{i}-layer-{j}-DenseReluDense-wo" for i in (0, 1)
                            for stack, j in (("encoder", 1), ("decoder", 2)))
    assert all(torch.equal(s, torch.ones_like(s)) for s in module.scales.values())


def test_a_plain_loop_trains_the_vectors_only(tok):  # noqa: F811
    model = ph.attach(tiny.t5(), tfew_ia3())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for batch in itertools.islice(choice_batches(model, DATA, tok, batch_size=4), 12):
        loss = tfew_loss(model, batch).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all("ia3" in n for n, p in model.named_parameters() if p.requires_grad)


def test_examples_without_choices_are_refused_before_any_batch(tok):  # noqa: F811
    with pytest.raises(DataError, match="needs answer choices"):
        next(choice_batches(model_for("llama"), [*DATA, G("a", "b")], tok))
