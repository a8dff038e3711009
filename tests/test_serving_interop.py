"""Serving interop: a LoRA, and each task of a Poly or hard-routed model (`export_task_lora`), written in
PEFT's format, load in PEFT with the same outputs, in the layout serving engines read.

The layout reference is PEFT itself: `save_pretrained` of a PEFT model built from the same
adapter_config.json must write the same file names and tensor names; the output reference is
the routed pelthub model called with that task's ids.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

import pelthub as ph
from pelthub.hub import export
from pelthub.routing import export_task_lora
from tests import tiny
from tests.tiny import perturb

peft = pytest.importorskip("peft")
TASKS = ("a", "b", "c")


def loras():
    out = []
    for seed in range(len(TASKS)):
        model = ph.attach(tiny.bert(), ph.LoRA(r=2, alpha=4.0))
        perturb(model, seed, scale=0.3)
        out.append(model)
    return out


def routed(kind):
    """A learned Poly (with a trained head) or a hard-routed inventory of three LoRAs."""
    if kind == "hard":
        return ph.compose(tiny.bert(), ph.Poly.from_modules(loras(), tasks=TASKS)).eval()
    model = ph.compose(tiny.bert(), ph.Poly(tasks=TASKS, skills=3, rank=2, heads=2), head=True)
    perturb(model, scale=0.3)
    return model.eval()


def assert_peft_layout(folder, base):
    """The files and tensor names PEFT writes itself for this adapter_config.json."""
    config = peft.PeftConfig.from_pretrained(folder)
    assert config.peft_type == "LORA"
    reference = peft.get_peft_model(base, config)
    reference.save_pretrained(folder.parent / f"{folder.name}-by-peft")
    theirs = folder.parent / f"{folder.name}-by-peft"
    assert {p.name for p in folder.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert sorted(load_file(folder / "adapter_model.safetensors")) == sorted(
        load_file(theirs / "adapter_model.safetensors"))
    ours, written = json.loads((folder / "adapter_config.json").read_text()), json.loads(
        (theirs / "adapter_config.json").read_text())
    for key in ("peft_type", "r", "lora_alpha", "task_type", "base_model_name_or_path"):
        assert ours.get(key) == written.get(key), key
    assert sorted(ours["target_modules"]) == sorted(written["target_modules"])  # (the head: by its tensor names)


def test_a_lora_exported_in_peft_format_is_what_peft_writes_and_gives_the_same_outputs(tmp_path):
    model = ph.attach(tiny.bert(), ph.LoRA(r=2, targets=("q", "v", "down")), head=True)
    perturb(model, scale=0.3)
    model.eval()
    folder = export(model, tmp_path / "lora")
    assert_peft_layout(folder, tiny.bert())
    inputs = tiny.batch("bert")
    loaded = peft.PeftModel.from_pretrained(tiny.bert(), folder).eval()
    torch.testing.assert_close(tiny.run(loaded, inputs), tiny.run(model, inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["poly", "hard"])
def test_each_task_of_a_routed_model_serves_as_a_peft_lora(kind, tmp_path):
    model, inputs = routed(kind), tiny.batch("bert")
    outputs = {}
    for task in TASKS:
        folder = export(export_task_lora(model, task), tmp_path / task)
        assert_peft_layout(folder, tiny.bert())
        loaded = peft.PeftModel.from_pretrained(tiny.bert(), folder).eval()
        outputs[task] = tiny.run(loaded, inputs)
        torch.testing.assert_close(outputs[task], tiny.run(model, inputs, task_ids=[task] * 3), rtol=0, atol=1e-5)
    assert not torch.allclose(outputs["a"], outputs["b"], atol=1e-3)  # each task really is its own adapter
