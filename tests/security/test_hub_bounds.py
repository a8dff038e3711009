"""Everything a Hub answer can cost is bounded, and every way it can be malformed is a pelthub error.

Slow drips, endless pages, redirect loops, broken or bombing gzip, alias
bombs in a card, cards declaring huge or countless files, answers of the
wrong shape: each ends within its limit as the pelthub error named here.
The limits are shortened for speed (timeout 0.3 s, CALL_SPAN 2: 0.6 s a call).
"""
from __future__ import annotations

import gzip
import os
import re
import time
import tracemalloc

import pytest

from pelthub.errors import HubConnectionError, HubError, HubIntegrityError, ModuleFormatError
from pelthub.hub import limits, search
from pelthub.hub.client import resolve
from pelthub.hub.fetch import download
from pelthub.registry.card import Card
from tests.security.conftest import publish
from tests.security.test_waits import within

README_GET = r"/resolve/.*/README\.md$"
TIMEOUT = 0.3


@pytest.fixture
def short(monkeypatch):
    """A call may take TIMEOUT x 2 = 0.6 s in all."""
    monkeypatch.setattr(limits, "CALL_SPAN", 2)


@pytest.fixture
def eve(local_hub, regs, lora_ref):
    """Bob's registry, with alice's LoRA published as eve/lora."""
    alice, bob = regs
    publish(local_hub, alice, lora_ref, "eve/lora")
    return bob


def gets(hub, pattern: str) -> int:
    return sum(1 for method, path in hub.requests if method == "GET" and re.search(pattern, path))


# ----- time: a slow drip ends at the call's limit, not after it -----
@pytest.mark.parametrize("step", [README_GET, r"^/api/models/eve/lora"])
def test_a_slow_drip_ends_at_the_limit(local_hub, eve, short, step):
    local_hub.fail("GET", step, drip=0.02)  # one byte every 20 ms: each read well inside the timeout
    start = time.monotonic()
    error = within(3, lambda: eve.pull("eve/lora", endpoint=local_hub.endpoint, timeout=TIMEOUT))
    assert type(error) is HubConnectionError and "did not finish within 0.6 s" in str(error)
    assert time.monotonic() - start < 1.5 and len(eve) == 0


def test_a_slow_drip_of_search_results_ends_at_the_limit(local_hub, eve, short):
    local_hub.fail("GET", r"^/api/models$", drip=0.02)
    error = within(3, lambda: search(endpoint=local_hub.endpoint, timeout=TIMEOUT))
    assert type(error) is HubConnectionError and "did not finish within 0.6 s" in str(error)


# ----- pages: a search follows a bounded number -----
def test_endless_next_pages_stop_at_the_page_budget(local_hub, eve, monkeypatch):
    local_hub.fail("GET", r"^/api/models$", headers={"Link": f'<{local_hub.endpoint}/api/models?more=1>; rel="next"'})
    assert [m.repo_id for m in search(endpoint=local_hub.endpoint, limit=1)] == ["eve/lora"]  # enough: no page 2
    with pytest.raises(HubError, match="after 3 pages.*max_pages=") as caught:
        search(endpoint=local_hub.endpoint, limit=None, max_pages=3)
    assert type(caught.value) is HubError and gets(local_hub, r"^/api/models$") == 1 + 3
    monkeypatch.setenv("PELTHUB_MAX_SEARCH_PAGES", "2")
    with pytest.raises(HubError, match="after 2 pages"):
        search(endpoint=local_hub.endpoint, limit=None)


# ----- hops: redirect loops end, same-origin redirects still work -----
@pytest.mark.parametrize("step", [README_GET, r"^/api/models/eve/lora"])
def test_a_redirect_loop_is_a_hub_error(local_hub, eve, step):
    local_hub.fail("GET", step, location=local_hub.endpoint + "{path}")
    with pytest.raises(HubError, match="redirected it more than 5 times") as caught:
        eve.pull("eve/lora", endpoint=local_hub.endpoint)
    assert type(caught.value) is HubError and gets(local_hub, step) == 6 and len(eve) == 0


