"""Push and pull through a local Hub-API server with the real huggingface_hub client (offline, LFS mode)."""
import json
import logging
import socket
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download

import pelthub as ph
from pelthub import cli
from pelthub.errors import (HubAuthError, HubConnectionError, HubError, HubIntegrityError, HubNotFoundError,
                            ModuleFormatError)
from pelthub.hub import export, import_peft, search
from tests import tiny
from tests.tiny import trained
from tests.hub_fixtures import local_hub  # noqa: F401  (pytest fixture)
from tests.hubserver import LocalHub

TOKEN = "hf_SecretTokenValue0123456789"


def files(reg, ref):
    folder = reg.path(ref)
    return {f: (folder / f).read_bytes() for f in reg.get(ref).files}


@pytest.fixture
def regs(tmp_path):
    return ph.Registry(tmp_path / "alice"), ph.Registry(tmp_path / "bob")


def test_push_pull_round_trip_is_byte_equal(local_hub, regs):  # noqa: F811
    alice, bob = regs
    model = trained(ph.LoRA(r=2))
    ref = alice.add(model, name="sst2-lora", task="sst2", tags=["demo"], metrics={"accuracy": 0.91})
    commit = alice.push(ref, "alice/sst2-lora", endpoint=local_hub.endpoint)
    assert commit == local_hub.commit_sha("alice/sst2-lora")
    api = HfApi(endpoint=local_hub.endpoint)
    assert [c.title for c in api.list_repo_commits("alice/sst2-lora")] == [f"pelthub push {ref}", "initial commit"]
    assert set(api.list_repo_files("alice/sst2-lora")) == {".gitattributes", "README.md", "pelthub.json",
                                                           "modules.safetensors"}

    pulled = bob.pull("alice/sst2-lora", endpoint=local_hub.endpoint)
    assert files(bob, pulled) == files(alice, ref)
    mine, theirs = alice.get(ref), bob.get(pulled)
    for field in ("name", "kinds", "modules", "task", "tags", "metrics", "base_model", "files"):
        assert getattr(theirs, field) == getattr(mine, field)
    assert theirs.source == {"repo_id": "alice/sst2-lora", "commit": commit, "endpoint": local_hub.endpoint}
    inputs = tiny.batch("bert")
    with torch.no_grad():
        torch.testing.assert_close(bob.load(pulled, tiny.bert())(**inputs).logits, model(**inputs).logits)
    assert local_hub.errors == []


def test_model_card_parses_and_carries_library_base_kind_and_task(local_hub, regs, tmp_path):  # noqa: F811
    alice, _ = regs
    ref = alice.add(trained(ph.Prompt(length=3)), name="sst2-prompt", task="sst2", metrics={"accuracy": 0.5})
    alice.push(ref, "alice/sst2-prompt", endpoint=local_hub.endpoint)
    path = hf_hub_download("alice/sst2-prompt", "README.md", endpoint=local_hub.endpoint, cache_dir=tmp_path / "c")
    card = ModelCard(Path(path).read_text())
    assert card.data.library_name == "pelthub" and card.data.base_model == "tiny/bert"
    assert {"pelthub", "prompt", "sst2", "base_model:adapter:tiny/bert"} <= set(card.data.tags)
    assert "accuracy = 0.5" in card.text and 'reg.pull("alice/sst2-prompt")' in card.text.replace("'", '"')
    info = HfApi(endpoint=local_hub.endpoint).model_info("alice/sst2-prompt")
    assert info.library_name == "pelthub" and "base_model:tiny/bert" in info.tags


def test_pulling_the_same_revision_again_downloads_nothing(local_hub, regs):  # noqa: F811
    alice, bob = regs
    ref = alice.add(trained(ph.IA3()), name="ia3")
    commit = alice.push(ref, "alice/ia3", endpoint=local_hub.endpoint)
    first = bob.pull("alice/ia3", endpoint=local_hub.endpoint)
    local_hub.requests.clear()
    assert bob.pull("alice/ia3", endpoint=local_hub.endpoint) == first
    assert not [r for r in local_hub.requests if "/resolve/" in r[1]]  # one revision lookup, no file
    local_hub.requests.clear()
    assert bob.pull("alice/ia3", revision=commit, endpoint=local_hub.endpoint) == first
    assert local_hub.requests == []  # a pinned commit already here needs no network at all
    assert len(bob) == 1


