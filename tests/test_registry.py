"""The registry: cards, versions, search, dependencies, integrity, crash safety and concurrent writers."""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import networkx as nx
import pytest
import torch

import pelthub as ph
from pelthub.errors import (ConfigError, IncompatibleModuleError, IntegrityError, ModuleFormatError, NotFoundError,
                            RegistryError)
from pelthub.sites import Sites
from pelthub.registry import Card
from pelthub.registry.blobs import file_sha256
from pelthub.registry.card import FIELDS, OPTIONAL
from tests import tiny

@pytest.fixture
def reg(tmp_path):
    return ph.Registry(tmp_path / "reg")


def module(seed=0, kind="prompt", base=None, name="p"):
    """A small module with seed-dependent weights."""
    base = base if base is not None else tiny.bert()  # tiny.bert() seeds torch itself: seed after it
    torch.manual_seed(seed)
    config = {"prompt": ph.Prompt(length=4), "lora": ph.LoRA(r=2)}[kind]
    model = ph.attach(base, config, name=name)
    with torch.no_grad():
        for _, p in model.module_parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    return model


def corrupt(path: Path) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------- add / get / load
def test_add_get_and_card_fields(reg):
    model = ph.attach(tiny.bert(), ph.LoRA(r=2), ph.Prompt(length=3), name="x", head=True)
    ref = reg.add(model, name="sst2-prompt", task="sst2", tags=["demo", "glue"], metrics={"accuracy": 0.91},
                  description="sentiment")
    assert ref == "sst2-prompt@1" and ref in reg and len(reg) == 1
    card = reg.get(ref)
    assert card == reg.get("sst2-prompt")
    assert (card.name, card.version, card.kinds, card.task) == ("sst2-prompt", 1, ["lora", "prompt"], "sst2")
    assert card.tags == ["demo", "glue"] and card.metrics == {"accuracy": 0.91} and card.description == "sentiment"
    assert card.base_sha == Sites(model.base).fingerprint()["sha256"]
    assert card.base_model["fingerprint"]["model_type"] == "bert"
    assert card.trainable_parameters == sum(p.numel() for _, p in model.module_parameters())
    assert card.modules["x"][0]["kind"] == "lora" and card.heads == {"x": ["classifier"]}
    assert card.pelthub_version == ph.__version__ and card.created and card.parents == [] and card.source is None
    directory = reg.path(ref)
    assert sorted(os.listdir(directory)) == sorted(card.files) == ["modules.safetensors", "pelthub.json"]
    for name, f in card.files.items():
        assert file_sha256(directory / name) == f["sha256"] and (directory / name).stat().st_size == f["size"]


def test_identical_content_returns_existing_version(reg):
    model = module(0)
    assert reg.add(model, name="m", task="t") == "m@1"
    assert reg.add(model, name="m", task="t") == "m@1"
    assert reg.add(model, name="m", task="t", metrics={"acc": 0.5}) == "m@2"  # same files, another card
    assert reg.add(module(1), name="m", task="t") == "m@3"
    assert reg.add(model, name="other", task="t") == "other@1"
    assert [c.version for c in reg.versions("m")] == [1, 2, 3]
    assert reg.get("m").version == 3 and len(reg) == 4


def test_add_from_directory_equals_add_from_model(reg, tmp_path):
    model = module(0)
    model.save_pretrained(str(tmp_path / "saved"))
    a, b = reg.add(model, name="a"), reg.add(tmp_path / "saved", name="b")
    assert reg.get(a).digest == reg.get(b).digest


def test_load_gives_the_same_outputs(reg):
    model = module(3)
    ref = reg.add(model, name="m")
    inputs = tiny.batch("bert")
    loaded = reg.load(ref, tiny.bert())
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_load_onto_another_architecture_names_both(reg):
    ref = reg.add(module(0), name="m")
    with pytest.raises(IncompatibleModuleError, match=r"m@1.*bert.*gpt2"):
        reg.load(ref, tiny.gpt2())


def test_same_fingerprint_other_name_only_warns(reg):
    base = tiny.bert()
    base.config.name_or_path = "org/bert-a"
    ref = reg.add(module(0, base=base), name="m")
    other = tiny.bert()
    other.config.name_or_path = "org/bert-b"
    with pytest.warns(UserWarning, match="org/bert-a.*org/bert-b"):
        reg.load(ref, other)