def test_a_redirect_on_the_same_hub_is_followed(local_hub, eve, regs, lora_ref):
    local_hub.fail("GET", r"/resolve/.*/modules\.safetensors$", times=1, location="{path}")  # relative
    ref = eve.pull("eve/lora", endpoint=local_hub.endpoint)
    assert eve.get(ref).files == regs[0].get(lora_ref).files


# ----- bytes: content encodings are decoded here, within the byte cap -----
@pytest.mark.parametrize("step", [README_GET, r"^/api/models/eve/lora"])
def test_broken_gzip_is_an_integrity_error(local_hub, eve, step):
    local_hub.fail("GET", step, body=b"this is not gzip at all", headers={"Content-Encoding": "gzip"})
    with pytest.raises(HubIntegrityError, match="broken gzip stream") as caught:
        eve.pull("eve/lora", endpoint=local_hub.endpoint)
    assert "\n" not in str(caught.value) and len(eve) == 0


def test_a_gzip_bomb_is_cut_off_at_the_recorded_size(local_hub, eve):
    bomb = gzip.compress(b"\0" * (16 << 20))  # 16 KB that inflates to 16 MB
    local_hub.fail("GET", README_GET, body=bomb, headers={"Content-Encoding": "gzip"})
    tracemalloc.start()
    try:
        with pytest.raises(HubIntegrityError, match="sent more than the"):
            eve.pull("eve/lora", endpoint=local_hub.endpoint)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_an_unknown_content_encoding_is_refused(local_hub, eve):
    local_hub.fail("GET", README_GET, headers={"Content-Encoding": "br"})
    with pytest.raises(HubIntegrityError, match="identity, gzip and deflate"):
        eve.pull("eve/lora", endpoint=local_hub.endpoint)


def test_a_download_holds_one_chunk_not_the_file(local_hub, tmp_path):
    """The hash is taken while streaming: no copy of the whole file in memory (8 MiB here)."""
    data = os.urandom(8 << 20)
    commit = local_hub.put_files("eve/big", {"big.safetensors": data})
    sha, siblings = resolve("eve/big", commit, local_hub.endpoint, None)
    tracemalloc.start()
    try:
        snap = download("eve/big", sha, siblings, ["big.safetensors"], tmp_path / "big", local_hub.endpoint)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (snap.directory / "big.safetensors").read_bytes() == data and peak < 2 << 20


