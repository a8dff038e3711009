"""HyperPrompt and Hyperformer++ against references computed here (ALGORITHMS.md §7.5).

- HyperPrompt: P_K = ReLU(P_τ D_K) U_K with D, U = generators(MLP([k_τ; z_m])) written out per task and
  layer; the model's outputs equal the bare base run with those keys and values in a cache built here
  and the mask extended by hand. l = 0 is the base; "free" per-task prefixes are prefix tuning.
- Hyperformer: W_down, b_down, W_up, b_up = generators(LayerNorm(MLP([k_τ; z_m]))) written out per task
  and site, applied by hooks written here, one example at a time; a fresh module is the base.
- Both: a mixed-task batch equals each task run alone; a new task trains its own tensors only; registry
  round trip; merge and PEFT export refused with the reason.
"""
import copy
import inspect

import pytest
import torch
from torch import nn
from transformers import DynamicCache

import pelthub as ph
from pelthub.errors import ConfigError, RoutingError
from pelthub.hub.peft import export
from pelthub.modules.hypernet import add_task
from pelthub.routing.tasks import PerTask
from tests import tiny

run = tiny.run
TASKS = ["a", "b", "c"]
SMALL = dict(tasks=TASKS, embedding=5, hidden=6)


def _attached(config, arch="bert", seed=4, scale=0.3):
    base = tiny.BUILDERS[arch]()
    model = ph.attach(copy.deepcopy(base), config)
    tiny.perturb(model, seed=seed, scale=scale)
    return base, model, model.adapters["default"][config.kind]


def _mlp(module, x):
    """W₂ ReLU(W₁ x + b₁) + b₂ from the module's two linear layers."""
    first, second = module.mlp[0], module.mlp[2]
    return second.weight @ torch.relu(first.weight @ x + first.bias) + second.bias


# ----- HyperPrompt -----

def _prefix_by_hand(module, task, layer, heads, head_dim):
    """(key, value) of (heads, l, head_dim): ReLU(P_τ D) U for D, U generated from I = MLP([k_τ; z_m])."""
    row, c = module.rows[task], module.config
    i = _mlp(module, torch.cat([row["embedding"], module.layer_embeddings[layer]]))
    d_k, d_v = (module.down.weight @ i + module.down.bias).view(2, -1, c.bottleneck)   # vec(D_K); vec(D_V)
    u_k, u_v = (module.up.weight @ i + module.up.bias).view(2, c.bottleneck, -1)       # vec(U_K); vec(U_V)
    return tuple((torch.relu(row["prompt"] @ d) @ u).view(c.length, heads, head_dim).transpose(0, 1)
                 for d, u in ((d_k, u_k), (d_v, u_v)))


