"""Threads sharing one model never see each other's calls; ids are integers (or names) in range, never truncated.

The expected values are independent of the code under test: the same call made alone (on a twin
model built the same way, so the model under test stays fresh), or the base before anything was
attached. `sys.setswitchinterval(1e-6)` makes CPython switch threads every few bytecodes, so a
check-then-build without a lock loses the race nearly every round.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable

import numpy as np
import pytest
import torch

import pelthub as ph
from pelthub.errors import PeltError, RoutingError
from pelthub.model import ModularModel, select
from pelthub.modules.bank import Bank
from pelthub.routing.poly import poly_module
from pelthub.routing.tasks import drop_absent_grads, per_task_module, sum_of_task_means
from tests import tiny

THREADS = 8
TASKS = ("a", "b")


@pytest.fixture
def switch_often():
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def in_threads(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Run the jobs in threads released together by a barrier; their results, or the first error raised."""
    barrier, results, errors = threading.Barrier(len(jobs)), [None] * len(jobs), []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = jobs[i]()
        except BaseException as e:  # noqa: BLE001 - reported in the main thread
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def logits(model, inputs, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kw).logits


def plain_sets() -> ModularModel:
    """Three plain sets over a fresh tiny BERT (the same tensors every time it is built)."""
    model = ModularModel(tiny.bert())
    model.add("a", [ph.LoRA(r=2)])
    model.add("b", [ph.LoRA(r=4), ph.IA3()])
    model.add("c", [ph.Bottleneck(reduction=4)])
    tiny.perturb(model.eval(), seed=0, scale=0.3)
    return model


CHOICES = [["a", "b", "c"], ["c", "__base__", "a"], ["b", "b", "b"], ["__base__", "c", "b"]]


def test_first_adapter_names_calls_of_many_threads_build_one_bank(switch_often, monkeypatch):
    twin, inputs = plain_sets(), tiny.batch("bert")
    alone = [logits(twin, inputs, adapter_names=c) for c in CHOICES]
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)  # the choices differ, so a mix-up would show
    installs = []

    class SlowBank(Bank):
        """Installs after a pause, so every thread's first call is inside the build at once."""

        def install(self, base, ctx):
            installs.append(self)
            time.sleep(0.05)
            return super().install(base, ctx)
    monkeypatch.setattr(select, "Bank", SlowBank)
    model = plain_sets()  # fresh: no bank yet, every thread's first call races to build it
    jobs = [lambda k=k: logits(model, inputs, adapter_names=CHOICES[k % len(CHOICES)]) for k in range(THREADS)]
    for k, got in enumerate(in_threads(jobs)):
        torch.testing.assert_close(got, alone[k % len(CHOICES)], rtol=0, atol=0)
    assert len(installs) == 1
    for choice, want in zip(CHOICES, alone):  # later calls too: no second bank was left installed
        torch.testing.assert_close(logits(model, inputs, adapter_names=choice), want, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, inputs), logits(twin, inputs), rtol=0, atol=0)
    torch.testing.assert_close(logits(model.detach(), inputs), logits(tiny.bert(), inputs), rtol=0, atol=0)


def poly_model() -> ModularModel:
    model = ph.compose(tiny.bert(), ph.Poly(tasks=TASKS, skills=2, rank=2))
    tiny.perturb(model, scale=0.5)
    with torch.no_grad():
        for row in poly_module(model).router.values():
            row.copy_(torch.tensor([[4.0, -4.0], [-4.0, 4.0]]))  # task a → skill 0, task b → skill 1
    return model.eval()


def test_a_routed_call_in_another_thread_keeps_its_modules_while_one_thread_disables_them():
    model, inputs = poly_model(), tiny.batch("bert")
    bare, routed = logits(tiny.bert(), inputs), logits(model, inputs, task_ids=["a", "b", "a"])
    assert not torch.allclose(bare, routed, atol=1e-3)
    inside, done = threading.Event(), threading.Event()

    def disabled() -> torch.Tensor:
        with model.disable_adapter():
            inside.set()
            done.wait(30)
            return logits(model, inputs)

    def other() -> torch.Tensor:
        inside.wait(30)
        try:
            return logits(model, inputs, task_ids=["a", "b", "a"])
        finally:
            done.set()
    got_bare, got_routed = in_threads([disabled, other])
    torch.testing.assert_close(got_routed, routed, rtol=0, atol=0)
    torch.testing.assert_close(got_bare, bare, rtol=0, atol=0)