def test_bad_add_arguments(reg, tmp_path):
    with pytest.raises(ConfigError, match="metrics"):
        reg.add(module(0), name="m", metrics={"acc": "high"})
    with pytest.raises(ConfigError, match="tags"):
        reg.add(module(0), name="m", tags=[1])
    with pytest.raises(ConfigError, match="ModularModel"):
        reg.add(123, name="m")
    with pytest.raises(ModuleFormatError, match="not a directory"):
        reg.add(tmp_path / "nope", name="m")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "pelthub.json").write_text(json.dumps({"modules": {}, "base_model": {}}))
    (tmp_path / "junk" / "modules.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModuleFormatError, match="safetensors"):
        reg.add(tmp_path / "junk", name="m")
    assert len(reg) == 0


def test_default_location(tmp_path, monkeypatch):
    assert ph.Registry().root == Path(os.environ["PELTHUB_HOME"])
    monkeypatch.delenv("PELTHUB_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ph.Registry().root == tmp_path / ".cache" / "pelthub"


# ----------------------------------------------------------------- names and refs
@pytest.mark.parametrize("name", ["a/b", "a\\b", "..", "a..b", "../etc", "", "x" * 101, ".hidden", "-x", "a b",
                                  "a@1", "é", None])
def test_bad_names_are_rejected(reg, name):
    with pytest.raises(RegistryError, match="name"):
        reg.add(module(0), name=name)
    assert len(reg) == 0 and not any((reg.root / "blobs").iterdir())


@pytest.mark.parametrize("ref", ["a@", "a@0", "a@-1", "a@x", "a@1@2", "@1", "a@01", "a/b@1", 5])
def test_malformed_refs_are_rejected(reg, ref):
    with pytest.raises(RegistryError, match="ref|name"):
        reg.get(ref)


def test_missing_refs_say_what_exists(reg):
    reg.add(module(0), name="sst2-prompt")
    with pytest.raises(NotFoundError, match="versions of 'sst2-prompt': 1"):
        reg.get("sst2-prompt@4")
    with pytest.raises(NotFoundError, match="did you mean sst2-prompt"):
        reg.get("sst2-promt")


# ----------------------------------------------------------------- cards
def full_card(**changes):
    fp = {"sha256": "a" * 64, "model_type": "bert", "hidden": 32, "layers": 2, "heads": 4, "vocab": 96}
    data = dict(name="m", version=2, kinds=["lora"], modules={"default": [{"kind": "lora", "r": 2}]}, heads={},
                base_model={"name": "org/bert", "revision": "abc", "fingerprint": fp}, task="sst2", tags=["x"],
                metrics={"accuracy": 0.9, "steps": 100},
                trainable_parameters=10, files={"modules.safetensors": {"sha256": "b" * 64, "size": 3}},
                created="2025-01-01T00:00:00+00:00", pelthub_version="0.1.0",
                parents=[{"ref": "a@1", "sha256": "c" * 64}], description="d", source={"repo_id": "me/m"})
    return {**data, **changes}


def test_markdown_round_trip_and_hub_front_matter():
    card = Card.from_dict(full_card())
    text = card.to_markdown()
    assert Card.from_markdown(text) == card
    front = text.split("---\n")[1]
    for line in ("library_name: pelthub", "base_model: org/bert", "- lora", "- sst2", "- accuracy",
                 "- base_model:adapter:org/bert"):
        assert line in front
    assert "# m@2" in text and "accuracy = 0.9" in text
    tricky = Card.from_dict(full_card(description="a\n---\nb: 1\nété", tags=["a: b", "---"]))
    assert Card.from_markdown(tricky.to_markdown()) == tricky
    local = Card.from_dict(full_card(base_model={**full_card()["base_model"], "name": "/home/me/model"}))
    assert "base_model:" not in local.to_markdown().split("pelthub:\n")[0]  # a local path is no Hub id


def test_every_card_field_is_validated():
    assert list(FIELDS) == [f.name for f in dataclasses.fields(Card)]
    with pytest.raises(ModuleFormatError, match="'metrics'"):
        Card(**{**full_card(), "metrics": {"acc": float("nan")}})  # direct construction validates too


@pytest.mark.parametrize("field", [f for f in FIELDS if f not in OPTIONAL])
def test_card_missing_field_is_named(field):
    data = full_card()
    del data[field]
    with pytest.raises(ModuleFormatError, match=f"field '{field}' is missing"):
        Card.from_dict(data)


@pytest.mark.parametrize("field,value", [("version", "2"), ("version", 0), ("tags", "x"), ("metrics", {"a": "b"}),
                                         ("metrics", {"a": True}), ("task", 3), ("files", {"../x": {}}),
                                         ("base_model", {"name": "b"}), ("parents", ["a@1"]), ("kinds", []),
                                         ("trainable_parameters", 1.5), ("source", "hub"), ("name", "a/b")])
def test_card_wrong_type_is_named(field, value):
    with pytest.raises(ModuleFormatError, match=f"field '{field}' must be"):
        Card.from_dict(full_card(**{field: value}))


def test_damaged_card_is_rejected_on_read(reg):
    ref = reg.add(module(0), name="m", task="t")
    db = sqlite3.connect(reg.root / "index.sqlite")
    data = json.loads(db.execute("SELECT card FROM cards").fetchone()[0])
    data["trainable_parameters"] = "many"
    db.execute("UPDATE cards SET card = ?", (json.dumps(data),))
    db.commit()
    with pytest.raises(ModuleFormatError, match="m@1.*'trainable_parameters'"):
        reg.get(ref)
    del data["task"]
    db.execute("UPDATE cards SET card = ?", (json.dumps(data),))
    db.commit()
    with pytest.raises(ModuleFormatError, match="'task' is missing"):
        reg.load(ref, tiny.bert())
    assert "'task' is missing" in reg.verify().bad_cards[0]
    db.close()


def test_markdown_without_card_is_rejected():
    with pytest.raises(ModuleFormatError, match="front matter"):
        Card.from_markdown("# just a readme\n")
    with pytest.raises(ModuleFormatError, match="'pelthub'"):
        Card.from_markdown("---\nlibrary_name: peft\n---\n")
    text = Card.from_dict(full_card()).to_markdown().replace("  task: sst2\n", "")
    with pytest.raises(ModuleFormatError, match="'task' is missing"):
        Card.from_markdown(text)


# ----------------------------------------------------------------- search
def test_search_filters_and_puts_compatible_first(reg):
    bert = tiny.bert()
    bert.config.name_or_path = "org/bert"
    roberta = tiny.roberta()
    roberta.config.name_or_path = "org/bert"  # same name, another architecture
    reg.add(module(0, base=bert), name="p-sst2", task="sst2", tags=["sentiment", "glue"], description="Movie reviews")
    reg.add(module(1, "lora", base=bert), name="l-mnli", task="mnli", tags=["glue"])
    reg.add(module(2, base=roberta), name="a-rob", task="sst2", tags=["sentiment"])
    reg.add(module(3, base=tiny.gpt2()), name="g-sst2", task="sst2")

    refs = lambda **kw: [c.ref for c in reg.search(**kw)]  # noqa: E731
    assert refs(base_model=bert) == ["l-mnli@1", "p-sst2@1", "a-rob@1"]  # compatible first, then same name
    assert refs(base_model=bert, compatible_only=True) == ["l-mnli@1", "p-sst2@1"]
    assert refs(base_model=reg.get("p-sst2").base_sha) == ["l-mnli@1", "p-sst2@1"]
    assert refs(base_model="org/bert") == ["a-rob@1", "l-mnli@1", "p-sst2@1"]
    assert refs(base_model=tiny.gpt2()) == ["g-sst2@1"]
    assert refs(kind="prompt", base_model=bert) == ["p-sst2@1", "a-rob@1"]
    assert refs(task="sst2") == ["a-rob@1", "g-sst2@1", "p-sst2@1"]
    assert refs(tags=["sentiment", "glue"]) == ["p-sst2@1"] and refs(tags="glue") == ["l-mnli@1", "p-sst2@1"]
    assert refs(text="MOVIE") == ["p-sst2@1"] and refs(text="mnli") == ["l-mnli@1"]
    assert refs(kind="lora", task="sst2") == [] and len(refs()) == 4 and len(refs(limit=2)) == 2
    with pytest.raises(ConfigError, match="base_model"):
        reg.search(base_model=3)


# ----------------------------------------------------------------- dependencies
def test_parents_are_pinned_and_protect_removal(reg, tmp_path):
    a = reg.add(module(0), name="a")
    b = reg.add(module(1), name="b")
    c = reg.add(module(2), name="c", parents=["a", {"ref": b}])
    assert reg.get(c).parents == [{"ref": "a@1", "sha256": reg.get(a).digest},
                                  {"ref": "b@1", "sha256": reg.get(b).digest}]
    module(3).save_pretrained(str(tmp_path / "d"), parents=[{"ref": c, "sha256": None}, {"ref": "hub/x"}])
    d = reg.add(tmp_path / "d", name="d")
    assert [p["ref"] for p in reg.get(d).parents] == ["c@1", "hub/x"]

    g = reg.graph()
    assert set(g.edges) == {("a@1", "c@1"), ("b@1", "c@1"), ("c@1", "d@1"), ("hub/x", "d@1")}
    assert nx.ancestors(g, "d@1") == {"a@1", "b@1", "c@1", "hub/x"} and g.nodes["hub/x"]["missing"]
    assert g.nodes["c@1"]["card"].ref == "c@1"

    with pytest.raises(RegistryError, match="c@1 was built from it"):
        reg.remove("a@1")
    with pytest.raises(RegistryError, match="wrong|sha256"):
        reg.add(module(4), name="e", parents=[{"ref": "a@1", "sha256": "0" * 64}])
    assert reg.remove("a@1", force=True) == ["a@1"]
    assert reg.graph().nodes["a@1"]["missing"]
    assert reg.remove("d") == ["d@1"] and reg.remove("c") == ["c@1"]  # leaves first, then free to go


def test_remove_by_name_and_versions_are_never_reused(reg):
    for seed in range(3):
        reg.add(module(seed), name="m")
    assert reg.remove("m@2") == ["m@2"]
    assert [c.version for c in reg.versions("m")] == [1, 3]
    assert reg.remove("m") == ["m@1", "m@3"]
    with pytest.raises(NotFoundError):
        reg.versions("m")
    assert reg.add(module(9), name="m") == "m@4"


# ----------------------------------------------------------------- integrity
def test_altered_blob_is_detected_on_read_and_repaired_by_re_adding(reg):
    model = module(0)
    ref = reg.add(model, name="m")
    reg.load(ref, tiny.bert())  # a checkout exists from now on; the blob is still checked on each read
    blob = reg.blobs.path(reg.get(ref).files["modules.safetensors"]["sha256"])
    corrupt(blob)
    with pytest.raises(IntegrityError, match=str(blob)):
        reg.load(ref, tiny.bert())
    report = reg.verify()
    assert report.corrupt == [str(blob)] and not report.ok
    reg.add(model, name="m")  # same content again rewrites the damaged blob
    assert reg.verify().ok and reg.load(ref, tiny.bert())


def test_missing_blob_and_damaged_checkout(reg):
    ref = reg.add(module(0), name="m")
    checkout = reg.path(ref)
    corrupt(checkout / "pelthub.json")
    assert file_sha256(reg.path(ref) / "pelthub.json") == reg.get(ref).files["pelthub.json"]["sha256"]  # rebuilt
    blob = reg.blobs.path(reg.get(ref).files["pelthub.json"]["sha256"])
    blob.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        reg.path(ref)
    assert reg.verify().missing == [f"m@1: pelthub.json ({blob})"]


def test_gc_drops_only_unreferenced(reg):
    keep = reg.add(module(0), name="keep")
    gone = reg.add(module(1, "lora"), name="gone")  # another kind: no file in common with keep
    reg.path(gone)
    reg.remove(gone)
    assert reg.verify().unreferenced == 2
    report = reg.gc()
    assert (report.blobs_removed, report.checkouts_removed) == (2, 1) and report.bytes_freed > 0
    assert reg.verify().ok and reg.verify().unreferenced == 0 and reg.load(keep, tiny.bert())


# ----------------------------------------------------------------- crashes and concurrent writers
# Writers are separate processes from a forkserver that imported pelthub once: each child is a fresh
# single-threaded fork (safe with torch, unlike fork() from this process), without paying the import again.
def processes():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pelthub", "tests.tiny", __name__])
    return ctx


def add_until_killed(path, offset, ready):
    """Keep adding an 8 MB module, new content each time."""
    reg = ph.Registry(path)
    model = ph.attach(tiny.bert(), ph.Prompt(length=60000))
    weights = model.adapters["default"]["prompt"].embeddings
    ready.set()
    for i in range(10**6):
        with torch.no_grad():
            weights.fill_(offset + i / 1000)
        reg.add(model, name="big", task=f"t{i % 3}")


def add_directories(path, dirs, barrier):
    reg = ph.Registry(path)
    barrier.wait(timeout=120)
    for d in dirs:
        reg.add(d, name=f"n{int(d.name) % 10}", tags=[f"w{d.name}"])


def die_inside_the_transaction(path, ref):
    reg = ph.Registry(path)
    card = reg.get(ref)
    with reg.index.write() as index:
        index.insert(dataclasses.replace(card, version=index.allocate_version(card.name)))
        os.kill(os.getpid(), signal.SIGKILL)


def test_sigkill_inside_the_transaction_leaves_nothing(reg):
    ref = reg.add(module(0), name="m")
    proc = processes().Process(target=die_inside_the_transaction, args=(reg.root, ref))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == -signal.SIGKILL
    assert [c.ref for c in reg.search()] == ["m@1"] and reg.verify().ok
    assert reg.add(module(1), name="m") == "m@2"  # the dead writer's lock and version number are gone


def test_sigkill_mid_add_leaves_registry_consistent(tmp_path):
    path, rng, ctx = tmp_path / "reg", random.Random(0), processes()
    events = [ctx.Event() for _ in range(4)]
    procs = [ctx.Process(target=add_until_killed, args=(path, i, e)) for i, e in enumerate(events)]
    for proc in procs:
        proc.start()
    assert all(e.wait(timeout=120) for e in events)
    for proc in procs:  # all writing at once, killed one by one
        time.sleep(rng.uniform(0.2, 1.0))
        proc.kill()
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
    reg = ph.Registry(path)
    report = reg.verify()
    assert report.ok, report
    cards = reg.search()
    assert len(cards) >= 1
    for card in cards:  # every entry that exists is complete
        directory = reg.path(card.ref)
        assert all(file_sha256(directory / n) == f["sha256"] for n, f in card.files.items())
    assert reg.gc().temps_removed >= 1 and not any((reg.root / "tmp").iterdir())  # the killed adds' files
    assert reg.verify().ok and reg.add(module(0), name="after") == "after@1"


def test_four_processes_adding_fifty_each(tmp_path):
    sources = tmp_path / "src"
    model = module(0)
    for i in range(200):
        with torch.no_grad():
            model.adapters["p"]["prompt"].embeddings.fill_(float(i))
        model.save_pretrained(str(sources / str(i)))
    path, ctx = tmp_path / "reg", processes()
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=add_directories, args=(path, [sources / str(i) for i in range(w, 200, 4)], barrier))
             for w in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    reg = ph.Registry(path)
    cards = reg.search()
    assert len(cards) == 200 and len({c.digest for c in cards}) == 200
    for n in range(10):
        assert [c.version for c in reg.versions(f"n{n}")] == list(range(1, 21))
    for card in cards:  # each entry holds the files of the directory it was added from
        i = int(card.tags[0][1:])
        assert card.name == f"n{i % 10}"
        assert card.files["modules.safetensors"]["sha256"] == file_sha256(sources / str(i) / "modules.safetensors")
    assert reg.verify().ok and reg.verify().blobs_checked == 201  # 200 weights files + 1 shared pelthub.json


def test_card_counts_trainable_parameters_as_the_module_file_does(tmp_path):
    """ATTEMPT saves its frozen source prompts; the card counts only what trains, like pelthub.json."""
    sources = {f"s{i}": torch.randn(4, 32) for i in range(3)}
    model = ph.compose(tiny.bert(), ph.AttentionMix(sources, target=ph.Prompt(length=4), bottleneck=5))
    trainable = 2 * 32 * 5 + 2 * 32 + 4 * 32  # router down/up, LayerNorm, one target prompt
    registry = ph.Registry(tmp_path / "reg")
    card = registry.get(registry.add(model, name="attempt"))
    saved = json.loads((registry.path(card.ref) / "pelthub.json").read_text())
    assert card.trainable_parameters == saved["trainable_parameters"] == trainable
    model.save_pretrained(tmp_path / "bad")
    data = json.loads((tmp_path / "bad" / "pelthub.json").read_text())
    data["trainable_parameters"] = 10**9
    (tmp_path / "bad" / "pelthub.json").write_text(json.dumps(data))
    with pytest.raises(ModuleFormatError, match="trainable_parameters"):
        registry.add(tmp_path / "bad", name="bad")
