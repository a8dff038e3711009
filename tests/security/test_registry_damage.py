"""A copied, restored, damaged or cluttered registry folder: never a raw exception, never a blob deleted
that the index cannot account for.

Before: a folder copied without `index.sqlite-wal` listed no modules, `verify` said "all intact" and `gc`
deleted every blob; a corrupt `index.sqlite` or `signatures.sqlite` raised sqlite3 errors, a stray file in
`checkouts/` NotADirectoryError, LoRA factors that disagree a torch RuntimeError.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pelthub as ph
from pelthub import cli
from pelthub.errors import ModuleFormatError, PeltError, RegistryError
from pelthub.registry import GcReport, signatures
from tests.security.conftest import files_under, trained

SHA = "ab" * 32


def pelt_only(fn, *args, **kwargs):
    """fn's result, or the PeltError it raised (one line); any other exception fails the test."""
    try:
        return fn(*args, **kwargs)
    except PeltError as e:
        assert "\n" not in str(e), e
        return e


def snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in files_under(root) if not p.name.startswith("index.sqlite")}


def run_sql(path: Path, sql: str, fresh: bool = False) -> None:
    """Run `sql` on the SQLite file at `path` (on a new, empty one instead with `fresh`)."""
    if fresh:
        path.unlink()
    with closing(sqlite3.connect(path)) as db, db:
        db.execute(sql)


def copy_without_wal(src: Path, dst: Path) -> Path:
    """What a backup tool excluding *-wal (and *-shm) makes of the folder, while its owner is still open."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*-wal", "*-shm"), symlinks=True)
    return dst


@pytest.fixture
def reg(tmp_path):
    """Three modules added, one of them removed again (its two blobs are garbage gc may reclaim)."""
    reg = ph.Registry(tmp_path / "reg")
    reg.add(trained(ph.LoRA(r=2), seed=0), name="keep", task="a")
    reg.add(trained(ph.Prompt(length=3), seed=1), name="also", task="b")
    gone = reg.add(trained(ph.LoRA(r=3), seed=2), name="gone", task="c")
    reg.path(gone)
    reg.remove(gone)
    return reg


def weights_of(reg: ph.Registry, ref: str) -> Path:
    return reg.blobs.path(reg.get(ref).files["modules.safetensors"]["sha256"])


# ----------------------------------------------------------------- copies and lost commits
def test_a_copy_without_the_wal_holds_every_card_and_gc_frees_the_same(reg, tmp_path):
    assert (reg.root / "index.sqlite-wal").exists()  # the owner is open: a WAL exists to be left behind
    copy = ph.Registry(copy_without_wal(reg.root, tmp_path / "copy"))
    assert [c.ref for c in copy.search()] == [c.ref for c in reg.search()] == ["also@1", "keep@1"]
    assert copy.verify().ok and copy.verify().unreferenced == reg.verify().unreferenced == 2
    assert copy.gc().blobs_removed == reg.gc().blobs_removed == 2
    assert sorted(copy.blobs) == sorted(reg.blobs) and copy.load("keep", trained(ph.LoRA(r=2)).base)


def test_an_index_that_lost_every_commit_keeps_every_blob(reg, tmp_path):
    """The old failure, reproduced: the copy's index is a fresh empty one beside the blobs."""
    root = copy_without_wal(reg.root, tmp_path / "copy")
    (root / "index.sqlite").unlink()
    before = snapshot(root)
    copy = ph.Registry(root)
    assert len(copy) == 0
    report = copy.verify()
    assert not report.ok and len(report.unaccounted) == report.blobs_checked == 6
    error = pelt_only(copy.gc)
    assert isinstance(error, RegistryError) and "gc deleted nothing: 6 of the 6 blobs" in str(error)
    assert "--unaccounted" in str(error) and snapshot(root) == before
    assert copy.gc(unaccounted=True).blobs_removed == 6 and list(copy.blobs) == []


def test_an_older_backup_of_the_index_keeps_the_newer_modules_blobs(reg, tmp_path):
    backup = tmp_path / "backup.sqlite"
    shutil.copy(reg.root / "index.sqlite", backup)  # no -wal needed: every commit is in the file
    newer = reg.add(trained(ph.LoRA(r=4), seed=3), name="newer")
    blob = weights_of(reg, newer)
    root = copy_without_wal(reg.root, tmp_path / "copy")
    shutil.copy(backup, root / "index.sqlite")
    restored = ph.Registry(root)
    assert newer not in restored and str(root / blob.relative_to(reg.root)) in restored.verify().unaccounted
    before = snapshot(root)
    assert isinstance(pelt_only(restored.gc), RegistryError) and snapshot(root) == before


