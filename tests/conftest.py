import os

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Never touch the user's registry or Hub cache."""
    monkeypatch.setenv("PELTHUB_HOME", str(tmp_path / "pelthub-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
