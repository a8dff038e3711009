"""Odd numbers in configs, pelthub.json and PEFT's adapter_config.json: refused with a pelthub error, nothing written.

Every case must raise a `PeltError` subclass with a one-line message naming what was wrong;
any other exception (ValueError from int(), RecursionError, TypeError) fails the test, and
so does acceptance. Cases read from files are tried through every door that reads them
(from_pretrained, Registry.add, pull; from_peft, import_peft), each leaving the base model
and the registry as they were.
"""
from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from transformers import BertConfig

import pelthub as ph
from pelthub.composition.merge import check_weights
from pelthub.errors import PeltError
from pelthub.hub.peft import export, from_peft, import_peft
from pelthub.hub.peft_poly import from_peft_state_dict
from pelthub.routing.arrow import ArrowConfig
from pelthub.routing.attention import AttentionMixConfig
from tests import tiny
from tests.security.conftest import publish
from tests.tiny import run, trained

NAN, INF = float("nan"), float("inf")
HUGE_INT = "1" + "0" * 5000                           # Python's int() refuses more than 4300 digits
DEEP = "[" * 100_000 + "]" * 100_000                  # the stdlib parser runs out of stack


def refused(call: Callable[[], Any]) -> PeltError:
    """The PeltError `call` raises; any other outcome fails the test."""
    try:
        call()
    except PeltError as e:
        assert "\n" not in str(e), f"a one-line message, got {str(e)!r}"
        return e
    except BaseException as e:  # noqa: BLE001 - the point: nothing but a PeltError may leave
        pytest.fail(f"{type(e).__name__} escaped instead of a pelthub error: {str(e)[:200]}")
    pytest.fail("accepted")


def nothing_written(reg: ph.Registry) -> bool:
    return len(reg) == 0 and not [p for d in ("blobs", "tmp", "checkouts") for p in (reg.root / d).rglob("*")
                                  if p.is_file()]


# ----- through the API: (call, words the message must hold) -----
API = {
    "nan alpha": (lambda: ph.LoRA(alpha=NAN), "LoRA.alpha"),
    "infinite bottleneck scale": (lambda: ph.Bottleneck(scale=INF), "Bottleneck.scale"),
    "bool rank": (lambda: ph.LoRA(r=True), "LoRA.r"),
    "fractional rank": (lambda: ph.LoRA(r=2.5), "LoRA.r"),
    "rank 10**9": (lambda: ph.LoRA(r=10 ** 9), "LoRA.r must be an integer from 1 to 65,536"),
    "string alpha": (lambda: ph.LoRA(alpha="16"), "LoRA.alpha"),
    "nan arrow temperature": (lambda: ArrowConfig(sources=("a",), temperature=NAN), "temperature"),
    "int as arrow flag": (lambda: ArrowConfig(sources=("a",), learn_temperature=1), "learn_temperature"),
    "fractional arrow layout index": (lambda: ArrowConfig(sources=("a",), layout=[["x", [[1.9, 2]]]]), "Arrow.layout"),
    "infinite attempt temperature": (lambda: AttentionMixConfig(sources=("a",), temperature=INF), "temperature"),
    "int as attempt flag": (lambda: AttentionMixConfig(sources=("a",), mask_padding=0), "mask_padding"),
    "nan poly alpha": (lambda: ph.Poly(tasks=2, alpha=NAN), "Poly.alpha"),
    "a billion poly tasks": (lambda: ph.Poly(tasks=10 ** 9), "Poly.tasks"),
    "one task over the cap": (lambda: ph.Poly(tasks=16_385), "Poly.tasks must be an integer from 1 to 16,384"),
    "fractional task count": (lambda: ph.PerTask(modules=ph.LoRA(), tasks=1.9), "PerTask.tasks"),
    "nan dropout": (lambda: ph.LoRA(dropout=NAN), "LoRA.dropout"),
    "int as prompt text": (lambda: ph.Prompt(init="text", text=5), "Prompt.text"),
    "nan in a unipelt part": (lambda: ph.UniPELT(lora=ph.LoRA(alpha=NAN)), "LoRA.alpha"),
    "nan sum weight": (lambda: ph.WeightedSum(["x", "y"], [NAN, 1.0]), "WeightedSum.weights"),
    "bool sum weight": (lambda: ph.WeightedSum(["x", "y"], [True, 1.0]), "WeightedSum.weights"),
    "infinite search bound": (lambda: ph.search_weights(tiny.bert(), ["x"], [{}], bounds=(-INF, 1.0)), "bounds"),
    "nan merge weight": (lambda: check_weights([NAN], 1), "merge.weights"),
}


@pytest.mark.parametrize("case", API)
def test_odd_numbers_through_the_api_are_refused_naming_the_field(case):
    call, words = API[case]
    assert words in str(refused(call))


