"""transformers.Trainer under `torchrun --nproc_per_node=2` (gloo on CPU): DDP keeps every rank's modules equal.

The worker (`tests/ddp_trainer_worker.py`) seeds each rank's modules differently, so the
ranks agree after training only if DDP broadcast rank 0's modules and averaged the gradients.
`--standalone` lets torchrun pick a free port, so parallel runs do not collide.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_trainer_under_torchrun_keeps_module_parameters_identical_across_ranks(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "ddp_trainer_worker.py"), str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    init = [load_file(tmp_path / f"rank{r}-init.safetensors") for r in range(2)]
    final = [load_file(tmp_path / f"rank{r}-final.safetensors") for r in range(2)]
    assert sorted(final[0]) == sorted(final[1]) == sorted(init[0]) and final[0]
    assert any(not torch.equal(init[0][k], init[1][k]) for k in init[0])  # the ranks started apart
    for k in final[0]:
        assert torch.equal(final[0][k], final[1][k]), f"{k} differs across ranks"
    trainable = [k for k in final[0] if "router" in k or "lora" in k or k.startswith("heads.")]
    assert trainable and all(not torch.equal(final[0][k], init[0][k]) for k in trainable)  # and they trained