def test_tags_branches_and_pinned_commits(local_hub, regs):  # noqa: F811
    alice, bob = regs
    v1 = alice.add(trained(ph.LoRA(r=2), seed=1), name="lora")
    v2 = alice.add(trained(ph.LoRA(r=2), seed=2), name="lora")
    v3 = alice.add(trained(ph.LoRA(r=2), seed=3), name="lora")
    first = alice.push(v1, "alice/lora", tag="v1.0", endpoint=local_hub.endpoint)
    second = alice.push(v2, "alice/lora", endpoint=local_hub.endpoint)
    alice.push(v3, "alice/lora", revision="dev", endpoint=local_hub.endpoint)
    assert second != first and local_hub.commit_sha("alice/lora") == second

    def pulled(**kw):
        return files(bob, bob.pull("alice/lora", endpoint=local_hub.endpoint, **kw))

    assert pulled(revision=first) == files(alice, v1)  # pinned after a newer push: the old content
    assert pulled(revision="v1.0") == files(alice, v1)
    assert pulled() == files(alice, v2)
    assert pulled(revision="dev") == files(alice, v3)
    assert alice.push(v2, "alice/lora", endpoint=local_hub.endpoint) == second  # nothing changed: no new commit
    with pytest.raises(HubError, match="already has a tag 'v1.0'"):
        alice.push(v3, "alice/lora", tag="v1.0", endpoint=local_hub.endpoint)
    assert local_hub.commit_sha("alice/lora") == second  # refused before committing


def test_search_by_base_model_kind_task_and_author(local_hub, regs):  # noqa: F811
    alice, _ = regs
    pushes = [("alice/bert-lora", trained(ph.LoRA(r=2)), "sst2"), ("alice/bert-prompt", trained(ph.Prompt(3)), "mnli"),
              ("bob/gpt2-lora", trained(ph.LoRA(r=2), base=tiny.gpt2(), name="tiny/gpt2"), "sst2")]
    for repo, model, task in pushes:
        alice.push(alice.add(model, name=repo.split("/")[1], task=task), repo, endpoint=local_hub.endpoint)
    HfApi(endpoint=local_hub.endpoint).create_repo("bob/not-pelthub")

    def ids(**kw):
        return sorted(m.repo_id for m in search(endpoint=local_hub.endpoint, **kw))

    assert ids() == ["alice/bert-lora", "alice/bert-prompt", "bob/gpt2-lora"]
    assert ids(base_model="tiny/bert") == ["alice/bert-lora", "alice/bert-prompt"]
    assert ids(base_model="tiny/bert", kind="lora") == ["alice/bert-lora"]
    assert ids(kind="lora", task="sst2") == ["alice/bert-lora", "bob/gpt2-lora"]
    assert ids(author="bob") == ["bob/gpt2-lora"]
    gpt2 = tiny.gpt2()
    gpt2.config.name_or_path = "tiny/gpt2"
    assert ids(base_model=gpt2) == ["bob/gpt2-lora"] and ids(base_model=gpt2, kind="prompt") == []
    hit = search(kind="prompt", endpoint=local_hub.endpoint)[0]
    assert (hit.kinds, hit.task, hit.base_model) == (["prompt"], "mnli", "tiny/bert")


def test_tampered_file_on_the_server_is_rejected(local_hub, regs):  # noqa: F811
    alice, bob = regs
    ref = alice.add(trained(ph.LoRA(r=2)), name="lora")
    alice.push(ref, "alice/lora", endpoint=local_hub.endpoint)
    weights = files(alice, ref)["modules.safetensors"]
    local_hub.tamper("alice/lora", "modules.safetensors", weights[:-4] + b"\x00\x00\x80\x7f")
    with pytest.raises(HubIntegrityError, match="modules.safetensors"):
        bob.pull("alice/lora", endpoint=local_hub.endpoint)
    assert len(bob) == 0 and not any(bob.blobs.tmp.iterdir())