def test_negative_zero_and_plain_numbers_are_fine():
    assert math.copysign(1, ph.LoRA(dropout=-0.0).dropout) == -1
    assert ph.LoRA(r=65_536, alpha=1e6).r == 65_536
    assert ph.Poly(tasks=3).tasks == ("0", "1", "2")


# ----- through pelthub.json: (old text, new text) replaced in the saved file, words of the message -----
PELTHUB_JSON = {
    "NaN alpha": ('"alpha": 16.0', '"alpha": NaN', "NaN"),
    "Infinity alpha": ('"alpha": 16.0', '"alpha": Infinity', "Infinity"),
    "-Infinity alpha": ('"alpha": 16.0', '"alpha": -Infinity', "-Infinity"),
    "1e309 alpha": ('"alpha": 16.0', '"alpha": 1e309', "1e309"),
    "string alpha": ('"alpha": 16.0', '"alpha": "16"', "LoRA.alpha"),
    "bool rank": ('"r": 2', '"r": true', "LoRA.r"),
    "fractional rank": ('"r": 2', '"r": 1.9', "LoRA.r"),
    "rank 10**9": ('"r": 2', '"r": 1000000000', "LoRA.r must be an integer from 1 to 65,536"),
    "5000-digit rank": ('"r": 2', f'"r": {HUGE_INT}', "digits"),
    "100000-deep nesting": ('"tasks": []', f'"tasks": {DEEP}', "nested"),
    "70-deep nesting": ('"tasks": []', '"tasks": ' + "[" * 70 + "]" * 70, "nested"),
    "list as kind": ('"kind": "lora"', '"kind": ["lora"]', "unknown module kind"),
    "targets not a list": ('"targets": null', '"targets": 5', "LoRA.targets"),
    "3000 layers": ('"layers": 2', '"layers": 3000', "base_model.fingerprint.layers"),
    "bool hidden size": ('"hidden": 32', '"hidden": true', "base_model.fingerprint.hidden"),
}


@pytest.fixture
def lora_dir(tmp_path) -> Path:
    trained(ph.LoRA(r=2)).save_pretrained(tmp_path / "module")
    return tmp_path / "module"


