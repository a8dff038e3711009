"""Composing for generative tasks: each composition method on causal LMs and T5, trained on `GenerativeExample`s.

References: the target log-likelihood computed by hand one example at a time (tests/test_generative.py's
`hand_loss`), the same model without the feature, or a plain training loop written here.
"""
import pytest
import torch

import pelthub as ph
from pelthub.errors import ConfigError, DataError
from pelthub.generative import GenerativeCollator, evaluate
from pelthub.model import ModularModel
from pelthub.routing import add_task
from pelthub.tasks.generative import GenerativeExample as G
from pelthub.training import fit
from pelthub.transfer import init_from
from tests import tiny
from tests.test_generative import BUILDERS, DATA, hand_loss, tok  # noqa: F401  (tok: pytest fixture)
from tests.tiny import perturb

SKILLS = {"p": DATA[:2], "q": DATA[2:]}


def trained_prompt(arch: str, tok, seed: int) -> torch.Tensor:
    model = ph.attach(BUILDERS[arch](), ph.Prompt(length=3))
    fit(model, DATA, tok, steps=4, batch_size=4, lr=3e-2, seed=seed, progress=False)
    return next(m for m in model.adapters["default"].values()).embeddings.detach().clone()


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_spot_init_copies_the_source_prompt_then_trains_on_the_generative_target(arch, tok):
    source = trained_prompt(arch, tok, seed=1)
    model = init_from(ph.attach(BUILDERS[arch](), ph.Prompt(length=3)), source)
    prompt = next(m for m in model.adapters["default"].values()).embeddings
    assert torch.equal(prompt.detach(), source)
    before = hand_loss(model, arch, tok, DATA)
    fit(model, DATA, tok, steps=10, batch_size=4, lr=1e-1, progress=False)
    assert hand_loss(model, arch, tok, DATA) < before  # tiny GPT-2 prompts move slowly (std 0.02 embeddings)


def test_attempt_on_t5_with_one_source_and_uniform_attention_equals_the_hand_prompt(tok):
    """ATTEMPT over encoder prompts on T5: at infinite temperature the attention over (source, target) is
    uniform, so the prompt is target + (source + target) / 2; the same T5 with that as a plain prompt is the
    reference."""
    source, target = trained_prompt("t5", tok, 1), trained_prompt("t5", tok, 2)
    model = ph.compose(tiny.t5(), ph.AttentionMix({"s": source}, temperature=1e9, target=ph.Prompt(length=3)))
    mix = next(iter(model.adapters[list(model.adapters)[-1]].values()))
    with torch.no_grad():
        mix.targets.copy_(target[None])
    reference = ph.attach(tiny.t5(), ph.Prompt(length=3))
    with torch.no_grad():
        next(iter(reference.adapters["default"].values())).embeddings.copy_(target + (source + target) / 2)
    assert hand_loss(model.eval(), "t5", tok, DATA) == pytest.approx(hand_loss(reference.eval(), "t5", tok, DATA),
                                                                    abs=1e-5)
    before = evaluate(model, DATA, tok)["loss"]
    fit(model, DATA, tok, steps=6, batch_size=4, lr=3e-2, progress=False)
    assert evaluate(model, DATA, tok)["loss"] < before


def test_poly_multitask_then_add_task_trains_only_the_new_task_routing_and_keeps_the_old_tasks(tok):
    model = ph.compose(tiny.gpt2(), ph.Poly(tasks=["p", "q"], skills=2, rank=2))
    fit(model, SKILLS, tok, steps=6, batch_size=4, lr=3e-2, progress=False)
    old = {t: hand_loss(model.eval(), "gpt2", tok, DATA, task_ids=[i]) for i, t in enumerate(["p", "q"])}
    add_task(model, "new", tune="routing")
    before = evaluate(model, DATA[:2], tok, tasks=["new"])["new"]["loss"]
    fit(model, {"new": DATA[:2]}, tok, steps=6, batch_size=2, lr=1e-1, progress=False)
    after = {t: hand_loss(model.eval(), "gpt2", tok, DATA, task_ids=[i]) for i, t in enumerate(["p", "q"])}
    assert after == pytest.approx(old, abs=1e-6)  # skills frozen, the old tasks' routing untouched
    assert evaluate(model, DATA[:2], tok, tasks=["new"])["new"]["loss"] < before


def test_lorahub_search_on_generative_examples_scores_by_the_target_loss(tok):
    sources = []
    for seed in (1, 2):
        m = ph.attach(tiny.gpt2(), ph.LoRA(r=2))
        perturb(m, seed=seed, scale=0.5)
        sources.append(m)
    base = tiny.gpt2()
    start = hand_loss(ModularModel(tiny.gpt2()).eval(), "gpt2", tok, DATA)
    model, weights = ph.search_weights(base, sources, DATA, tokenizer=tok, steps=12, l1=0.01, method="cat")
    found = hand_loss(model.eval(), "gpt2", tok, DATA)
    assert found + 0.01 * sum(map(abs, weights)) < start  # w = 0 (the base) is the search's first point
    with pytest.raises(ConfigError, match="tokenizer"):
        ph.search_weights(tiny.gpt2(), sources, DATA, steps=2)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_trainer_with_the_collator_equals_fit(arch, tok, tmp_path):
    """transformers.Trainer (SGD, one batch of all four rows per step, so the order does not matter) and a
    plain loop over the collator's batches end equal."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    data = [{"input": e.input, "target": e.target, "task": t} for t, part in SKILLS.items() for e in part]
    models = [ph.compose(BUILDERS[arch](), ph.PerTask((ph.LoRA(r=2),), tasks=["p", "q"])) for _ in range(2)]
    perturb(models[0], seed=4, scale=0.5)  # LoRA's B starts at zero: A would get no gradient at the first step
    for m in models:
        m.load_state_dict(models[0].state_dict())
        for layer in m.modules():  # Trainer trains in train mode: T5's dropout would draw differently in each run
            if isinstance(layer, torch.nn.Dropout):
                layer.p = 0.0
            elif isinstance(getattr(layer, "dropout", None), float):  # T5's attention: a float it hands to sdpa
                layer.dropout = 0.0
    start = {name: p.clone() for name, p in models[0].named_parameters()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=2,
                                          per_device_train_batch_size=4, learning_rate=1e-1, optim="sgd",
                                          lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                                          remove_unused_columns=False, save_strategy="no")
    trainer = transformers.Trainer(model=models[0], args=args, train_dataset=data,
                                   data_collator=GenerativeCollator(models[0], tok))
    trainer.train()
    collate, reference = GenerativeCollator(models[1], tok), models[1].train()
    optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=1e-1)
    for _ in range(2):
        batch = collate(data)
        assert batch["task_ids"].tolist() == [0, 0, 1, 1]
        optimizer.zero_grad()
        reference(**batch).loss.backward()
        optimizer.step()
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert all(not torch.equal(p, start[name]) for name, p in models[0].named_parameters() if p.requires_grad)


def test_collator_refuses_rows_without_a_target(tok):
    with pytest.raises(DataError, match="target"):
        GenerativeCollator(tiny.gpt2(), tok)([{"input": "a b"}])
    seq2seq = GenerativeCollator(tiny.t5(), tok)([G("a b", "c")])  # the input to the encoder, the target as labels
    assert seq2seq["input_ids"].tolist() == [tok("a b")["input_ids"]]
    assert seq2seq["labels"].tolist() == [tok("c", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
