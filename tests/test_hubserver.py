"""Drive tests/hubserver.py's LocalHub with the real huggingface_hub client (LFS mode)."""

from __future__ import annotations

import hashlib
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.numpy import load_file, save_file

from tests.hub_fixtures import local_hub  # noqa: F401  (pytest fixture)
from tests.hubserver import LocalHub

REPO = "alice/adapter"
README = """---
library_name: pelthub
tags:
- lora
- base_model:adapter:tiny/base
base_model: tiny/base
license: mit
---
# Adapter
A test module.
"""


def make_folder(path: Path, scale: float = 1.0, readme: str = README) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "README.md").write_text(readme)
    (path / "config.json").write_text(json.dumps({"rank": 4, "scale": scale}))
    save_file({"lora_A": np.full((4, 8), scale, dtype=np.float32)}, str(path / "adapter.safetensors"))
    (path / "sub").mkdir(exist_ok=True)
    (path / "sub" / "notes.txt").write_text("notes " * 4000)  # 24 kB: LFS by size
    return path


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".cache" not in p.parts and p.name != ".gitattributes"}


@pytest.fixture
def api(local_hub):  # noqa: F811
    return HfApi(endpoint=local_hub.endpoint, token="test-token")


def download(hub, tmp_path: Path, revision: str | None = None, repo: str = REPO, name: str = "cache") -> Path:
    return Path(snapshot_download(repo, revision=revision, endpoint=hub.endpoint, cache_dir=tmp_path / name))


def test_push_and_snapshot_roundtrip(api, local_hub, tmp_path):  # noqa: F811
    url = api.create_repo(REPO)
    assert url.repo_id == REPO and url.startswith(local_hub.endpoint)
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 409

    src = make_folder(tmp_path / "src")
    info = api.upload_folder(repo_id=REPO, folder_path=src, commit_message="first")
    assert len(info.oid) == 40 and info.oid == local_hub.commit_sha(REPO)
    # *.safetensors and files > 10 kB went through the LFS batch endpoint + PUT; the rest inline.
    puts = {path for method, path in local_hub.requests if method == "PUT"}
    assert puts == {f"/lfs-upload/{hashlib.sha256((src / p).read_bytes()).hexdigest()}"
                    for p in ("adapter.safetensors", "sub/notes.txt")}

    local = download(local_hub, tmp_path)
    assert local.name == info.oid
    assert read_tree(local) == read_tree(src)
    assert load_file(str(local / "adapter.safetensors"))["lora_A"].shape == (4, 8)

    model = api.model_info(REPO, files_metadata=True)
    assert model.sha == info.oid
    siblings = {s.rfilename: s for s in model.siblings}
    assert set(siblings) == {".gitattributes", "README.md", "config.json", "adapter.safetensors", "sub/notes.txt"}
    assert siblings["config.json"].lfs is None
    for lfs_file in ("adapter.safetensors", "sub/notes.txt"):
        assert siblings[lfs_file].lfs.sha256 == hashlib.sha256((src / lfs_file).read_bytes()).hexdigest()
    assert model.card_data.library_name == "pelthub" and model.library_name == "pelthub"
    assert {"pelthub", "lora", "base_model:tiny/base", "safetensors"} <= set(model.tags)

    files = {f.path: f for f in api.list_repo_tree(REPO, recursive=True)}
    assert set(files) >= {"sub", "sub/notes.txt", "config.json"}
    assert [p.path for p in api.get_paths_info(REPO, ["config.json", "sub", "missing"])] == ["config.json", "sub"]
    assert api.whoami()["name"] == "user"
    assert local_hub.errors == []


def test_pinned_commit_tag_and_deletion(api, local_hub, tmp_path):  # noqa: F811
    api.create_repo(REPO)
    first = api.upload_folder(repo_id=REPO, folder_path=make_folder(tmp_path / "v1", 1.0)).oid
    api.create_tag(REPO, tag="v1.0")
    src2 = make_folder(tmp_path / "v2", 2.0)
    second = api.upload_folder(repo_id=REPO, folder_path=src2, commit_message="second").oid
    third = api.create_commit(REPO, operations=[CommitOperationDelete("sub/"),
                                                CommitOperationAdd("extra.txt", b"inline")],
                              commit_message="third").oid
    assert len({first, second, third}) == 3

    old = download(local_hub, tmp_path, revision=first)
    assert json.loads((old / "config.json").read_text())["scale"] == 1.0
    tagged = download(local_hub, tmp_path, revision="v1.0", name="cache2")
    assert tagged.name == first and (tagged / "sub" / "notes.txt").exists()
    new = download(local_hub, tmp_path, name="cache3")
    assert json.loads((new / "config.json").read_text())["scale"] == 2.0
    assert (new / "extra.txt").read_bytes() == b"inline" and not (new / "sub").exists()

    path = hf_hub_download(REPO, "adapter.safetensors", revision=second, endpoint=local_hub.endpoint,
                           cache_dir=tmp_path / "cache4")
    assert Path(path).read_bytes() == (src2 / "adapter.safetensors").read_bytes()

    refs = api.list_repo_refs(REPO)
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1.0", first)]
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", third)]
    assert [c.commit_id for c in api.list_repo_commits(REPO)][:3] == [third, second, first]
    assert api.model_info(REPO, revision="v1.0").sha == first
    assert local_hub.errors == []


