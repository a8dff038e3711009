"""Per-example module selection (PerTask, adapter_names, hard Poly) against each example run alone.

Reference: example i run by itself on a fresh copy of the base carrying only its own modules (the
weights copied), or the bare base for "__base__". Mixed batches take the gathered path, one-task
batches the single path; both are checked.
"""
import pytest
import torch

import pelthub as ph
from pelthub.errors import RoutingError
from pelthub.model import ModularModel
from pelthub.routing.tasks import PerTask, per_task_module
from tests import tiny
from tests.tiny import perturb, run

KINDS = {
    "lora": [ph.LoRA(r=2, targets=("q", "k", "v", "o", "up", "down"))],
    "ia3": [ph.IA3()],
    "bottleneck": [ph.Bottleneck(reduction=4)],
    "houlsby": [ph.Bottleneck(reduction=4, placement="houlsby", activation="gelu")],
    "parallel": [ph.Bottleneck(reduction=8, placement="parallel", scale=2.0)],
    "compacter": [ph.Compacter(n=2, reduction=4)],
    "ln": [ph.LNTuning()],
    "mixed": [ph.LoRA(r=2, targets=("q", "v", "up")), ph.IA3(), ph.Bottleneck(reduction=4)],
    "prompt": [ph.Prompt(length=3)],
    "prefix": [ph.Prefix(length=2, hidden=None)],
    "prefix-mlp": [ph.Prefix(length=2, hidden=8)],
    "lora+prompt": [ph.LoRA(r=2, targets=("q", "v")), ph.Prompt(length=2)],
}
IDS = [2, 0, 1, 2, 1]


def alone(modules, inputs, i):
    """Example i run by itself on a fresh base with only `modules` ({kind: module}) attached."""
    ref = ModularModel(tiny.bert())
    if modules:
        ref.add("only", [m.config for m in modules.values()], init=False)
        for kind, m in modules.items():
            ref.adapters["only"][kind].load_state_dict(m.state_dict())
    return run(ref.eval(), {k: v[i:i + 1] for k, v in inputs.items()})