def _rewrite(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("case", PELTHUB_JSON)
def test_odd_pelthub_json_is_refused_by_load_and_add(case, lora_dir, tmp_path):
    old, new, words = PELTHUB_JSON[case]
    _rewrite(lora_dir / "pelthub.json", old, new)
    base = tiny.bert()
    before = run(base, tiny.batch("bert"))
    e = refused(lambda: ph.from_pretrained(base, lora_dir))
    assert words in str(e) and "pelthub.json" in str(e)
    assert not base._forward_hooks and torch.equal(run(base, tiny.batch("bert")), before)  # base left as it was
    reg = ph.Registry(tmp_path / "reg")
    assert words in str(refused(lambda: reg.add(lora_dir, name="odd")))
    assert nothing_written(reg)


@pytest.mark.parametrize("case", ["NaN alpha", "1e309 alpha", "100000-deep nesting"])
def test_odd_pelthub_json_served_by_a_hub_is_refused_by_pull(case, lora_dir, local_hub, regs):  # noqa: F811
    """The card lists the odd file's true sha256, so only the number check stands between it and bob's registry."""
    alice, bob = regs
    ref = alice.add(lora_dir, name="odd")
    old, new, words = PELTHUB_JSON[case]
    _rewrite(lora_dir / "pelthub.json", old, new)
    config = (lora_dir / "pelthub.json").read_bytes()
    meta = {"sha256": hashlib.sha256(config).hexdigest(), "size": len(config)}
    publish(local_hub, alice, ref, "eve/odd", files={**alice.get(ref).files, "pelthub.json": meta})
    local_hub.put_files("eve/odd", {"pelthub.json": config})
    assert words in str(refused(lambda: bob.pull("eve/odd", endpoint=local_hub.endpoint)))
    assert nothing_written(bob)


def test_a_nan_alpha_that_gave_finite_wrong_logits_is_refused(lora_dir, monkeypatch):
    """Why NaN must be refused: with the checks off, a NaN alpha loads and its logits are finite yet wrong."""
    inputs = tiny.batch("bert")
    right = run(ph.from_pretrained(tiny.bert(), lora_dir), inputs)
    _rewrite(lora_dir / "pelthub.json", '"alpha": 16.0', '"alpha": NaN')
    assert "NaN" in str(refused(lambda: ph.from_pretrained(tiny.bert(), lora_dir)))

    # what the file got before: JSON's NaN read as a float, and no finiteness check on alpha
    monkeypatch.setattr("pelthub.modules.jsonsafe._no_constant", float)
    monkeypatch.setattr("pelthub.modules.config.check_fields", lambda config: None)
    monkeypatch.setattr(ph.LoRA, "validate", lambda self: None)
    wrong = run(ph.from_pretrained(tiny.bert(), lora_dir), inputs)
    assert torch.isfinite(wrong).all() and not torch.allclose(wrong, right, atol=1e-4)


# ----- through PEFT's adapter_config.json -----
PEFT_JSON = {
    "NaN lora_alpha": ("lora_alpha", "NaN", "NaN"),
    "Infinity lora_dropout": ("lora_dropout", "Infinity", "Infinity"),
    "1e309 lora_alpha": ("lora_alpha", "1e309", "1e309"),
    "string lora_alpha": ("lora_alpha", '"16"', "lora_alpha"),
    "bool lora_alpha": ("lora_alpha", "true", "lora_alpha"),
    "huge lora_alpha": ("lora_alpha", "1e300", "LoRA.alpha"),
    "5000-digit r": ("r", HUGE_INT, "digits"),
    "100000-deep target_modules": ("target_modules", DEEP, "nested"),
    "list as peft_type": ("peft_type", '["LORA"]', "peft_type"),
    "int modules_to_save": ("modules_to_save", "7", "modules_to_save"),
}


@pytest.fixture
def peft_dir(tmp_path) -> Path:
    return export(trained(ph.LoRA(r=2, alpha=4.0)), tmp_path / "peft", format="peft")


def _set_field(path: Path, field: str, literal: str) -> None:
    data = json.loads(path.read_text())
    data[field] = "@@"
    path.write_text(json.dumps(data).replace('"@@"', literal))


@pytest.mark.parametrize("case", PEFT_JSON)
def test_odd_adapter_config_is_refused_by_from_peft_and_import(case, peft_dir, tmp_path):
    field, literal, words = PEFT_JSON[case]
    _set_field(peft_dir / "adapter_config.json", field, literal)
    base = tiny.bert()
    assert words in str(refused(lambda: from_peft(peft_dir, base)))
    assert not base._forward_hooks
    reg = ph.Registry(tmp_path / "reg")
    assert words in str(refused(lambda: import_peft(peft_dir, registry=reg, base=tiny.bert())))
    assert nothing_written(reg)


@pytest.mark.parametrize("field, literal, words", [("n_tasks", "1.9", "n_tasks"), ("n_skills", "true", "n_skills"),
                                                   ("n_tasks", "1000000000", "Poly.tasks")])
def test_odd_poly_counts_are_refused_not_truncated(field, literal, words, tmp_path):
    model = trained(ph.Poly(tasks=2, skills=2, rank=2))
    folder = export(model, tmp_path / "poly", format="peft")
    _set_field(folder / "adapter_config.json", field, literal)
    e = refused(lambda: from_peft(folder, tiny.bert()))
    assert words in str(e) and str(folder) in str(e)


def test_poly_counts_from_a_peft_config_object_are_not_cast():
    """from_peft_state_dict also takes PEFT's PolyConfig (no JSON parse): Poly itself refuses 1.9 tasks."""
    state = {f"base_model.model.x.{k}": torch.zeros(1) for k in ("poly_lora_A", "poly_lora_B", "poly_router")}
    config = {"n_tasks": 1.9, "n_skills": 2, "r": 2, "n_splits": 1}
    assert "Poly.tasks" in str(refused(lambda: from_peft_state_dict(state, config)))


def test_a_3000_layer_base_config_is_refused_before_it_is_built(peft_dir, tmp_path):
    """import_peft builds a weightless copy of the base from its config: 3000 layers took about a minute."""
    BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=3000, num_attention_heads=4,
               intermediate_size=64).save_pretrained(tmp_path / "deep")
    reg = ph.Registry(tmp_path / "reg")
    start = time.perf_counter()
    e = refused(lambda: import_peft(peft_dir, registry=reg, base=str(tmp_path / "deep")))
    assert "num_hidden_layers must be an integer from 0 to 512" in str(e)
    assert time.perf_counter() - start < 5 and nothing_written(reg)


@pytest.mark.parametrize("text", [DEEP, '{"name": NaN}', HUGE_INT])
def test_an_odd_card_in_the_registry_index_is_a_format_error(text, lora_dir, tmp_path):
    """The index holds each card as JSON text; a damaged row is refused with the row named, not parsed raw."""
    reg = ph.Registry(tmp_path / "reg")
    ref = reg.add(lora_dir, name="m")
    with sqlite3.connect(reg.index.path) as db:
        db.execute("UPDATE cards SET card = ?", (text,))
    db.close()
    assert "card m@1" in str(refused(lambda: reg.get(ref)))
