"""Poly / MHR routing: the identities of ALGORITHMS.md §1, variants, export, PEFT interop, DDP."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pelthub as ph
from pelthub.errors import ConfigError, DuplicateNameError, RoutingError
from pelthub.hub.peft_poly import from_peft_state_dict, to_peft_config, to_peft_state_dict
from pelthub.modules.config import config_from_dict
from pelthub.routing import (add_task, export_task_lora, plot_routing, poly_module,
                             task_lora_state)
from pelthub.routing.poly import PolyLinear
from pelthub.training import param_groups
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("a", "b", "c")


def composed(arch="bert", seed=0, **kw):
    """An eval-mode Poly model with B moved off zero (so every path is visible in the outputs)."""
    kw = {"tasks": TASKS, "skills": 3, "rank": 2, "alpha": 1.0, **kw}  # mttl scale: keeps the outputs small
    model = ph.compose(tiny.BUILDERS[arch](), ph.Poly(**kw)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in poly_module(model).layers.values():
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.3)
        for z in poly_module(model).router.values():
            z.copy_(torch.randn(z.shape, generator=g))
    return model


def logits(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).logits


def lora_model(base, r, alpha, seed):
    model = ph.attach(base, ph.LoRA(r=r, alpha=alpha)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.module_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("bad, field", [
    ({"tasks": ()}, "tasks"), ({"tasks": ("a", "a")}, "tasks"), ({"skills": 0}, "skills"),
    ({"rank": -1}, "rank"), ({"heads": 0}, "heads"), ({"granularity": "head"}, "granularity"),
    ({"variant": "soft"}, "variant"), ({"alpha": 0}, "alpha"), ({"dropout": 1.0}, "dropout"),
    ({"variant": "hard", "skills": 2}, "skills"),
])
def test_config_validation_names_the_field(bad, field):
    with pytest.raises(ConfigError, match=f"Poly.{field}"):
        ph.Poly(**{"tasks": TASKS, **bad})


def test_config_round_trips_and_counts_tasks():
    cfg = ph.Poly(tasks=["x", "y"], skills=2, heads=2, targets=["q"], variant="mu")
    assert config_from_dict(cfg.to_dict()) == cfg
    assert ph.Poly(tasks=3).tasks == ("0", "1", "2")


def test_heads_must_divide_every_target():
    with pytest.raises(ConfigError, match="heads=3 must divide.*Heads that fit"):
        ph.compose(tiny.bert(), ph.Poly(tasks=TASKS, heads=3))


# ------------------------------------------------------------------ identities (ALGORITHMS.md §1)
def test_fresh_poly_equals_base_in_train_and_eval():
    inputs = tiny.batch("bert")
    expected = logits(tiny.bert(), inputs)
    model = ph.compose(tiny.bert(), ph.Poly(tasks=TASKS, skills=3, rank=2, heads=2)).eval()
    poly_module(model).train()  # sampled routing, B = 0 still adds nothing
    assert torch.equal(logits(model, inputs, task_ids=["a", "b", "c"]), expected)


@pytest.mark.parametrize("train", [False, True])
def test_one_skill_one_head_equals_lora(train):
    inputs = tiny.batch("bert")
    model = composed(tasks=("a",), skills=1, rank=4)
    lora = ph.attach(tiny.bert(), ph.LoRA(r=4, alpha=1.0)).eval()
    with torch.no_grad():
        for key, layer in poly_module(model).layers.items():
            target = lora.adapters["default"]["lora"].layers[key]
            target.lora_a.copy_(layer.lora_a[0, 0].T)
            target.lora_b.copy_(layer.lora_b[0, 0].T)
    poly_module(model).train(train)
    torch.testing.assert_close(logits(model, inputs), logits(lora, inputs), rtol=0, atol=1e-5)


def test_identical_head_rows_equal_one_head():
    inputs, ids = tiny.batch("bert"), ["c", "a", "b"]
    mhr = composed(heads=2)
    poly = composed(heads=1)
    with torch.no_grad():
        m, p = poly_module(mhr), poly_module(poly)
        for key, layer in m.layers.items():
            p.layers[key].lora_a.copy_(torch.cat(list(layer.lora_a), dim=1)[None])  # heads along in
            p.layers[key].lora_b.copy_(torch.cat(list(layer.lora_b), dim=2)[None])  # heads along out
            z = p.router[key]
            m.router[key].copy_(torch.cat([z, z], dim=1))  # the same row for both heads
    torch.testing.assert_close(logits(mhr, inputs, task_ids=ids), logits(poly, inputs, task_ids=ids),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("heads", [1, 4])
def test_explicit_delta_w_equals_batched_path(heads):
    torch.manual_seed(0)
    layer = PolyLinear(16, 24, skills=3, rank=2, heads=heads, scale=0.5)
    torch.nn.init.normal_(layer.lora_b)
    x, w = torch.randn(5, 7, 16), torch.rand(5, heads, 3)
    w = w / w.sum(-1, keepdim=True)
    batched = layer(x, *layer.mixed(w))
    for b in range(5):
        a_bar = torch.cat([sum(w[b, q, k] * layer.lora_a[q, k] for k in range(3)) for q in range(heads)], 0)
        b_bar = torch.cat([sum(w[b, q, k] * layer.lora_b[q, k] for k in range(3)) for q in range(heads)], 1)
        delta_w = a_bar @ b_bar * 0.5  # (in, out): ΔW_b = (Σ w A)(Σ w B), not Σ w (A B)
        torch.testing.assert_close(batched[b], x[b] @ delta_w, rtol=0, atol=1e-5)


def test_uniform_equals_collapsed_lora_and_zero_logits():
    inputs, ids = tiny.batch("bert"), ["a", "b", "c"]
    mu = composed(heads=2, variant="mu")
    assert not list(poly_module(mu).router)
    poly = composed(heads=2)
    lora = ph.attach(tiny.bert(), ph.LoRA(r=2, alpha=1.0)).eval()
    with torch.no_grad():
        for key, layer in poly_module(mu).layers.items():
            poly_module(poly).layers[key].load_state_dict(layer.state_dict())
            poly_module(poly).router[key].zero_()  # σ(0) for every skill: weights 1/K
            target = lora.adapters["default"]["lora"].layers[key]
            target.lora_a.copy_(layer.lora_a.mean(1).reshape(-1, 2).T)
            target.lora_b.copy_(layer.lora_b.mean(1).transpose(0, 1).reshape(2, -1).T)
    expected = logits(lora, inputs)
    torch.testing.assert_close(logits(mu, inputs, task_ids=ids), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(poly, inputs, task_ids=ids), expected, rtol=0, atol=1e-5)


def test_weights_sum_to_one_in_eval_and_training():
    module = poly_module(composed(heads=2))
    for w in module.routing_weights().values():
        assert w.shape == (3, 2, 3)
        torch.testing.assert_close(w.sum(-1), torch.ones(3, 2))
    ids = torch.tensor([0, 1, 2, 2])
    sampled = module.weights(next(iter(module.router)), ids, sample=True)
    torch.testing.assert_close(sampled.sum(-1), torch.ones(4, 2))
    assert sampled.dtype == torch.float32


def test_add_task_starts_uniform_and_keeps_task_names_in_sync(tmp_path):
    model = composed(skills=4)
    add_task(model, "d")
    assert model.task_names == ["a", "b", "c", "d"]
    for w in poly_module(model).routing_weights().values():
        torch.testing.assert_close(w[3], torch.full((1, 4), 0.25), rtol=0, atol=1e-3)
    inputs = tiny.batch("bert")
    out = logits(model, inputs, task_ids=["d", "a", "d"])
    model.save_pretrained(tmp_path)
    loaded = ph.from_pretrained(tiny.bert(), tmp_path).eval()
    assert loaded.task_names == ["a", "b", "c", "d"]
    torch.testing.assert_close(logits(loaded, inputs, task_ids=["d", "a", "d"]), out, rtol=0, atol=0)
    with pytest.raises(DuplicateNameError):
        add_task(model, "a")


def test_add_task_init_from_task_and_routing_only_tuning():
    model = composed()
    module = add_task(model, "a2", init="a", tune="routing")
    for z in module.router.values():
        assert torch.equal(z[3], z[0]) and z.requires_grad
    assert module.config.variant == "z"
    assert not any(p.requires_grad for p in module.layers.parameters())
    inputs = tiny.batch("bert")
    torch.testing.assert_close(logits(model, inputs, task_ids=["a2"] * 3), logits(model, inputs, task_ids=["a"] * 3))


def test_few_shot_on_a_new_task_moves_its_row_and_the_skills_only():
    model = composed()
    module = add_task(model, "new")  # tune="all": skills and routing
    model.train()
    rows = {g: z[:3].clone() for g, z in module.router.items()}
    new_rows = {g: z[3].clone() for g, z in module.router.items()}
    b_before = next(iter(module.layers.values())).lora_b.clone()
    optimizer = torch.optim.AdamW(param_groups(model, 1e-2, lr_routing=0.1))
    inputs, labels = tiny.batch("bert"), torch.tensor([0, 1, 1])
    for _ in range(3):
        model(**inputs, task_ids=["new"] * 3, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for g, z in module.router.items():
        assert torch.equal(z[:3], rows[g]) and not torch.equal(z[3], new_rows[g])
    assert not torch.equal(next(iter(module.layers.values())).lora_b, b_before)


# ------------------------------------------------------------------ training
def test_gradients_reach_routing_after_the_first_step():
    model = ph.compose(tiny.bert(), ph.Poly(tasks=TASKS, skills=3, rank=2, heads=2)).train()
    module = poly_module(model)
    optimizer = torch.optim.SGD(param_groups(model, 0.1, lr_routing=0.1))
    inputs, labels = tiny.batch("bert"), torch.tensor([0, 1, 1])
    model(**inputs, task_ids=[0, 1, 2], labels=labels).loss.backward()
    z = next(iter(module.router.values()))
    layer = next(iter(module.layers.values()))
    assert torch.count_nonzero(z.grad) == 0 and torch.count_nonzero(layer.lora_a.grad) == 0  # B = 0 at step 0
    assert torch.count_nonzero(layer.lora_b.grad) > 0
    optimizer.step()
    optimizer.zero_grad()
    model(**inputs, task_ids=[0, 1, 2], labels=labels).loss.backward()
    assert all(torch.count_nonzero(z.grad) > 0 for z in module.router.values())
    assert torch.count_nonzero(layer.lora_a.grad) > 0


def test_eval_is_deterministic_and_training_samples():
    model, inputs, ids = composed(), tiny.batch("bert"), ["a", "b", "c"]
    assert torch.equal(logits(model, inputs, task_ids=ids), logits(model, inputs, task_ids=ids))
    poly_module(model).train()
    assert not torch.equal(logits(model, inputs, task_ids=ids), logits(model, inputs, task_ids=ids))


def test_param_groups_split_routing_logits():
    model = composed()
    groups = param_groups(model, 1e-3, lr_routing=0.1, weight_decay=0.01)
    routing = {id(p) for p in poly_module(model).router.values()}
    assert [g["lr"] for g in groups] == [1e-3, 0.1]
    assert {id(p) for p in groups[1]["params"]} == routing and groups[1]["weight_decay"] == 0.0
    assert not routing & {id(p) for p in groups[0]["params"]}
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------ routing per example
@pytest.mark.parametrize("arch", ["bert", "gpt2", "t5", "llama"])
def test_mixed_batch_equals_each_example_alone(arch):
    model, inputs = composed(arch, heads=2), tiny.batch(arch)
    mixed = logits(model, inputs, task_ids=["c", "a", "b"])
    for i, task in enumerate(["c", "a", "b"]):
        alone = logits(model, {k: v[i:i + 1] for k, v in inputs.items()}, task_ids=task)
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model, inputs, task_ids=[2, 0, 1]), mixed, rtol=0, atol=0)


def test_task_ids_are_required_beyond_one_task():
    with pytest.raises(RoutingError, match="task_ids"):
        logits(composed(), tiny.batch("bert"))
    single = composed(tasks=("only",))
    torch.testing.assert_close(logits(single, tiny.batch("bert")), logits(single, tiny.batch("bert"), task_ids="only"))


@pytest.mark.parametrize("granularity, count", [("layer", 4), ("block", 2), ("model", 1)])
def test_granularity_shares_routing(granularity, count):
    model = composed(granularity=granularity)
    module = poly_module(model)
    assert len(module.router) == count and len(module.layers) == 4
    logits(model, tiny.batch("bert"), task_ids=["a", "b", "c"])


def test_generation_repeats_task_ids_per_beam():
    model, ids = composed("llama"), torch.randint(3, tiny.VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    batched = model.generate(ids, task_ids=["b", "c"], max_new_tokens=3, do_sample=False)
    for i, task in enumerate(["b", "c"]):
        alone = model.generate(ids[i:i + 1], task_ids=[task], max_new_tokens=3, do_sample=False)
        assert torch.equal(batched[i:i + 1], alone)
    beams = model.generate(ids, task_ids=["b", "c"], max_new_tokens=3, num_beams=2, do_sample=False)
    assert beams.shape == (2, 8)


# ------------------------------------------------------------------ inventory and hard routing
def test_from_modules_hard_routing_serves_each_task_its_lora(tmp_path):
    inputs = tiny.batch("bert")
    loras = [lora_model(tiny.bert(), r, alpha, seed) for seed, (r, alpha) in enumerate([(2, 4.0), (4, 8.0), (3, 1.0)])]
    cfg = ph.Poly.from_modules([loras[0], loras[1], loras[2].adapters["default"]["lora"]], tasks=["x", "y", "z"])
    assert (cfg.variant, cfg.skills, cfg.rank) == ("hard", 3, 4)
    model = ph.compose(tiny.bert(), cfg).eval()
    routed = logits(model, inputs, task_ids=["y", "z", "x"])
    for i, j in enumerate([1, 2, 0]):
        torch.testing.assert_close(routed[i], logits(loras[j], inputs)[i], rtol=0, atol=1e-5)
    assert not list(poly_module(model).router)
    model.save_pretrained(tmp_path)
    loaded = ph.from_pretrained(tiny.bert(), tmp_path).eval()
    assert torch.equal(logits(loaded, inputs, task_ids=["y", "z", "x"]), routed)


def test_from_modules_resolves_registry_refs_and_unhooks_the_base():
    class FakeRegistry:
        def __init__(self):
            self.sources = {f"task-{i}": lora_model(tiny.bert(), 2, 2.0, i) for i in range(2)}

        def load(self, ref, base, heads=True):
            loaded = ph.attach(base, ph.LoRA(r=2, alpha=2.0), name="loaded")
            loaded.adapters["loaded"].load_state_dict(self.sources[ref].adapters["default"].state_dict())
            return loaded

    registry, base, inputs = FakeRegistry(), tiny.bert(), tiny.batch("bert")
    before = logits(base, inputs)
    cfg = ph.Poly.from_modules(["task-0", "task-1"], registry=registry, base=base)
    assert cfg.tasks == ("task-0", "task-1")
    assert torch.equal(logits(base, inputs), before)  # the loaded copies left no hooks behind
    model = ph.compose(base, cfg).eval()
    torch.testing.assert_close(logits(model, inputs, task_ids=["task-1"] * 3),
                               logits(registry.sources["task-1"], inputs), rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="registry="):
        ph.Poly.from_modules(["task-0"])


def test_routing_only_over_an_inventory_trains_only_the_router():
    loras = [lora_model(tiny.bert(), 2, 2.0, seed) for seed in range(3)]
    cfg = ph.Poly.from_modules(loras, tasks=["new1", "new2"], variant="z")
    model = ph.compose(tiny.bert(), cfg).train()
    module = poly_module(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("router" in n for n in trainable)
    before = {k: layer.lora_b.clone() for k, layer in module.layers.items()}
    z_before = [z.clone() for z in module.router.values()]
    optimizer = torch.optim.AdamW(param_groups(model, 1e-3, lr_routing=0.1))
    model(**tiny.batch("bert"), task_ids=["new1", "new2", "new1"], labels=torch.tensor([0, 1, 0])).loss.backward()
    optimizer.step()
    assert all(torch.equal(layer.lora_b, before[k]) for k, layer in module.layers.items())
    assert any(not torch.equal(z, z0) for z, z0 in zip(module.router.values(), z_before))


# ------------------------------------------------------------------ export
@pytest.mark.parametrize("arch, heads, variant", [("bert", 1, "poly"), ("bert", 4, "poly"), ("gpt2", 2, "poly"),
                                                  ("bert", 2, "mu"), ("t5", 2, "poly")])
def test_exported_task_lora_reproduces_the_routed_model(arch, heads, variant):
    model, inputs = composed(arch, heads=heads, variant=variant), tiny.batch(arch)
    for task in TASKS:
        exported = export_task_lora(model, task)
        assert list(exported.adapters) == [task] and exported.base is not model.base
        torch.testing.assert_close(logits(exported.eval(), inputs), logits(model, inputs, task_ids=[task] * 3),
                                   rtol=0, atol=1e-5)


def test_export_carries_the_trained_head_and_loads_into_peft_lora():
    from peft import LoraConfig, get_peft_model
    model = ph.compose(tiny.bert(), ph.Poly(tasks=TASKS, skills=3, rank=2, heads=2), head=True).eval()
    with torch.no_grad():
        for p in poly_module(model).parameters():
            p.normal_()
        model.heads["composed"]["classifier"].weight.mul_(3.0)
    inputs = tiny.batch("bert")
    exported = export_task_lora(model, "b", base=tiny.bert()).eval()
    expected = logits(model, inputs, task_ids=["b"] * 3)
    torch.testing.assert_close(logits(exported, inputs), expected, rtol=0, atol=1e-5)

    config, weights = task_lora_state(model, "b")
    peft = get_peft_model(tiny.bert(), LoraConfig(r=config.r, lora_alpha=config.alpha, target_modules=list(weights)))
    with torch.no_grad():
        for site, (a, b) in weights.items():
            layer = peft.base_model.model.get_submodule(site)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
        peft.base_model.model.classifier.load_state_dict(model.heads["composed"]["classifier"].state_dict())
    torch.testing.assert_close(logits(peft.eval(), inputs), expected, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="base"):
        export_task_lora(model, "b", base=model.base)


# ------------------------------------------------------------------ PEFT interop
def peft_poly(pelthub_model):
    """PEFT's PolyModel (`peft_model.base_model`, whose forward takes task_ids) with the same weights."""
    from peft import get_peft_model, set_peft_model_state_dict
    peft = get_peft_model(tiny.bert(), to_peft_config(pelthub_model))
    result = set_peft_model_state_dict(peft, to_peft_state_dict(pelthub_model))
    assert not result.unexpected_keys
    return peft.eval()


