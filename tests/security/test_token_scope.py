"""A token goes only to the Hub it was issued for: never to another endpoint, next page or redirect target.

Two local Hubs, each recording the Authorization header of every request it
gets. The stored token (HF_TOKEN) belongs to the default Hub (HF_ENDPOINT,
patched here to hub `a`); a `token=` belongs to the endpoint named with it.
"""
from __future__ import annotations

import pytest
from huggingface_hub import constants

from pelthub import cli
from pelthub.errors import HubError
from pelthub.hub import search
from tests.hubserver import LocalHub
from tests.security.conftest import publish

STORED = "hf_storedtokenofthedefaulthub"
GIVEN = "hf_tokengivenwiththecall"


@pytest.fixture
def hubs(local_hub, monkeypatch):
    """(a, b): `a` is the default Hub and HF_TOKEN holds its token; `b` is any other endpoint."""
    monkeypatch.setenv("HF_TOKEN", STORED)
    monkeypatch.setattr(constants, "ENDPOINT", local_hub.endpoint)
    with LocalHub() as other:
        yield local_hub, other


def calls(hub: LocalHub) -> list[tuple[str, str, str | None]]:
    """(method, path, Authorization) of the requests `hub` got, less the client's own agent lookup (no token)."""
    return [c for c in hub.authorizations if c[1] != "/api/agent-harnesses"]


def mirror(source: LocalHub, target: LocalHub, reg, ref: str, repo_id: str) -> None:
    """Publish `ref` on both hubs, `target` answering `source`'s commit sha, so either serves the other's URLs."""
    publish(source, reg, ref, repo_id)
    publish(target, reg, ref, repo_id)
    target.lie(repo_id, sha=source.commit_sha(repo_id))


def sent(hub: LocalHub) -> set[str | None]:
    """The Authorization headers `hub` received (None: a request without one)."""
    return {auth for _, _, auth in calls(hub)}


def test_the_stored_token_goes_to_the_default_hub(hubs, regs, lora_ref):
    a, _ = hubs
    alice, bob = regs
    publish(a, alice, lora_ref, "alice/lora")
    bob.pull("alice/lora", endpoint=a.endpoint)
    search(endpoint=a.endpoint)
    gets = {auth for method, _, auth in calls(a) if method == "GET"}
    assert gets == {f"Bearer {STORED}"}  # the positive control: scoping did not just drop every token


def test_the_stored_token_never_goes_to_a_named_endpoint(hubs, regs, lora_ref):
    a, b = hubs
    alice, bob = regs
    publish(b, alice, lora_ref, "alice/lora")
    ref = bob.pull("alice/lora", endpoint=b.endpoint)
    search(endpoint=b.endpoint)
    bob.push(ref, "bob/lora", endpoint=b.endpoint)
    assert len(calls(b)) > 5 and sent(b) == {None} and calls(a) == []


def test_the_cli_sends_the_stored_token_to_no_named_endpoint(hubs, regs, lora_ref, capsys):
    _, b = hubs
    alice, bob = regs
    publish(b, alice, lora_ref, "alice/lora")
    for argv in (["pull", "alice/lora"], ["hub-search"]):
        assert cli.main([*argv, "--endpoint", b.endpoint, "--registry", str(bob.root)]) == 0
    assert STORED not in capsys.readouterr().out
    assert len(calls(b)) > 3 and sent(b) == {None}


@pytest.mark.parametrize("step", [r"/resolve/.*/README\.md$", r"/resolve/.*/modules\.safetensors$"])
def test_a_token_given_with_an_endpoint_goes_to_that_endpoint_only(hubs, regs, lora_ref, step):
    """Even a redirect to the default Hub does not carry it there."""
    a, b = hubs
    alice, bob = regs
    mirror(b, a, alice, lora_ref, "alice/lora")
    b.fail("GET", step, location=a.endpoint + "{path}")
    bob.pull("alice/lora", endpoint=b.endpoint, token=GIVEN)
    assert sent(b) == {f"Bearer {GIVEN}"}
    assert [auth for _, path, auth in calls(a)] == [None]  # the redirected file: no token


def test_a_next_page_on_a_third_host_gets_no_token(hubs, regs, lora_ref):
    a, b = hubs
    alice, _ = regs
    publish(a, alice, lora_ref, "alice/lora")
    a.fail("GET", r"^/api/models$", headers={"Link": f'<{b.endpoint}/api/models?page=2>; rel="next"'})
    with pytest.raises(HubError, match="next page on another host") as caught:
        search(endpoint=a.endpoint, limit=None)
    assert type(caught.value) is HubError and calls(b) == []
    assert sent(a) == {None, f"Bearer {STORED}"}  # HEAD preflight carries none; the listing did


def test_a_next_page_on_the_same_hub_keeps_its_token(hubs, regs, lora_ref):
    a, _ = hubs
    alice, _ = regs
    publish(a, alice, lora_ref, "alice/lora")
    a.fail("GET", r"^/api/models$", times=1, headers={"Link": f'<{a.endpoint}/api/models?p=2>; rel="next"'})
    found = search(endpoint=a.endpoint, limit=None)
    assert [m.repo_id for m in found] == ["alice/lora", "alice/lora"]  # two pages, the same listing twice
    assert [auth for m, p, auth in calls(a) if p == "/api/models"] == [f"Bearer {STORED}"] * 2


@pytest.mark.parametrize("step", [r"^/api/models/alice/lora", r"/resolve/.*/README\.md$",
                                  r"/resolve/.*/modules\.safetensors$"])
def test_a_redirect_to_another_origin_drops_the_token(hubs, regs, lora_ref, step):
    a, b = hubs
    alice, bob = regs
    mirror(a, b, alice, lora_ref, "alice/lora")
    a.fail("GET", step, location=b.endpoint + "{path}")
    ref = bob.pull("alice/lora", endpoint=a.endpoint)
    assert bob.get(ref).files == alice.get(lora_ref).files
    assert len(calls(b)) == 1 and sent(b) == {None}
    assert f"Bearer {STORED}" in sent(a)
