"""Names: no squatting on a local name by a pulled card; no newlines, NULs, surrogates or control characters."""
from __future__ import annotations

import pytest
import torch

import pelthub as ph
from pelthub import cli
from pelthub.errors import ConfigError, RegistryError
from pelthub.registry import check_name, parse_ref
from tests import tiny
from tests.security.conftest import publish, trained


def test_a_pulled_card_cannot_add_a_version_to_a_local_name(local_hub, regs, tmp_path):
    alice, bob = regs
    mine = bob.add(trained(ph.LoRA(r=2), seed=1), name="my-prod-lora")
    stranger = alice.add(trained(ph.LoRA(r=2), seed=2), name="my-prod-lora")
    publish(local_hub, alice, stranger, "eve/my-prod-lora")
    with pytest.raises(RegistryError, match="my-prod-lora.*name="):
        bob.pull("eve/my-prod-lora", endpoint=local_hub.endpoint)
    assert [c.ref for c in bob.versions("my-prod-lora")] == [mine]
    inputs = tiny.batch("bert")
    with torch.no_grad():  # load("my-prod-lora") is still my module
        ours = trained(ph.LoRA(r=2), seed=1)(**inputs).logits
        torch.testing.assert_close(bob.load("my-prod-lora", tiny.bert())(**inputs).logits, ours)
    theirs = bob.pull("eve/my-prod-lora", endpoint=local_hub.endpoint, name="eve-lora")
    assert theirs == "eve-lora@1" and bob.get(theirs).source["repo_id"] == "eve/my-prod-lora"
    carol = ph.Registry(tmp_path / "carol")  # asked for explicitly, the same name is fine
    carol.add(trained(ph.LoRA(r=2), seed=1), name="my-prod-lora")
    assert carol.pull("eve/my-prod-lora", endpoint=local_hub.endpoint, name="my-prod-lora") == "my-prod-lora@2"


def test_new_commits_of_the_same_repo_become_new_versions(local_hub, regs):
    alice, bob = regs
    first = alice.add(trained(ph.LoRA(r=2), seed=1), name="shared")
    publish(local_hub, alice, first, "alice/shared")
    assert bob.pull("alice/shared", endpoint=local_hub.endpoint) == "shared@1"
    second = alice.add(trained(ph.LoRA(r=2), seed=2), name="shared")
    publish(local_hub, alice, second, "alice/shared")
    assert bob.pull("alice/shared", endpoint=local_hub.endpoint) == "shared@2"


def test_a_parent_cannot_squat_either(local_hub, regs):
    alice, bob = regs
    bob.add(trained(ph.LoRA(r=2), seed=1), name="base-lora")
    parent = alice.add(trained(ph.LoRA(r=2), seed=3), name="base-lora")
    sha = publish(local_hub, alice, parent, "eve/base-lora")
    publish(local_hub, alice, parent, "eve/child", name="child",
            parents=[{"ref": parent, "sha256": alice.get(parent).digest, "repo_id": "eve/base-lora",
                      "commit": sha}])
    with pytest.raises(RegistryError, match="pull that parent first under another name"):
        bob.pull("eve/child", endpoint=local_hub.endpoint)
    bob.pull("eve/base-lora", revision=sha, endpoint=local_hub.endpoint, name="eve-base")
    child = bob.pull("eve/child", endpoint=local_hub.endpoint)
    assert bob.get(child).parents[0]["ref"] == "eve-base@1"


def test_show_says_where_a_version_came_from(local_hub, regs, lora_ref, capsys):
    alice, bob = regs
    sha = publish(local_hub, alice, lora_ref, "alice/sst2-lora")
    ref = bob.pull("alice/sst2-lora", endpoint=local_hub.endpoint)
    assert cli.main(["show", ref, "--registry", str(bob.root)]) == 0
    out = capsys.readouterr().out
    assert f"alice/sst2-lora at commit {sha} on {local_hub.endpoint}" in out
    assert cli.main(["show", lora_ref, "--registry", str(alice.root)]) == 0
    assert "added here" in capsys.readouterr().out


def test_cli_pull_takes_a_name(local_hub, regs, lora_ref, capsys):
    alice, bob = regs
    publish(local_hub, alice, lora_ref, "alice/sst2-lora")
    bob.add(trained(ph.LoRA(r=2), seed=5), name="sst2-lora")
    args = ["pull", "alice/sst2-lora", "--endpoint", local_hub.endpoint, "--registry", str(bob.root)]
    assert cli.main(args) == 1
    assert "--name" in capsys.readouterr().err
    assert cli.main([*args, "--name", "alice-sst2"]) == 0
    assert bob.get("alice-sst2").source["repo_id"] == "alice/sst2-lora"


@pytest.mark.parametrize("bad", ["name\n", "na\x00me", "name\r", "x" * 101, "nam\ud800e"])
def test_names_are_matched_whole(bad):
    with pytest.raises(RegistryError):
        check_name(bad)
    with pytest.raises(RegistryError):
        parse_ref(f"{bad}@1")


def test_a_version_with_a_trailing_newline_is_refused():
    with pytest.raises(RegistryError):
        parse_ref("name@1\n")


@pytest.mark.parametrize("field, value", [("task", "ss\x00t2"), ("task", "\ud800"), ("task", "a\x1b[31mb"),
                                          ("tags", ["ok", "b\x1b]0;title\x07"]), ("description", "x\x00"),
                                          ("metrics", {"acc\x1b[2J": 1.0})])
def test_control_characters_and_surrogates_in_card_text_are_refused(tmp_path, field, value):
    reg = ph.Registry(tmp_path / "reg")
    with pytest.raises(ConfigError, match=field):
        reg.add(trained(ph.LoRA(r=2)), name="m", **{field: value})
    assert len(reg) == 0


def test_tabs_and_newlines_stay_allowed_in_descriptions(tmp_path):
    reg = ph.Registry(tmp_path / "reg")
    ref = reg.add(trained(ph.LoRA(r=2)), name="m", description="line one\n\tline two")
    assert reg.get(ref).description == "line one\n\tline two"


def test_an_imported_hub_adapter_cannot_add_a_version_to_a_local_name(local_hub, regs, tmp_path, monkeypatch):
    """import of a Hub PEFT adapter names it after the repo; a stranger's repo may not extend a local name either."""
    peft = pytest.importorskip("peft")
    from pelthub.hub import fetch, import_peft
    _, bob = regs
    mine = bob.add(trained(ph.LoRA(r=2), seed=1), name="my-prod-lora")
    folder = tmp_path / "adapter"
    peft.get_peft_model(tiny.bert(), peft.LoraConfig(r=2, target_modules=["query", "value"])).save_pretrained(folder)
    local_hub.put_files("eve/my-prod-lora", {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})
    written = []
    real = fetch._stream
    monkeypatch.setattr(fetch, "_stream", lambda url, dest, *a, **k: (written.append(dest), real(url, dest, *a, **k)))
    with pytest.raises(RegistryError, match="my-prod-lora.*name="):
        import_peft("eve/my-prod-lora", registry=bob, base=tiny.bert(), endpoint=local_hub.endpoint)
    assert [c.ref for c in bob.versions("my-prod-lora")] == [mine]
    ref = import_peft("eve/my-prod-lora", registry=bob, base=tiny.bert(), endpoint=local_hub.endpoint, name="eve-lora")
    assert ref == "eve-lora@1" and bob.get(ref).source["repo_id"] == "eve/my-prod-lora"
    assert written and all(p.resolve().is_relative_to(bob.blobs.tmp.resolve()) for p in written)
