"""Concurrent readers never see a checkout vanish; a parent cannot be removed inside an add naming it; kill -9."""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import pelthub as ph
from pelthub.errors import RegistryError
from pelthub.registry import blobs as blobs_module
from pelthub.registry.blobs import BlobStore
from tests.security.conftest import publish, trained


def _store(root: Path, n: int) -> tuple[BlobStore, list[dict[str, str]]]:
    store = BlobStore(root)
    sets = []
    for i in range(n):
        files = {}
        for name in ("pelthub.json", "modules.safetensors"):
            src = root / f"src-{i}-{name}"
            src.write_bytes(f"{name} {i} ".encode() * 200)
            files[name] = store.put(src)[0]
        sets.append(files)
    return store, sets


def test_a_checkout_in_use_is_never_replaced(tmp_path, monkeypatch):
    store, (files,) = _store(tmp_path, 1)
    target = store.checkout("k", files, "m@1")
    inode = target.stat().st_ino
    real = blobs_module._matches
    calls = []

    def stale_first(directory, wanted):  # this process looked before another one finished its checkout
        calls.append(directory)
        return False if len(calls) == 1 else real(directory, wanted)

    monkeypatch.setattr(blobs_module, "_matches", stale_first)
    assert store.checkout("k", files, "m@1") == target
    assert target.stat().st_ino == inode  # the directory readers hold was kept, not removed and rebuilt
    assert sorted(os.listdir(target)) == sorted(files)


def test_a_damaged_checkout_is_rebuilt(tmp_path):
    store, (files,) = _store(tmp_path, 1)
    target = store.checkout("k", files, "m@1")
    os.chmod(target / "pelthub.json", 0o644)
    (target / "pelthub.json").write_bytes(b"damaged")
    store.checkout("k", files, "m@1")
    assert blobs_module.file_sha256(target / "pelthub.json") == files["pelthub.json"]


def _reader(root: str, sets: list, start, failures) -> None:
    store = BlobStore(Path(root))
    start.wait()
    for i, files in enumerate(sets):
        try:
            path = store.checkout(f"k{i}", files, f"m{i}")
            for name in files:
                (path / name).read_bytes()
        except (OSError, ph.PeltError) as e:
            failures.put(f"{type(e).__name__}: {e}")


def test_concurrent_readers_of_fresh_checkouts_all_succeed(tmp_path):
    store, sets = _store(tmp_path, 150)
    ctx = multiprocessing.get_context("fork")
    failures, start = ctx.Queue(), ctx.Barrier(4)
    procs = [ctx.Process(target=_reader, args=(str(tmp_path), sets, start, failures)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert errors == [] and all(p.exitcode == 0 for p in procs)


def test_a_parent_removed_while_an_add_names_it_fails_the_add(tmp_path, monkeypatch):
    reg = ph.Registry(tmp_path / "reg")
    parent = reg.add(trained(ph.LoRA(r=2), seed=1), name="parent")
    other = ph.Registry(tmp_path / "reg")  # another process, same registry
    real_put = reg.blobs.put
    removed = []

    def put_then_remove(*args, **kwargs):  # the other process removes the parent inside the add's window
        if not removed:
            removed.extend(other.remove(parent))
        return real_put(*args, **kwargs)

    monkeypatch.setattr(reg.blobs, "put", put_then_remove)
    with pytest.raises(RegistryError, match=f"parent {parent} was removed"):
        reg.add(trained(ph.LoRA(r=2), seed=2), name="child", parents=[parent])
    assert removed == [parent] and "child" not in {c.name for c in reg.search()}


PULL = textwrap.dedent("""
    import sys
    import pelthub as ph
    from huggingface_hub import constants
    constants.HF_HUB_DISABLE_XET = True
    ph.Registry(sys.argv[1]).pull("eve/lora", endpoint=sys.argv[2])
""")


@pytest.mark.slow
def test_kill_9_during_pull_leaves_nothing_half_added(local_hub, regs, lora_ref, tmp_path):
    alice, bob = regs
    publish(local_hub, alice, lora_ref, "eve/lora")
    local_hub.fail("GET", r"/resolve/.*/modules\.safetensors$", delay=30)
    proc = subprocess.Popen([sys.executable, "-c", PULL, str(bob.root), local_hub.endpoint],
                            cwd=Path(__file__).parents[2], env={**os.environ, "PELTHUB_HUB_TIMEOUT": "60", "HF_HUB_OFFLINE": "0"})
    try:
        deadline = time.monotonic() + 120
        while not any(p.endswith("modules.safetensors") for _, p in local_hub.requests):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    reopened = ph.Registry(bob.root)
    assert len(reopened) == 0 and reopened.verify().ok and list(reopened.blobs) == []
    assert reopened.gc().temps_removed >= 1 and not any(reopened.blobs.tmp.iterdir())
