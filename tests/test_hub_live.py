"""Against the real Hugging Face Hub: opt in with `pytest -m live` (needs HF_TOKEN with write access, and network).

Covers what the local server cannot: real auth, private repos, Xet uploads, the Hub's own card
validation and indexing. Pushes to a temporary private repo of the token's user and deletes it.
"""
import os
import time
import uuid

import pytest
import torch

import pelthub as ph
from pelthub.errors import HubNotFoundError
from pelthub.hub import export, import_peft, search
from tests import tiny

pytestmark = pytest.mark.live
TOKEN = os.environ.get("HF_TOKEN")


@pytest.fixture
def repo():
    if not TOKEN:
        pytest.skip("set HF_TOKEN (write access) to run the live Hub test")
    from huggingface_hub import HfApi
    api = HfApi(token=TOKEN)
    repo_id = f"{api.whoami()['name']}/pelthub-live-{uuid.uuid4().hex[:8]}"
    yield repo_id
    api.delete_repo(repo_id, missing_ok=True)
    api.delete_repo(repo_id + "-peft", missing_ok=True)


def test_push_pull_search_and_peft_on_the_real_hub(repo, tmp_path):
    base = tiny.bert()
    model = ph.attach(base, ph.LoRA(r=2)).eval()
    with torch.no_grad():
        for _, p in model.module_parameters():
            p.add_(0.1)
    mine, theirs = ph.Registry(tmp_path / "a"), ph.Registry(tmp_path / "b")
    ref = mine.add(model, name="live-lora", task="live-test")
    commit = mine.push(ref, repo, private=True, token=TOKEN, tag="v1")
    pulled = theirs.pull(repo, revision="v1", token=TOKEN)
    assert theirs.get(pulled).source["commit"] == commit
    assert theirs.get(pulled).files == mine.get(ref).files
    with pytest.raises(HubNotFoundError):
        theirs.pull(repo, revision="no-such-branch", token=TOKEN)

    deadline = time.monotonic() + 60  # the Hub indexes new repos within seconds
    author = repo.split("/")[0]
    while repo not in [m.repo_id for m in search(author=author, kind="lora", task="live-test", token=TOKEN)]:
        assert time.monotonic() < deadline, f"{repo} did not show up in list_models"
        time.sleep(5)

    from huggingface_hub import HfApi
    folder = export(ref, tmp_path / "peft", registry=mine)
    api = HfApi(token=TOKEN)
    api.create_repo(repo + "-peft", private=True)
    api.upload_folder(repo_id=repo + "-peft", folder_path=folder)
    imported = import_peft(repo + "-peft", registry=theirs, base=tiny.bert(), token=TOKEN)
    inputs = tiny.batch("bert")
    with torch.no_grad():
        torch.testing.assert_close(theirs.load(imported, tiny.bert())(**inputs).logits, model(**inputs).logits,
                                   rtol=0, atol=1e-5)
