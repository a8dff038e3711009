"""FSDP2 (`fully_shard`) and FSDP1 (`use_orig_params=True`) under `torchrun --nproc_per_node=2` (gloo on CPU).

One torchrun launch (`tests/fsdp_worker.py`) trains every case under both wrappers, each rank on
half of one global batch, and the single-process run on the whole batch; these tests compare
what it wrote: the sharded runs' saved modules equal the single-process ones, the saved folders
load onto a fresh base with the single-process outputs, and the base is stored once, in halves.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pelthub as ph
from tests import fsdp_worker as worker

ROOT = Path(__file__).resolve().parents[1]
RUNS = [(case, wrapper) for case in worker.CASES for wrapper in ("fsdp2", "fsdp1")]
TOL = 1e-5


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "fsdp_worker.py"), str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case,wrapper", RUNS)
def test_sharded_training_equals_one_process_on_the_global_batch(out, case, wrapper):
    reference = load_file(out / f"reference-{case}.safetensors")
    reference.pop("logits")
    sharded = load_file(out / wrapper / case / "modules.safetensors")
    assert sorted(sharded) == sorted(reference)
    start = worker.build(case).state_dict()
    assert max((reference[k] - start[k]).abs().max().item() for k in reference) > 50 * TOL  # it trained
    for k in reference:
        assert torch.allclose(sharded[k], reference[k], atol=TOL, rtol=0), (
            k, (sharded[k] - reference[k]).abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("case,wrapper", RUNS)
def test_saved_folder_loads_with_the_one_process_outputs(out, case, wrapper):
    model = ph.from_pretrained(worker.base(), out / wrapper / case).eval()
    probe = {k: v for k, v in worker.data().items() if k != "labels"}
    with torch.no_grad():
        logits = model(**probe).logits
    torch.testing.assert_close(logits, load_file(out / f"reference-{case}.safetensors")["logits"], atol=TOL, rtol=0)


@pytest.mark.slow
def test_base_is_sharded_once_whatever_the_number_of_module_sets(out):
    stored = json.loads((out / "storage.json").read_text())
    base = worker.base()
    elements = sum(p.numel() for p in base.parameters())
    assert stored["base_elements"] == elements and stored["base_tensors"] == len(list(base.parameters()))
    assert sum(stored["local_elements"]) == elements  # each element on one rank, none copied per module set
    assert max(stored["local_elements"]) <= elements // 2 + 32 * stored["base_tensors"]  # about half each


@pytest.mark.slow
def test_merging_into_sharded_weights_or_attaching_after_sharding_is_refused(out):
    said = json.loads((out / "storage.json").read_text())
    assert said["merge"].startswith("UnsupportedModelError: merge_and_unload cannot fold modules into sharded weights")
    assert said["attach"].startswith("ConfigError: cannot attach 'late' to a sharded base")