def _cache_keyword(base):
    params = inspect.signature(type(base.base_model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_hyperprompt_prefix_is_the_formula_and_acts_as_a_cache_built_by_hand(arch):
    """Llama has grouped-query attention: keys and values are 2 heads × 8, narrower than d = 32."""
    config = ph.HyperPrompt(length=3, bottleneck=4, **SMALL)
    base, model, module = _attached(config, arch)
    heads = base.config.num_key_value_heads if arch == "llama" else base.config.num_attention_heads
    head_dim = base.config.hidden_size // base.config.num_attention_heads
    inputs, task_ids = tiny.batch(arch, b=4), [2, 0, 2, 1]
    with model.bind(task_ids, batch=4), torch.no_grad():
        pairs = module.prefix(4, model.ctx)
    assert len(pairs) == base.config.num_hidden_layers
    expected = [[_prefix_by_hand(module, t, m, heads, head_dim) for t in task_ids] for m in range(len(pairs))]
    for (k, v), per_example in zip(pairs, expected):
        torch.testing.assert_close(k, torch.stack([e[0] for e in per_example]).detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, torch.stack([e[1] for e in per_example]).detach(), rtol=1e-5, atol=1e-5)
    cache = DynamicCache([(torch.stack([e[0] for e in ex]), torch.stack([e[1] for e in ex])) for ex in expected])
    mask = torch.cat([torch.ones(4, config.length, dtype=torch.long), inputs["attention_mask"]], 1)
    with torch.no_grad():
        by_hand = base(input_ids=inputs["input_ids"], attention_mask=mask, **{_cache_keyword(base): cache}).logits
    torch.testing.assert_close(run(model, inputs, task_ids=task_ids), by_hand, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "llama", "t5"])
def test_hyperprompt_of_length_zero_is_the_base(arch):
    base, model, _ = _attached(ph.HyperPrompt(length=0, **SMALL), arch)
    inputs = tiny.batch(arch)
    torch.testing.assert_close(run(model, inputs, task_ids=[0, 1, 2]), run(base, inputs), rtol=0, atol=0)


def test_free_hyperprompt_is_prefix_tuning_per_task():
    """variant="free": each task's own per-layer P_K, P_V, as `Prefix(hidden=None)` holding the same values."""
    base, model, module = _attached(ph.HyperPrompt(length=3, variant="free", tasks=TASKS))
    inputs, task_ids = tiny.batch("bert", b=4), [1, 0, 2, 1]
    mixed = run(model, inputs, task_ids=task_ids)
    for t in range(len(TASKS)):
        prefix = ph.attach(copy.deepcopy(base), ph.Prefix(length=3, hidden=None))
        prefix.adapters["default"]["prefix"].values.data.copy_(module.rows[t]["kv"])
        alone = run(prefix, inputs)
        for i in (i for i, task in enumerate(task_ids) if task == t):
            torch.testing.assert_close(mixed[i], alone[i], rtol=1e-5, atol=1e-6)


# ----- Hyperformer -----

BERT_SITES = {  # (input, output) sites per placement on the tiny two-layer BERT, in layer order
    "houlsby": [(s, s) for i in range(2) for s in (f"bert.encoder.layer.{i}.attention.output.dense",
                                                      f"bert.encoder.layer.{i}.output.dense")],
    "parallel": [(f"bert.encoder.layer.{i}.intermediate", f"bert.encoder.layer.{i}.output.dense")
                 for i in range(2)],
}


def _adapter_by_hand(module, task, site):
    """W_down, b_down, W_up, b_up of one task at one site, from I = LayerNorm(MLP([k_τ; z_m]))."""
    d, b = module.d, module.b
    i = _mlp(module, torch.cat([module.rows[task]["embedding"], module.site_embeddings[site]]))
    i = nn.functional.layer_norm(i, (i.shape[0],), module.norm.weight, module.norm.bias, module.norm.eps)
    down, up = module.down.weight @ i + module.down.bias, module.up.weight @ i + module.up.bias
    return down[:b * d].view(b, d), down[b * d:], up[:d * b].view(d, b), up[d * b:]


def _hooked_by_hand(base, module, task_ids, placement):
    """A copy of the base with each example's task's adapter added at each site, one example at a time."""
    hooked = copy.deepcopy(base)
    for m, (src, dst) in enumerate(BERT_SITES[placement]):
        weights = [_adapter_by_hand(module, t, m) for t in task_ids]
        held = {}

        def keep(_mod, args, held=held):
            held["x"] = args[0]

        def add(_mod, _args, out, weights=weights, held=held):
            x = held.pop("x") if held else out
            return out + torch.stack([wu @ torch.relu(wd @ x[i].T + bd[:, None]) + bu[:, None]
                                      for i, (wd, bd, wu, bu) in enumerate(weights)]).transpose(1, 2)
        if src != dst:
            hooked.get_submodule(src).register_forward_pre_hook(keep)
        hooked.get_submodule(dst).register_forward_hook(add)
    return hooked


@pytest.mark.parametrize("placement", ["houlsby", "parallel"])
def test_hyperformer_is_the_generated_adapter_by_hand(placement):
    base, model, module = _attached(ph.Hyperformer(placement=placement, reduction=4, **SMALL))
    assert module.pairs == BERT_SITES[placement]
    inputs, task_ids = tiny.batch("bert", b=4), [2, 0, 2, 1]
    with torch.no_grad():
        expected = run(_hooked_by_hand(base, module, task_ids, placement), inputs)
    torch.testing.assert_close(run(model, inputs, task_ids=task_ids), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected, run(base, inputs), atol=1e-3)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "t5"])
