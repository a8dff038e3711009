"""Hostile CLI invocations give one line on stderr and a non-zero exit; output carries no terminal escapes."""
from __future__ import annotations

import json
import sqlite3

import pytest

import pelthub as ph
from pelthub import cli
from tests.security.conftest import trained


@pytest.fixture
def reg(tmp_path):
    r = ph.Registry(tmp_path / "reg")
    r.add(trained(ph.LoRA(r=2)), name="good")
    return r


def hostile(tmp_path, reg, endpoint: str) -> dict[str, list[str]]:
    """Each case runs against a live Hub, so what fails is pelthub's check, not the connection."""
    afile = tmp_path / "a-file"
    afile.write_text("not a directory")
    r = ["--registry", str(reg.root)]
    return {
        "registry is a file": ["list", "--registry", str(afile)],
        "registry is empty": ["list", "--registry", ""],
        "registry under a file": ["gc", "--registry", str(afile / "sub")],
        "repo id climbs": ["pull", "../../etc", *r, "--endpoint", endpoint],
        "repo id too deep": ["pull", "a/b/c", *r, "--endpoint", endpoint],
        "push to a bad id": ["push", "good", "bad id!", *r, "--endpoint", endpoint],
        "export into a file": ["export", "good", str(afile / "out"), *r],
        "negative limit": ["hub-search", "--limit", "-1", "--endpoint", endpoint],
        "zero timeout": ["pull", "a/b", "--timeout", "0", *r],
        "missing rank target": ["rank", "--base", str(tmp_path / "none"), "--target", str(tmp_path / "no.jsonl"), *r],
        "bad demo model": ["demo", "--model", str(tmp_path / "bad"), "--steps", "1"],
        "escape in a ref": ["show", "x\x1b[31m", *r],
        "missing import": ["import", str(tmp_path / "nothing-here"), *r],
        "missing rm": ["rm", "nope@1", *r],
    }


CASES = ["registry is a file", "registry is empty", "registry under a file", "repo id climbs", "repo id too deep",
         "push to a bad id", "export into a file", "negative limit", "zero timeout", "missing rank target",
         "bad demo model", "escape in a ref", "missing import", "missing rm"]


@pytest.mark.parametrize("case", CASES)
def test_hostile_invocations_fail_in_one_line(case, tmp_path, reg, capsys, local_hub):
    argv = hostile(tmp_path, reg, local_hub.endpoint)[case]
    assert cli.main(argv) != 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pelthub {argv[0]}: error: "), captured.err
    assert "Traceback" not in captured.err and "\x1b" not in captured.err + captured.out


def test_an_empty_registry_path_is_not_the_default_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("PELTHUB_HOME", str(tmp_path / "default"))
    with pytest.raises(ph.errors.ConfigError, match="empty"):
        ph.Registry("")
    assert not (tmp_path / "default").exists()


def test_a_damaged_index_row_is_skipped_with_a_warning(reg, capsys):
    reg.add(trained(ph.LoRA(r=2), seed=1), name="damaged")
    with sqlite3.connect(reg.root / "index.sqlite") as db:
        db.execute("UPDATE cards SET card = ? WHERE name = 'damaged'", (json.dumps({"name": "damaged"}),))
    with pytest.warns(UserWarning, match="damaged@1"):
        assert [c.name for c in reg.search()] == ["good"]
    assert cli.main(["list", "--registry", str(reg.root)]) == 0
    captured = capsys.readouterr()
    assert "good@1" in captured.out and "damaged" not in captured.out
    warning = captured.err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("pelthub list: warning: skipping a damaged card")
    assert cli.main(["search", "--registry", str(reg.root)]) == 0


def test_terminal_escapes_are_stripped_from_output(reg, capsys):
    source = {"repo_id": "x\x1b[2J\x1b]0;owned\x07", "commit": "c", "endpoint": "e"}
    ref = reg.add(reg.path("good"), name="escaped", source=source)
    assert cli.main(["show", ref, "--registry", str(reg.root)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "x[2J]0;owned" in out