@pytest.mark.parametrize("kw", [{"heads": 1}, {"heads": 4, "alpha": 2.0}, {"heads": 2, "granularity": "block"},
                                {"heads": 2, "variant": "mu"}])
def test_peft_poly_gives_the_same_eval_outputs(kw):
    model, inputs = composed(**kw), tiny.batch("bert")
    peft = peft_poly(model)
    ids = torch.tensor([2, 0, 1])
    torch.testing.assert_close(logits(peft.base_model, inputs, task_ids=ids), logits(model, inputs, task_ids=ids),
                               rtol=0, atol=1e-5)


def test_peft_poly_matches_hard_routing_and_converts_back():
    loras = [lora_model(tiny.bert(), 2, 4.0, seed) for seed in range(3)]
    model = ph.compose(tiny.bert(), ph.Poly.from_modules(loras, tasks=TASKS)).eval()
    inputs, ids = tiny.batch("bert"), torch.tensor([1, 2, 0])
    expected = logits(model, inputs, task_ids=ids)
    peft = peft_poly(model)
    torch.testing.assert_close(logits(peft.base_model, inputs, task_ids=ids), expected, rtol=0, atol=1e-5)

    from peft import get_peft_model_state_dict
    cfg, state = from_peft_state_dict(get_peft_model_state_dict(peft), peft.peft_config["default"], tasks=TASKS)
    back = ph.compose(tiny.bert(), cfg).eval()
    poly_module(back).load_state_dict(state)
    torch.testing.assert_close(logits(back, inputs, task_ids=ids), expected, rtol=0, atol=1e-5)


