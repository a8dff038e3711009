"""No credentials (user:pass@ in an endpoint) or local absolute paths in cards, logs, errors or pushed READMEs."""
from __future__ import annotations


import pytest

import pelthub as ph
from pelthub.errors import HubError
from pelthub.hub import import_peft
from tests.security.conftest import publish, trained

SECRET = "hunter2secret"


def with_credentials(endpoint: str) -> str:
    return endpoint.replace("://", f"://alice:{SECRET}@")


def _readme(hub, repo_id: str) -> str:
    with hub.lock:
        return hub.repo("model", repo_id).head.files["README.md"].data.decode()


def test_credentials_in_an_endpoint_stay_out_of_cards_logs_errors_and_readmes(local_hub, regs, lora_ref):
    alice, bob = regs
    url = with_credentials(local_hub.endpoint)
    publish(local_hub, alice, lora_ref, "alice/sst2-lora")
    pulled = bob.pull("alice/sst2-lora", endpoint=url)
    assert bob.get(pulled).source["endpoint"] == local_hub.endpoint
    bob.push(pulled, "bob/sst2-lora", endpoint=url)
    log = (bob.root / "hub" / "pushes.jsonl").read_text()
    assert SECRET not in log and SECRET not in _readme(local_hub, "bob/sst2-lora")
    with pytest.raises(HubError) as caught:
        bob.pull("alice/missing", endpoint=url)
    assert SECRET not in str(caught.value) and "alice@" not in str(caught.value)


def test_a_card_pulled_before_the_fix_does_not_republish_its_credentials(local_hub, regs, lora_ref):
    alice, _ = regs
    card = alice.get(lora_ref)
    leaky = {"repo_id": "x/y", "commit": "a" * 40, "endpoint": with_credentials("http://mirror.example")}
    ref = alice.add(alice.path(lora_ref), name="leaky", source=leaky)
    alice.push(ref, "alice/leaky", endpoint=local_hub.endpoint)
    readme = _readme(local_hub, "alice/leaky")
    assert SECRET not in readme and "http://mirror.example" in readme
    assert card.files == alice.get(ref).files


def test_local_paths_stay_out_of_pushed_readmes(local_hub, regs, tmp_path):
    alice, _ = regs
    local_base = str(tmp_path / "models" / "my-private-bert")
    ref = alice.add(trained(ph.LoRA(r=2), name=local_base), name="m")
    alice.push(ref, "alice/m", endpoint=local_hub.endpoint)
    readme = _readme(local_hub, "alice/m")
    assert str(tmp_path) not in readme and "my-private-bert" not in readme
    assert alice.get(ref).base_model["name"] == local_base  # the local card keeps it


def test_an_imported_folders_path_stays_out_of_pushed_readmes(local_hub, regs, tmp_path):
    peft = pytest.importorskip("peft")
    from tests import tiny
    alice, _ = regs
    model = peft.get_peft_model(tiny.bert(), peft.LoraConfig(r=2, target_modules=["query", "value"]))
    folder = tmp_path / "secret-folder" / "adapter"
    model.save_pretrained(str(folder))
    ref = import_peft(folder, registry=alice, base=tiny.bert(), name="imported")
    assert alice.get(ref).source["path"] == str(folder.resolve())
    alice.push(ref, "alice/imported", endpoint=local_hub.endpoint)
    assert "secret-folder" not in _readme(local_hub, "alice/imported")


def test_http_errors_from_the_client_are_scrubbed_of_credentials(local_hub, regs, lora_ref):
    alice, _ = regs
    local_hub.fail("POST", r"/api/repos/create", status=400)
    with pytest.raises(HubError) as caught:
        alice.push(lora_ref, "alice/x", endpoint=with_credentials(local_hub.endpoint))
    assert SECRET not in str(caught.value)


def test_the_cli_prints_no_credentials_in_its_errors(local_hub, regs, capsys):
    _, bob = regs
    from pelthub import cli
    for endpoint in (with_credentials(local_hub.endpoint), with_credentials("http://127.0.0.1:9")):
        assert cli.main(["pull", "alice/missing", "--endpoint", endpoint, "--registry", str(bob.root)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("pelthub pull: error: ") and SECRET not in err and "alice@" not in err


def test_scrub_removes_credentials_from_client_messages():
    """Client errors quote URLs; whatever URL a message holds loses its user:password@."""
    from pelthub.hub.client import scrub
    text = scrub(f"Server error for url 'http://alice:{SECRET}@mirror.example/api/models/x' (token hf_abcdefghijkl)")
    assert SECRET not in text and "hf_abcdefghijkl" not in text and "http://mirror.example/api/models/x" in text
