"""MAM, DSEE, KAdaptation and VPT against references computed here (ALGORITHMS.md §7.1, 7.2, 7.4, 7.9).

- MAM: the same outputs as Prefix + a parallel Bottleneck attached by hand with the same tensors.
- DSEE: W' = W + (α/r)(BA + S⊙M_Ω) written into a copy of the base; Ω = the N largest |W − SVD_r(W)|;
  N = 0 is LoRA; S stays on Ω under AdamW; pruning drops the ratio of smallest |W + ΔW|.
- KAdaptation: W + s·Σ A_i ⊗ u_i v_iᵀ (torch.kron here) and b written into a copy of the base.
- VPT: the ViT forward run layer by layer by hand, P_i put in place before layer i.
Each kind: bare base at init (bit-exact where the method is the identity), registry round trip,
PEFT export (KAdaptation: for n > 1; n = 1 exports as LoKr, tests/test_kadaptation_lokr.py) and per-task
batches refused with a message.
"""
import copy

import pytest
import torch
from torch import nn

import pelthub as ph
from pelthub.errors import ConfigError, UnsupportedModelError
from pelthub.hub.peft import export
from pelthub.routing.tasks import PerTask
from pelthub.sites import Sites
from tests import tiny, tiny_more

run = tiny.run


def _set_linear(model: nn.Module, name: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Write an nn.Linear-layout (out, in) weight (and a bias) into `name` of a plain model."""
    target = model.get_submodule(name)
    with torch.no_grad():
        (target.weight.T if type(target).__name__ == "Conv1D" else target.weight).copy_(weight)
        if bias is not None:
            target.bias.copy_(bias)


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    target = model.get_submodule(name)
    return (target.weight.T if type(target).__name__ == "Conv1D" else target.weight).detach().clone()


def _perturb(model, seed=0, scale=0.3):
    """tiny.perturb for the trained tensors; DSEE's support (positions, never trained) stays where it was."""
    frozen = {n: p.detach().clone() for n, p in model.module_parameters() if not p.requires_grad}
    tiny.perturb(model, seed=seed, scale=scale)
    with torch.no_grad():
        for n, p in model.module_parameters():
            if n in frozen:
                p.copy_(frozen[n])


def _refusals(model, kind_config, tmp_path):
    """PEFT has no format for the kind; PerTask serves no such kind per example."""
    with pytest.raises(ConfigError, match=f"PEFT has no format for pelthub's '{kind_config.kind}'.*format='pelthub'"):
        export(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    with pytest.raises(ConfigError, match="PerTask.modules must be one config per kind"):
        PerTask(kind_config, tasks=["a", "b"])


def _round_trip(model, base, inputs, tmp_path, out=run):
    reg = ph.Registry(tmp_path / "reg")
    ref = reg.add(model, name="m")
    loaded = reg.load(ref, base)
    torch.testing.assert_close(out(loaded, inputs), out(model, inputs), rtol=0, atol=0)


# ----- MAM -----

def test_mam_is_prefix_plus_scaled_parallel_adapter_attached_by_hand():
    base, inputs = tiny.bert(), tiny.batch("bert")
    mam = ph.attach(copy.deepcopy(base), ph.MAM())
    module = mam.adapters["default"]["mam"]
    assert module.prefix_part.config == ph.Prefix(length=30, hidden=800)
    by_hand = ph.attach(base, ph.Prefix(length=30, hidden=800),
                        ph.Bottleneck(placement="parallel", reduction=2, activation="relu", scale=4.0))
    parts = by_hand.adapters["default"]
    parts["prefix"].load_state_dict(module.prefix_part.state_dict())
    prefix_only = run(by_hand, inputs)   # the adapter's zero up-projection: only the prefix acts at init
    torch.testing.assert_close(run(mam, inputs), prefix_only, rtol=0, atol=0)
    _perturb(mam, seed=3)
    parts["prefix"].load_state_dict(module.prefix_part.state_dict())
    parts["bottleneck"].layers.load_state_dict(module.adapter.layers.state_dict())
    torch.testing.assert_close(run(mam, inputs), run(by_hand, inputs), rtol=0, atol=0)
    assert not torch.equal(run(mam, inputs), prefix_only)


def test_mam_parts_serve_a_mixed_task_batch_under_per_task():
    """PerTask takes MAM's two parts (not MAM itself): each example equals MAM with its task's tensors."""
    from pelthub.routing.tasks import per_task_module
    inputs = tiny.batch("bert", b=3)
    parts = (ph.Prefix(length=4, hidden=None), ph.Bottleneck(placement="parallel", reduction=2, scale=4.0))
    model = ph.compose(tiny.bert(), PerTask(parts, tasks=["a", "b"]))
    _perturb(model, seed=8)
    rows = per_task_module(model).tasks
    mixed = run(model, inputs, task_ids=[0, 1, 0])
    for t, row in enumerate(rows):
        mam = ph.attach(tiny.bert(), ph.MAM(prefix_length=4, prefix_hidden=None))
        module = mam.adapters["default"]["mam"]
        module.prefix_part.load_state_dict(row["prefix"].state_dict())
        module.adapter.layers.load_state_dict(row["bottleneck"].layers.state_dict())
        for i in (i for i, task in enumerate([0, 1, 0]) if task == t):
            torch.testing.assert_close(mixed[i], run(mam, inputs)[i], rtol=1e-5, atol=1e-6)


def test_mam_bottleneck_is_512_capped_at_half_the_hidden_size(tmp_path):
    assert (ph.MAM().width(1024), ph.MAM().width(768), ph.MAM().width(32)) == (512, 384, 16)
    base, inputs = tiny.bert(), tiny.batch("bert")
    model = ph.attach(base, ph.MAM(prefix_length=4, prefix_hidden=None))
    assert {layer.down.out_features for layer in model.adapters["default"]["mam"].adapter.layers.values()} == {16}
    _perturb(model)
    _round_trip(model, tiny.bert(), inputs, tmp_path)
    _refusals(model, ph.MAM(), tmp_path)
    with pytest.raises(ConfigError, match="mam modules cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ConfigError, match="MAM.scale must hold finite numbers"):
        ph.MAM(scale=float("inf"))
    with pytest.raises(ConfigError, match=r"MAM.scale must be a finite number in \(0"):
        ph.MAM(scale=0.0)


# ----- DSEE -----

def _dsee_reference(base, module, alpha_over_r):
    """A copy of the (bare) base whose adapted weights are W + (α/r)(BA + S⊙M_Ω), S written entry by entry."""
    expected = copy.deepcopy(base)
    for key, layer in module.layers.items():
        name = key.replace("-", ".")
        w = _weight(base, name)
        s = torch.zeros_like(w)
        for (row, col), value in zip(layer.support.long().tolist(), layer.values.detach()):
            s[row, col] += value
        _set_linear(expected, name, w + alpha_over_r * (layer.lora.lora_b @ layer.lora.lora_a + s).detach())
    return expected


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_dsee_is_the_base_at_init_and_w_plus_low_rank_plus_sparse_after(arch):
    base, inputs = tiny.BUILDERS[arch](), tiny.batch(arch)
    plain, reference = run(base, inputs), copy.deepcopy(base)
    model = ph.attach(base, ph.DSEE(r=4, alpha=8.0, support=6))
    torch.testing.assert_close(run(model, inputs), plain, rtol=0, atol=0)
    _perturb(model, seed=1)
    module = model.adapters["default"]["dsee"]
    expected = _dsee_reference(reference, module, 8.0 / 4)
    torch.testing.assert_close(run(model, inputs), run(expected, inputs), rtol=1e-5, atol=1e-5)
    merged = model.merge_and_unload()
    torch.testing.assert_close(run(merged, inputs), run(expected, inputs), rtol=1e-5, atol=1e-5)


def test_dsee_support_is_where_the_low_rank_approximation_misses_most():
    base = tiny.bert()
    model = ph.attach(base, ph.DSEE(r=3, support=10, targets=("q",)))
    for key, layer in model.adapters["default"]["dsee"].layers.items():
        w = _weight(base, key.replace("-", "."))
        u, s, vh = torch.linalg.svd(w)
        residual = (w - u[:, :3] @ torch.diag(s[:3]) @ vh[:3]).abs()
        expected = {divmod(i, w.shape[1]) for i in residual.flatten().topk(10).indices.tolist()}
        assert {tuple(p) for p in layer.support.long().tolist()} == expected


def test_dsee_without_support_is_lora_with_the_same_factors():
    inputs = tiny.batch("bert")
    dsee = ph.attach(tiny.bert(), ph.DSEE(r=4, alpha=8.0, support=0))
    lora = ph.attach(tiny.bert(), ph.LoRA(r=4, alpha=8.0))
    _perturb(dsee, seed=2)
    for key, layer in dsee.adapters["default"]["dsee"].layers.items():
        lora.adapters["default"]["lora"].layers[key].load_state_dict(layer.lora.state_dict())
    torch.testing.assert_close(run(dsee, inputs), run(lora, inputs), rtol=0, atol=0)


def test_dsee_sparse_part_keeps_its_support_under_adamw():
    inputs = tiny.batch("bert")
    model = ph.attach(tiny.bert(), ph.DSEE(r=2, support=7))
    layers = model.adapters["default"]["dsee"].layers.values()
    supports = [{tuple(p) for p in layer.support.long().tolist()} for layer in layers]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        model(**inputs).logits.square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    for layer, support in zip(layers, supports):
        dense = layer.sparse_weight().detach()
        assert dense.count_nonzero() == 7
        assert {tuple(p) for p in dense.nonzero().tolist()} == support
        assert layer.support.grad is None


def test_dsee_pruning_drops_the_ratio_of_smallest_merged_weights(tmp_path):
    base, inputs = tiny.bert(), tiny.batch("bert")
    reference = copy.deepcopy(base)
    model = ph.attach(base, ph.DSEE(r=2, support=5))
    _perturb(model, seed=4)
    module = model.adapters["default"]["dsee"]
    expected = _dsee_reference(reference, module, 32.0 / 2)
    names = [k.replace("-", ".") for k in module.layers]
    merged = torch.cat([_weight(expected, n).abs().flatten() for n in names])
    threshold = merged.sort().values[int(0.2 * merged.numel()) - 1]
    module.prune(base, 0.2)
    dropped = sum(int((layer.keep == 0).sum()) for layer in module.layers.values())
    assert dropped == int(0.2 * merged.numel())
    for n in names:
        w = _weight(expected, n)
        _set_linear(expected, n, torch.where(w.abs() > threshold, w, torch.zeros_like(w)))
    torch.testing.assert_close(run(model, inputs), run(expected, inputs), rtol=1e-5, atol=1e-5)
    assert module.config.pruned == 0.2
    _round_trip(model, tiny.bert(), inputs, tmp_path)   # the masks reload with the module
    torch.testing.assert_close(run(model.merge_and_unload(), inputs), run(expected, inputs), rtol=1e-5, atol=1e-5)


def test_dsee_configured_pruned_prunes_the_pretrained_weights_at_attach():
    base = tiny.bert()
    weights = torch.cat([_weight(base, n).flatten() for n in Sites(base).find("q") + Sites(base).find("v")])
    model = ph.attach(base, ph.DSEE(pruned=0.25))
    keeps = [layer.keep for layer in model.adapters["default"]["dsee"].layers.values()]
    assert sum(int((k == 0).sum()) for k in keeps) == weights.numel() // 4
    assert torch.cat([k.flatten() for k in keeps]).bool().equal(weights.abs() > weights.abs().sort().values[
        weights.numel() // 4 - 1])


def test_dsee_round_trip_refusals_and_checks(tmp_path):
    inputs = tiny.batch("bert")
    model = ph.attach(tiny.bert(), ph.DSEE(r=2, support=4))
    _perturb(model)
    _round_trip(model, tiny.bert(), inputs, tmp_path)
    _refusals(model, ph.DSEE(), tmp_path)
    with pytest.raises(ConfigError, match="DSEE.alpha must hold finite numbers"):
        ph.DSEE(alpha=float("nan"))
    with pytest.raises(ConfigError, match="DSEE.support must be an integer"):
        ph.DSEE(support=-1)
    with pytest.raises(ConfigError, match="DSEE.support=5000 is more entries than"):
        ph.attach(tiny.bert(), ph.DSEE(support=5000))


# ----- KAdaptation -----

@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_kadaptation_is_bit_exact_at_init_and_w_plus_kronecker_sum_after(arch):
    base, inputs = tiny.BUILDERS[arch](), tiny.batch(arch)
    plain, reference = run(base, inputs), copy.deepcopy(base)
    model = ph.attach(base, ph.KAdaptation(n=3, scale=0.5))
    torch.testing.assert_close(run(model, inputs), plain, rtol=0, atol=0)
    _perturb(model, seed=5)
    module = model.adapters["default"]["kadaptation"]
    expected = copy.deepcopy(reference)
    for key, layer in module.layers.items():
        slow = module.slow[layer.target].detach()
        delta = sum(torch.kron(slow[i], torch.outer(layer.u[i], layer.v[i])) for i in range(3)).detach()
        name, target = key.replace("-", "."), base.get_submodule(key.replace("-", "."))
        if target.bias is None:
            target = expected.get_submodule(name)
            target.bias = nn.Parameter(torch.zeros(target.out_features))
        _set_linear(expected, name, _weight(base, name) + 0.5 * delta.T,
                    expected.get_submodule(name).bias.detach() + layer.bias.detach())
    torch.testing.assert_close(run(model, inputs), run(expected, inputs), rtol=1e-5, atol=1e-5)
    if arch == "bert":
        torch.testing.assert_close(run(model.merge_and_unload(), inputs), run(expected, inputs), rtol=1e-5, atol=1e-5)


def test_kadaptation_one_term_is_one_kronecker_product():
    model = ph.attach(tiny.bert(), ph.KAdaptation(n=1, a=4))
    _perturb(model, seed=6)
    module = model.adapters["default"]["kadaptation"]
    layer = next(iter(module.layers.values()))
    slow = module.slow[layer.target]
    assert slow.shape == (1, 4, 4) and layer.u.shape == (1, 8)
    torch.testing.assert_close(layer.delta(slow), torch.kron(slow[0], torch.outer(layer.u[0], layer.v[0])))


def test_kadaptation_shared_slow_weights_learn_from_every_layer():
    inputs = tiny.batch("bert")
    model = ph.attach(tiny.bert(), ph.KAdaptation(n=2))
    _perturb(model, seed=7)
    module = model.adapters["default"]["kadaptation"]
    assert set(module.slow) == {"q", "v"} and len(module.layers) == 4

    def grad(slow):
        module.zero_grad()
        model(**inputs).logits.square().sum().backward()
        assert slow.grad is not None
        return slow.grad.clone()

    for target, slow in module.slow.items():
        full = grad(slow)
        for layer in (m for m in module.layers.values() if m.target == target):
            with torch.no_grad():
                saved, layer.v.data = layer.v.data, torch.zeros_like(layer.v)
            assert not torch.allclose(grad(slow), full)  # this layer's share of A's gradient is gone
            layer.v.data = saved


def test_kadaptation_round_trip_refusals_and_checks(tmp_path):
    inputs = tiny.batch("bert")
    model = ph.attach(tiny.bert(), ph.KAdaptation(n=2))
    _perturb(model)
    saved = {id(p) for _, p in model.module_parameters()}
    assert all(id(a) in saved for a in model.adapters["default"]["kadaptation"].slow.values())  # shared, saved once
    _round_trip(model, tiny.bert(), inputs, tmp_path)
    with pytest.raises(ConfigError, match="n=2 of them.*format='pelthub'"):  # n = 1 exports: test_kadaptation_lokr
        export(model, tmp_path / "peft")
    with pytest.raises(ConfigError, match="PerTask.modules must be one config per kind"):
        PerTask(ph.KAdaptation(), tasks=["a", "b"])
    with pytest.raises(ConfigError, match="KAdaptation.a=5 must divide"):
        ph.attach(tiny.bert(), ph.KAdaptation(a=5))
    with pytest.raises(ConfigError, match="KAdaptation.n must be an integer"):
        ph.KAdaptation(n=0)


# ----- VPT -----

def _vit_by_hand(base, inputs, prompts):
    """logits of a ViT with prompts[0] inserted after [CLS] and prompts[i] put in place before layer i."""
    with torch.no_grad():
        e = base.vit.embeddings(inputs["pixel_values"])
        p = prompts[0].shape[0]
        h = torch.cat([e[:, :1], prompts[0].expand(e.shape[0], -1, -1), e[:, 1:]], dim=1)
        for i, layer in enumerate(base.vit.layers):
            if 0 < i < len(prompts):
                h = torch.cat([h[:, :1], prompts[i].expand(e.shape[0], -1, -1), h[:, 1 + p:]], dim=1)
            h = layer(h)
        return base.classifier(base.vit.layernorm(h)[:, 0])


def _prompts(module):
    return [module.embeddings.detach(), *module.deep.detach()]


def test_vpt_deep_puts_fresh_prompts_before_every_layer():
    base, inputs = tiny_more.family("vit"), tiny_more.batch("vit")
    reference = copy.deepcopy(base)
    model = ph.attach(base, ph.VPT(length=3))
    module = model.adapters["default"]["vpt"]
    assert module.deep.shape == (1, 3, 32)
    expected = _vit_by_hand(reference, inputs, _prompts(module))
    torch.testing.assert_close(tiny_more.output(model(**inputs)).detach(), expected, rtol=0, atol=1e-6)


def test_vpt_without_prompts_is_the_base():
    base, inputs = tiny_more.family("vit"), tiny_more.batch("vit")
    plain = run(base, inputs)
    torch.testing.assert_close(run(ph.attach(base, ph.VPT(length=0)), inputs), plain, rtol=0, atol=0)


def test_vpt_deep_fed_the_previous_layers_prompt_outputs_is_shallow():
    base, inputs = tiny_more.family("vit"), tiny_more.batch("vit", b=1)
    shallow = ph.attach(copy.deepcopy(base), ph.VPT(length=3, deep=False))
    seen = []
    handle = shallow.base.vit.layers[0].register_forward_hook(lambda _m, _a, out: seen.append(out[:, 1:4]))
    expected = run(shallow, inputs)
    handle.remove()
    deep = ph.attach(base, ph.VPT(length=3))
    module = deep.adapters["default"]["vpt"]
    with torch.no_grad():
        module.embeddings.copy_(shallow.adapters["default"]["vpt"].embeddings)
        module.deep[0].copy_(seen[0][0])
    torch.testing.assert_close(run(deep, inputs), expected, rtol=0, atol=0)


def test_vpt_shallow_is_the_image_prompt():
    base, inputs = tiny_more.family("vit"), tiny_more.batch("vit")
    vpt = ph.attach(copy.deepcopy(base), ph.VPT(length=3, deep=False))
    prompt = ph.attach(base, ph.Prompt(length=3))
    with torch.no_grad():
        prompt.adapters["default"]["prompt"].embeddings.copy_(vpt.adapters["default"]["vpt"].embeddings)
    torch.testing.assert_close(run(vpt, inputs), run(prompt, inputs), rtol=0, atol=0)


def test_vpt_round_trip_refusals_and_checks(tmp_path):
    inputs = tiny_more.batch("vit")
    model = ph.attach(tiny_more.family("vit"), ph.VPT(length=2))
    _perturb(model)
    _round_trip(model, tiny_more.family("vit"), inputs, tmp_path)
    _refusals(model, ph.VPT(), tmp_path)
    with pytest.raises(ConfigError, match="vpt modules cannot be merged.*supports lora, ia3, ln, dsee and kadaptation"):
        model.merge_and_unload()
    with pytest.raises(UnsupportedModelError, match="VPT prompts vision and audio.*ph.Prompt"):
        ph.attach(tiny.bert(), ph.VPT())
    with pytest.raises(ConfigError, match="VPT.length must be an integer"):
        ph.VPT(length=-1)

def test_kadaptation_merge_refusal_leaves_the_model_attached():
    base = tiny.BUILDERS["llama"]()
    model = ph.attach(base, ph.KAdaptation(n=2))
    for name, p in model.named_parameters():
        if "bias" in name and p.requires_grad:
            with torch.no_grad(): p.fill_(0.1)
    ids = torch.tensor([[1, 2, 3, 4]])
    before = model(input_ids=ids).logits
    with pytest.raises(ConfigError, match="bias"):
        model.merge_and_unload()
    assert model.adapters and torch.equal(model(input_ids=ids).logits, before)
