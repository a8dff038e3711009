"""PEFT's adapter format both ways: PEFT gives the same outputs as pelthub within 1e-5, and the reverse."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import pelthub as ph
from pelthub.errors import ConfigError, ModuleFormatError
from pelthub.hub import export, from_peft, import_peft
from pelthub.hub.peft import PEFT_PREFIX_NEEDS_PAST, PeftCompatibilityWarning, peft_refuses_cache_prefix
from tests import tiny

peft = pytest.importorskip("peft")
TASKS = ("a", "b", "c")
IDS = torch.tensor([2, 0, 1])


def moved(model, seed=0):
    """Every module tensor moved off its initial value, so each path shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.module_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def logits(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).logits


def close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


CASES = {  # name: (architecture, config, head, needs task ids)
    "lora": ("bert", ph.LoRA(r=2, alpha=4.0), False, False),
    "lora+head": ("bert", ph.LoRA(r=3, alpha=2.0, targets=("q", "v", "down")), True, False),
    "lora-gpt2-conv1d": ("gpt2", ph.LoRA(r=2), False, False),
    "ia3": ("bert", ph.IA3(), True, False),
    "ia3-gpt2-conv1d": ("gpt2", ph.IA3(), False, False),
    "prompt": ("bert", ph.Prompt(length=4), True, False),
    "prompt-no-head": ("bert", ph.Prompt(length=2), False, False),
    "prefix": ("bert", ph.Prefix(length=3, hidden=None), True, False),
    "prefix-reparameterised": ("bert", ph.Prefix(length=3, hidden=8), False, False),
    "prefix-llama-gqa": ("llama", ph.Prefix(length=2, hidden=None), False, False),
    "prompt-t5-encoder": ("t5", ph.Prompt(length=3), False, False),
    "poly": ("bert", ph.Poly(tasks=TASKS, skills=2, rank=2), True, True),
    "poly-mhr-block": ("bert", ph.Poly(tasks=TASKS, skills=2, rank=2, heads=2, granularity="block"), False, True),
}


def peft_refuses_prefix(arch, task_type):
    """PEFT <= 0.21.x runs a prefix for SEQ_CLS-style tasks only if the backbone's forward names past_key_values,
    which transformers 5.24 renamed to cache (and BERT is the only such backbone here); PEFT 0.22 reads either."""
    return arch == "bert" and task_type in PEFT_PREFIX_NEEDS_PAST and peft_refuses_cache_prefix()


def assert_peft_refuses(model, inputs):
    """The refusal is PEFT's own, for exactly that reason (asserted only where `peft_refuses_cache_prefix` says so)."""
    with pytest.raises(ValueError, match="does not support past key values"):
        model(**inputs)


@pytest.mark.parametrize("case", CASES)
def test_exported_module_loads_in_peft_with_the_same_outputs(case, tmp_path):
    arch, config, head, routed = CASES[case]
    model = moved(ph.compose(tiny.BUILDERS[arch](), config, head=head))
    inputs, kw = tiny.batch(arch), {"task_ids": IDS} if routed else {}
    refused = config.kind == "prefix" and head and peft_refuses_prefix(arch, "SEQ_CLS")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export(model, tmp_path)
    assert any(issubclass(w.category, PeftCompatibilityWarning) for w in caught) == refused
    loaded = peft.PeftModel.from_pretrained(tiny.BUILDERS[arch](), tmp_path).eval()
    expected = logits(model, inputs, **kw)
    assert (expected - logits(tiny.BUILDERS[arch](), inputs)).abs().max() > 1e-4  # the module does something (10 × the tolerance)
    if refused:
        assert_peft_refuses(loaded, inputs)
    else:
        close(logits(loaded, inputs, **kw), expected)
    back = from_peft(tmp_path, tiny.BUILDERS[arch](), tasks=TASKS if routed else None)  # and back again
    close(logits(back.eval(), inputs, **kw), expected)


def peft_trained(arch, config):
    """A PEFT model with every adapter (and head) tensor moved off its initial value."""
    model = peft.get_peft_model(tiny.BUILDERS[arch](), config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


PEFT_CASES = {
    "lora": ("bert", lambda: peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=8, target_modules=["query", "key"])),
    "rslora": ("bert", lambda: peft.LoraConfig(r=4, lora_alpha=3, use_rslora=True, target_modules=["value"])),
    "lora-gpt2": ("gpt2", lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn", "c_fc"])),
    "ia3": ("bert", lambda: peft.IA3Config(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
                                           feedforward_modules=["output.dense"])),
    "prompt": ("bert", lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)),
    "prefix": ("bert", lambda: peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)),
    "prefix-projection": ("bert", lambda: peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2,
                                                                  prefix_projection=True, encoder_hidden_size=8)),
    "prefix-gpt2": ("gpt2", lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)),
    "poly": ("bert", lambda: peft.PolyConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"], n_tasks=3,
                                             n_skills=2, n_splits=2)),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_adapter_imports_with_the_same_outputs(case, tmp_path):
    arch, make = PEFT_CASES[case]
    config = make()
    source = peft_trained(arch, config)
    source.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(tiny.BUILDERS[arch](), tmp_path).eval()  # what PEFT users get
    inputs, kw = tiny.batch(arch), {"task_ids": IDS} if case == "poly" else {}
    imported = from_peft(tmp_path, tiny.BUILDERS[arch]()).eval()
    if config.peft_type == "PREFIX_TUNING" and peft_refuses_prefix(arch, config.task_type):
        assert_peft_refuses(reloaded, inputs)  # no PEFT reference to compare with: check the round trip of the files
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PeftCompatibilityWarning)
            export(imported, tmp_path / "back")
        original, back = load_file(str(tmp_path / "adapter_model.safetensors")), load_file(
            str(tmp_path / "back" / "adapter_model.safetensors"))
        assert sorted(back) == sorted(original)
        for name, tensor in original.items():
            torch.testing.assert_close(back[name], tensor, rtol=0, atol=0)
        return
    expected = logits(reloaded, inputs, **kw)
    close(logits(imported, inputs, **kw), expected)