@pytest.mark.parametrize("kind", KINDS)
def test_per_task_equals_each_example_alone(kind):
    model = ph.compose(tiny.bert(), PerTask(tuple(KINDS[kind]), tasks=["a", "b", "c"])).eval()
    perturb(model, scale=0.3)
    module = per_task_module(model)
    inputs = tiny.batch("bert", b=5)
    for ids in (IDS, [1] * 5):  # gathered, then single
        got = run_ids(model, inputs, torch.tensor(ids))
        want = torch.cat([alone(dict(module.tasks[t]), inputs, i) for i, t in enumerate(ids)])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_per_task_prompts_train_only_their_tasks(kind):
    """Each example's loss reaches its own task's prompt or prefix and no other task's."""
    model = ph.compose(tiny.bert(), PerTask(tuple(KINDS[kind]), tasks=["a", "b", "c"]), head=True).train()
    inputs = tiny.batch("bert", b=4)
    model(**inputs, task_ids=torch.tensor([2, 0, 2, 0])).logits.square().sum().backward()
    module = per_task_module(model)
    grads = [[p.grad for p in module.tasks[t].parameters()] for t in range(3)]
    assert all(g is not None and g.abs().sum() > 0 for t in (0, 2) for g in grads[t])
    assert all(g is None or not g.any() for g in grads[1])


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_per_task_prompts_generate_as_each_task_alone(kind):
    model = ph.compose(tiny.gpt2(), PerTask(tuple(KINDS[kind]), tasks=["a", "b"])).eval()
    perturb(model, scale=0.3)
    module = per_task_module(model)
    ids = tiny.batch("gpt2", b=2, n=4)["input_ids"]
    got = model.generate(ids, task_ids=torch.tensor([1, 0]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    for i, t in enumerate([1, 0]):
        ref = ModularModel(tiny.gpt2())
        ref.add("only", [m.config for m in module.tasks[t].values()], init=False)
        for k, m in module.tasks[t].items():
            ref.adapters["only"][k].load_state_dict(m.state_dict())
        want = ref.eval().generate(ids[i:i + 1], max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert torch.equal(got[i:i + 1], want)


def run_ids(model, inputs, ids):
    with torch.no_grad():
        return model(**inputs, task_ids=ids).logits


def plain_sets():
    """Sets a (LoRA r=2), b (LoRA r=4, another scale, + IA3), c and e (bottlenecks of two sizes), d (LN)."""
    model = ModularModel(tiny.bert())
    model.add("a", [ph.LoRA(r=2, targets=("q", "v", "down"))])
    model.add("b", [ph.LoRA(r=4, alpha=4.0), ph.IA3()])
    model.add("c", [ph.Bottleneck(reduction=4)])
    model.add("d", [ph.LNTuning()])
    model.add("e", [ph.Bottleneck(reduction=8, scale=2.0)])
    perturb(model.eval(), scale=0.3)
    return model


def test_adapter_names_equals_each_example_alone_and_plain_calls_are_unchanged():
    model = plain_sets()
    inputs = tiny.batch("bert", b=7)
    before = run(model, inputs)  # every set at once (Stack)
    names = ["c", "a", "__base__", "b", "d", "a", "e"]
    with torch.no_grad():
        got = model(**inputs, adapter_names=names).logits
    want = torch.cat([alone(dict(model.adapters[n]) if n != "__base__" else {}, inputs, i)
                      for i, n in enumerate(names)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(run(model, inputs), before, rtol=0, atol=0)  # the bank stands aside


def test_set_adapter_runs_one_set_alone_until_reset():
    model = plain_sets()
    inputs = tiny.batch("bert", b=3)
    before = run(model, inputs)
    model.set_adapter("b")
    want = torch.cat([alone(dict(model.adapters["b"]), inputs, i) for i in range(3)])
    torch.testing.assert_close(run(model, inputs), want, rtol=0, atol=1e-6)
    model.set_adapter(None)
    torch.testing.assert_close(run(model, inputs), before, rtol=0, atol=0)
    with pytest.raises(RoutingError, match="no module set"):
        model.set_adapter("zz")


def test_adapter_names_sees_new_sets_and_detach_is_exact():
    model = plain_sets()
    inputs = tiny.batch("bert", b=2)
    with torch.no_grad():
        model(**inputs, adapter_names=["a", "b"])
    model.add("f", [ph.IA3()])
    perturb(model, seed=3, scale=0.3)
    with torch.no_grad():
        got = model(**inputs, adapter_names=["f", "a"]).logits
    want = torch.cat([alone(dict(model.adapters[n]), inputs, i) for i, n in enumerate(["f", "a"])])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with pytest.raises(RoutingError, match="unknown module sets"):
        model(**inputs, adapter_names=["a", "nope"])
    base = model.detach()
    torch.testing.assert_close(run(base, inputs), run(tiny.bert(), inputs), rtol=0, atol=0)


def test_adapter_names_refuses_prompt_sets():
    model = ModularModel(tiny.bert())
    model.add("a", [ph.LoRA(r=2)])
    model.add("p", [ph.Prompt(length=2)])
    with pytest.raises(RoutingError, match="prompts"):
        model(**tiny.batch("bert", b=2), adapter_names=["a", "p"])


def test_hard_poly_mixed_and_single_batches_equal_each_task_lora():
    loras = [tiny.trained(ph.LoRA(r=2, targets=("q", "v", "o", "up", "down")), seed=s) for s in range(3)]
    model = ph.compose(tiny.bert(), ph.Poly.from_modules(loras, tasks=["x", "y", "z"])).eval()
    inputs = tiny.batch("bert", b=5)
    for ids in (IDS, [0] * 5):
        with torch.no_grad():
            got = model(**inputs, task_ids=torch.tensor(ids)).logits
        want = torch.cat([alone(dict(loras[t].adapters["default"]), inputs, i) for i, t in enumerate(ids)])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_compiled_adapter_names_as_indices_do_not_recompile_per_composition():
    from tests.test_compile import Counting
    torch._dynamo.reset()
    model = ModularModel(tiny.bert())
    model.add("a", [ph.LoRA(r=2)])
    model.add("b", [ph.IA3()])
    perturb(model.eval(), scale=0.3)
    inputs = tiny.batch("bert", b=4)
    backend = Counting()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for i, ids in enumerate([[0, 1, 2, 0], [1, 1, 0, 2], [2, 2, 2, 2], [0, 0, 0, 0]]):
            names = [["a", "b", "__base__"][j] for j in ids]  # indices of the sets, in order, then the base
            torch.testing.assert_close(compiled(**inputs, adapter_names=torch.tensor(ids)).logits,
                                       model(**inputs, adapter_names=names).logits, rtol=1e-5, atol=1e-5)
            if i == 0:
                after_first = backend.graphs
    assert backend.graphs == after_first > 0


def test_two_threads_with_different_adapter_names_get_what_each_gets_alone():
    from concurrent.futures import ThreadPoolExecutor
    model = plain_sets()
    inputs = tiny.batch("bert", b=3)
    choices = [["a", "b", "c"], ["d", "__base__", "a"]]
    with torch.no_grad():
        alone_out = [model(**inputs, adapter_names=c).logits for c in choices]

    def calls(k):
        with torch.no_grad():
            return [float((model(**inputs, adapter_names=choices[k]).logits - alone_out[k]).abs().max())
                    for _ in range(15)]
    with ThreadPoolExecutor(2) as pool:
        diffs = [d for found in pool.map(calls, [0, 1]) for d in found]
    assert max(diffs) == 0.0


def test_generate_with_adapter_names_equals_each_example_alone():
    model = ModularModel(tiny.gpt2())
    model.add("a", [ph.LoRA(r=2)])
    model.add("b", [ph.IA3()])
    perturb(model.eval(), scale=0.5)
    ids = torch.randint(3, tiny.VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    kw = {"max_new_tokens": 4, "do_sample": False, "num_beams": 2, "pad_token_id": 0}
    got = model.generate(ids, adapter_names=["b", "a"], **kw)
    want = []
    for i, name in enumerate(["b", "a"]):
        ref = ModularModel(tiny.gpt2())
        ref.add("only", [m.config for m in model.adapters[name].values()], init=False)
        ref.adapters["only"].load_state_dict(model.adapters[name].state_dict())
        want.append(ref.eval().generate(ids[i:i + 1], **kw))
    assert torch.equal(got, torch.cat(want))
