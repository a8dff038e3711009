"""A module's files are checked against each other before anything is allocated, and must hold finite floats."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import pelthub as ph
from pelthub.errors import ModuleFormatError
from pelthub.modules.lora import LoRALinear
from tests import tiny
from tests.security.conftest import publish, trained


@pytest.fixture
def saved(tmp_path):
    """A LoRA r=2 module folder, and the LoRA's config as written."""
    folder = tmp_path / "lora"
    trained(ph.LoRA(r=2)).save_pretrained(str(folder))
    return folder


def _declare(folder, **fields):
    path = folder / "pelthub.json"
    data = json.loads(path.read_text())
    for configs in data["modules"].values():
        configs[0].update(fields)
    path.write_text(json.dumps(data))


def _rewrite(folder, change):
    path = folder / "modules.safetensors"
    tensors = load_file(str(path))
    save_file(change(tensors), str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("rank", [2 ** 20, 2 ** 24, 2 ** 40])
def test_a_declared_rank_the_tensors_do_not_have_is_refused_before_allocating(saved, rank, monkeypatch):
    _declare(saved, r=rank)
    allocated = []
    original = LoRALinear.__init__

    def recording(self, *args, **kwargs):  # what each LoRA layer got on a real device
        original(self, *args, **kwargs)
        if self.lora_a.device.type != "meta":
            allocated.append(self.lora_a.numel() + self.lora_b.numel())

    monkeypatch.setattr(LoRALinear, "__init__", recording)
    with pytest.raises(ModuleFormatError, match="lora_a|LoRA.r must be an integer from 1 to"):
        ph.from_pretrained(tiny.bert(), saved)
    assert allocated == []  # the mismatch was found before any layer was built for real


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64])
def test_non_float_tensors_are_refused_naming_the_tensor(saved, dtype):
    _rewrite(saved, lambda t: {k: (v.to(dtype) if i == 0 else v) for i, (k, v) in enumerate(sorted(t.items()))})
    first = sorted(load_file(str(saved / "modules.safetensors")))[0]
    with pytest.raises(ModuleFormatError, match=f"{first}.*dtype"):
        ph.from_pretrained(tiny.bert(), saved)
    with pytest.raises(ModuleFormatError, match=first):
        ph.Registry(saved.parent / "reg").add(saved, name="bad")


def test_float64_tensors_for_float32_parameters_are_refused(saved):
    _rewrite(saved, lambda t: {k: v.double() for k, v in t.items()})
    with pytest.raises(ModuleFormatError, match="float64"):
        ph.from_pretrained(tiny.bert(), saved)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused_by_load_add_and_pull(saved, value, local_hub, regs):
    good = saved.parent / "good"
    shutil.copytree(saved, good)

    def poison(tensors):
        key = sorted(tensors)[-1]
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value
        return tensors

    _rewrite(saved, poison)
    key = sorted(load_file(str(saved / "modules.safetensors")))[-1]
    with pytest.raises(ModuleFormatError, match=f"{key}.*(NaN|infinite)"):
        ph.from_pretrained(tiny.bert(), saved)
    alice, bob = regs
    with pytest.raises(ModuleFormatError, match=key):
        alice.add(saved, name="poisoned")
    # the same bytes served by a Hub whose card records them: refused before they enter bob's registry
    ref = alice.add(good, name="poisoned")
    weights = (saved / "modules.safetensors").read_bytes()
    meta = {"sha256": hashlib.sha256(weights).hexdigest(), "size": len(weights)}
    publish(local_hub, alice, ref, "eve/poisoned", files={**alice.get(ref).files, "modules.safetensors": meta})
    local_hub.put_files("eve/poisoned", {"modules.safetensors": weights})
    with pytest.raises(ModuleFormatError, match=key):
        bob.pull("eve/poisoned", endpoint=local_hub.endpoint)
    assert len(bob) == 0


def test_an_honest_module_of_every_kind_still_loads_equal(tmp_path):
    """The meta-device dry run accepts what save_pretrained writes (every module kind, heads included)."""
    configs = [ph.LoRA(r=2), ph.Prompt(length=3), ph.Prefix(length=2), ph.IA3(), ph.Bottleneck(reduction=4),
               ph.Compacter(reduction=4, n=2), ph.LNTuning(),
               ph.UniPELT(lora=ph.LoRA(r=2), prefix=ph.Prefix(length=2), adapter=ph.Bottleneck(reduction=4)),
               ph.Poly(tasks=["a", "b"], skills=2)]
    for i, cfg in enumerate(configs):
        model = trained(cfg, seed=i)
        model.save_pretrained(str(tmp_path / str(i)))
        loaded = ph.from_pretrained(tiny.bert(), tmp_path / str(i))
        theirs, ours = dict(loaded.module_parameters()), dict(model.module_parameters())
        assert theirs.keys() == ours.keys()
        for key, value in ours.items():
            torch.testing.assert_close(theirs[key], value, rtol=0, atol=0)


def test_a_pulled_module_declaring_a_huge_rank_allocates_nothing(saved, local_hub, regs, monkeypatch):
    """The 3.6 KB attack of the issue, served by a Hub: add and pull refuse the declared rank before building anything."""
    good = saved.parent / "good"
    shutil.copytree(saved, good)
    _declare(saved, r=2 ** 40)
    alice, bob = regs
    ref = alice.add(good, name="huge-rank")
    config = (saved / "pelthub.json").read_bytes()
    meta = {"sha256": hashlib.sha256(config).hexdigest(), "size": len(config)}
    publish(local_hub, alice, ref, "eve/huge-rank", files={**alice.get(ref).files, "pelthub.json": meta})
    local_hub.put_files("eve/huge-rank", {"pelthub.json": config})
    allocated = []
    original = LoRALinear.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.lora_a.device.type != "meta":
            allocated.append(self.lora_a.numel() + self.lora_b.numel())

    monkeypatch.setattr(LoRALinear, "__init__", recording)
    with pytest.raises(ModuleFormatError, match="LoRA.r must be an integer from 1 to"):
        alice.add(saved, name="huge-rank")
    with pytest.raises(ModuleFormatError, match="LoRA.r must be an integer from 1 to"):
        bob.pull("eve/huge-rank", endpoint=local_hub.endpoint)
    assert allocated == [] and len(bob) == 0
