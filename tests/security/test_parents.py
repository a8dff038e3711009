"""Parents are walked with a stack within depth and count limits the user can raise; cycles are refused."""
from __future__ import annotations

import sys
import time

import pytest

from pelthub.errors import HubError, HubIntegrityError
from tests.security.conftest import publish


def chain(hub, reg, ref, length: int, prefix: str = "eve/m") -> str:
    """Repos prefix0 <- prefix1 <- ... : prefix{i} lists prefix{i+1} as its parent; returns the root's repo id."""
    digest = reg.get(ref).digest
    parents: list = []
    for i in reversed(range(length)):
        repo = f"{prefix}{i}"
        sha = publish(hub, reg, ref, repo, name=f"m{i}", parents=parents)
        parents = [{"ref": f"m{i}@1", "sha256": digest, "repo_id": repo, "commit": sha}]
    return f"{prefix}0"


def fan(hub, reg, ref, width: int) -> str:
    """A repo eve/top whose card lists `width` parents eve/p0 ... eve/p{width-1}."""
    digest = reg.get(ref).digest
    parents = [{"ref": f"p{i}@1", "sha256": digest, "repo_id": f"eve/p{i}",
                "commit": publish(hub, reg, ref, f"eve/p{i}", name=f"p{i}")} for i in range(width)]
    publish(hub, reg, ref, "eve/top", name="top", parents=parents)
    return "eve/top"


@pytest.mark.slow
def test_a_400_deep_chain_stops_at_the_depth_limit_quickly(local_hub, regs, lora_ref):
    alice, bob = regs
    root = chain(local_hub, alice, lora_ref, 400)
    start = time.monotonic()
    with pytest.raises(HubError, match="deeper than 32 levels.*max_depth="):
        bob.pull(root, endpoint=local_hub.endpoint)
    assert time.monotonic() - start < 30
    assert len(local_hub.requests) < 40 * 4  # ~3 requests per level reached, not 2,000+
    assert len(bob) == 0 and list(bob.blobs) == []


@pytest.mark.slow
def test_a_deep_chain_within_a_raised_limit_is_walked_without_recursion(local_hub, regs, lora_ref):
    """Before: RecursionError at 400 deep. The walk keeps a stack: 200 levels pull with only 150 Python frames
    to spare above this test (a pull needs ~30), where a recursive walk needs at least one frame a level."""
    alice, bob = regs
    root = chain(local_hub, alice, lora_ref, 200)
    frame, depth = sys._getframe(), 0
    while frame:
        frame, depth = frame.f_back, depth + 1
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + 150)
    try:
        ref = bob.pull(root, endpoint=local_hub.endpoint, max_depth=200, max_parents=200)
    finally:
        sys.setrecursionlimit(limit)
    assert len(bob) == 200 and [p["ref"] for p in bob.get(ref).parents] == ["m1@1"]
    assert [p["ref"] for p in bob.get("m198").parents] == ["m199@1"] and bob.get("m199").parents == []


def test_the_depth_limit_can_be_raised(local_hub, regs, lora_ref):
    alice, bob = regs
    root = chain(local_hub, alice, lora_ref, 4)
    with pytest.raises(HubError, match="deeper than 2 levels"):
        bob.pull(root, endpoint=local_hub.endpoint, max_depth=2)
    ref = bob.pull(root, endpoint=local_hub.endpoint, max_depth=3)
    assert [p["ref"] for p in bob.get(ref).parents] == ["m1@1"]
    assert sorted(c.name for c in bob.search()) == ["m0", "m1", "m2", "m3"]


def test_200_parents_are_refused_before_any_is_fetched(local_hub, regs, lora_ref):
    alice, bob = regs
    top = fan(local_hub, alice, lora_ref, 200)
    with pytest.raises(HubError, match="200 modules, more than 100.*max_parents="):
        bob.pull(top, endpoint=local_hub.endpoint)
    assert not any("/eve/p" in path for _, path in local_hub.requests)


def test_the_parent_count_limit_can_be_raised(local_hub, regs, lora_ref, monkeypatch):
    alice, bob = regs
    top = fan(local_hub, alice, lora_ref, 3)
    with pytest.raises(HubError, match="more than 2"):
        bob.pull(top, endpoint=local_hub.endpoint, max_parents=2)
    monkeypatch.setenv("PELTHUB_MAX_PARENTS", "2")
    with pytest.raises(HubError, match="more than 2"):
        bob.pull(top, endpoint=local_hub.endpoint)
    ref = bob.pull(top, endpoint=local_hub.endpoint, max_parents=3)
    assert sorted(p["ref"] for p in bob.get(ref).parents) == ["p0@1", "p1@1", "p2@1"]


def test_a_shared_ancestor_is_fetched_once(local_hub, regs, lora_ref):
    alice, bob = regs
    digest = alice.get(lora_ref).digest
    base = {"ref": "b@1", "sha256": digest, "repo_id": "eve/b", "commit": publish(local_hub, alice, lora_ref, "eve/b",
                                                                                   name="b")}
    mids = [{"ref": f"{n}@1", "sha256": digest, "repo_id": f"eve/{n}",
             "commit": publish(local_hub, alice, lora_ref, f"eve/{n}", name=n, parents=[base])} for n in ("l", "r")]
    publish(local_hub, alice, lora_ref, "eve/top", name="top", parents=mids)
    bob.pull("eve/top", endpoint=local_hub.endpoint)
    assert sum(1 for m, p in local_hub.requests if m == "GET" and p == "/api/models/eve/b/revision/"
               + base["commit"]) == 1
    assert sorted(c.name for c in bob.search()) == ["b", "l", "r", "top"]


def test_a_cycle_is_refused(local_hub, regs, lora_ref):
    """Commits are content-addressed, so only a lying server can serve a card that lists its own commit."""
    alice, bob = regs
    digest = alice.get(lora_ref).digest
    own = publish(local_hub, alice, lora_ref, "eve/self", name="self")
    publish(local_hub, alice, lora_ref, "eve/self", name="self",
            parents=[{"ref": "self@1", "sha256": digest, "repo_id": "eve/self", "commit": own}])
    local_hub.lie("eve/self", sha=own)  # the new head is served as commit `own`
    with pytest.raises(HubError, match="its own"):
        bob.pull("eve/self", endpoint=local_hub.endpoint)
    assert len(bob) == 0


def test_a_parent_location_must_be_a_repo_id_and_a_commit_sha(local_hub, regs, lora_ref):
    alice, bob = regs
    digest = alice.get(lora_ref).digest
    for repo, commit in (("../../x", "a" * 40), ("eve/a", "../../" + "a" * 34), ("eve/a", "a" * 40 + "\n")):
        publish(local_hub, alice, lora_ref, "eve/bad", name="bad",
                parents=[{"ref": "a@1", "sha256": digest, "repo_id": repo, "commit": commit}])
        with pytest.raises(HubIntegrityError, match="not a repo id and commit sha"):
            bob.pull("eve/bad", endpoint=local_hub.endpoint)
    assert len(bob) == 0