def test_files_that_do_not_match_their_card_are_rejected(local_hub, regs, tmp_path):  # noqa: F811
    """A repo whose files are intact on the Hub but are not the ones its card lists."""
    alice, bob = regs
    one, other = (alice.add(trained(ph.LoRA(r=2), seed=s), name=f"m{s}") for s in (1, 2))
    folder = export(one, tmp_path / "repo", format="pelthub", registry=alice)
    (folder / "modules.safetensors").write_bytes(files(alice, other)["modules.safetensors"])
    api = HfApi(endpoint=local_hub.endpoint)
    api.create_repo("mallory/swap")
    api.upload_folder(repo_id="mallory/swap", folder_path=folder)
    with pytest.raises(HubIntegrityError, match="card records"):
        bob.pull("mallory/swap", endpoint=local_hub.endpoint)
    assert len(bob) == 0


def test_composed_modules_bring_their_parents(local_hub, regs):  # noqa: F811
    alice, bob = regs
    a = alice.add(trained(ph.LoRA(r=2), seed=1), name="leaf-a")
    b = alice.add(trained(ph.LoRA(r=2), seed=2), name="leaf-b")
    mid = alice.add(trained(ph.LoRA(r=2), seed=3), name="mid", parents=[a])
    top = alice.add(trained(ph.LoRA(r=2), seed=4), name="top", parents=[mid, b])
    with pytest.raises(HubError, match="push the parents first"):
        alice.push(top, "alice/top", endpoint=local_hub.endpoint)
    for ref in (a, b, mid, top):
        alice.push(ref, f"alice/{alice.get(ref).name}", endpoint=local_hub.endpoint)

    pulled = bob.pull("alice/top", endpoint=local_hub.endpoint)
    assert sorted(c.name for c in bob.search()) == ["leaf-a", "leaf-b", "mid", "top"]
    graph = bob.graph()
    assert sorted(graph.predecessors(pulled)) == ["leaf-b@1", "mid@1"]
    assert list(graph.predecessors("mid@1")) == ["leaf-a@1"]
    for name in ("leaf-a", "leaf-b", "mid", "top"):
        assert files(bob, f"{name}@1") == files(alice, f"{name}@1")
        assert bob.get(name).source["repo_id"] == f"alice/{name}"
    # pulled parents count as "on the Hub": bob can push a new composite built from them
    child = bob.add(trained(ph.LoRA(r=2), seed=5), name="child", parents=[pulled])
    bob.push(child, "bob/child", endpoint=local_hub.endpoint)
    readme = hf_hub_download("bob/child", "README.md", endpoint=local_hub.endpoint, cache_dir=bob.root / "c")
    parent = ModelCard(Path(readme).read_text()).data.pelthub["parents"][0]
    assert parent["repo_id"] == "alice/top" and parent["commit"] == local_hub.commit_sha("alice/top")


def test_missing_repo_and_revision(local_hub, regs):  # noqa: F811
    alice, bob = regs
    with pytest.raises(HubNotFoundError, match="check the repo id"):
        bob.pull("nobody/missing", endpoint=local_hub.endpoint)
    alice.push(alice.add(trained(ph.LoRA(r=2)), name="lora"), "alice/lora", endpoint=local_hub.endpoint)
    with pytest.raises(HubNotFoundError, match="no revision 'v9'"):
        bob.pull("alice/lora", revision="v9", endpoint=local_hub.endpoint)
    with pytest.raises(HubNotFoundError):
        bob.pull("alice/lora", revision="f" * 40, endpoint=local_hub.endpoint)


