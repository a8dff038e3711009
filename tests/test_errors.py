"""Bad input gets a clear pelthub error naming what was wrong, and leaves nothing attached."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

import pelthub as ph
from pelthub import errors
from pelthub.modules import config_from_dict
from tests import tiny


@pytest.mark.parametrize("make, field", [
    (lambda: ph.LoRA(r=0), "LoRA.r"), (lambda: ph.LoRA(r=-2), "LoRA.r"), (lambda: ph.LoRA(alpha=0), "LoRA.alpha"),
    (lambda: ph.LoRA(dropout=1.5), "LoRA.dropout"), (lambda: ph.LoRA(targets=[]), "LoRA.targets"),
    (lambda: ph.Prompt(length=0), "Prompt.length"), (lambda: ph.Prompt(init="zeros"), "Prompt.init"),
    (lambda: ph.Prompt(init="text"), "text="), (lambda: ph.Prefix(length=-1), "Prefix.length"),
    (lambda: ph.Prefix(hidden=0), "Prefix.hidden"), (lambda: ph.Bottleneck(placement="middle"), "placement"),
    (lambda: ph.Bottleneck(reduction=0), "reduction"), (lambda: ph.Bottleneck(activation="x"), "activation"),
    (lambda: ph.Compacter(n=0), "Compacter.n"),
])
def test_bad_config_fields_are_named(make, field):
    with pytest.raises(errors.ConfigError, match=field.replace(".", r"\.")):
        make()


@pytest.mark.parametrize("cfg", [ph.LoRA(r=3, alpha=6.0, dropout=0.1, targets=("q", "down")), ph.Prompt(length=7),
                                 ph.Prefix(length=2, hidden=None), ph.Bottleneck(placement="parallel", scale=4.0),
                                 ph.Compacter(n=2), ph.IA3(targets=("k",)), ph.LNTuning()])
def test_configs_round_trip_through_json(cfg):
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_unknown_kind_and_field_are_named():
    with pytest.raises(errors.ConfigError, match="known kinds"):
        config_from_dict({"kind": "mystery"})
    with pytest.raises(errors.ConfigError, match="rank"):
        config_from_dict({"kind": "lora", "rank": 4})


def test_unknown_target_lists_available_sites():
    base = tiny.bert()
    with pytest.raises(errors.SiteNotFoundError) as info:
        ph.attach(base, ph.LoRA(targets=("q", "nonexistent_proj")))
    message = str(info.value)
    assert "nonexistent_proj" in message and "'q'" in message and "self.query" in message
    assert not any(m._forward_hooks for m in base.modules())


def test_a_failed_attach_leaves_the_base_trainable_as_it_was():
    base = tiny.bert()
    with pytest.raises(errors.SiteNotFoundError):
        ph.attach(base, ph.LoRA(targets=("missing",)))
    assert all(p.requires_grad for p in base.parameters())


def test_compacter_size_not_divisible_by_n():
    with pytest.raises(errors.ConfigError, match="divisible by n"):
        ph.attach(tiny.bert(), ph.Compacter(n=3, reduction=4))


def test_attaching_the_same_name_twice():
    model = ph.attach(tiny.bert(), ph.LoRA(), name="a")
    with pytest.raises(errors.DuplicateNameError, match="'a'"):
        ph.attach(model, ph.Prompt(), name="a")
    ph.attach(model, ph.Prompt(length=2), name="b")
    assert list(model.adapters) == ["a", "b"]


def test_two_prefixes_are_refused_and_nothing_is_half_attached():
    model = ph.attach(tiny.gpt2(), ph.Prefix(length=2), name="a")
    with pytest.raises(errors.ConfigError, match="prefix"):
        ph.attach(model, ph.LoRA(), ph.Prefix(length=2), name="b")
    assert list(model.adapters) == ["a"]
    assert sum(len(m._forward_hooks) for m in model.base.modules()) == 0


class OddConfig(PretrainedConfig):
    model_type = "odd"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.hidden_size, self.num_attention_heads, self.num_hidden_layers = 8, 2, 1


class OddModel(PreTrainedModel):
    config_class = OddConfig

    def __init__(self, config):
        super().__init__(config)
        self.mixer = nn.Linear(8, 8)

    def forward(self, x):
        return self.mixer(x)


def test_unsupported_architecture_says_which_sites_are_missing():
    model = OddModel(OddConfig())
    with pytest.raises(errors.SiteNotFoundError, match="mixer"):
        ph.attach(model, ph.LoRA())
    with pytest.raises(errors.UnsupportedModelError, match="ffn_out"):
        ph.attach(model, ph.Bottleneck(reduction=2))
    adapted = ph.attach(model, ph.LoRA(r=2, targets=("mixer",)))  # naming sites by suffix works anywhere
    assert adapted.trainable_parameters().trainable == 2 * 8 + 8 * 2


def test_loading_onto_another_architecture_fails_naming_both(tmp_path):
    ph.attach(tiny.bert(), ph.LoRA()).save_pretrained(tmp_path)
    with pytest.raises(errors.IncompatibleModuleError, match="bert.*gpt2|gpt2.*bert"):
        ph.from_pretrained(tiny.gpt2(), tmp_path)


def test_a_head_of_another_label_count_fails_the_load_and_leaves_nothing_attached(tmp_path):
    ph.attach(tiny.bert(num_labels=4), ph.LoRA(r=2), ph.Prompt(length=3), head=True).save_pretrained(tmp_path)
    base = tiny.bert()
    for target in (base, ph.attach(base, ph.IA3(), name="kept")):
        with pytest.raises(errors.IncompatibleModuleError, match="another label count"):
            ph.from_pretrained(target, tmp_path)
    assert list(target.adapters) == ["kept"]                       # the existing set stays, the new one is gone
    target.detach()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())
    assert all(p.requires_grad for p in base.parameters())
    assert list(ph.from_pretrained(base, tmp_path, heads=False).adapters) == ["default"]
    with pytest.raises(errors.ConfigError, match="as_saved"):
        ph.from_pretrained(tiny.bert(), tmp_path, heads="yes")


def test_a_head_of_another_label_count_loads_as_saved_with_its_own_logits(tmp_path):
    """Reference: the same module loaded onto a base with the saved label count."""
    torch.manual_seed(0)
    ph.attach(tiny.bert(num_labels=4), ph.LoRA(r=2), ph.Prompt(length=3), head=True).save_pretrained(tmp_path)
    batch = tiny.batch("bert")
    with torch.no_grad():
        expected = ph.from_pretrained(tiny.bert(num_labels=4), tmp_path).eval()(**batch).logits
        got = ph.from_pretrained(tiny.bert(), tmp_path, heads="as_saved").eval()(**batch).logits
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, expected)
    weights = tmp_path / "modules.safetensors"                     # a head whose input width differs: refused
    state = load_file(weights)
    key = next(k for k in state if k.startswith("heads.") and k.endswith("weight"))
    state[key] = state[key][:, :16].contiguous()
    save_file(state, weights)
    base = tiny.bert()
    with pytest.raises(errors.IncompatibleModuleError, match="another label count"):
        ph.from_pretrained(base, tmp_path, heads="as_saved")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())


def test_same_architecture_under_another_name_only_warns(tmp_path):
    trained = tiny.bert()
    trained.config.name_or_path = "org/one"
    ph.attach(trained, ph.LoRA()).save_pretrained(tmp_path)
    other = tiny.bert(seed=3)
    other.config.name_or_path = "org/two"
    with pytest.warns(UserWarning, match="org/one"):
        ph.from_pretrained(other, tmp_path)


def test_missing_or_corrupt_module_directory(tmp_path):
    with pytest.raises(errors.ModuleFormatError, match="pelthub.json"):
        ph.from_pretrained(tiny.bert(), tmp_path)
    (tmp_path / "pelthub.json").write_text("{not json")
    with pytest.raises(errors.ModuleFormatError, match="not valid JSON"):
        ph.from_pretrained(tiny.bert(), tmp_path)


def test_merge_refuses_unmergeable_kinds_and_keeps_the_model():
    model = ph.attach(tiny.bert(), ph.Prompt(length=2))
    with pytest.raises(errors.ConfigError, match="cannot be merged"):
        model.merge_and_unload()
    assert list(model.adapters) == ["default"]


def test_unknown_task_name_is_a_routing_error():
    model = ph.attach(tiny.bert(), ph.LoRA())
    model.task_names = ["a", "b"]
    with pytest.raises(errors.RoutingError, match="known tasks"):
        model(**tiny.batch("bert"), task_ids=["a", "c", "a"])
    assert model.ctx.task_ids is None
