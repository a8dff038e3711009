"""torch.compile: compiled outputs equal eager ones, and fixed shapes do not recompile on every call.

A counting backend (public `torch.compile(backend=...)` API) records each graph dynamo
hands over and runs it as is: fast, and it shows recompiles directly. The routed methods
(Poly, UniPELT, ATTEMPT, Arrow, PerTask) compile to one graph per forward in inference and
training, threads keep their own task ids, and `ph.hotswap` reaches a compiled model.
"""
import threading

import pytest
import torch

import pelthub as ph
from tests import tiny
from tests.security.test_threads import switch_often  # noqa: F401  (pytest fixture: threads switch every few bytecodes)
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


# ----- routed methods: one graph per forward, tensors for task ids, thread-safe, hotswap -----

D = 32  # width of the tiny models


def lora_sources(base=tiny.bert, scale=0.3):
    """Three LoRAs on q, v moved off their init, for Arrow."""
    out = []
    for i in range(3):
        source = ph.attach(base(), ph.LoRA(r=2 + i, targets=("q", "v")))
        perturb(source, seed=i, scale=scale)
        out.append(source)
    return out


def routed(kind, base=None, width=D):
    """A model over `base` (tiny BERT) with one routed method over tasks a, b; its tensors moved off their init."""
    g = torch.Generator().manual_seed(0)
    configs = {
        "poly": lambda: ph.Poly(tasks=("a", "b"), skills=2, rank=2),
        "unipelt": lambda: ph.UniPELT(lora=ph.LoRA(r=2), adapter=ph.Bottleneck(reduction=4)),
        "attempt": lambda: ph.AttentionMix({f"s{i}": torch.randn(3, width, generator=g) for i in range(2)},
                                           target=ph.Prompt(length=3), tasks=["a", "b"]),
        "arrow": lambda: ph.Arrow(lora_sources() if base is None else lora_sources(minilm, scale=0.05), top_k=2),
        "per_task": lambda: ph.PerTask((ph.LoRA(r=2), ph.IA3()), tasks=["a", "b"]),
    }
    model = ph.compose(tiny.bert() if base is None else base, configs[kind](), head=True)
    perturb(model, scale=0.3)
    return model


def minilm():
    """BERT with MiniLM-L6's sizes (hidden 384, 6 layers, 12 heads), built from a config: no download."""
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                                    intermediate_size=1536)).eval()


ROUTED = ("poly", "unipelt", "attempt", "arrow", "per_task")
IDS = [torch.tensor(t) for t in ([0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 1])]


def call(model, inputs, ids):
    return model(**inputs, task_ids=ids)


@pytest.mark.parametrize("kind", ROUTED)
def test_routed_methods_compile_to_one_graph_equal_eager_and_new_task_ids_compile_nothing(kind):
    torch._dynamo.reset()
    model, inputs = routed(kind).eval(), tiny.batch("bert")
    backend = Counting()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for i, ids in enumerate(IDS):
            torch.testing.assert_close(call(compiled, inputs, ids).logits, call(model, inputs, ids).logits,
                                       rtol=1e-5, atol=1e-5)
            if i == 0:
                assert backend.graphs == 1  # no graph break in any routed layer
    assert model.ctx._traced is None  # the state dynamo traced through is not left behind for later calls
    # task ids are graph inputs: new ones of the same shape compile nothing. UniPELT compiles once more on
    # its second call, where its `gate_values` record (a dict dynamo guards on) is no longer empty.
    assert backend.graphs == (2 if kind == "unipelt" else 1)


@pytest.mark.parametrize("kind", ROUTED)
def test_compiled_training_step_gives_eager_loss_and_gradients(kind):
    torch._dynamo.reset()
    model, inputs = routed(kind).train(), {**tiny.batch("bert"), "labels": torch.tensor([0, 1, 1])}
    backend = Counting()
    compiled = torch.compile(model, backend=backend)
    results = []
    for run in (model, compiled):
        model.zero_grad()
        torch.manual_seed(0)  # Poly samples its routing in training: the same draws in both runs
        loss = run(**inputs, task_ids=IDS[0]).loss
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.module_parameters() if p.grad is not None}))
    (eager_loss, eager_grads), (loss, grads) = results
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys() and len(grads) > 0
    for k in grads:
        torch.testing.assert_close(grads[k], eager_grads[k], rtol=1e-4, atol=1e-6)
    assert backend.graphs == 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ROUTED)
def test_minilm_geometry_routed_methods_compile_to_at_most_two_graphs(kind):
    """Six routed layers, more than dynamo's recompile limit of 8 sites: a per-layer break would show here."""
    torch._dynamo.reset()
    model = routed(kind, base=minilm(), width=384).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(1000, 30000, (4, 16), generator=g),
              "attention_mask": torch.ones(4, 16, dtype=torch.long)}
    backend = Counting()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for ids in (torch.tensor([0, 1, 0, 1]), torch.tensor([1, 1, 0, 0])):
            torch.testing.assert_close(call(compiled, inputs, ids).logits, call(model, inputs, ids).logits,
                                       rtol=1e-4, atol=1e-4)
    assert 1 <= backend.graphs <= 2