@pytest.mark.parametrize("placement", ["houlsby", "parallel"])
def test_fresh_hyperformer_is_the_base(arch, placement):
    """The up-generator starts at zero: every generated W_up and b_up is zero, whatever the task."""
    base, inputs = tiny.BUILDERS[arch](), tiny.batch(arch)
    model = ph.attach(copy.deepcopy(base), ph.Hyperformer(placement=placement, reduction=4, **SMALL))
    torch.testing.assert_close(run(model, inputs, task_ids=[0, 1, 2]), run(base, inputs), rtol=0, atol=0)


# ----- both -----

KINDS = {"hyperprompt": ph.HyperPrompt(length=3, bottleneck=4, **SMALL),
         "hyperprompt-free": ph.HyperPrompt(length=3, variant="free", tasks=TASKS),
         "hyperformer": ph.Hyperformer(reduction=4, **SMALL)}


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_task_batch_equals_each_task_alone(kind):
    _, model, _ = _attached(KINDS[kind])
    inputs, task_ids = tiny.batch("bert", b=5), ["c", "a", "b", "c", "a"]
    mixed = run(model, inputs, task_ids=task_ids)
    for name in TASKS:
        alone = run(model, inputs, task_ids=[name] * 5)
        for i in (i for i, task in enumerate(task_ids) if task == name):
            torch.testing.assert_close(mixed[i], alone[i], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(run(model, inputs, task_ids=["a"] * 5), run(model, inputs, task_ids=["b"] * 5))


@pytest.mark.parametrize("kind", KINDS)
def test_generate_runs_each_input_under_its_own_task(kind):
    """Beam search widens the batch to inputs × beams; each beam keeps its input's task."""
    _, model, _ = _attached(KINDS[kind], "gpt2", scale=0.05)
    ids = tiny.batch("gpt2", b=3, n=5)["input_ids"]
    settings = dict(max_new_tokens=4, min_new_tokens=4, num_beams=2, do_sample=False)
    mixed = model.generate(ids, task_ids=["b", "c", "a"], **settings)
    for i, name in enumerate(["b", "c", "a"]):
        assert torch.equal(mixed[i], model.generate(ids, task_ids=[name] * 3, **settings)[i])
    assert not torch.equal(model.generate(ids, task_ids=["a"] * 3, **settings),
                           model.generate(ids, task_ids=["b"] * 3, **settings))


@pytest.mark.parametrize("kind", KINDS)
def test_new_task_trains_its_own_tensors_only(kind):
    """add_task: the new row starts at the mean of the others; one AdamW step (weight decay on) moves it alone.

    (For "free" HyperPrompt the new task's row is its whole prefix: nothing is shared.)"""
    _, model, module = _attached(KINDS[kind])
    inputs = tiny.batch("bert", b=3)
    before = {name: run(model, inputs, task_ids=[name] * 3) for name in TASKS}
    params_before = {n: p.detach().clone() for n, p in module.named_parameters()}
    add_task(model, "d")
    assert model.task_names == [*TASKS, "d"] and module.config.tasks == (*TASKS, "d")
    new = dict(module.rows[3])
    for key, tensor in new.items():
        torch.testing.assert_close(tensor, torch.stack([module.rows[t][key] for t in range(3)]).mean(0))
    assert [id(p) for p in model.parameters() if p.requires_grad] == [id(p) for p in new.values()]
    start = {key: tensor.detach().clone() for key, tensor in new.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    model(**inputs, task_ids=["d"] * 3).logits.sum().backward()
    optimizer.step()
    for n, p in module.named_parameters():
        if n in params_before:
            torch.testing.assert_close(p, params_before[n], rtol=0, atol=0)
    assert all(not torch.equal(start[key], tensor) for key, tensor in new.items())
    for name in TASKS:
        torch.testing.assert_close(run(model, inputs, task_ids=[name] * 3), before[name], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="add_task needs a new, non-empty task name"):
        add_task(model, "a")


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_and_refusals(kind, tmp_path):
    base, model, _ = _attached(KINDS[kind])
    kind = KINDS[kind].kind
    add_task(model, "d")
    inputs, task_ids = tiny.batch("bert", b=4), ["d", "a", "c", "b"]
    reg = ph.Registry(tmp_path / "reg")
    loaded = reg.load(reg.add(model, name="m"), copy.deepcopy(base))
    assert loaded.task_names == [*TASKS, "d"]
    torch.testing.assert_close(run(loaded, inputs, task_ids=task_ids), run(model, inputs, task_ids=task_ids),
                               rtol=0, atol=0)
    with pytest.raises(ConfigError, match=f"PEFT has no format for pelthub's '{kind}'.*format='pelthub'"):
        export(model, tmp_path / "peft")
    reason = "prefix adds key/value positions" if kind == "hyperprompt" else "nonlinear function"
    with pytest.raises(ConfigError, match=f"{kind} modules cannot be merged into the base weights: .*{reason}"):
        model.merge_and_unload()
    torch.testing.assert_close(run(model, inputs, task_ids=task_ids), run(loaded, inputs, task_ids=task_ids),
                               rtol=0, atol=0)   # still attached
    with pytest.raises(RoutingError, match="task_ids=.*one task per example"):
        run(model, inputs)
    with pytest.raises(RoutingError, match=f"adapter_names selects among .* modules per example, not \\['{kind}'\\]"):
        run(model, inputs, adapter_names=["default"] * 4)
    with pytest.raises(ConfigError, match="PerTask.modules must be one config per kind"):
        PerTask(model.adapters["default"][kind].config, tasks=TASKS)


def test_hyperformer_under_checkpointing_gives_the_same_gradients():
    """The hooks read the task ids inside the layers: the recomputed forward must see the same call state."""
    _, model, _ = _attached(KINDS["hyperformer"])
    inputs, task_ids = tiny.batch("bert", b=4), ["c", "a", "c", "b"]
    model.train()

    def grads():
        torch.manual_seed(0)  # the same dropout draws in both runs
        model.zero_grad()
        model(**inputs, task_ids=task_ids).logits.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    want = grads()
    model.gradient_checkpointing_enable()
    got = grads()
    assert sorted(got) == sorted(want) and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ConfigError, match="HyperformerModule read per-call state"):
        model.gradient_checkpointing_enable({"use_reentrant": True})


@pytest.mark.parametrize("family", ["bart", "opt", "falcon", "qwen3"])
def test_other_families_serve_mixed_batches(family):
    """Encoder-decoder (BART: the decoder's self-attention gets the prefix), multi-query Falcon (one key/value
    head), Qwen3 (q/k norms): a mixed batch equals each task alone; a fresh Hyperformer is the base."""
    base, inputs = tiny.FAMILIES[family](), tiny.batch(family, b=3)
    expected_base = run(base, inputs)
    for config in (KINDS["hyperprompt"], KINDS["hyperformer"]):
        model = ph.attach(copy.deepcopy(base), config)
        if config.kind == "hyperformer":
            torch.testing.assert_close(run(model, inputs, task_ids=[0, 1, 2]), expected_base, rtol=0, atol=0)
        tiny.perturb(model, seed=2, scale=0.3)
        mixed = run(model, inputs, task_ids=[2, 0, 1])
        for i, t in enumerate([2, 0, 1]):
            torch.testing.assert_close(mixed[i], run(model, inputs, task_ids=[t] * 3)[i], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(mixed, expected_base, atol=1e-4)


def test_config_errors():
    with pytest.raises(ConfigError, match="HyperPrompt.length must be an integer from 0"):
        ph.HyperPrompt(tasks=2, length=-1)
    with pytest.raises(ConfigError, match="HyperPrompt.variant must be one of"):
        ph.HyperPrompt(tasks=2, variant="share")
    with pytest.raises(ConfigError, match="Hyperformer.tasks must be a non-empty list of distinct"):
        ph.Hyperformer(tasks=["a", "a"])
    with pytest.raises(ConfigError, match="Hyperformer.placement must be one of"):
        ph.Hyperformer(tasks=2, placement="after")
    with pytest.raises(ConfigError, match="Hyperformer.reduction=3 must divide the hidden size 32"):
        ph.attach(tiny.bert(), ph.Hyperformer(tasks=2, reduction=3))
    assert ph.modules.config_from_dict(KINDS["hyperformer"].to_dict()) == KINDS["hyperformer"]
