"""Fixtures for the security suite: two registries, a LocalHub that can lie, and modules published on it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import pelthub as ph
from pelthub.hub.sync import README
from pelthub.registry import Card
from tests.tiny import trained
from tests.hub_fixtures import local_hub  # noqa: F401  (pytest fixture)


def publish(hub, reg: ph.Registry, ref: str, repo_id: str, readme: str | None = None, **changes) -> str:
    """Commit module `ref` of `reg` to `repo_id` on `hub` directly (no client), its card changed by `changes`.

    readme: the README.md text to serve instead of the card's. Returns the commit sha.
    """
    card = reg.get(ref)
    folder = reg.path(ref)
    files = {name: (folder / name).read_bytes() for name in card.files}
    card = dataclasses.replace(card, **changes) if changes else card
    files[README] = (readme if readme is not None else card.to_markdown()).encode()
    return hub.put_files(repo_id, files)


def as_parent(hub, reg: ph.Registry, ref: str, repo_id: str) -> dict:
    """The card entry for a parent published at `repo_id`."""
    card = reg.get(ref)
    return {"ref": ref, "sha256": card.digest, "repo_id": repo_id, "commit": hub.commit_sha(repo_id)}


@pytest.fixture
def regs(tmp_path):
    return ph.Registry(tmp_path / "alice"), ph.Registry(tmp_path / "bob")


@pytest.fixture
def lora_ref(regs):
    """A small LoRA in alice's registry."""
    alice, _ = regs
    return alice.add(trained(ph.LoRA(r=2)), name="sst2-lora", task="sst2")


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


__all__ = ["Card", "as_parent", "files_under", "publish", "trained"]
