"""Every script in examples/ runs end to end with --tiny: a tiny random model from a config, a few steps.

The examples start together in subprocesses (most of their time is importing torch and
transformers, which overlaps well), each in its own temporary folder with its own
PELTHUB_HOME and HF_HOME; each test then waits for its example and checks the exit code.
An example that accepts neither --tiny nor PELTHUB_EXAMPLE_TINY is skipped, as is
poly_ddp.py, which needs torchrun and has its own test.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
OWN_TEST = {"poly_ddp.py"}
ALREADY_TINY = {"hub_roundtrip.py"}  # tiny by default; talks to a local Hub server, so no offline mode
TIMEOUT_S = 300


def tiny_args(script: Path) -> list[str] | None:
    """The arguments that make `script` tiny ([] when it only reads the env var), None if it has no tiny mode."""
    text = script.read_text()
    if script.name in ALREADY_TINY:
        return []
    if "--tiny" in text:
        return ["--tiny"]
    return [] if "PELTHUB_EXAMPLE_TINY" in text else None


SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if p.name not in OWN_TEST and not p.name.startswith("_"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[subprocess.Popen, Path]]]:
    """{script: (process, its folder)} for every example with a tiny mode, all started at once."""
    started: dict[str, tuple[subprocess.Popen, Path]] = {}
    for name in SCRIPTS:
        args = tiny_args(EXAMPLES / name)
        if args is None:
            continue
        folder = tmp_path_factory.mktemp(name.removesuffix(".py"))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "PELTHUB_HOME": str(folder / "pelthub-home"), "HF_HOME": str(folder / "hf-home"),
               "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "PELTHUB_EXAMPLE_TINY": "1", "OMP_NUM_THREADS": "1",
               "TRANSFORMERS_VERBOSITY": "error"}
        if name in ALREADY_TINY:
            del env["HF_HUB_OFFLINE"]
            env.pop("HF_TOKEN", None)
        with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
            process = subprocess.Popen([sys.executable, str(EXAMPLES / name), *args], cwd=folder, env=env,
                                       stdout=out, stderr=err)
        started[name] = (process, folder)
    yield started
    for process, _ in started.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_runs_tiny(name: str, runs: dict[str, tuple[subprocess.Popen, Path]]) -> None:
    if name not in runs:
        pytest.skip(f"{name} accepts neither --tiny nor PELTHUB_EXAMPLE_TINY")
    process, folder = runs[name]
    code = process.wait(timeout=TIMEOUT_S)
    stdout, stderr = (folder / "stdout").read_text(), (folder / "stderr").read_text()
    assert code == 0, f"{name} exited with {code}\n--- stdout\n{stdout}\n--- stderr\n{stderr[-4000:]}"
    assert stdout.strip(), f"{name} printed nothing"


def test_poly_multitask_writes_the_routing_heatmap(runs: dict[str, tuple[subprocess.Popen, Path]]) -> None:
    if "poly_multitask.py" not in runs:
        pytest.skip("poly_multitask.py is not among the examples")
    process, folder = runs["poly_multitask.py"]
    assert process.wait(timeout=TIMEOUT_S) == 0
    assert (folder / "outputs" / "examples" / "routing.png").stat().st_size > 0