def test_threads_calling_one_compiled_model_get_what_each_gets_alone(switch_often):
    torch._dynamo.reset()
    model, inputs = routed("poly").eval(), tiny.batch("bert")
    compiled = torch.compile(model, backend=Counting())
    tasks = [torch.tensor([t] * 3) for t in (0, 1)]
    with torch.no_grad():
        alone = [model(**inputs, task_ids=ids).logits for ids in tasks]
        compiled(**inputs, task_ids=tasks[0])  # compile first: the threads then run the graph
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)  # the tasks differ, so a leak would show
    got, errors = {0: [], 1: []}, []

    def work(t):
        try:
            with torch.no_grad():
                for _ in range(20):
                    got[t].append(compiled(**inputs, task_ids=tasks[t]).logits)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(t,)) for t in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for t in (0, 1):
        for out in got[t]:
            torch.testing.assert_close(out, alone[t], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_graph_break_inside_the_base_falls_back_to_the_call_state_without_writing_it():
    """After a break dynamo resumes outside `CallContext.run`: hooks there read the ContextVar, and the
    state dynamo saw while tracing is never written where another thread's call would read it."""
    torch._dynamo.reset()
    model, inputs = routed("poly").eval(), tiny.batch("bert")
    seen = []

    @torch.compiler.disable
    def look(*_):
        seen.append(model.ctx._traced)
    model.base.bert.encoder.layer[0].register_forward_hook(look)  # a graph break inside the base
    compiled = torch.compile(model, backend=Counting())
    with torch.no_grad():
        for ids in IDS[:2]:
            torch.testing.assert_close(compiled(**inputs, task_ids=ids).logits, model(**inputs, task_ids=ids).logits,
                                       rtol=1e-5, atol=1e-5)
    assert seen and all(s is None for s in seen)


# ----- hotswap -----

def two_trained_poly():
    """A Poly model and a second set of weights for it (the same configs, other values)."""
    model, other = routed("poly").eval(), routed("poly").eval()
    perturb(other, seed=7, scale=0.5)
    return model, other


@pytest.mark.parametrize("source", ["tensors", "folder"])
def test_hotswap_into_a_compiled_model_runs_the_new_weights_without_recompiling(source, tmp_path):
    torch._dynamo.reset()
    model, other = two_trained_poly()
    inputs, ids = tiny.batch("bert"), IDS[0]
    with torch.no_grad():
        before, after = model(**inputs, task_ids=ids).logits, other(**inputs, task_ids=ids).logits
    assert not torch.allclose(before, after, atol=1e-3)  # the swap must show
    backend = Counting()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs, task_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
        graphs, params = backend.graphs, [id(p) for p in model.parameters()]
        if source == "folder":
            other.save_pretrained(str(tmp_path))
            ph.hotswap(model, "composed", tmp_path)
        else:
            ph.hotswap(model, "composed", other.state_dict())
        torch.testing.assert_close(compiled(**inputs, task_ids=ids).logits, after, rtol=1e-5, atol=1e-5)
    assert backend.graphs == graphs  # nothing recompiled
    assert [id(p) for p in model.parameters()] == params  # copied in place


def test_hotswap_refuses_what_does_not_fit_and_leaves_the_set_as_it_was(tmp_path):
    from pelthub.errors import IncompatibleModuleError, ModuleFormatError
    model, other = two_trained_poly()
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    new = other.state_dict()
    key = next(k for k in new if k.endswith("lora_a"))
    last = list(new)[-1]
    cases = [
        ({k: v for k, v in new.items() if k != key}, ModuleFormatError, "missing"),
        ({**new, "adapters.composed.poly.extra": new[key]}, ModuleFormatError, "unexpected"),
        ({**new, key: new[key][..., :1]}, ModuleFormatError, "shape"),
        ({**new, last: new[last].long()}, ModuleFormatError, "floating-point"),
        ({**new, last: new[last] * float("nan")}, ModuleFormatError, "NaN"),
    ]
    for given, error, words in cases:
        with pytest.raises(error, match=words):
            ph.hotswap(model, "composed", given)
    ph.attach(tiny.bert(), ph.Poly(tasks=("a", "b"), skills=3, rank=2), name="x").save_pretrained(str(tmp_path))
    with pytest.raises(IncompatibleModuleError, match="same configs"):
        ph.hotswap(model, "composed", tmp_path)
    with pytest.raises(KeyError, match="no module set 'nope'"):
        ph.hotswap(model, "nope", new)
    for k, v in model.state_dict().items():
        assert torch.equal(v, kept[k]), k
