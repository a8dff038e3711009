"""A hostile Hub endpoint cannot choose where pull writes, nor make it take unchecked or unbounded bytes."""
from __future__ import annotations

import os
import time

import pytest

from pelthub.errors import HubError, HubIntegrityError, ModuleFormatError
from pelthub.hub import fetch
from tests.security.conftest import files_under, publish


def _traversal(target) -> str:
    """A relative path that climbs from anywhere under /tmp up to `target`."""
    return "../" * 30 + str(target).lstrip("/")


def test_hostile_commit_sha_is_refused_and_writes_nothing(local_hub, regs, lora_ref, tmp_path):
    alice, bob = regs
    publish(local_hub, alice, lora_ref, "eve/lora")
    pwned = tmp_path / "pwned"
    local_hub.lie("eve/lora", sha=_traversal(pwned))
    before = files_under(tmp_path)
    with pytest.raises(HubIntegrityError, match="not a commit sha"):
        bob.pull("eve/lora", endpoint=local_hub.endpoint)
    assert not pwned.exists() and not list(tmp_path.rglob("pwned*"))
    assert files_under(tmp_path) - before <= files_under(bob.root)  # anything new is inside bob's registry
    assert len(bob) == 0 and not any(bob.blobs.tmp.iterdir())


def test_hostile_sha_with_a_trailing_newline_is_refused(local_hub, regs, lora_ref):
    alice, bob = regs
    sha = publish(local_hub, alice, lora_ref, "eve/lora")
    local_hub.lie("eve/lora", sha=sha + "\n")
    with pytest.raises(HubIntegrityError):
        bob.pull("eve/lora", endpoint=local_hub.endpoint)


def test_a_commit_other_than_the_one_asked_for_is_refused(local_hub, regs, lora_ref):
    alice, bob = regs
    sha = publish(local_hub, alice, lora_ref, "eve/lora")
    local_hub.lie("eve/lora", sha="0" * 40)
    with pytest.raises(HubIntegrityError, match="not that commit"):
        bob.pull("eve/lora", revision=sha, endpoint=local_hub.endpoint)


def test_hostile_etag_cannot_choose_where_bytes_land(local_hub, regs, lora_ref, tmp_path, monkeypatch):
    alice, bob = regs
    publish(local_hub, alice, lora_ref, "eve/lora")
    pwned = tmp_path / "etag-pwned"
    local_hub.lie("eve/lora", etag=_traversal(pwned))
    before, written = files_under(tmp_path), []
    real = fetch._stream

    def recording(url, dest, *args, **kwargs):  # every file the downloader writes
        written.append(dest)
        return real(url, dest, *args, **kwargs)

    monkeypatch.setattr(fetch, "_stream", recording)
    ref = bob.pull("eve/lora", endpoint=local_hub.endpoint)  # the ETag plays no part in where bytes go
    assert not pwned.exists() and not list(tmp_path.rglob("etag-pwned*"))
    assert bob.get(ref).files == alice.get(lora_ref).files
    assert sorted(p.name for p in written) == ["README.md", "modules.safetensors", "pelthub.json"]
    assert all(p.resolve().is_relative_to(bob.blobs.tmp.resolve()) for p in written)
    assert files_under(tmp_path) - before <= files_under(bob.root)  # not even the client's cache was written
    assert not any(bob.blobs.tmp.iterdir())


def test_file_names_in_a_card_must_be_plain(local_hub, regs, lora_ref):
    alice, bob = regs
    card = alice.get(lora_ref).to_markdown()
    for bad in ("../pelthub.json", "pelthub.json\n", "sub/pelthub.json", "/etc/pelthub.json"):
        quoted = '"' + bad.replace("\n", "\\n") + '":'
        publish(local_hub, alice, lora_ref, "eve/names", readme=card.replace("pelthub.json:", quoted, 1))
        with pytest.raises((ModuleFormatError, HubIntegrityError)):
            bob.pull("eve/names", endpoint=local_hub.endpoint)
    assert len(bob) == 0


def test_bytes_are_checked_before_they_enter_the_blob_store(local_hub, regs, lora_ref):
    alice, bob = regs
    publish(local_hub, alice, lora_ref, "eve/lora")
    weights = (alice.path(lora_ref) / "modules.safetensors").read_bytes()
    local_hub.tamper("eve/lora", "modules.safetensors", weights[:-4] + b"\0\0\0\0")
    with pytest.raises(HubIntegrityError):
        bob.pull("eve/lora", endpoint=local_hub.endpoint)
    assert list(bob.blobs) == [] and len(bob) == 0


def test_a_server_sending_more_bytes_than_it_records_is_cut_off(local_hub, regs, lora_ref):
    alice, bob = regs
    publish(local_hub, alice, lora_ref, "eve/lora")
    weights = (alice.path(lora_ref) / "modules.safetensors").read_bytes()
    local_hub.tamper("eve/lora", "modules.safetensors", weights + b"\0" * (4 << 20))
    with pytest.raises(HubIntegrityError, match="sent more than"):
        bob.pull("eve/lora", endpoint=local_hub.endpoint)
    assert list(bob.blobs) == []


@pytest.mark.slow
def test_a_huge_card_is_refused_before_it_is_downloaded_or_parsed(local_hub, regs, lora_ref, monkeypatch):
    alice, bob = regs
    card = alice.get(lora_ref).to_markdown()
    head, body = card.split("\n---\n", 1)
    padding = "".join(f"# {'x' * 70}\n" for _ in range(30_000))  # ~2 MB of YAML comments: a valid card
    publish(local_hub, alice, lora_ref, "eve/huge", readme=f"{head}\n{padding}---\n{body}")
    start = time.monotonic()
    with pytest.raises(HubError, match="at most"):
        bob.pull("eve/huge", endpoint=local_hub.endpoint)
    assert time.monotonic() - start < 5
    assert not any(path.endswith("README.md") for method, path in local_hub.requests if method == "GET")
    monkeypatch.setenv("PELTHUB_MAX_CARD_BYTES", str(4 << 20))  # the user can raise the limit
    assert bob.get(bob.pull("eve/huge", endpoint=local_hub.endpoint)).files == alice.get(lora_ref).files


def test_a_huge_pelthub_json_is_refused(local_hub, regs, lora_ref, tmp_path):
    from pelthub.model.io import MAX_CONFIG_BYTES, read_description
    folder = tmp_path / "m"
    folder.mkdir()
    with open(folder / "pelthub.json", "wb") as f:
        f.truncate(MAX_CONFIG_BYTES + 1)
    with pytest.raises(ModuleFormatError, match="at most"):
        read_description(folder)
    assert os.path.getsize(folder / "pelthub.json") == MAX_CONFIG_BYTES + 1
