"""The command line a new user meets: --version, import --base, search --base FOLDER, pull --name, bad paths;
and the two defaults that surprise PEFT users (a random frozen head, LoRA's alpha)."""
import json
import warnings

import pytest
import torch

import pelthub as ph
from pelthub import cli
from pelthub.hub import export
from pelthub.model.modular import FrozenHeadWarning
from pelthub.sites import Sites
from tests import tiny
from tests.hub_fixtures import local_hub  # noqa: F401  (pytest fixture)
from tests.tiny import trained

transformers = pytest.importorskip("transformers")


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"pelthub {ph.__version__}"


@pytest.fixture
def bert_folder(tmp_path):
    """A tiny BERT saved as a model folder, as `rank --base FOLDER` reads it."""
    folder = tmp_path / "tiny-bert"
    tiny.bert().save_pretrained(folder)
    return folder


def test_search_base_folder_finds_what_rank_would_rank(bert_folder, capsys):
    reg = ph.Registry()
    reg.add(trained(ph.Prompt(length=2), name="another/name"), name="same-arch")  # same architecture, other name
    reg.add(ph.attach(tiny.gpt2(), ph.Prompt(length=2)), name="other-arch")
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(bert_folder)  # what `rank` loads
    want = [c.ref for c in reg.search(base_model=loaded, compatible_only=True)]
    assert want == ["same-arch@1"]
    code, out, _ = run(capsys, "search", "--base", str(bert_folder), "--compatible-only", "--json")
    assert code == 0 and [c["ref"] for c in json.loads(out)] == want


def test_import_peft_with_base_when_the_adapter_names_an_unreachable_base(bert_folder, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = export(trained(ph.LoRA(r=2)), tmp_path / "peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "nowhere/missing"}))
    code, _, err = run(capsys, "import", str(folder), "--name", "x")
    assert code == 1 and "--base" in err and len(err.strip().splitlines()) == 1
    code, out, err = run(capsys, "import", str(folder), "--name", "x", "--base", str(bert_folder), "--json")
    assert code == 0, err
    want = ph.Registry().get("x").base_model["fingerprint"]["sha256"]
    assert want == Sites(tiny.bert()).fingerprint()["sha256"]
    assert json.loads(out)["base_model"]["fingerprint"]["sha256"] == want


def test_pull_name_registers_under_the_given_name(local_hub, tmp_path, capsys):  # noqa: F811
    alice, bob = ph.Registry(tmp_path / "alice"), ph.Registry(tmp_path / "bob")
    alice.push(alice.add(trained(ph.LoRA(r=2)), name="lora"), "alice/lora", endpoint=local_hub.endpoint)
    code, out, err = run(capsys, "pull", "alice/lora", "--name", "renamed", "--registry", str(bob.root),
                         "--endpoint", local_hub.endpoint, "--json")
    assert code == 0, err
    assert json.loads(out)["ref"] == "renamed@1" and [c.ref for c in bob.search()] == ["renamed@1"]


@pytest.mark.parametrize("argv", [
    ["rank", "--base", "/nonexistent/model", "--target", "data.jsonl"],
    ["rank", "--base", "./no-such-model", "--target", "data.jsonl"],
    ["search", "--base", "./no-such-model"],
    ["import", "./no-such-adapter"],
    ["import", "alice/x", "--base", "~/no-such-model"],
    ["demo", "--model", "/nonexistent/model"],
])
def test_a_bad_path_is_one_line_and_a_non_zero_exit(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text('{"text": "a b", "label": 0}\n')
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"pelthub {argv[0]}: error: ")
    assert "no such" in err or "neither a folder" in err


def test_a_random_frozen_head_warns_unless_head_true_or_loaded(tmp_path):
    with pytest.warns(FrozenHeadWarning, match="built from a config.*head=True"):
        ph.attach(tiny.bert(), ph.LoRA(r=2))
    tiny.bert().bert.save_pretrained(tmp_path / "backbone")  # a checkpoint without the classifier
    fresh = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "backbone", num_labels=2)
    with pytest.warns(FrozenHeadWarning, match=r"\['BertModel'\]"):
        ph.compose(fresh, ph.Prompt(length=2))
    tiny.bert().save_pretrained(tmp_path / "classifier")  # a checkpoint with it
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrozenHeadWarning)
        ph.attach(transformers.BertForSequenceClassification.from_pretrained(tmp_path / "classifier"), ph.LoRA(r=2))
        ph.attach(tiny.bert(), ph.LoRA(r=2), head=True)
        ph.attach(tiny.gpt2(), ph.LoRA(r=2))  # a language-model head is pretrained (or tied), never warned about


def test_lora_alpha_default_is_scale_two_as_documented():
    peft = pytest.importorskip("peft")
    ours, theirs = ph.LoRA(), peft.LoraConfig()
    assert ours.alpha / ours.r == 2.0 and theirs.lora_alpha / theirs.r == 1.0
    assert "scale 2" in ph.LoRA.__doc__ and "scale 1" in ph.LoRA.__doc__
    model = ph.attach(tiny.bert(), ph.LoRA(r=4, targets=("q",)))
    layer = next(iter(model.adapters["default"]["lora"].layers.values()))
    torch.nn.init.normal_(layer.lora_b)
    x = torch.randn(2, layer.lora_a.shape[1])
    torch.testing.assert_close(layer(x), (16.0 / 4) * x @ layer.lora_a.T @ layer.lora_b.T)
