"""🤗 datasets as input everywhere pelthub takes examples, and the bounds on what `pelthub rank --target` reads.

The reference for every datasets call is the same call on the equivalent list of `Example`
(written out here, or read from a JSONL file by the older loader), on the same weights.
"""
from __future__ import annotations

import argparse
import json
import os
import random

import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from transformers import AutoModelForSequenceClassification, BertTokenizer

import pelthub as ph
from pelthub import cli
from pelthub.errors import DataError
from pelthub.tasks import MAX_LABELS, Example, Task, as_examples, as_task, load_examples, load_jsonl
from pelthub.tasks.hf import MAX_DATA_BYTES
from pelthub.training import accuracy, fit, mean_loss, probabilities
from pelthub.transfer import adjusted_leep, evaluate, leep
from tests import tiny

GOOD = ["good", "great", "fine", "nice", "happy", "bright", "warm", "kind", "calm", "clean"]
BAD = ["bad", "awful", "poor", "sad", "dark", "cold", "cruel", "loud", "dirty", "weak"]
NAMES = ["negative", "positive"]


def sentences(n: int, seed: int = 0) -> list[Example]:
    """Label 1 when most of five words are GOOD ones: learnable by the tiny model, nothing else needed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.choices(GOOD + BAD, k=5)
        out.append(Example(" ".join(words), int(sum(w in GOOD for w in words) > 2)))
    return out


EXAMPLES = sentences(24)


@pytest.fixture(scope="module")
def tokenizer() -> BertTokenizer:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *GOOD, *BAD]
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def as_dataset(examples: list[Example], text: str = "sentence", label: str = "label") -> Dataset:
    """A Dataset with a ClassLabel column, as `datasets.load_dataset` gives for GLUE-style tasks."""
    features = Features({text: Value("string"), label: ClassLabel(names=NAMES)})
    return Dataset.from_dict({text: [e.text for e in examples], label: [e.label for e in examples]},
                             features=features)


# ----- conversion -----
@pytest.mark.parametrize("text,pair,label", [("text", None, "label"), ("sentence", None, "label"),
                                             ("content", None, "labels"), ("sentence1", "sentence2", "label"),
                                             ("premise", "hypothesis", "label"), ("question1", "question2", "class")])
def test_columns_are_found_by_their_usual_names(text, pair, label):
    rows = {text: ["a b", "c d", "e f"], label: [1, 0, 1], "idx": [7, 8, 9]}
    if pair:
        rows[pair] = ["x", "", "z"]                                  # an empty second sentence is no pair
    expected = [Example("a b", 1, "x" if pair else None), Example("c d", 0), Example("e f", 1, "z" if pair else None)]
    assert as_examples(Dataset.from_dict(rows)) == expected


def test_class_labels_give_names_and_string_labels_are_numbered_as_the_jsonl_loader_does(tmp_path):
    got = as_examples(as_dataset(EXAMPLES))
    assert got == EXAMPLES and got.label_names == tuple(NAMES)
    words = ["sports", "science", "sports", "arts", "science"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": w}) + "\n"
                                              for i, w in enumerate(words)))
    named = as_examples(Dataset.from_dict({"text": [f"t{i}" for i in range(5)], "category": words}))
    assert named == load_jsonl(tmp_path / "d.jsonl") and named.label_names == ("sports", "science", "arts")
    fixed = as_examples(Dataset.from_dict({"text": ["a", "b"], "label": ["arts", "sports"]}),
                        label_names=["sports", "science", "arts"])
    assert [e.label for e in fixed] == [2, 0]


def test_dataset_dict_split_saved_to_disk_and_explicit_columns(tmp_path):
    dd = DatasetDict(train=as_dataset(EXAMPLES[:16], "review", "labels"),
                     validation=as_dataset(EXAMPLES[16:], "review", "labels"))
    assert as_examples(dd, split="validation") == EXAMPLES[16:]
    dd.save_to_disk(str(tmp_path / "saved"))
    assert load_examples(tmp_path / "saved", split="train") == EXAMPLES[:16]
    both = Dataset.from_dict({"q": ["a", "b"], "s": ["x", "y"], "label": [0, 1], "note": ["n", "m"]})
    assert as_examples(both, columns={"text": "q", "text_pair": "s"}) == [Example("a", 0, "x"), Example("b", 1, "y")]
    task = as_task(dd, "reviews")
    assert task.train == tuple(EXAMPLES[:16]) and task.dev == tuple(EXAMPLES[16:]) and task.test == ()
    assert task.label_names == tuple(NAMES) and task.family == "reviews"


@pytest.mark.parametrize("data,kw,message", [
    ({"question": ["a"], "sentence": ["b"], "label": [0]}, {}, "['sentence', 'question'] all fit"),
    ({"question": ["a"], "sentence": ["b"], "label": [0]}, {"columns": {"text": "question"}},
     "'sentence' looks like text too"),
    ({"body": ["a"], "y": [0]}, {}, "no text column found among ['body', 'y']"),
    ({"text": ["a"], "y": [0]}, {}, "no label column found among ['text', 'y']"),
    ({"text": ["a"], "label": [0]}, {"columns": {"text": "body"}}, "the dataset has ['text', 'label']"),
    ({"text": ["a"], "label": [0]}, {"columns": {"txt": "text"}}, "keys must be among"),
    ({"text": ["a"], "label": [0.5]}, {}, "no label column found among ['text', 'label']"),
    ({"text": ["a"], "label": [0.5]}, {"columns": {"label": "label"}}, "labels must be integer ids"),
    ({"text": ["a"], "label": [MAX_LABELS]}, {}, "maximum of 100,000 classes"),
    ({"text": ["a", " "], "label": [0, 1]}, {}, "row 1: empty text"),
    ({"text": ["a"], "label": [0]}, {"split": "train"}, "applies to a DatasetDict only"),
])
def test_bad_columns_and_rows_raise_data_errors_naming_what_was_found(data, kw, message):
    with pytest.raises(DataError) as e:
        as_examples(Dataset.from_dict(data), **kw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unlabelled_class_label_rows_and_missing_splits_are_refused():
    test = Dataset.from_dict({"text": ["a"], "label": [-1]}, features=Features(
        {"text": Value("string"), "label": ClassLabel(names=NAMES)}))  # GLUE test splits look like this
    with pytest.raises(DataError, match="negative label -1"):
        as_examples(test)
    with pytest.raises(DataError, match=r"split= one of \['test'\], got 'train'"):
        as_examples(DatasetDict(test=test), split="train")
    with pytest.raises(DataError, match="label 100000 is not an integer id"):
        as_examples([Example("a", MAX_LABELS)])


# ----- the API on a Dataset equals the API on the Example list -----
def prompt_model(seed: int = 0) -> ph.ModularModel:
    torch.manual_seed(seed)
    return ph.attach(tiny.bert(), ph.Prompt(length=4), head=True)


def test_fit_accuracy_probabilities_and_loss_on_a_dataset_equal_the_example_list(tokenizer):
    dd = DatasetDict(train=as_dataset(EXAMPLES, "tweet", "class"))
    runs = []
    for data, kw in ((EXAMPLES, {}), (dd, {"split": "train"})):
        model = prompt_model()
        losses = fit(model, data, tokenizer, steps=4, batch_size=8, lr=0.05, progress=False, **kw)
        runs.append((losses, accuracy(model, data, tokenizer, **kw), probabilities(model, data, tokenizer, **kw),
                     mean_loss(model, data, tokenizer, **kw)))
    (losses, acc, probs, loss), got = runs
    assert got[0] == losses and got[1] == acc and got[3] == loss
    assert torch.equal(got[2], probs) and probs.shape == (len(EXAMPLES), 2)
    with pytest.raises(DataError, match="a DatasetDict needs split="):
        accuracy(prompt_model(), dd, tokenizer)


def test_multi_task_fit_on_datasets_per_task_equals_example_lists(tokenizer):
    lists = {"a": EXAMPLES[:12], "b": EXAMPLES[12:]}
    losses = []
    for data in (lists, {"a": as_dataset(lists["a"]), "b": lists["b"]}):    # datasets and lists may mix
        torch.manual_seed(0)
        model = ph.compose(tiny.bert(), ph.Poly(tasks=["a", "b"], skills=2, rank=2), head=True)
        losses.append(fit(model, data, tokenizer, steps=3, batch_size=8, lr=0.01, progress=False))
    assert losses[0] == losses[1]


def sources(n: int = 3) -> dict[str, ph.ModularModel]:
    out = {}
    for i in range(n):
        model = prompt_model(seed=i + 1)
        tiny.perturb(model, seed=i, scale=0.5)
        out[f"src{i}"] = model
    return out


def test_rank_sources_on_a_dataset_equals_the_example_list(tokenizer):
    cands = sources()
    ranked = ph.rank_sources(tiny.bert(), EXAMPLES, cands, tokenizer=tokenizer)
    got = ph.rank_sources(tiny.bert(), as_dataset(EXAMPLES), cands, tokenizer=tokenizer)
    assert got.rows == ranked.rows and len(ranked.rows) == 3
    with pytest.raises(DataError, match="maximum of 100,000"):
        ph.rank_sources(tiny.bert(), Dataset.from_dict({"text": ["good"], "label": [10**9]}), cands,
                        tokenizer=tokenizer)


def test_leep_ignores_which_ids_the_labels_have_and_refuses_huge_ones_before_allocating(monkeypatch):
    probs = torch.softmax(torch.randn(40, 3, generator=torch.Generator().manual_seed(0)), -1)
    labels = torch.randint(0, 2, (40,), generator=torch.Generator().manual_seed(1))
    sparse = labels * 70_000                                     # ids 0 and 70,000: the same partition
    assert leep(probs, sparse) == pytest.approx(leep(probs, labels), abs=1e-12)
    one_hot, widths = torch.nn.functional.one_hot, []
    monkeypatch.setattr(torch.nn.functional, "one_hot", lambda x, n: widths.append(n) or one_hot(x, n))
    assert adjusted_leep(probs, sparse) == pytest.approx(adjusted_leep(probs, labels), abs=1e-12)
    assert widths == [2, 2, 2, 2]                                # sized by the 2 labels there are, not by 70,001
    for bad in (labels + MAX_LABELS, labels - 1, labels.float()):
        with pytest.raises(DataError):
            adjusted_leep(probs, bad)


# ----- pelthub rank --target -----
@pytest.fixture
def ranked_registry(tmp_path, tokenizer):
    """A tiny BERT folder with its tokenizer and a registry of three prompt sources with heads."""
    folder = tmp_path / "base"
    tiny.bert().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    reg = ph.Registry(tmp_path / "reg")
    refs = [reg.add(model, name=name) for name, model in sources().items()]
    return folder, reg, refs


def rank_cli(folder, reg, target, *extra) -> int:
    code = cli.main(["rank", "--base", str(folder), "--target", str(target), "--registry", str(reg.root), "--json",
                     *extra])
    return code


def test_cli_rank_reads_jsonl_csv_and_saved_datasets_alike(ranked_registry, tokenizer, tmp_path, capsys):
    folder, reg, refs = ranked_registry
    base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    expected = ph.rank_sources(base, EXAMPLES, refs, tokenizer=tokenizer, registry=reg).rows
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n"
                                              for e in EXAMPLES))
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"{e.text},{e.label}\n" for e in EXAMPLES))
    DatasetDict(test=as_dataset(EXAMPLES, "content", "labels")).save_to_disk(str(tmp_path / "saved"))
    as_dataset(EXAMPLES, "words", "y").save_to_disk(str(tmp_path / "odd"))
    for target, extra in (("t.jsonl", ()), ("t.csv", ()), ("saved", ("--split", "test")),
                          ("odd", ("--column", "text=words", "--column", "label=y"))):
        capsys.readouterr()
        assert rank_cli(folder, reg, tmp_path / target, *extra) == 0, capsys.readouterr().err
        rows = json.loads(capsys.readouterr().out)["ranking"]
        assert [r["name"] for r in rows] == [n for n, _ in expected], target
        assert [r["score"] for r in rows] == pytest.approx([s for _, s in expected], abs=1e-9), target


def test_cli_rank_refuses_devices_fifos_plain_folders_and_oversize_inputs(ranked_registry, tmp_path, capsys):
    folder, reg, _ = ranked_registry
    os.mkfifo(tmp_path / "pipe.jsonl")                  # open() would wait for a writer for ever
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("text,label\ngood,1\n")
    with open(tmp_path / "big.jsonl", "wb") as f:
        f.truncate(MAX_DATA_BYTES + 1)                    # sparse: costs no disk
    as_dataset(EXAMPLES).save_to_disk(str(tmp_path / "bigsaved"))
    with open(next((tmp_path / "bigsaved").glob("*.arrow")), "r+b") as f:
        f.truncate(MAX_DATA_BYTES + 1)
    for target, message in (("/dev/zero", "is not a regular file"), (tmp_path / "pipe.jsonl", "not a regular file"),
                            (tmp_path / "plain", "not a saved dataset"), (tmp_path / "big.jsonl", "over the"),
                            (tmp_path / "bigsaved", "over the"), (tmp_path / "missing.jsonl", "cannot open"),
                            (tmp_path / "plain" / "notes.txt", "unknown format .txt")):
        capsys.readouterr()
        assert rank_cli(folder, reg, target) != 0
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (target, err)


def test_transfer_study_on_datasets_equals_the_study_on_example_tasks(tokenizer):
    parts = {"a": sentences(24, seed=1), "b": [Example(e.text, 1 - e.label) for e in sentences(24, seed=2)],
             "t": sentences(24, seed=3)}
    data = {n: DatasetDict(train=as_dataset(x[:16]), validation=as_dataset(x[16:])) for n, x in parts.items()}
    tasks = {n: Task(n, n, tuple(NAMES), tuple(x[:16]), tuple(x[16:]), ()) for n, x in parts.items()}
    kw = dict(seeds=1, metrics=("adjusted_leep", "cosine_avg"), source_steps=2, target_steps=2,
              prompt=ph.Prompt(length=4), n_train=16, shots=8, n_dev=8, max_length=16, progress=False)
    study = [evaluate(lambda k: tiny.bert(num_labels=k), tokenizer, sources, targets, **kw).to_dict()
             for sources, targets in (([tasks["a"], tasks["b"]], [tasks["t"]]),
                                      ({"a": data["a"], "b": data["b"]}, {"t": data["t"]}))]
    for run in study:
        run.pop("seconds")
    assert study[0] == study[1] and study[0]["baseline"][0][0] is not None


def test_demo_takes_a_saved_dataset_dict_as_its_target(tmp_path, tokenizer, capsys):
    from pelthub import demo
    tiny.bert().save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    train, test = sentences(40, seed=5), sentences(20, seed=6)
    DatasetDict(train=as_dataset(train), test=as_dataset(test)).save_to_disk(str(tmp_path / "mine"))
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path / "model"), "--target", str(tmp_path / "mine"), "--sources",
                              "wn_bio_tech", "wn_people_places", "--steps", "1", "--seeds", "1", "--shots",
                              "16", "--registry", str(tmp_path / "reg"), "--out", str(tmp_path / "out")])
    reference = Task("mine", "mine", tuple(NAMES), tuple(train), (), tuple(test)).sample(16, 0, None, seed=3)
    assert demo.target_task(args, seed=3) == reference and len(reference.train) == 16
    runs = demo.run(args)
    assert runs and all(0 <= acc <= 1 for method in runs.values() for acc, _, _ in method)
    assert "mine" in capsys.readouterr().out
