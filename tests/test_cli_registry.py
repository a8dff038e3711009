"""`pelthub list | search | show | rm | verify | gc` on a real registry: tables for people, JSON for scripts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import pelthub as ph
from pelthub import cli
from tests import tiny


@pytest.fixture
def reg():
    """The registry at $PELTHUB_HOME (a temporary directory, see conftest), with three modules."""
    reg = ph.Registry()
    base = tiny.bert()
    base.config.name_or_path = "org/bert"
    for seed, (kind, name, task) in enumerate([(ph.Prompt(length=4), "sst2-prompt", "sst2"),
                                               (ph.LoRA(r=2), "mnli-lora", "mnli")]):
        torch.manual_seed(seed)
        reg.add(ph.attach(tiny.bert() if seed else base, kind), name=name, task=task, tags=["glue"],
                metrics={"accuracy": 0.9 - seed / 10})
    torch.manual_seed(7)
    reg.add(ph.attach(base, ph.Prompt(length=4), name="v2"), name="sst2-prompt", task="sst2")
    torch.manual_seed(8)
    reg.add(ph.attach(tiny.gpt2(), ph.Prompt(length=4)), name="mix", task="sst2", parents=["sst2-prompt@1"])
    return reg


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_shows_latest_versions_as_a_table(reg, capsys):
    code, out, _ = run(capsys, "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["REF", "KINDS", "TASK"]
    assert [line.split()[0] for line in lines[1:]] == ["mix@1", "mnli-lora@1", "sst2-prompt@2"]
    assert "org/bert" in out and "accuracy=0.9" not in out.splitlines()[3]  # v2 has no metrics
    code, out, _ = run(capsys, "list", "--all", "--json")
    assert [c["ref"] for c in json.loads(out)] == ["mix@1", "mnli-lora@1", "sst2-prompt@1", "sst2-prompt@2"]


def test_list_empty_registry(capsys, tmp_path):
    assert run(capsys, "list", "--registry", str(tmp_path / "empty")) == (0, "no modules\n", "")


def test_search_filters(reg, capsys):
    def refs(*argv):
        code, out, _ = run(capsys, "search", "--json", *argv)
        assert code == 0
        return [c["ref"] for c in json.loads(out)]

    assert refs("--kind", "prompt", "--task", "sst2") == ["mix@1", "sst2-prompt@2", "sst2-prompt@1"]
    assert refs("--tag", "glue", "--kind", "lora") == ["mnli-lora@1"]
    assert refs("--base", "org/bert") == ["sst2-prompt@2", "sst2-prompt@1"]
    assert refs("--base", reg.get("mnli-lora").base_sha) == ["mnli-lora@1", "sst2-prompt@2", "sst2-prompt@1"]
    assert refs("MNLI") == ["mnli-lora@1"] and refs("--limit", "1") == ["mix@1"]
    code, out, _ = run(capsys, "search", "--kind", "ia3")
    assert (code, out) == (0, "no modules\n")


def test_show(reg, capsys):
    code, out, _ = run(capsys, "show", "sst2-prompt@1")
    assert code == 0 and out.startswith("sst2-prompt@1\n")
    for text in ("prompt", reg.get("sst2-prompt@1").base_sha, "accuracy=0.9", "versions", "1, 2", "pelthub.json"):
        assert text in out
    code, out, _ = run(capsys, "show", "sst2-prompt", "--json")
    assert json.loads(out)["ref"] == "sst2-prompt@2"
    code, out, _ = run(capsys, "show", "mix", "--markdown")
    assert out.startswith("---\nlibrary_name: pelthub\n") and "sst2-prompt@1" in out


@pytest.mark.parametrize("ref,message", [("sst2-promt", "did you mean sst2-prompt"), ("sst2-prompt@9", "versions"),
                                         ("a@0", "malformed ref"), ("../x", "not allowed")])
def test_errors_are_one_line_with_exit_status_1(reg, capsys, ref, message):
    code, out, err = run(capsys, "show", ref)
    assert code == 1 and out == "" and err.startswith("pelthub show: error:") and message in err
    assert "Traceback" not in err


def test_rm_refuses_dependants_unless_forced(reg, capsys):
    code, _, err = run(capsys, "rm", "sst2-prompt@1")
    assert code == 1 and "mix@1" in err and "sst2-prompt@1" in reg
    code, out, _ = run(capsys, "rm", "sst2-prompt@1", "--force", "--json")
    assert code == 0 and json.loads(out) == {"removed": ["sst2-prompt@1"]}
    code, out, _ = run(capsys, "rm", "sst2-prompt")
    assert code == 0 and "removed sst2-prompt@2" in out and "sst2-prompt" not in reg


def test_verify_and_gc(reg, capsys):
    code, out, _ = run(capsys, "verify")
    assert code == 0 and "all intact" in out
    blob = reg.blobs.path(reg.get("mnli-lora").files["modules.safetensors"]["sha256"])
    os.chmod(blob, 0o644)
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")
    code, out, _ = run(capsys, "verify")
    assert code == 1 and f"corrupt blob: {blob}" in out
    code, out, _ = run(capsys, "verify", "--json")
    assert code == 1 and json.loads(out)["corrupt"] == [str(blob)] and not json.loads(out)["ok"]

    run(capsys, "rm", "mnli-lora")
    code, out, _ = run(capsys, "gc", "--json")
    assert code == 0 and json.loads(out)["blobs_removed"] == 2  # the lora's weights and its pelthub.json
    code, out, _ = run(capsys, "verify", "--json")
    assert code == 0 and json.loads(out)["ok"]


def test_demo_is_imported_only_when_run(monkeypatch, capsys):
    calls = []
    fake = types.SimpleNamespace(main=lambda args: calls.append(args), add_arguments=lambda p, registry_option: None)
    monkeypatch.setitem(sys.modules, "pelthub.demo", fake)
    assert cli.main(["demo"]) == 0 and calls[0].command == "demo"
    assert set(cli.COMMANDS) >= {"list", "search", "show", "rm", "verify", "gc", "demo"}


def test_module_entry_point(reg):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-m", "pelthub.cli", "list", "--json"], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert len(json.loads(out)) == 3
