"""Tests for the built-in task suite and the JSONL/CSV loaders."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from pelthub.errors import ConfigError, DataError
from pelthub.tasks import Example, Task, families, list_tasks, load_csv, load_jsonl, load_task, save_jsonl

ALL_TASKS = list_tasks()


# ------------------------------------------------------------------ suite
def test_suite_size_and_families():
    fams = families()
    assert len(ALL_TASKS) >= 12
    assert len(fams) >= 4
    assert sorted(n for names in fams.values() for n in names) == ALL_TASKS
    assert all(len(names) >= 3 for names in fams.values())
    assert any(load_task(n, 8, 0, 0).num_labels >= 3 for n in ALL_TASKS)
    for family, names in fams.items():
        assert list_tasks(family) == names


@pytest.mark.parametrize("name", ALL_TASKS)
def test_task_shape_balance_and_no_leaks(name):
    task = load_task(name)
    assert isinstance(task, Task) and task.name == name
    assert task.num_labels == len(task.label_names) >= 2
    for split, size in (("train", 256), ("dev", 128), ("test", 256)):
        examples = getattr(task, split)
        assert len(examples) == size
        counts = Counter(ex.label for ex in examples)
        assert set(counts) == set(range(task.num_labels))
        assert max(counts.values()) - min(counts.values()) <= 1
        for ex in examples:
            assert 0 <= ex.label < task.num_labels
            assert 3 <= len(ex.text.split()) <= 25
            assert (ex.text_pair is not None) == (task.family == "pair")
    texts = [ex.text for ex in task.train + task.dev + task.test]
    assert len(texts) == len(set(texts))  # no duplicates within or across splits


@pytest.mark.parametrize("name", ALL_TASKS)
def test_determinism(name):
    assert load_task(name, 32, 16, 32, seed=3) == load_task(name, 32, 16, 32, seed=3)
    assert load_task(name, 32, 16, 32, seed=3).train != load_task(name, 32, 16, 32, seed=4).train


def test_tasks_in_a_family_differ():
    for names in families().values():
        firsts = {load_task(n, 8, 0, 0).train for n in names}
        assert len(firsts) == len(names)


def test_unknown_task_lists_names():
    with pytest.raises(ConfigError) as info:
        load_task("sentiment_moviez")
    for name in ALL_TASKS:
        assert name in str(info.value)


def test_unknown_family_and_bad_sizes():
    with pytest.raises(ConfigError, match="sentiment"):
        list_tasks("nope")
    with pytest.raises(ConfigError, match="n_dev"):
        load_task("topic_news", n_dev=-1)
    with pytest.raises(ConfigError, match="n_train"):
        load_task("topic_news", n_train=2)  # fewer than its 4 labels
    with pytest.raises(ConfigError, match="distinct"):
        load_task("topic_forum", n_train=100_000)


def test_odd_sizes_stay_balanced():
    task = load_task("pair_entailment", n_train=10, n_dev=0, n_test=5)
    assert sorted(Counter(ex.label for ex in task.train).values()) == [3, 3, 4]
    assert len(task.dev) == 0 and len(task.test) == 5


# --------------------------------------------------------------------- io
def test_task_to_jsonl_round_trip(tmp_path):
    task = load_task("pair_paraphrase", 16, 8, 8)
    out = task.to_jsonl(tmp_path / "export")
    for split in ("train", "dev", "test"):
        assert tuple(load_jsonl(out / f"{split}.jsonl")) == getattr(task, split)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_save_jsonl_round_trip_unicode(tmp_path):
    rows = [Example("caf\u00e9 \u2028 line", 1), Example("a", 0, "b")]
    path = save_jsonl(rows, tmp_path / "sub" / "x.jsonl")
    assert load_jsonl(path) == rows
    save_jsonl(rows[:1], path)  # overwrite in place
    assert load_jsonl(path) == rows[:1]


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_label_names_and_first_appearance(tmp_path):
    lines = [{"text": "x", "label": "pos"}, {"text": "y", "label": "neg"}, {"text": "z", "label": "pos"}]
    path = _write(tmp_path, "a.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n\n")
    assert [e.label for e in load_jsonl(path)] == [0, 1, 0]  # order of first appearance
    assert [e.label for e in load_jsonl(path, ["neg", "pos"])] == [1, 0, 1]


def test_csv_loading(tmp_path):
    path = _write(tmp_path, "a.csv",
                  'text,text_pair,label\n"hello, world",,pos\nsecond,other side,neg\n"multi\nline",,2\n')
    rows = load_csv(path, label_names=["neg", "pos", "other"])
    assert rows == [Example("hello, world", 1), Example("second", 0, "other side"), Example("multi\nline", 2)]
    plain = _write(tmp_path, "b.csv", "label,text\n1,a\n0,b\n")
    assert load_csv(plain) == [Example("a", 1), Example("b", 0)]


BAD_JSONL = [
    ('{"text": "a", "label": 0', "invalid JSON"),
    ('["a", 0]', "JSON object"),
    ('{"label": 0}', "missing 'text'"),
    ('{"text": "  ", "label": 0}', "empty 'text'"),
    ('{"text": 5, "label": 0}', "must be a string"),
    ('{"text": "a"}', "missing label"),
    ('{"text": "a", "label": null}', "missing label"),
    ('{"text": "a", "label": "meh"}', "unknown label name 'meh'"),
    ('{"text": "a", "label": 1.5}', "non-integer label"),
    ('{"text": "a", "label": true}', "non-integer label"),
    ('{"text": "a", "label": -1}', "negative label"),
    ('{"text": "a", "label": 7}', "out of range"),
]


@pytest.mark.parametrize(("line", "problem"), BAD_JSONL)
def test_bad_jsonl_row_names_file_line_and_problem(tmp_path, line, problem):
    path = _write(tmp_path, "bad.jsonl", '{"text": "ok", "label": "neg"}\n\n' + line + "\n")
    with pytest.raises(DataError) as info:
        load_jsonl(path, label_names=["neg", "pos"])
    message = str(info.value)
    assert str(path) in message and "line 3" in message and problem in message


BAD_CSV = [
    ("a,", "missing label"),
    (",0", "empty 'text'"),
    ("  ,0", "empty 'text'"),
    ("a,meh", "unknown label name"),
    ("a,-2", "negative label"),
    ("a,0,extra", "more fields"),
]


@pytest.mark.parametrize(("row", "problem"), BAD_CSV)
def test_bad_csv_row_names_file_line_and_problem(tmp_path, row, problem):
    path = _write(tmp_path, "bad.csv", f"text,label\nok,pos\n{row}\n")
    with pytest.raises(DataError) as info:
        load_csv(path, label_names=["neg", "pos"])
    message = str(info.value)
    assert str(path) in message and "line 3" in message and problem in message


def test_mixed_int_and_name_labels_need_label_names(tmp_path):
    path = _write(tmp_path, "m.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label": 0}\n')
    with pytest.raises(DataError, match="line 2.*mixes"):
        load_jsonl(path)


@pytest.mark.parametrize("name", ["e.jsonl", "e.csv"])
@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_file_is_an_error(tmp_path, name, content):
    path = _write(tmp_path, name, content)
    loader = load_jsonl if name.endswith("jsonl") else load_csv
    with pytest.raises(DataError, match="empty"):
        loader(path)


def test_csv_header_problems(tmp_path):
    with pytest.raises(DataError, match="line 1.*missing column 'label'"):
        load_csv(_write(tmp_path, "h.csv", "text,tag\na,0\n"))
    with pytest.raises(DataError, match="no rows"):
        load_csv(_write(tmp_path, "o.csv", "text,label\n"))


def test_invalid_utf8_is_a_data_error(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_bytes(b'{"text": "\xff", "label": 0}\n')
    with pytest.raises(DataError, match="UTF-8"):
        load_jsonl(path)
