"""Every integrity check against the corruption it guards: registry blob sha256, checkouts, parents' digests,
the architecture fingerprint, and the sha256 a Hub card records for each file."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download

import pelthub as ph
from pelthub.errors import HubIntegrityError, IncompatibleModuleError, IntegrityError, RegistryError
from pelthub.hub import export
from tests import tiny
from tests.hub_fixtures import local_hub  # noqa: F401  (pytest fixture)
from tests.reference.handmade import fill, logits

WEIGHTS = "modules.safetensors"


def module(seed: int = 0) -> ph.ModularModel:
    model = ph.attach(tiny.bert(), ph.LoRA(r=2)).eval()
    fill(model.adapters, seed=seed)
    return model


def flip_one_byte(path: Path) -> None:
    """Change the last byte (a tensor value; the size stays the same)."""
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def blob_of(reg: ph.Registry, ref: str, name: str = WEIGHTS) -> Path:
    return reg.blobs.path(reg.get(ref).files[name]["sha256"])


@pytest.mark.parametrize("checked_out_before", [False, True])
def test_corrupt_blob_is_refused_on_load_and_reported_by_verify(tmp_path, checked_out_before):
    reg = ph.Registry(tmp_path / "reg")
    ref = reg.add(module(), name="lora")
    if checked_out_before:
        reg.load(ref, tiny.bert())
    assert reg.verify().ok
    blob = blob_of(reg, ref)
    flip_one_byte(blob)
    report = reg.verify()
    assert not report.ok and report.corrupt == [str(blob)]
    with pytest.raises(IntegrityError, match="corrupt"):
        reg.load(ref, tiny.bert())


def test_damaged_checkout_is_rebuilt_from_verified_blobs(tmp_path):
    reg = ph.Registry(tmp_path / "reg")
    model = module()
    ref = reg.add(model, name="lora")
    batch = tiny.batch("bert")
    expected = logits(model, **batch)
    flip_one_byte(reg.path(ref) / WEIGHTS)
    loaded = reg.load(ref, tiny.bert()).eval()
    torch.testing.assert_close(logits(loaded, **batch), expected)


def test_missing_blob_is_reported_and_refused(tmp_path):
    reg = ph.Registry(tmp_path / "reg")
    ref = reg.add(module(), name="lora")
    blob_of(reg, ref).unlink()
    assert reg.verify().missing
    with pytest.raises(IntegrityError, match="missing"):
        reg.path(ref)


def test_parent_with_another_digest_is_refused(tmp_path):
    reg = ph.Registry(tmp_path / "reg")
    parent = reg.add(module(0), name="parent")
    digest = reg.get(parent).digest
    child = module(1)
    assert reg.get(reg.add(child, name="ok", parents=[{"ref": parent, "sha256": digest}])).parents[0]["sha256"] == digest
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    with pytest.raises(RegistryError, match="sha256"):
        reg.add(child, name="child", parents=[{"ref": parent, "sha256": wrong}])


def test_fingerprint_refuses_another_architecture(tmp_path):
    model = module()
    model.save_pretrained(tmp_path / "m")
    config = tiny.bert().config
    wider, deeper = (type(tiny.bert())(type(config)(**{**config.to_dict(), **change})).eval()
                     for change in ({"hidden_size": 48}, {"num_hidden_layers": 3}))
    for base in (wider, deeper):
        with pytest.raises(IncompatibleModuleError, match="trained on"):
            ph.from_pretrained(base, tmp_path / "m")
    ph.from_pretrained(tiny.bert(num_labels=5), tmp_path / "m")                   # task heads are not part of it
    reg = ph.Registry(tmp_path / "reg")
    ref = reg.add(tmp_path / "m", name="lora")
    with pytest.raises(IncompatibleModuleError):
        reg.load(ref, deeper)


def test_tampered_fingerprint_in_pelthub_json_is_refused_unless_strict_base_is_off(tmp_path):
    module().save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "pelthub.json"
    data = json.loads(path.read_text())
    data["base_model"]["fingerprint"]["sha256"] = "f" * 64
    path.write_text(json.dumps(data))
    with pytest.raises(IncompatibleModuleError):
        ph.from_pretrained(tiny.bert(), tmp_path / "m")
    ph.from_pretrained(tiny.bert(), tmp_path / "m", strict_base=False)


def test_pull_refuses_weights_that_differ_from_the_cards_sha256_by_one_byte(local_hub, tmp_path):  # noqa: F811
    alice, bob = ph.Registry(tmp_path / "alice"), ph.Registry(tmp_path / "bob")
    ref = alice.add(module(), name="lora")
    folder = export(ref, tmp_path / "repo", format="pelthub", registry=alice)
    flip_one_byte(folder / WEIGHTS)                 # uploaded as is: the Hub's own records match the bad bytes
    api = HfApi(endpoint=local_hub.endpoint)
    api.create_repo("mallory/flip")
    api.upload_folder(repo_id="mallory/flip", folder_path=folder)
    with pytest.raises(HubIntegrityError, match=WEIGHTS):
        bob.pull("mallory/flip", endpoint=local_hub.endpoint)
    assert len(bob) == 0


def served(hub, repo_id: str, name: str) -> bytes:
    return Path(hf_hub_download(repo_id, name, endpoint=hub.endpoint)).read_bytes()


def test_pull_refuses_a_card_the_hub_serves_changed(local_hub, tmp_path):  # noqa: F811
    """README.md (the card) is not among the files the card hashes: only the Hub's git blob id guards it."""
    alice, bob = ph.Registry(tmp_path / "alice"), ph.Registry(tmp_path / "bob")
    ref = alice.add(module(), name="lora")
    alice.push(ref, "alice/lora", endpoint=local_hub.endpoint)
    readme = served(local_hub, "alice/lora", "README.md")
    assert b"lora" in readme
    local_hub.tamper("alice/lora", "README.md", readme.replace(b"lora", b"l0ra"))       # same size
    with pytest.raises(HubIntegrityError, match="README.md"):
        bob.pull("alice/lora", endpoint=local_hub.endpoint)
    assert len(bob) == 0


def test_pull_refuses_a_file_the_hub_serves_with_another_size(local_hub, tmp_path):  # noqa: F811
    alice, bob = ph.Registry(tmp_path / "alice"), ph.Registry(tmp_path / "bob")
    ref = alice.add(module(), name="lora")
    alice.push(ref, "alice/lora", endpoint=local_hub.endpoint)
    local_hub.tamper("alice/lora", "README.md", served(local_hub, "alice/lora", "README.md") + b"\n")
    with pytest.raises(HubIntegrityError, match="README.md"):
        bob.pull("alice/lora", endpoint=local_hub.endpoint)
