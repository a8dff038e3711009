"""Training N task modules in one mixed batch (PerTask) equals N separate plain runs.

Reference: N plain LoRA models (`ph.attach`), each started from its task's initial weights and
trained alone on its task's examples of every batch, each with its own AdamW. The batches are
unbalanced (3, 2 and 1 examples of the three tasks); the multi-task loss is the sum of the task means.
Models run in eval mode (gradients flow): the base's dropout would draw differently per run.
"""
import pytest
import torch
from torch.nn import functional as F

import pelthub as ph
from pelthub.routing.tasks import PerTask, drop_absent_grads, per_task_module, save_tasks, sum_of_task_means
from tests import tiny

CFG = ph.LoRA(r=2, targets=("q", "k", "v", "o", "up", "down"))
TASKS = ["a", "b", "c"]
IDS = torch.tensor([0, 1, 0, 2, 1, 0])
STEPS = 4


def batches():
    g = torch.Generator().manual_seed(5)
    for _ in range(STEPS):
        inputs = tiny.batch("bert", b=6, seed=int(torch.randint(0, 1000, (1,), generator=g)))
        yield inputs, torch.randint(0, 2, (6,), generator=g)


OPTIMISERS = {"adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01),
              "sgd": lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9)}  # sees a wrong loss scale


MIXED = (ph.LoRA(r=2, targets=("q", "v")), ph.IA3(), ph.Bottleneck(reduction=4))


INPUTS = (ph.LoRA(r=2, targets=("q", "v")), ph.Prompt(length=2), ph.Prefix(length=2, hidden=None))


@pytest.mark.parametrize("optimiser, configs", [("adamw", (CFG,)), ("sgd", (CFG,)), ("adamw", MIXED),
                                                ("adamw", INPUTS)],
                         ids=["adamw-lora", "sgd-lora", "adamw-lora+ia3+bottleneck", "adamw-lora+prompt+prefix"])
def test_per_task_training_equals_separate_runs(optimiser, configs):
    adamw = OPTIMISERS[optimiser]
    model = ph.compose(tiny.bert(), PerTask(configs, tasks=TASKS)).eval()
    module = per_task_module(model)
    separate = []
    for t in range(len(TASKS)):
        plain = ph.attach(tiny.bert(), *configs).eval()
        for kind, m in module.tasks[t].items():
            plain.adapters["default"][kind].load_state_dict(m.state_dict())
        separate.append(plain)
    opt = adamw([p for p in model.parameters() if p.requires_grad])
    opts = [adamw([p for p in m.parameters() if p.requires_grad]) for m in separate]
    for inputs, labels in batches():
        logits = model(**inputs, task_ids=IDS).logits
        loss = sum_of_task_means(F.cross_entropy(logits, labels, reduction="none"), IDS)
        loss.backward()
        opt.step()
        opt.zero_grad()
        for t, (plain, o) in enumerate(zip(separate, opts)):
            rows = IDS == t
            plain(**{k: v[rows] for k, v in inputs.items()}, labels=labels[rows]).loss.backward()
            o.step()
            o.zero_grad()
    for t, plain in enumerate(separate):
        want = plain.adapters["default"].state_dict()
        got = module.tasks[t].state_dict()
        assert sorted(got) == sorted(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5)
        lora_b = plain.adapters["default"]["lora"].layers["bert-encoder-layer-0-attention-self-value"].lora_b
        assert float(lora_b.detach().abs().max()) > 1e-3  # the runs did train


def test_each_example_reaches_only_its_task_and_absent_tasks_can_be_left_alone():
    model = ph.compose(tiny.bert(), PerTask(CFG, tasks=TASKS)).train()
    module = per_task_module(model)
    ids = torch.tensor([0, 2, 0])
    inputs = tiny.batch("bert", b=3)
    model(**inputs, task_ids=ids).logits[1].sum().backward()   # example 1 is task c
    grads = [max(float(p.grad.abs().max()) if p.grad is not None else 0.0 for p in row.parameters())
             for row in module.tasks]
    assert grads[0] == grads[1] == 0.0 and grads[2] > 0
    drop_absent_grads(model, ids)
    assert all(p.grad is None for p in module.tasks[1].parameters())


def test_save_tasks_writes_each_task_as_a_plain_module(tmp_path):
    model = ph.compose(tiny.bert(), PerTask((CFG, ph.IA3()), tasks=TASKS)).eval()
    tiny.perturb(model, scale=0.3)
    registry = ph.Registry(tmp_path / "reg")
    refs = save_tasks(model, registry, prefix="mt-")
    inputs = tiny.batch("bert", b=3)
    with torch.no_grad():
        routed = model(**inputs, task_ids=torch.tensor([1, 1, 1])).logits
        loaded = registry.load(refs["b"], tiny.bert()).eval()
        torch.testing.assert_close(loaded(**inputs).logits, routed, rtol=0, atol=1e-6)
    assert sorted(refs) == TASKS


@pytest.mark.slow
@pytest.mark.parametrize("what", ["per_task", "hard_poly"])
def test_compiled_selection_equals_eager_without_recompiling_per_composition(what):
    from tests.test_compile import Counting
    torch._dynamo.reset()
    if what == "per_task":
        model = ph.compose(tiny.bert(), PerTask(CFG, tasks=TASKS)).eval()
        tiny.perturb(model, scale=0.3)
    else:
        loras = [tiny.trained(CFG, seed=s) for s in range(3)]
        model = ph.compose(tiny.bert(), ph.Poly.from_modules(loras, tasks=TASKS)).eval()
    backend = Counting()
    compiled = torch.compile(model, backend=backend)
    inputs = tiny.batch("bert", b=4)
    routes = [[0, 1, 2, 0], [2, 2, 1, 0], [1, 1, 1, 1], [0, 0, 2, 2], [2, 2, 2, 2]]
    with torch.no_grad():
        for i, ids in enumerate(routes):
            ids = torch.tensor(ids)
            torch.testing.assert_close(compiled(**inputs, task_ids=ids).logits,
                                       model(**inputs, task_ids=ids).logits, rtol=1e-5, atol=1e-5)
            if i == 1:
                after_warmup = backend.graphs
    assert backend.graphs == after_warmup > 0