def test_cli_verify_and_gc_report_an_index_that_lost_commits(reg, tmp_path, capsys):
    root = copy_without_wal(reg.root, tmp_path / "copy")
    (root / "index.sqlite").unlink()
    before = snapshot(root)
    assert cli.main(["verify", "--registry", str(root)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEMS FOUND" in out and out.count("unaccounted blob:") == 6 and "restore index.sqlite" in out
    assert cli.main(["gc", "--registry", str(root)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pelthub gc: error: gc deleted nothing" in err and snapshot(root) == before
    assert cli.main(["gc", "--registry", str(root), "--unaccounted", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["blobs_removed"] == 6


def test_an_add_that_fails_after_writing_its_blobs_leaves_them_to_gc(reg, monkeypatch):
    """The blobs are claimed before they appear, so the index accounts for them though no card came."""
    blobs = set(reg.blobs)

    def fail(card):
        raise RegistryError("the card could not be written")

    monkeypatch.setattr(reg.index, "insert", fail)
    assert isinstance(pelt_only(reg.add, trained(ph.LoRA(r=4), seed=4), name="failed"), RegistryError)
    assert len(set(reg.blobs) - blobs) == 2 and reg.verify().ok
    assert reg.gc().blobs_removed == 4 and set(reg.blobs) < blobs  # the failed add's two and the removed module's


def test_gc_running_beside_adds_never_finds_a_blob_it_cannot_account_for(reg, tmp_path):
    """Claims commit before blobs appear, so gc (under the write lock) always knows an add's blobs."""
    sources = []
    for i in range(24):
        sources.append(tmp_path / f"src{i}")
        trained(ph.LoRA(r=2), seed=100 + i).save_pretrained(str(sources[-1]))
    done, errors, runs = threading.Event(), [], [0]

    def add(paths):
        writer = ph.Registry(reg.root)  # its own connection, as another process has
        for path in paths:
            writer.add(path, name=path.name)

    def collect():
        collector = ph.Registry(reg.root)
        while not done.is_set():
            try:
                collector.gc()
                runs[0] += 1
            except Exception as e:  # noqa: BLE001 - recorded, asserted below
                errors.append(e)
                return

    adders = [threading.Thread(target=add, args=(sources[w::2],)) for w in range(2)]
    gc = threading.Thread(target=collect)
    for thread in (*adders, gc):
        thread.start()
    for thread in adders:
        thread.join()
    done.set()
    gc.join()
    assert errors == [] and runs[0] > 0 and reg.verify().ok
    assert all(reg.path(f"src{i}").is_dir() for i in range(24))


def test_an_index_from_before_the_ledger_accounts_for_its_cards_blobs(reg):
    """Schema 1 (no `stored` table): after the upgrade, removed modules' blobs still go, others stay."""
    run_sql(reg.root / "index.sqlite", "DROP TABLE stored")
    run_sql(reg.root / "index.sqlite", "PRAGMA user_version = 1")
    old = ph.Registry(reg.root)
    in_cards = {f["sha256"] for card in old.search() for f in card.files.values()}
    gone = [str(old.blobs.path(sha)) for sha in sorted(old.blobs) if sha not in in_cards]
    assert old.verify().unaccounted == gone and len(gone) == 2
    old.remove("also")
    assert isinstance(pelt_only(old.gc), RegistryError)  # the removed "gone" was never recorded
    assert old.gc(unaccounted=True).blobs_removed == 4 and old.verify().ok
    assert old.index.conn.execute("PRAGMA user_version").fetchone()[0] == 2


# ----------------------------------------------------------------- damaged databases
@pytest.mark.parametrize("damage", ["garbage", "truncated", "damaged pages", "directory", "foreign", "wrong schema"])
def test_a_damaged_index_is_a_registry_error_naming_it(reg, damage):
    index = reg.root / "index.sqlite"
    reg.index.conn.close()
    (reg.root / "index.sqlite-wal").unlink(missing_ok=True)
    if damage == "garbage":
        index.write_bytes(os.urandom(8192))
    elif damage == "truncated":
        index.write_bytes(index.read_bytes()[:4096 * 3 + 100])
    elif damage == "damaged pages":  # the schema (page 1) reads, the tables behind it do not
        index.write_bytes(index.read_bytes()[:4096] + os.urandom(len(index.read_bytes()) - 4096))
    elif damage == "directory":
        index.unlink()
        index.mkdir()
    else:
        run_sql(index, "CREATE TABLE notes (text TEXT)" if damage == "foreign" else "DROP TABLE kinds",
                fresh=damage == "foreign")
    before = snapshot(reg.root)
    errors = [pelt_only(fn) for fn in (lambda: ph.Registry(reg.root), lambda: ph.Registry(reg.root).search(),
                                       lambda: ph.Registry(reg.root).verify(), lambda: ph.Registry(reg.root).gc())]
    assert all(isinstance(e, RegistryError) and str(index) in str(e) for e in errors), errors
    assert snapshot(reg.root) == before


@pytest.mark.parametrize("damage", ["garbage", "wrong schema", "bad row", "wrong width"])
def test_a_damaged_signatures_file_is_a_registry_error_saying_delete_it(reg, damage):
    path = reg.root / signatures.FILE
    if damage == "garbage":
        path.write_bytes(os.urandom(8192))
    else:
        run_sql(path, "CREATE TABLE signatures (weights TEXT, vec BLOB)" if damage == "wrong schema"
                else f"UPDATE signatures SET vec = x'{'010203' if damage == 'bad row' else '00' * 8}'",
                fresh=damage == "wrong schema")
    if damage in ("garbage", "wrong schema"):
        error = pelt_only(reg.add, trained(ph.LoRA(r=2), seed=5), name="new")
    else:
        error = pelt_only(signatures.stored, reg, "keep")
    assert isinstance(error, RegistryError) and str(path) in str(error) and "delete it" in str(error)
    assert "new" not in reg
    path.unlink()
    assert reg.add(trained(ph.LoRA(r=2), seed=5), name="new") == "new@1"
    assert signatures.stored(reg, "keep").keys() == signatures.compute(reg.path("keep")).keys()


def test_stored_signatures_of_two_widths_at_one_site_are_a_registry_error():
    error = pelt_only(signatures.table, [{"s": torch.ones(3)}, {"s": torch.ones(4)}, {"t": torch.ones(2)}])
    assert isinstance(error, RegistryError) and "s differ in width ([3, 4])" in str(error)


# ----------------------------------------------------------------- strays
def test_strays_in_checkouts_blobs_and_tmp_are_left_alone(reg, tmp_path):
    outside = tmp_path / "outside"
    (outside / SHA[:2]).mkdir(parents=True)
    (outside / SHA[:2] / SHA).write_bytes(b"not a blob of ours")
    (outside / "precious").write_bytes(b"keep me")
    strays = {
        reg.root / "checkouts" / "notes.txt": b"file",
        reg.root / "checkouts" / SHA: b"a file named like a checkout",
        reg.root / "blobs" / "README": b"file",
    }
    for path, data in strays.items():
        path.write_bytes(data)
    links = {reg.root / "checkouts" / "link": outside, reg.root / "checkouts" / ("cd" * 32): outside,
             reg.root / "blobs" / SHA[:2]: outside / SHA[:2], reg.root / "tmp" / "1-link": outside,
             reg.blobs.path("ef" * 32): outside / "precious"}
    reg.blobs.path("ef" * 32).parent.mkdir(exist_ok=True)
    for link, target in links.items():
        link.symlink_to(target)
    (reg.root / "tmp" / f"{10**20}-x").write_bytes(b"no such pid")
    outside_before = snapshot(outside)

    report = pelt_only(reg.verify)
    assert report.ok and {str(p) for p in [*strays, *links] if p.parent.name != "tmp"} == set(report.stray)
    gc = pelt_only(reg.gc)
    assert isinstance(gc, GcReport) and gc.blobs_removed == 2  # the removed module's, nothing else
    assert all(p.read_bytes() == data for p, data in strays.items()) and all(p.is_symlink() for p in links)
    assert snapshot(outside) == outside_before and (reg.root / "tmp" / f"{10**20}-x").exists()
    assert pelt_only(reg.load, "keep", trained(ph.LoRA(r=2)).base)


def test_a_file_where_a_registry_folder_belongs_is_a_registry_error(tmp_path):
    (tmp_path / "reg").mkdir()
    (tmp_path / "reg" / "checkouts").write_bytes(b"not a folder")
    error = pelt_only(ph.Registry, tmp_path / "reg")
    assert isinstance(error, RegistryError) and str(tmp_path / "reg" / "checkouts") in str(error)
    assert (tmp_path / "reg" / "checkouts").read_bytes() == b"not a folder"


def test_a_stray_file_at_a_checkout_path_is_replaced_by_the_checkout(reg):
    card = reg.get("keep")
    (reg.root / "checkouts" / card.digest).write_bytes(b"stray")
    assert pelt_only(reg.path, "keep").is_dir() and pelt_only(reg.load, "keep", trained(ph.LoRA(r=2)).base)


# ----------------------------------------------------------------- LoRA factors at signature time
@pytest.mark.parametrize("damage", ["r disagrees", "no B", "vector"])
def test_lora_factors_that_disagree_are_a_module_format_error_and_add_nothing(reg, tmp_path, damage):
    folder = tmp_path / "lora"
    trained(ph.LoRA(r=2), seed=9).save_pretrained(str(folder))
    weights = folder / "modules.safetensors"
    tensors = load_file(weights)
    key = next(k for k in sorted(tensors) if k.endswith(".lora_b"))
    if damage == "r disagrees":
        tensors[key] = torch.randn(tensors[key].shape[0], 3)
    elif damage == "no B":
        tensors[key[:-1] + "c"] = tensors.pop(key)  # same parameter count, no B
    else:
        tensors[key[:-1] + "a"] = torch.randn(tensors[key[:-1] + "a"].numel())
    save_file(tensors, weights)
    blobs, cards = sorted(reg.blobs), len(reg)
    assert isinstance(pelt_only(signatures.compute, folder), ModuleFormatError)
    error = pelt_only(reg.add, folder, name="bad")
    assert isinstance(error, ModuleFormatError) and str(weights) in str(error) and key[:-7] in str(error)
    assert sorted(reg.blobs) == blobs and len(reg) == cards and not any(reg.blobs.tmp.iterdir())