def test_import_peft_into_the_registry_without_loading_the_base(tmp_path):
    """With only the base model's config at hand (a weightless copy), the registry records the right fingerprint."""
    base_dir = tmp_path / "base"
    tiny.bert().save_pretrained(base_dir)
    from transformers import AutoModelForSequenceClassification
    base = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
    source = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"]))
    moved_params = [p for p in source.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in moved_params:
            p.add_(0.1)
    source.eval().save_pretrained(tmp_path / "adapter")
    inputs = tiny.batch("bert")
    expected = logits(source, inputs)

    reg = ph.Registry(tmp_path / "reg")
    ref = import_peft(tmp_path / "adapter", registry=reg, task="sst2")
    card = reg.get(ref)
    assert (card.name, card.kinds, card.task, card.source["format"]) == ("adapter", ["lora"], "sst2", "peft")
    assert card.base_model["name"] == str(base_dir)
    fresh = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
    close(logits(reg.load(ref, fresh), inputs), expected)  # the fingerprint matched the real model's


def test_registry_ref_export_and_pelthub_format(tmp_path):
    reg = ph.Registry(tmp_path / "reg")
    model = moved(ph.attach(tiny.bert(), ph.LoRA(r=2), head=True))
    ref = reg.add(model, name="lora", task="sst2")
    out = export(ref, tmp_path / "peft", registry=reg)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["modules_to_save"]) == ("LORA", "SEQ_CLS", ["classifier"])
    assert config["r"] == 2 and sorted(config["target_modules"])[0] == "bert.encoder.layer.0.attention.self.query"
    assert "library_name: peft" in (out / "README.md").read_text()
    mine = export(ref, tmp_path / "mine", format="pelthub", registry=reg)
    for name in ("pelthub.json", "modules.safetensors"):
        assert (mine / name).read_bytes() == (reg.path(ref) / name).read_bytes()
    assert ph.registry.Card.from_markdown((mine / "README.md").read_text()) == reg.get(ref)


def test_what_peft_cannot_hold_is_refused(tmp_path):
    two_sets = ph.attach(ph.attach(tiny.bert(), ph.LoRA(r=2), name="a"), ph.Prompt(length=2), name="b")
    with pytest.raises(ConfigError, match="one adapter of one method"):
        export(two_sets, tmp_path / "x")
    with pytest.raises(ConfigError, match="no format for pelthub's 'bottleneck'"):
        export(ph.attach(tiny.bert(), ph.Bottleneck()), tmp_path / "y")
    with pytest.raises(ConfigError, match="Conv1D"):
        export(ph.compose(tiny.gpt2(), ph.Poly(tasks=TASKS)), tmp_path / "z")
    with pytest.raises(ConfigError, match="decoder self-attention only"):
        export(ph.attach(tiny.t5(), ph.Prefix(length=2)), tmp_path / "v")
    with pytest.raises(ConfigError, match="format"):
        export(two_sets, tmp_path / "w", format="onnx")

    dora = peft.get_peft_model(tiny.bert(), peft.LoraConfig(r=2, target_modules=["query"], use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(ConfigError, match="DoRA"):
        from_peft(tmp_path / "dora", tiny.bert())
    t5_prompt = peft.get_peft_model(tiny.t5(), peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2))
    t5_prompt.save_pretrained(tmp_path / "t5")  # PEFT prompts both encoder and decoder here; pelthub the encoder
    with pytest.raises(ConfigError, match="both the encoder and the decoder"):
        from_peft(tmp_path / "t5", tiny.t5())
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(ModuleFormatError, match="pickle"):
        from_peft(pickled, tiny.bert())
    base = tiny.bert()
    peft.get_peft_model(tiny.bert(), peft.LoraConfig(r=2, target_modules=["query"])).save_pretrained(tmp_path / "w")
    weights = str(tmp_path / "w" / "adapter_model.safetensors")
    save_file({k: torch.zeros(v.shape[0], 7) if "lora_A" in k else v for k, v in load_file(weights).items()}, weights)
    with pytest.raises(ModuleFormatError, match="do not fit"):  # a LoRA for layers of another width
        from_peft(tmp_path / "w", base)
    assert not any(m._forward_hooks for m in base.modules())  # a failed import leaves nothing attached
