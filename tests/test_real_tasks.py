"""The real-text task suite: the committed files as the loader serves them, and the builder that makes them."""
import hashlib
import re
import shutil
import subprocess
from collections import Counter

import pytest

from pelthub.errors import ConfigError, DataError
from pelthub.tasks import build_real
from pelthub.tasks.build_real import Item, Spec, select
from pelthub.tasks.real import DATA_DIR, list_real_tasks, load_real_task, real_families, real_task_info

TASKS = list_real_tasks()


def split_by_hash(text: str) -> str:
    """The documented split rule, computed here rather than borrowed from the builder."""
    bucket = int(hashlib.sha256(f"split:{text}".encode()).hexdigest()[:8], 16) % 10
    return "train" if bucket < 6 else "dev" if bucket < 8 else "test"


def test_suite_has_families_across_sources_and_held_apart_tasks():
    families = real_families()
    assert set(families["bio_tech"]) == {"wn_bio_tech", "deb_bio_tech"}
    assert set(families["num_text"]) == {"wn_num_text", "deb_num_text", "code_num_text"}
    for members in families.values():  # siblings mean the same thing by each label
        assert len({tuple(real_task_info(name)["label_names"]) for name in members}) == 1
    assert sum(len(m) == 1 for m in families.values()) >= 3
    assert {real_task_info(n)["source"] for n in TASKS} == {"wordnet", "debian", "code"}
    assert {len(real_task_info(n)["label_names"]) for n in TASKS} >= {2, 3, 4}
    assert sum(p.stat().st_size for p in DATA_DIR.iterdir()) < 3_000_000


@pytest.mark.parametrize("name", TASKS)
def test_committed_task_is_balanced_disjoint_and_split_by_text_hash(name):
    info = real_task_info(name)
    k = len(info["label_names"])
    task = load_real_task(name)
    texts = {}
    for split in ("train", "dev", "test"):
        rows = getattr(task, split)
        assert len(rows) == k * min(info["counts"][split])  # the default takes every balanced example
        assert set(Counter(ex.label for ex in rows).values()) == {len(rows) // k}
        assert {split_by_hash(ex.text) for ex in rows} == {split}
        texts[split] = {ex.text for ex in rows}
        assert len(texts[split]) == len(rows)
    assert not texts["train"] & texts["dev"] and not texts["train"] & texts["test"] and not texts["dev"] & texts["test"]
    assert len(task.train) >= 200 and len(task.test) >= 64
    leak = re.compile(r"\b(?:" + "|".join(info["label_names"]) + ")", re.IGNORECASE)
    assert not [text for split in texts.values() for text in split if leak.search(text)]


def test_load_is_deterministic_and_seed_picks_examples_not_splits():
    a, b = load_real_task("wn_bio_tech", 32, 16, 16, seed=1), load_real_task("wn_bio_tech", 32, 16, 16, seed=1)
    assert a == b
    c = load_real_task("wn_bio_tech", 32, 16, 16, seed=2)
    assert {ex.text for ex in a.train} != {ex.text for ex in c.train}
    assert {split_by_hash(ex.text) for ex in a.test + c.test} == {"test"}
    assert Counter(ex.label for ex in a.train) == {0: 16, 1: 16}


def test_provenance_and_licences_are_recorded():
    for name in TASKS:
        info = real_task_info(name)
        prov = info["provenance"]
        assert prov["debian_version"] and info["licence"] and info["split_rule"]
        if info["source"] == "wordnet":
            assert prov["wordnet_version"] == "3.0" and "wordnet-base" in prov["apt_policy_wordnet_base"]
            assert "WordNet 3.0 Copyright 2006 by Princeton University" in info["licence"]
        elif info["source"] == "debian":
            assert "o=Debian" in prov["apt_releases"] and "DFSG" in info["licence"]
        else:
            assert prov["python"] and "numpy" in prov["packages"] and "PSF" in info["licence"]
    assert "Princeton University" in (DATA_DIR / "WORDNET_LICENSE").read_text()


def test_loader_refuses_unknown_tasks_and_oversized_requests():
    with pytest.raises(ConfigError, match="available real tasks: .*wn_bio_tech"):
        load_real_task("wn_nope")
    most = 2 * min(real_task_info("deb_bio_tech")["counts"]["test"])
    with pytest.raises(ConfigError, match=f"ask for {most} or fewer"):
        load_real_task("deb_bio_tech", n_test=most + 1)
    with pytest.raises(ConfigError, match="n_train"):
        load_real_task("deb_bio_tech", n_train=1)
    with pytest.raises(ConfigError, match="unknown real task family"):
        list_real_tasks("nope")


def test_select_dedupes_drops_leaks_and_conflicts_and_balances():
    spec = Spec("t", "f", "wordnet", (("biology", ("noun.animal",)), ("technology", ("noun.artifact",))), ("animal",))
    animal, artifact = frozenset({"noun.animal"}), frozenset({"noun.artifact"})
    items = [
        Item("a small furry creature of the woods", "n1", animal),
        Item("A small furry creature of the woods", "n2", animal),  # a duplicate up to case
        Item("a large domestic animal kept for milk", "n3", animal),  # names its category
        Item("the study of Biology in schools here", "n4", animal),  # names its label
        Item("a thing said of both creatures and tools", "n5", animal),
        Item("a thing said of both creatures and tools", "n6", artifact),  # the same text, another label
        Item("a device for cutting wood into planks", "n7", artifact),
        Item("a hand tool for driving nails into wood", "n8", artifact),
        Item("too short", "n9", artifact),
        Item("a bird with long legs that wades in water", "n10", animal | artifact),  # matches both labels
    ]
    rows = select(spec, items)
    assert sorted(label for _, label, _ in rows) == [0, 1]  # one biology text left, so one of each
    assert rows[0] == ("A small furry creature of the woods", 0, "n2")
    assert rows[1][0] in {"a device for cutting wood into planks", "a hand tool for driving nails into wood"}


def _sources_present(source: str) -> str | None:
    """Why a source cannot be read here, or None when it can."""
    if source == "wordnet" and not (build_real.WORDNET_DIR / "data.noun").is_file():
        return f"{build_real.WORDNET_DIR} is absent: install the Debian package wordnet-base to test this build"
    if source == "debian":
        if shutil.which(build_real.APT_CACHE) is None:
            return "apt-cache is absent: this build reads the Debian archive's package lists"
        if not subprocess.run([build_real.APT_CACHE, "dumpavail"], capture_output=True, text=True).stdout.strip():
            return "apt-cache lists no packages: run apt-get update to test this build"
    return None


@pytest.mark.parametrize("source", ["wordnet", "debian", "code"])
def test_two_builds_give_identical_files(source, tmp_path):
    reason = _sources_present(source)
    if reason:
        pytest.skip(reason)
    first = build_real.build(tmp_path / "a", [source])
    second = build_real.build(tmp_path / "b", [source])
    assert [p.name for p in first] == [p.name for p in second] and first
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_build_without_wordnet_names_the_package_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(build_real, "WORDNET_DIR", tmp_path / "no-wordnet")
    with pytest.raises(DataError, match=r"apt-get install wordnet-base"):
        build_real.build(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_build_without_apt_lists_says_to_update(tmp_path, monkeypatch):
    monkeypatch.setattr(build_real, "APT_CACHE", str(tmp_path / "no-apt-cache"))
    with pytest.raises(DataError, match=r"apt-get update"):
        build_real.build(tmp_path / "out", ["debian"])
    assert not (tmp_path / "out").exists()
