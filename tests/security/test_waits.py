"""Every wait on a Hub has a limit; retries are bounded; each HTTP failure is reported as what it is."""
from __future__ import annotations

import socket
import threading
import time

import pytest

import pelthub as ph
from pelthub.errors import ConfigError, HubAuthError, HubConnectionError, HubError, HubNotFoundError
from pelthub.hub import import_peft, search
from tests.security.conftest import publish


class Silent:
    """A TCP server that accepts connections and never answers (nor closes them)."""

    def __enter__(self) -> str:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                continue

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for c in [*self.conns, self.sock]:
            c.close()


def within(seconds: float, call) -> BaseException | None:
    """Run `call` in a thread; fail if it has not returned after `seconds`; return what it raised."""
    box: list = []

    def run():
        try:
            call()
            box.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box.append(e)

    thread = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    assert time.monotonic() - start < seconds
    return box[0]


CALLS = {
    "pull": lambda reg, url: reg.pull("eve/lora", endpoint=url, timeout=1),
    "import": lambda reg, url: import_peft("eve/adapter", registry=reg, endpoint=url, timeout=1),
    "search": lambda reg, url: search(endpoint=url, timeout=1),
    "push": lambda reg, url: reg.push(reg.add(reg_module(reg), name="m"), "eve/m", endpoint=url, timeout=1),
}


def reg_module(reg):
    from tests.security.conftest import trained
    return trained(ph.LoRA(r=2))


@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_hub_that_never_answers_fails_within_the_timeout(call, tmp_path):
    reg = ph.Registry(tmp_path / "reg")
    with Silent() as url:
        error = within(15, lambda: CALLS[call](reg, url))
    assert isinstance(error, HubConnectionError) and "did not answer within 1 s" in str(error)


def test_the_timeout_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PELTHUB_HUB_TIMEOUT", "0.5")
    reg = ph.Registry(tmp_path / "reg")
    with Silent() as url:
        error = within(10, lambda: reg.pull("eve/lora", endpoint=url))
    assert isinstance(error, HubConnectionError) and "0.5 s" in str(error)
    monkeypatch.setenv("PELTHUB_HUB_TIMEOUT", "-3")
    with pytest.raises(ConfigError, match="PELTHUB_HUB_TIMEOUT"):
        reg.pull("eve/lora", endpoint=url)


def test_a_download_that_stalls_fails_within_the_timeout(local_hub, regs, lora_ref):
    alice, bob = regs
    publish(local_hub, alice, lora_ref, "eve/lora")
    local_hub.fail("GET", r"/resolve/.*/modules\.safetensors$", hang=30)
    error = within(15, lambda: bob.pull("eve/lora", endpoint=local_hub.endpoint, timeout=1))
    assert isinstance(error, HubConnectionError) and "did not answer" in str(error)
    assert len(bob) == 0 and list(bob.blobs) == []


@pytest.mark.parametrize("status, error, tries", [(403, HubAuthError, 1), (404, HubNotFoundError, 1),
                                                   (500, HubError, 3), (503, HubError, 3)])
def test_download_failures_say_what_the_hub_answered(local_hub, regs, lora_ref, status, error, tries):
    alice, bob = regs
    publish(local_hub, alice, lora_ref, "eve/lora")
    local_hub.fail("GET", r"/resolve/.*/modules\.safetensors$", status=status)
    with pytest.raises(error) as caught:
        bob.pull("eve/lora", endpoint=local_hub.endpoint)
    assert f"({status})" in str(caught.value) and "unreachable" not in str(caught.value)
    gets = [p for m, p in local_hub.requests if m == "GET" and p.endswith("/modules.safetensors")]
    assert len(gets) == tries  # 4xx: one request; 5xx: a few, with back-off
    assert len(bob) == 0


def test_a_5xx_that_recovers_is_retried(local_hub, regs, lora_ref):
    alice, bob = regs
    publish(local_hub, alice, lora_ref, "eve/lora")
    local_hub.fail("GET", r"/resolve/.*/modules\.safetensors$", status=502, times=1)
    ref = bob.pull("eve/lora", endpoint=local_hub.endpoint)
    assert bob.get(ref).files == alice.get(lora_ref).files


@pytest.mark.parametrize("step", [r"/preupload/", r"/lfs-upload/", r"/commit/"])
def test_a_push_whose_upload_never_answers_fails_within_the_timeout(local_hub, regs, lora_ref, step):
    alice, _ = regs
    local_hub.fail("*", step, hang=30)
    error = within(15, lambda: alice.push(lora_ref, "alice/stuck", endpoint=local_hub.endpoint, timeout=1))
    assert isinstance(error, HubConnectionError) and "did not answer within 1 s" in str(error)
    assert "deleted again" in str(error) and ("model", "alice/stuck") not in local_hub.repos


def test_a_hub_search_that_stalls_fails_within_the_timeout(local_hub):
    local_hub.fail("GET", r"^/api/models", hang=30)
    error = within(15, lambda: search(endpoint=local_hub.endpoint, timeout=1))
    assert isinstance(error, HubConnectionError) and "did not answer within 1 s" in str(error)