# ----- cards: no alias bombs, no countless or huge files -----
ALIAS_BOMB = "---\npelthub:\n  a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"  {n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")) + "---\n\n# card\n"


def test_an_alias_bomb_card_is_refused_at_once_in_one_line(local_hub, regs, lora_ref):
    alice, bob = regs
    publish(local_hub, alice, lora_ref, "eve/bomb", readme=ALIAS_BOMB)  # 9^9 nodes once expanded, 420 bytes
    error = within(3, lambda: bob.pull("eve/bomb", endpoint=local_hub.endpoint))
    assert type(error) is ModuleFormatError and "aliases (*name) are not allowed" in str(error)
    assert "\n" not in str(error) and len(str(error)) < 500


def test_deep_nesting_in_a_card_is_refused_in_one_short_line():
    deep = "---\npelthub: " + "[" * 10_000 + "]" * 10_000 + "\n---\n"
    with pytest.raises(ModuleFormatError, match="64 levels") as caught:
        Card.from_markdown(deep)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 500


def test_a_card_declaring_huge_files_is_refused_before_downloading_them(local_hub, regs, lora_ref):
    alice, bob = regs
    files = {name: {**meta, "size": 1 << 50} for name, meta in alice.get(lora_ref).files.items()}
    publish(local_hub, alice, lora_ref, "eve/huge", files=files)
    with pytest.raises(HubError, match="declares 2,251,799,813,685,248 bytes.*PELTHUB_MAX_MODULE_BYTES") as caught:
        bob.pull("eve/huge", endpoint=local_hub.endpoint)
    assert type(caught.value) is HubError and gets(local_hub, r"/resolve/.*safetensors$") == 0


def test_a_card_declaring_countless_files_is_refused_before_downloading_them(local_hub, regs, lora_ref):
    alice, bob = regs
    files = {**alice.get(lora_ref).files, **{f"f{i}.bin": {"sha256": "0" * 64, "size": 1} for i in range(64)}}
    publish(local_hub, alice, lora_ref, "eve/many", files=files)
    with pytest.raises(HubError, match="declares 66 files; a pelthub module has at most 64") as caught:
        bob.pull("eve/many", endpoint=local_hub.endpoint)
    assert type(caught.value) is HubError and gets(local_hub, r"/resolve/.*\.(bin|safetensors)$") == 0


# ----- shapes: wrong-typed answers are HubErrors, never Type/Key/Index/JSON errors -----
@pytest.mark.parametrize("answer", [b'{"models": []}', b"[5]", b'[{"id": 5}]', b'[{"id": "../x"}]',
                                    b'[{"id": "a/b", "tags": "pelthub"}]', b'[{"id": "a/b", "cardData": []}]',
                                    b'[{"id": "a/b", "lastModified": 3}]', b"not json", b"[" * 100_000])
def test_a_malformed_search_answer_is_a_hub_error(local_hub, answer):
    local_hub.fail("GET", r"^/api/models$", body=answer)
    with pytest.raises(HubError) as caught:
        search(endpoint=local_hub.endpoint)
    assert type(caught.value) is HubError and "\n" not in str(caught.value)


def test_wrong_typed_card_fields_in_one_search_result_read_as_absent(local_hub):
    """Any repo owner writes its card: one bad card must not break every search."""
    card = b'{"pelthub": {"kinds": 5, "task": ["x"], "base_model": {"name": 3}}}'
    local_hub.fail("GET", r"^/api/models$", body=b'[{"id": "a/b", "tags": ["pelthub"], "cardData": %s}]' % card)
    [hit] = search(endpoint=local_hub.endpoint)
    assert (hit.repo_id, hit.kinds, hit.task, hit.base_model, hit.tags) == ("a/b", [], None, None, ["pelthub"])


SHA = '"' + "a" * 40 + '"'


@pytest.mark.parametrize("answer, error", [('{"sha": %s, "siblings": "README.md"}' % SHA, HubError),
                                           ('{"sha": %s, "siblings": [{"rfilename": "README.md", "size": "big"}]}'
                                            % SHA, HubError),
                                           ('{"sha": %s, "siblings": [{"rfilename": "a.bin", "lfs": 5}]}' % SHA,
                                            HubError),
                                           ("[]", HubIntegrityError)])  # no commit sha at all
def test_malformed_repo_metadata_is_a_hub_error(local_hub, eve, answer, error):
    local_hub.fail("GET", r"^/api/models/eve/lora", body=answer.encode())
    with pytest.raises(HubError) as caught:
        eve.pull("eve/lora", endpoint=local_hub.endpoint)
    assert type(caught.value) is error and "\n" not in str(caught.value)


@pytest.mark.parametrize("answer", [b"not json", b"[5]", b"{}"])
def test_a_malformed_answer_to_creating_a_repo_is_a_hub_error(local_hub, regs, lora_ref, answer):
    local_hub.fail("POST", r"^/api/repos/create$", body=answer)
    with pytest.raises(HubError, match="answered malformed JSON") as caught:
        regs[0].push(lora_ref, "alice/x", endpoint=local_hub.endpoint)
    assert type(caught.value) is HubError and "\n" not in str(caught.value)