def test_many_threads_disabling_and_routing_at_once_each_get_their_own_answer(switch_often):
    model, inputs = poly_model(), tiny.batch("bert")
    bare = logits(tiny.bert(), inputs)
    routes = [["a", "b", "a"], ["b", "b", "a"]]
    alone = [logits(model, inputs, task_ids=r) for r in routes]

    def disabled() -> list[torch.Tensor]:
        out = []
        for _ in range(5):
            with model.disable_adapter():
                out.append(logits(model, inputs))
        return out

    def routed(k: int) -> list[torch.Tensor]:
        return [logits(model, inputs, task_ids=routes[k]) for _ in range(5)]
    jobs = [disabled if k % 2 else (lambda k=k: routed(k // 2 % 2)) for k in range(THREADS)]
    for k, outs in enumerate(in_threads(jobs)):
        for got in outs:
            torch.testing.assert_close(got, bare if k % 2 else alone[k // 2 % 2], rtol=0, atol=0)
    torch.testing.assert_close(logits(model.detach(), inputs), bare, rtol=0, atol=0)


def _sources() -> list[ModularModel]:
    out = []
    for i, r in enumerate((2, 4)):
        source = ph.attach(tiny.bert(), ph.LoRA(r=r, targets=("q", "v")))
        tiny.perturb(source, seed=i, scale=0.3)
        out.append(source)
    return out


KINDS: dict[str, Callable[[], Any]] = {
    "lora+head": lambda: [ph.LoRA(r=2)],
    "ia3": lambda: [ph.IA3()],
    "ln": lambda: [ph.LNTuning()],
    "bottleneck": lambda: [ph.Bottleneck(reduction=4)],
    "compacter": lambda: [ph.Compacter(n=2, reduction=4)],
    "prompt": lambda: [ph.Prompt(length=3)],
    "prefix": lambda: [ph.Prefix(length=3)],
    "per_task": lambda: [ph.PerTask([ph.LoRA(r=2), ph.Prompt(length=2)], tasks=TASKS)],
    "poly": lambda: [ph.Poly(tasks=TASKS, skills=2, rank=2)],
    "hard_poly": lambda: [ph.Poly.from_modules(_sources(), tasks=TASKS)],
    "unipelt": lambda: [ph.UniPELT(lora=ph.LoRA(r=2), prefix=ph.Prefix(length=2, hidden=8),
                                   adapter=ph.Bottleneck(reduction=4))],
    "arrow": lambda: [ph.Arrow(_sources(), top_k=1)],
}


@pytest.mark.parametrize("kind", KINDS)
def test_disable_adapter_runs_the_bare_base_for_every_kind_and_only_inside_the_block(kind):
    inputs = tiny.batch("bert")
    bare = logits(tiny.bert(), inputs)
    model = ModularModel(tiny.bert())
    model.add("s", KINDS[kind](), head=kind == "lora+head")
    tiny.perturb(model.eval(), scale=0.3)
    kw = {"task_ids": ["a", "b", "a"]} if model.task_names else {}
    with_modules = logits(model, inputs, **kw)
    assert not torch.allclose(with_modules, bare, atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs, **kw), bare, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, inputs, **kw), with_modules, rtol=0, atol=0)


def test_disable_adapter_generates_with_the_bare_base():
    inputs = tiny.batch("gpt2", b=2)
    settings = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, **inputs}
    with torch.no_grad():
        bare = tiny.gpt2().generate(**settings)
    model = ph.attach(tiny.gpt2(), ph.Prefix(length=3), ph.LoRA(r=2))
    tiny.perturb(model.eval(), scale=1.0)
    assert not torch.equal(model.generate(**settings), bare)
    with model.disable_adapter():
        torch.testing.assert_close(model.generate(**settings), bare, rtol=0, atol=0)


# ----- ids: integers (or names) in range, never truncated -----

BAD_TASK_IDS = {
    "fraction": [0, 1.9, 0],
    "whole float": [0, 1.0, 0],
    "bool list": [True, False, True],
    "bool scalar": True,
    "float scalar": 1.0,
    "float tensor": torch.tensor([0.0, 1.0, 0.0]),
    "fraction tensor": torch.tensor([0.0, 1.9, 0.0]),
    "half tensor": torch.tensor([0, 1, 0], dtype=torch.float16),
    "bool tensor": torch.tensor([True, False, True]),
    "complex tensor": torch.tensor([0, 1, 0], dtype=torch.complex64),
    "nan": [0, float("nan"), 1],
    "nan tensor": torch.tensor([0, float("nan"), 1]),
    "inf": [0, float("inf"), 1],
    "negative": [0, -1, 0],
    "negative tensor": torch.tensor([0, -1, 0]),
    "out of range": [0, 2, 1],
    "out of range tensor": torch.tensor([0, 5, 1]),
    "huge": [0, 10 ** 30, 1],
    "unknown name": ["a", "zzz", "b"],
    "unknown name scalar": "zzz",
    "not a set of names": ["a", "ab", "b"],
    "nested lists": [[0], [1], [0]],
    "2-d tensor": torch.tensor([[0, 1, 0]]),
    "0-d tensor": torch.tensor(1),
    "too few": [0, 1],
    "too many tensor": torch.tensor([0, 1, 0, 1]),
    "none inside": [0, None, 1],
    "a set": {0, 1},
    "a dict": {"a": 0},
    "float numpy": np.array([0.5, 1.0, 0.0]),
    "bytes": [b"a", b"b", b"a"],
}


@pytest.fixture(scope="module")
def routed() -> ModularModel:
    """One Poly model for the corpus: a refused call changes nothing, so the cases can share it."""
    return poly_model()


@pytest.fixture(scope="module")
def selecting() -> ModularModel:
    return plain_sets()


@pytest.mark.parametrize("case", BAD_TASK_IDS)
def test_bad_task_ids_are_refused_by_name_never_truncated(routed, case):
    with pytest.raises(PeltError) as raised:  # any other exception type fails the test
        logits(routed, tiny.batch("bert"), task_ids=BAD_TASK_IDS[case])
    assert isinstance(raised.value, RoutingError) and "\n" not in str(raised.value)


def test_task_ids_for_part_of_the_batch_are_refused_not_repeated(routed):
    with pytest.raises(RoutingError, match="one per example"):
        logits(routed, tiny.batch("bert", b=4), task_ids=["a", "b"])  # would run as a, a, b, b


def test_integer_ids_of_every_accepted_form_equal_the_names(routed):
    inputs = tiny.batch("bert")
    want = logits(routed, inputs, task_ids=["a", "b", "a"])
    for given in ([0, 1, 0], (0, 1, 0), torch.tensor([0, 1, 0]), torch.tensor([0, 1, 0], dtype=torch.int32),
                  np.array([0, 1, 0]), [np.int64(0), 1, "a"]):
        torch.testing.assert_close(logits(routed, inputs, task_ids=given), want, rtol=0, atol=0)


BAD_ADAPTER_NAMES = {
    "fraction": ["a", 1.9, "b"],
    "bool": [True, 0, 1],
    "float tensor": torch.tensor([0.0, 1.0, 2.0]),
    "bool tensor": torch.tensor([True, False, True]),
    "past the base": torch.tensor([0, 4, 1]),  # a, b, c, then __base__ at 3
    "negative tensor": torch.tensor([-1, 0, 0]),
    "negative": [0, -1, 0],
    "unknown name": ["a", "nope", "b"],
    "nested": [["a"], "b", "a"],
    "too few": ["a", "b"],
    "float scalar": 1.5,
    "nan tensor": torch.tensor([0.0, float("nan"), 1.0]),
}


@pytest.mark.parametrize("case", BAD_ADAPTER_NAMES)
def test_bad_adapter_names_are_refused_by_name_never_truncated(selecting, case):
    with pytest.raises(PeltError) as raised:
        logits(selecting, tiny.batch("bert"), adapter_names=BAD_ADAPTER_NAMES[case])
    assert isinstance(raised.value, RoutingError)


def test_adapter_names_as_indices_equal_the_names(selecting):
    inputs = tiny.batch("bert")
    want = logits(selecting, inputs, adapter_names=["c", "__base__", "a"])
    for given in (torch.tensor([2, 3, 0]), [2, 3, 0], ["c", 3, 0]):
        torch.testing.assert_close(logits(selecting, inputs, adapter_names=given), want, rtol=0, atol=0)


@pytest.mark.parametrize("task", [1.9, 1.0, True, -1, 2, "zz", None, [0]])
def test_one_task_by_index_is_an_integer_in_range(routed, task):
    per_task = per_task_module(ph.compose(tiny.bert(), ph.PerTask(ph.LoRA(r=2), tasks=TASKS)))
    poly = poly_module(routed)
    for pick in (per_task.task, poly.task_index):
        with pytest.raises(RoutingError, match="task"):
            pick(task)
    assert per_task.task(1) is per_task.task("b") and poly.task_index(1) == poly.task_index("b") == 1


def test_training_helpers_refuse_ids_that_are_not_integers():
    model = ph.compose(tiny.bert(), ph.PerTask(ph.LoRA(r=2), tasks=TASKS))
    losses = torch.tensor([1.0, 2.0, 4.0])
    assert float(sum_of_task_means(losses, torch.tensor([0, 1, 1]))) == 1.0 + 3.0
    for bad in (torch.tensor([0.0, 1.9, 1.0]), torch.tensor([0, -1, 1]), torch.tensor([0, 1])):
        with pytest.raises(RoutingError):
            sum_of_task_means(losses, bad)
    for bad in (torch.tensor([0.5]), torch.tensor([True]), torch.tensor([2])):
        with pytest.raises(RoutingError):
            drop_absent_grads(model, bad)