def test_offline_mode(local_hub, regs, monkeypatch):  # noqa: F811
    alice, bob = regs
    ref = alice.add(trained(ph.LoRA(r=2)), name="lora")
    commit = alice.push(ref, "alice/lora", endpoint=local_hub.endpoint)
    pulled = bob.pull("alice/lora", endpoint=local_hub.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    local_hub.requests.clear()
    with pytest.raises(HubConnectionError, match=f"HF_HUB_OFFLINE.*{commit}"):
        bob.pull("alice/lora", endpoint=local_hub.endpoint)
    assert bob.pull("alice/lora", revision=commit, endpoint=local_hub.endpoint) == pulled
    for call in (lambda: alice.push(ref, "alice/lora", endpoint=local_hub.endpoint),
                 lambda: search(endpoint=local_hub.endpoint)):
        with pytest.raises(HubConnectionError, match="HF_HUB_OFFLINE"):
            call()
    assert local_hub.requests == []


def test_unreachable_endpoint_fails_fast(regs):
    alice, _ = regs
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    ref = alice.add(trained(ph.LoRA(r=2)), name="lora")
    start = time.monotonic()
    for call in (lambda: alice.push(ref, "alice/lora", endpoint=dead), lambda: alice.pull("alice/lora", endpoint=dead),
                 lambda: search(endpoint=dead), lambda: import_peft("alice/lora", registry=alice, endpoint=dead)):
        with pytest.raises(HubConnectionError, match="unreachable"):
            call()
    assert time.monotonic() - start < 5


def test_auth_errors_name_the_fix_and_never_show_the_token(local_hub, regs, monkeypatch, caplog, capsys):  # noqa: F811
    alice, _ = regs
    ref = alice.add(trained(ph.LoRA(r=2)), name="lora")
    caplog.set_level(logging.DEBUG)
    with LocalHub(token="the-right-one") as hub:
        with pytest.raises(HubAuthError, match="token was refused") as err:
            alice.push(ref, "alice/lora", token=TOKEN, endpoint=hub.endpoint)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        with pytest.raises(HubAuthError, match="no token found"):
            alice.push(ref, "alice/lora", endpoint=hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)  # a token from the environment is scrubbed too
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)  # the stored token goes to the default Hub only
        assert cli.main(["push", ref, "alice/lora", "--endpoint", hub.endpoint, "--registry", str(alice.root)]) == 1
    out = capsys.readouterr()
    assert "token was refused" in out.err
    for text in (str(err.value), caplog.text, out.out, out.err):
        assert TOKEN not in text


def test_pulling_a_peft_repo_points_to_import(local_hub, regs, tmp_path):  # noqa: F811
    alice, bob = regs
    folder = export(trained(ph.LoRA(r=2)), tmp_path / "peft")
    api = HfApi(endpoint=local_hub.endpoint)
    api.create_repo("alice/peft-lora")
    api.upload_folder(repo_id="alice/peft-lora", folder_path=folder)
    with pytest.raises(ModuleFormatError, match="import_peft"):
        bob.pull("alice/peft-lora", endpoint=local_hub.endpoint)
    ref = import_peft("alice/peft-lora", registry=bob, base=tiny.bert(), endpoint=local_hub.endpoint)
    assert bob.get(ref).source["repo_id"] == "alice/peft-lora" and bob.get(ref).kinds == ["lora"]
    local_hub.tamper("alice/peft-lora", "adapter_model.safetensors", b"\x00" * len(
        (folder / "adapter_model.safetensors").read_bytes()))
    with pytest.raises(HubIntegrityError):
        import_peft("alice/peft-lora", registry=bob, base=tiny.bert(), endpoint=local_hub.endpoint)


def test_cli_push_pull_search_export_import(local_hub, regs, tmp_path, capsys):  # noqa: F811
    alice, bob = regs
    ref = alice.add(trained(ph.LoRA(r=2)), name="lora", task="sst2")
    common = ["--endpoint", local_hub.endpoint]

    def run(*args, reg=alice):
        assert cli.main([*args, "--registry", str(reg.root), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    pushed = run("push", ref, "alice/lora", "--tag", "v1", *common)
    assert pushed["commit"] == local_hub.commit_sha("alice/lora", "v1")
    assert run("pull", "alice/lora", "--revision", "v1", *common, reg=bob)["source"]["commit"] == pushed["commit"]
    assert [m["repo_id"] for m in run("hub-search", "--kind", "lora", "--base", "tiny/bert", *common)] == ["alice/lora"]
    run("export", ref, str(tmp_path / "peft"), "--format", "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    run("export", ref, str(tmp_path / "mine"), "--format", "pelthub")
    assert run("import", str(tmp_path / "mine"), "--name", "again", reg=bob)["files"] == alice.get(ref).files