def test_list_models(api, local_hub, tmp_path):  # noqa: F811
    api.create_repo(REPO)
    api.upload_folder(repo_id=REPO, folder_path=make_folder(tmp_path / "a"))
    api.create_repo("bob/other-model")
    api.upload_folder(repo_id="bob/other-model", folder_path=make_folder(
        tmp_path / "b", readme="---\nlibrary_name: transformers\ntags: [vision]\n---\nhi\n"))
    api.create_repo("bob/empty")

    def ids(**kwargs):
        return sorted(m.id for m in api.list_models(**kwargs))

    assert ids(filter="pelthub") == [REPO]
    assert ids(filter="lora") == [REPO]
    assert ids(filter=["pelthub", "vision"]) == []
    assert ids(filter="vision") == ["bob/other-model"]
    assert ids(author="bob") == ["bob/empty", "bob/other-model"]
    assert ids(search="adapt") == [REPO]
    full = next(iter(api.list_models(filter="pelthub", cardData=True)))
    assert full.card_data.library_name == "pelthub"


def test_missing_repo_revision_and_file(api, local_hub, tmp_path):  # noqa: F811
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("nobody/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("nobody/missing", "config.json", endpoint=local_hub.endpoint, cache_dir=tmp_path / "c")
    api.create_repo(REPO)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="f" * 40, endpoint=local_hub.endpoint, cache_dir=tmp_path / "c")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "nope.json", endpoint=local_hub.endpoint, cache_dir=tmp_path / "c")
    api.delete_repo(REPO)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(REPO)
    api.delete_repo(REPO, missing_ok=True)


def test_tamper_changes_served_bytes_not_metadata(api, local_hub, tmp_path):  # noqa: F811
    api.create_repo(REPO)
    src = make_folder(tmp_path / "src")
    api.upload_folder(repo_id=REPO, folder_path=src)
    original = (src / "adapter.safetensors").read_bytes()
    recorded = {s.rfilename: s for s in api.model_info(REPO, files_metadata=True).siblings}

    local_hub.tamper(REPO, "adapter.safetensors", original[:-4] + b"\xff\xff\xff\xff")
    path = hf_hub_download(REPO, "adapter.safetensors", endpoint=local_hub.endpoint, cache_dir=tmp_path / "fresh")
    served = Path(path).read_bytes()
    assert served != original and len(served) == len(original)
    assert hashlib.sha256(served).hexdigest() != recorded["adapter.safetensors"].lfs.sha256
    after = {s.rfilename: s for s in api.model_info(REPO, files_metadata=True).siblings}
    assert after["adapter.safetensors"].lfs.sha256 == recorded["adapter.safetensors"].lfs.sha256


def test_range_requests_and_headers(api, local_hub, tmp_path):  # noqa: F811
    api.create_repo(REPO)
    src = make_folder(tmp_path / "src")
    sha = api.upload_folder(repo_id=REPO, folder_path=src).oid
    url = f"{local_hub.endpoint}/{REPO}/resolve/main/sub/notes.txt"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=6-11"})) as resp:
        assert resp.status == 206 and resp.read() == b"notes "
        assert resp.headers["X-Repo-Commit"] == sha and resp.headers["X-Linked-Size"] == str(24000)
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as resp:
        digest = hashlib.sha256((src / "sub" / "notes.txt").read_bytes()).hexdigest()
        assert resp.headers["ETag"] == f'"{digest}"' and resp.headers["Content-Length"] == "24000"


def test_token_required_for_writes(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with LocalHub(token="secret") as hub:
        with pytest.raises(HfHubHTTPError) as err:
            HfApi(endpoint=hub.endpoint, token="wrong").create_repo(REPO)
        assert err.value.response.status_code == 401 and not isinstance(err.value, RepositoryNotFoundError)
        good = HfApi(endpoint=hub.endpoint, token="secret")
        good.create_repo(REPO)
        good.upload_folder(repo_id=REPO, folder_path=make_folder(tmp_path / "src"))
        assert "config.json" in good.list_repo_files(REPO)
