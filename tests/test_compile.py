"""torch.compile: compiled outputs equal eager ones, and fixed shapes do not recompile on every call.

A counting backend (public `torch.compile(backend=...)` API) records each graph dynamo
hands over and runs it as is: fast, and it shows recompiles directly.
"""
import pytest
import torch

import pelthub as ph
from tests import tiny
from tests.tiny import perturb

CONFIGS = {"lora": ph.LoRA(r=2), "ia3": ph.IA3(), "prompt": ph.Prompt(length=3),
           "poly": ph.Poly(tasks=("a", "b"), skills=2, rank=2)}


class Counting:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.slow
@pytest.mark.parametrize("kind", CONFIGS)
def test_compiled_equals_eager_and_does_not_recompile_per_call(kind):
    torch._dynamo.reset()
    model = ph.compose(tiny.bert(), CONFIGS[kind]).eval()
    perturb(model)
    inputs = tiny.batch("bert")
    routes = [torch.tensor(t) for t in ([0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 1])]
    backend = Counting()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for i, ids in enumerate(routes):
            kw = {"task_ids": ids} if kind == "poly" else {}
            torch.testing.assert_close(compiled(**inputs, **kw).logits, model(**inputs, **kw).logits,
                                       rtol=1e-5, atol=1e-5)
            if i == 1:
                after_warmup = backend.graphs
    assert backend.graphs == after_warmup > 0  # new task ids of the same shape compile nothing new


@pytest.mark.slow
def test_inductor_compiled_lora_equals_eager():
    torch._dynamo.reset()
    model = ph.attach(tiny.bert(), ph.LoRA(r=2)).eval()
    perturb(model)
    inputs = tiny.batch("bert")
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(**inputs).logits, model(**inputs).logits,
                                   rtol=1e-5, atol=1e-5)
