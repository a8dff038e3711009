"""Per-call state (task ids, masks, the prefix cache) cannot leak between calls.

The expected values are the same model called alone, sequentially, without the
feature under test (threads, a nested call, gradient checkpointing).
"""
import threading
import warnings

import pytest
import torch

import pelthub as ph
from pelthub.errors import ConfigError
from pelthub.model.modular import StackedHooksWarning
from tests import tiny
from tests.tiny import perturb

TASKS = ("a", "b")


def poly_model(arch="bert"):
    model = ph.compose(tiny.BUILDERS[arch](), ph.Poly(tasks=TASKS, skills=2, rank=2))
    perturb(model, scale=0.5)
    with torch.no_grad():
        for logits in model.adapters["composed"]["poly"].router.values():
            logits.copy_(torch.tensor([[4.0, -4.0], [-4.0, 4.0]]))  # task a → skill 0, task b → skill 1
    return model.eval()


def logits(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).logits


def test_two_threads_with_different_task_ids_get_what_each_gets_alone():
    model, inputs = poly_model(), tiny.batch("bert")
    alone = {t: logits(model, inputs, task_ids=[t] * 3) for t in TASKS}
    assert not torch.allclose(alone["a"], alone["b"], atol=1e-3)  # the tasks differ, so a leak would show
    wrong, errors = [], []

    def worker(task):
        try:
            for _ in range(25):
                if not torch.equal(logits(model, inputs, task_ids=[task] * 3), alone[task]):
                    wrong.append(task)
        except Exception as e:  # noqa: BLE001 - any error in a thread is a failure here
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in TASKS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and wrong == []


def test_unipelt_gates_in_two_threads_with_different_masks():
    model = ph.compose(tiny.bert(), ph.UniPELT(lora=ph.LoRA(r=2), adapter=ph.Bottleneck(reduction=4)))
    perturb(model, scale=0.5)
    model.eval()
    inputs = tiny.batch("bert")
    masked = dict(inputs, attention_mask=inputs["attention_mask"].clone())
    masked["attention_mask"][:, 3:] = 0
    alone = [logits(model, inputs), logits(model, masked)]
    assert not torch.allclose(alone[0], alone[1], atol=1e-4)
    wrong = []

    def worker(i, batch):
        for _ in range(25):
            if not torch.equal(logits(model, batch), alone[i]):
                wrong.append(i)

    threads = [threading.Thread(target=worker, args=(i, b)) for i, b in enumerate([inputs, masked])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_a_model_called_inside_its_own_forward_keeps_the_outer_task_ids():
    """Teacher/student on one base: a hook calls the model again with other task ids mid-forward."""
    model, inputs = poly_model(), tiny.batch("bert")
    want_a, want_b = logits(model, inputs, task_ids=["a"] * 3), logits(model, inputs, task_ids=["b"] * 3)
    inner = []
    layer = model.base.bert.encoder.layer[0]

    def nested(_m, _args, _out):
        if not inner:
            inner.append(None)
            inner[0] = model(**inputs, task_ids=["b"] * 3).logits
    handle = layer.register_forward_hook(nested)
    try:
        outer = logits(model, inputs, task_ids=["a"] * 3)
    finally:
        handle.remove()
    torch.testing.assert_close(outer, want_a, rtol=0, atol=0)
    torch.testing.assert_close(inner[0], want_b, rtol=0, atol=0)


def loss_and_grads(model, inputs, seed=0, **kw):
    torch.manual_seed(seed)
    model.zero_grad()
    out = model(**inputs, **kw).logits
    loss = out.float().square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_gradient_checkpointing_sees_the_task_ids_on_recompute(arch):
    """Poly in training (relaxed-Bernoulli sampling) with checkpointing = the same run without it."""
    model, inputs = poly_model(arch).train(), tiny.batch(arch)
    want_loss, want = loss_and_grads(model, inputs, task_ids=["a", "b", "a"])
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    loss, got = loss_and_grads(model, inputs, task_ids=["a", "b", "a"])
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert sorted(got) == sorted(want) and len(got) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_reentrant_checkpointing_is_refused_for_modules_that_read_the_call_state():
    model = poly_model()
    with pytest.raises(ConfigError, match="use_reentrant=False"):
        model.gradient_checkpointing_enable({"use_reentrant": True})
    lora = ph.attach(tiny.bert(), ph.LoRA(r=2))
    lora.gradient_checkpointing_enable({"use_reentrant": True})  # LoRA reads no call state: allowed
    assert lora.is_gradient_checkpointing


def test_a_prefix_under_gradient_checkpointing_is_refused_not_silently_dropped():
    model = ph.attach(tiny.bert(), ph.Prefix(length=2, hidden=None)).train()
    model.gradient_checkpointing_enable()
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        model(**tiny.batch("bert"))
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    model(**tiny.batch("bert")).logits.sum().backward()  # and works again without it


def test_wrapping_a_base_that_carries_modules_warns():
    base = tiny.bert()
    ph.attach(base, ph.LoRA(r=2))
    with pytest.warns(StackedHooksWarning, match="already carries pelthub modules"):
        ph.attach(base, ph.IA3())
    fresh = tiny.bert()
    with warnings.catch_warnings():
        warnings.simplefilter("error", StackedHooksWarning)
        ph.attach(ph.attach(fresh, ph.LoRA(r=2)).detach(), ph.IA3())  # a detached base is free again


def test_disable_adapter_runs_the_bare_base_then_restores_the_modules():
    base = tiny.bert()
    inputs = tiny.batch("bert")
    bare = logits(base, inputs)
    model = ph.attach(base, ph.LoRA(r=2), head=True)
    perturb(model)
    with_modules = logits(model, inputs)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), bare, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, inputs), with_modules, rtol=0, atol=0)


def test_the_wrapped_model_exposes_what_the_ecosystem_reads(capsys):
    model = ph.attach(tiny.gpt2(), ph.LoRA(r=2))
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.generation_config is model.base.generation_config and model.can_generate()
    assert model.get_input_embeddings() is model.base.get_input_embeddings()
    model.print_trainable_parameters()
    assert "trainable params" in capsys.readouterr().out