def test_peft_export_refuses_conv1d():
    with pytest.raises(ConfigError, match="nn.Linear"):
        to_peft_config(composed("gpt2"))


# ------------------------------------------------------------------ inspection
def test_routing_weights_per_layer_and_heatmap():
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    model = composed(heads=2)
    weights = poly_module(model).routing_weights()
    assert set(weights) == {k.replace("-", ".") for k in poly_module(model).layers}
    fig = plot_routing(model)
    assert fig.axes[0].get_title() == "mean over 4 layers"
    fig = plot_routing(model, layer=0)
    assert fig.axes[0].get_images()[0].get_array().shape == (3, 6)


def test_hard_routing_weights_are_one_hot():
    loras = [lora_model(tiny.bert(), 2, 2.0, seed) for seed in range(3)]
    model = ph.compose(tiny.bert(), ph.Poly.from_modules(loras, tasks=TASKS))
    for w in poly_module(model).routing_weights().values():
        assert torch.equal(w[:, 0], torch.eye(3))
    with pytest.raises(RoutingError, match="from_modules"):
        add_task(model, "d")


# ------------------------------------------------------------------ distributed
@pytest.mark.slow
def test_ddp_two_ranks_keep_identical_parameters_and_the_loss_falls():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "poly_ddp.py"), "--steps", "30"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "max param spread 0.00e+00" in done.stdout and "ok" in done.stdout.splitlines()
