"""Big-model dispatch: a base dispatched by accelerate (`dispatch_model` with a `device_map` offloading layers to
disk, `cpu_offload`) keeps its weights on the meta device between calls, and accelerate's AlignDevicesHook loads
them for each layer's forward. pelthub's hooks run beside those: the outputs equal the same modules on the base
as it was (not dispatched). LN-tuning reparametrises the norms' weights, which an offloaded norm does not hold:
refused, naming what to do instead.
"""
import pytest
import torch

import pelthub as ph
from pelthub.errors import UnsupportedModelError
from pelthub.tiny import batch, bert, perturb

accelerate = pytest.importorskip("accelerate")

KINDS = {"lora": [ph.LoRA(r=2)], "ia3": [ph.IA3()], "prompt": [ph.Prompt(length=3)], "prefix": [ph.Prefix(length=3)],
         "bottleneck": [ph.Bottleneck()], "poly": [ph.Poly(tasks=("a", "b"), skills=2, rank=2)],
         "per_task": [ph.PerTask((ph.LoRA(r=2), ph.IA3()), tasks=("a", "b"))]}
# the embeddings and the second layer on disk, the rest in memory
DEVICE_MAP = {"bert.embeddings": "disk", "bert.encoder.layer.0": "cpu", "bert.encoder.layer.1": "disk",
              "bert.pooler": "cpu", "classifier": "cpu"}


def dispatched(how: str, folder) -> torch.nn.Module:
    if how == "disk":
        return accelerate.dispatch_model(bert(), device_map=DEVICE_MAP, main_device="cpu", offload_dir=folder)
    return accelerate.cpu_offload(bert(), execution_device=torch.device("cpu"))  # every weight held aside


@pytest.mark.parametrize("how", ["disk", "cpu_offload"])
@pytest.mark.parametrize("kind", KINDS)
def test_modules_on_an_offloaded_base_give_the_undispatched_outputs(tmp_path, kind, how):
    inputs = {**batch("bert"), "task_ids": torch.tensor([0, 1, 0])}
    reference = ph.compose(bert(), *KINDS[kind]).eval()
    perturb(reference, seed=3)
    base = dispatched(how, tmp_path)
    assert any(p.device.type == "meta" for p in base.parameters())  # weights really held aside
    model = ph.compose(base, *KINDS[kind]).eval()
    perturb(model, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, atol=1e-6, rtol=0)
    loss = model(**inputs, labels=torch.tensor([0, 1, 1])).loss  # and the modules train there
    loss.backward()
    assert all(p.grad is not None for _, p in model.module_parameters() if p.requires_grad)


@pytest.mark.parametrize("how", ["disk", "cpu_offload"])
def test_ln_tuning_on_offloaded_norms_is_refused(tmp_path, how):
    with pytest.raises(UnsupportedModelError, match="offload"):
        ph.attach(dispatched(how, tmp_path), ph.LNTuning())
