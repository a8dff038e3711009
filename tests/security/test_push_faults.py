"""A failed push leaves no empty repo; a failed LFS upload is a HubError; a failed tag names the commit that landed."""
from __future__ import annotations

import pytest

import pelthub as ph
from pelthub.errors import HubError, HubPushError
from tests.security.conftest import trained


def test_a_failed_commit_leaves_no_empty_repo(local_hub, regs, lora_ref):
    alice, _ = regs
    local_hub.fail("POST", r"/api/models/alice/new/commit/", status=400)
    with pytest.raises(HubError, match="deleted again"):
        alice.push(lora_ref, "alice/new", endpoint=local_hub.endpoint)
    assert ("model", "alice/new") not in local_hub.repos


def test_a_failed_push_to_an_existing_repo_leaves_it_alone(local_hub, regs, lora_ref):
    alice, _ = regs
    first = alice.push(lora_ref, "alice/kept", endpoint=local_hub.endpoint)
    other = alice.add(trained(ph.LoRA(r=2), seed=4), name="other")
    local_hub.fail("POST", r"/api/models/alice/kept/commit/", status=400)
    with pytest.raises(HubError) as caught:
        alice.push(other, "alice/kept", endpoint=local_hub.endpoint)
    assert "deleted" not in str(caught.value) and local_hub.commit_sha("alice/kept") == first


def test_a_failed_lfs_upload_is_a_hub_error(local_hub, regs, lora_ref):
    alice, _ = regs
    local_hub.fail("PUT", r"/lfs-upload/", status=400)
    with pytest.raises(HubError, match="uploading the files failed"):
        alice.push(lora_ref, "alice/lfs", endpoint=local_hub.endpoint)
    assert ("model", "alice/lfs") not in local_hub.repos


def test_a_failed_tag_reports_the_commit_that_landed(local_hub, regs, lora_ref):
    alice, _ = regs
    local_hub.fail("POST", r"/api/models/alice/tagged/tag/", status=400)
    with pytest.raises(HubPushError) as caught:
        alice.push(lora_ref, "alice/tagged", endpoint=local_hub.endpoint, tag="v1")
    landed = local_hub.commit_sha("alice/tagged")
    assert caught.value.commit == landed and landed in str(caught.value) and "do not push again" in str(caught.value)
    commits = [p for m, p in local_hub.requests if m == "POST" and p.endswith("/commit/main")]
    assert len(commits) == 1
    # the push was logged: pushing a module built on it finds it on this Hub
    log = (alice.root / "hub" / "pushes.jsonl").read_text()
    assert landed in log
