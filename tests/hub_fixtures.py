"""Pytest fixture serving a LocalHub; use with ``from tests.hub_fixtures import local_hub``."""

from __future__ import annotations

import pytest

from tests.hubserver import LocalHub


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A running LocalHub (LFS mode: HF_HUB_DISABLE_XET patched on, HF_HOME and the hub cache in tmp_path).

    Pass ``endpoint=local_hub.endpoint`` to ``HfApi``, ``snapshot_download`` and ``hf_hub_download``.
    """
    from huggingface_hub import constants

    hf_home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    with LocalHub() as hub:
        yield hub
