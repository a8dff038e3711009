"""Vision prompts, mixture-of-experts weights and MoE-block adapters against references written here.

- MoE (Mixtral, experts fused into [E, out, in] parameters): LoRA and IA3 update each expert; the
  reference routes every token by hand (softmax, top-k, renormalised) and runs each chosen expert
  as its own unfused linears, the update applied to the activations (W x + s·B(A x), l ⊙ (W x),
  W (l ⊙ z)), never to a weight.
- Adapters on the MoE block: the block's output (and input, for 'parallel') written into the graph.
- Prompts on image and audio models: L tokens in the first layer's input after [CLS] (DeiT: after
  [CLS] and the distillation token; Whisper: first), the rest of the forward run by hand.
"""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pelthub as ph
from pelthub.errors import ConfigError, RoutingError
from tests import tiny, tiny_more
from tests.test_families import _Wrapped

TOP_K, EXPERTS = 2, 4


def run(model, inputs, **kw):
    with torch.no_grad():
        return tiny_more.output(model(**inputs, **kw))


class _HandMoE(nn.Module):
    """A Mixtral MoE block computed token by token, expert by expert; `lora` / `ia3` give each expert's
    update of the fused 'gate_up_proj' / 'down_proj' as (A, B, scale) or a scale vector per expert."""

    def __init__(self, block, lora=None, ia3=None):
        super().__init__()
        self.router = block.gate.weight.detach().clone()
        self.w_up = block.experts.gate_up_proj.detach().clone()
        self.w_down = block.experts.down_proj.detach().clone()
        self.lora, self.ia3 = lora or {}, ia3 or {}

    def _linear(self, name, w, e, x):
        y = x @ w[e].T
        if name in self.lora:
            a, b, s = self.lora[name]
            y = y + s * ((x @ a[e].T) @ b[e].T)
        return y

    def forward(self, x):
        h = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(h @ self.router.T, dim=-1)
        top, idx = probs.topk(TOP_K, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        for t in range(h.shape[0]):
            for j in range(TOP_K):
                e = int(idx[t, j])
                gate, up = self._linear("up", self.w_up, e, h[t]).chunk(2)
                if "up" in self.ia3:     # output side: l ⊙ (W x)
                    gate, up = (self.ia3["up"][e] * torch.cat([gate, up])).chunk(2)
                z = F.silu(gate) * up
                if "down" in self.ia3:   # input side: W (l ⊙ z)
                    z = self.ia3["down"][e] * z
                out[t] += top[t, j] * self._linear("down", self.w_down, e, z)
        return out.reshape(x.shape)


IMPLEMENTATIONS = ("grouped_mm", "eager")  # transformers' experts kernels: one matmul per group, or a loop


def _mixtral(implementation="grouped_mm"):
    base, inputs = tiny_more.family("mixtral"), tiny_more.batch("mixtral")
    base.set_experts_implementation(implementation)
    return base, inputs, copy.deepcopy(base)


def _per_layer(module, attr):
    """{layer index: {'up'|'down': tensors}} of a module's expert updates (keys end in the parameter name)."""
    out = {}
    for key, update in module.experts.items():
        layer = int(key.split("-")[2])
        out.setdefault(layer, {})["up" if key.endswith("gate_up_proj") else "down"] = attr(update)
    return out


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_expert_lora_equals_experts_run_one_by_one_with_their_own_update(implementation):
    base, inputs, reference = _mixtral(implementation)
    model = ph.attach(base, ph.LoRA(r=2, alpha=4, targets=("up", "down")))
    tiny.perturb(model, scale=0.3)
    updates = _per_layer(model.adapters["default"]["lora"],
                         lambda u: (u.lora_a.detach(), u.lora_b.detach(), u.scale))
    assert sorted(updates) == [0, 1] and all(sorted(u) == ["down", "up"] for u in updates.values())
    for i, layer in enumerate(reference.model.layers):
        layer.mlp = _HandMoE(layer.mlp, lora=updates[i])
    torch.testing.assert_close(run(model, inputs), run(reference, inputs), rtol=0, atol=1e-5)
    assert not torch.equal(run(model, inputs), run(tiny_more.family("mixtral"), inputs))


def test_expert_ia3_scales_each_experts_activations():
    base, inputs, reference = _mixtral()
    model = ph.attach(base, ph.IA3(targets=("up", "down")))  # "down" is a feed-forward (input-side) target
    tiny.perturb(model, scale=0.3)
    scales = _per_layer(model.adapters["default"]["ia3"], lambda u: u.scale.detach())
    assert {k: tuple(v.shape) for k, v in scales[0].items()} == {"up": (EXPERTS, 128), "down": (EXPERTS, 64)}
    for i, layer in enumerate(reference.model.layers):
        layer.mlp = _HandMoE(layer.mlp, ia3=scales[i])
    torch.testing.assert_close(run(model, inputs), run(reference, inputs), rtol=0, atol=1e-5)


def test_expert_updates_leave_the_router_alone_merge_exactly_and_reload(tmp_path):
    base, inputs, _ = _mixtral()
    router = base.model.layers[0].mlp.gate
    seen = []
    handle = router.register_forward_hook(lambda _m, _a, out: seen.append(out[0].detach().clone()))
    run(base, inputs)
    model = ph.attach(base, ph.LoRA(r=2, targets=("up", "down")))
    model.add("scaled", [ph.IA3(targets=("down",))])  # a second update stacked on the experts' down_proj
    tiny.perturb(model, scale=0.3)
    adapted = run(model, inputs)
    handle.remove()
    torch.testing.assert_close(seen[1], seen[0], rtol=0, atol=0)   # layer 0's router logits: untouched
    model.save_pretrained(tmp_path)
    reloaded = ph.from_pretrained(tiny_more.family("mixtral"), tmp_path)
    torch.testing.assert_close(run(reloaded, inputs), adapted, rtol=0, atol=0)
    merged = model.merge_and_unload()
    assert all("parametrizations" not in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(run(merged, inputs), adapted, rtol=1e-5, atol=1e-5)


def test_removing_one_of_two_updates_on_a_fused_weight_keeps_the_other():
    base, inputs, _ = _mixtral()
    before = run(base, inputs)
    model = ph.attach(base, ph.IA3(targets=("down",)), name="alone")
    tiny.perturb(model, scale=0.3)
    alone = run(model, inputs)
    scales = {k: v.clone() for k, v in model.adapters["alone"].state_dict().items()}
    model.add("lora", [ph.LoRA(r=2, targets=("down",))])
    tiny.perturb(model, scale=0.3, seed=1)  # moves both sets
    assert not torch.equal(run(model, inputs), alone)
    model.remove("lora")
    model.adapters["alone"].load_state_dict(scales)
    torch.testing.assert_close(run(model, inputs), alone, rtol=0, atol=0)
    model.detach()
    torch.testing.assert_close(run(base, inputs), before, rtol=0, atol=0)


def test_expert_updates_refuse_per_example_selection_and_input_dropout():
    base, inputs, _ = _mixtral()
    model = ph.attach(base, ph.LoRA(r=2, targets=("down",)))
    model.set_adapter("default")
    with pytest.raises(RoutingError, match="whole batch.*adapter_names"):
        run(model, inputs)
    model.set_adapter(None)
    run(model, inputs)
    model.detach()
    with pytest.raises(ConfigError, match="dropout.*experts.down_proj"):
        ph.attach(base, ph.LoRA(r=2, dropout=0.1, targets=("down",)))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())
    assert all("parametrizations" not in n for n, _ in base.named_parameters())


@pytest.mark.parametrize("config", [ph.Bottleneck(placement="pfeiffer", reduction=4, scale=2.0),
                                    ph.Bottleneck(placement="parallel", reduction=4, scale=2.0),
                                    ph.Bottleneck(placement="houlsby", reduction=4),
                                    ph.Compacter(n=2, reduction=4)], ids=lambda c: f"{c.kind}-{c.placement}")
def test_adapters_sit_on_the_moe_blocks_output(config):
    """pfeiffer/houlsby: moe(x) + a(moe(x)); parallel: moe(x) + a(x); houlsby also on the attention output."""
    base, inputs, reference = _mixtral()
    model = ph.attach(base, config)
    tiny.perturb(model, scale=0.3)
    adapters = model.adapters["default"][config.kind].layers
    for i, layer in enumerate(reference.model.layers):
        a = adapters[f"model-layers-{i}-mlp"]
        parallel = config.placement == "parallel"
        layer.mlp = _Wrapped(layer.mlp, lambda x, y, a=a, p=parallel: y + a(x if p else y))
        if config.placement == "houlsby":
            o = adapters[f"model-layers-{i}-self_attn-o_proj"]
            layer.self_attn.o_proj = _Wrapped(layer.self_attn.o_proj, lambda x, y, o=o: y + o(y))
    torch.testing.assert_close(run(model, inputs), run(reference, inputs), rtol=0, atol=1e-5)


def _first_layer_input(model, layer, inputs):
    """What `layer` receives when `model` runs `inputs` (read after any hook installed before)."""
    seen = []
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    run(model, inputs)
    handle.remove()
    return seen[0]


def test_vit_prompt_is_inserted_after_cls_and_the_rest_runs_unchanged():
    """VPT-shallow: x₁ = L₁([x_cls, P, E₀]); logits = classifier(layernorm(L₂(x₁))[:, 0])."""
    base, inputs = tiny_more.family("vit"), tiny_more.batch("vit")
    reference = copy.deepcopy(base)
    model = ph.attach(base, ph.Prompt(length=3))
    prompt = model.adapters["default"]["prompt"].embeddings.detach()
    with torch.no_grad():
        e = reference.vit.embeddings(inputs["pixel_values"])
        h = torch.cat([e[:, :1], prompt.expand(e.shape[0], -1, -1), e[:, 1:]], dim=1)
        for layer in reference.vit.layers:
            h = layer(h)
        expected = reference.classifier(reference.vit.layernorm(h)[:, 0])
    torch.testing.assert_close(run(model, inputs), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family,lead,layers", [("deit", 2, "deit.layers"), ("clip-vision", 1, "encoder.layers"),
                                               ("whisper", 0, "model.encoder.layers")])
def test_prompt_follows_the_tokens_before_the_patches(family, lead, layers):
    """DeiT: after [CLS] and the distillation token; CLIP (a convolution counts the patches): after
    [CLS]; Whisper's encoder: first. Everything else in the first layer's input is unchanged."""
    base, inputs = tiny_more.family(family), tiny_more.batch(family)
    first = base.get_submodule(f"{layers}.0")
    plain = _first_layer_input(base, first, inputs)
    model = ph.attach(base, ph.Prompt(length=3))
    prompted = _first_layer_input(model, first, inputs)
    prompt = model.adapters["default"]["prompt"].embeddings.detach()
    assert prompted.shape[1] == plain.shape[1] + 3
    torch.testing.assert_close(prompted[:, lead:lead + 3], prompt.expand(plain.shape[0], -1, -1), rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([prompted[:, :lead], prompted[:, lead + 3:]], 1), plain, rtol=0, atol=0)


def test_image_prompts_start_random_only():
    with pytest.raises(ConfigError, match="init='vocab'.*pixel_values.*init='random'"):
        ph.attach(tiny_more.family("vit"), ph.Prompt(length=3, init="vocab"))


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_what_reads_linear_layers_only_refuses_expert_updates(kind, tmp_path):
    """PEFT export, LoRA merging and UniPELT's gates would drop an expert update silently: they refuse."""
    from pelthub.errors import UnsupportedModelError
    from pelthub.hub.peft import export
    base = tiny_more.family("mixtral")
    config = ph.LoRA(r=2, targets=("q", "down")) if kind == "lora" else ph.IA3()
    model = ph.attach(base, config)
    with pytest.raises(ConfigError, match="fused expert weights.*experts.down_proj.*save_pretrained"):
        export(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    if kind == "lora":
        with pytest.raises(ConfigError, match="fused expert weights"):
            ph.merge([model, model])
        model.detach()
        with pytest.raises(UnsupportedModelError, match="UniPELT.*experts.down_proj"):
            ph.attach(base, ph.UniPELT(lora=ph.LoRA(r=2, targets=("down",))))
        assert all("parametrizations" not in n for n, _ in base.named_parameters())


@pytest.mark.parametrize("family,config", [("vit", ph.Prompt(length=3)), ("clip-vision", ph.IA3()),
                                           ("whisper", ph.Prefix(length=2, hidden=None))],
                         ids=["vit-prompt", "clip-ia3", "whisper-prefix"])
def test_modules_on_image_and_audio_models_reload(family, config, tmp_path):
    """A vision tower has no vocabulary: its fingerprint says none (not 0), and the saved file loads."""
    base, inputs = tiny_more.family(family), tiny_more.batch(family)
    model = ph.attach(base, config)
    tiny.perturb(model, scale=0.3)
    model.save_pretrained(tmp_path)
    reloaded = ph.from_pretrained(tiny_more.family(family), tmp_path)
    torch.testing.assert_close(run(reloaded, inputs), run(model, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_an_expert_update_is_computed_once_per_call(implementation):
    """The eager experts loop reads the fused weight once per expert; the update is built once per call."""
    base, inputs, _ = _mixtral(implementation)
    assert base.config._experts_implementation == implementation
    model = ph.attach(base, ph.LoRA(r=2, targets=("up", "down")))
    calls = []
    for update in model.adapters["default"]["lora"].experts.values():
        update.register_forward_hook(lambda *_: calls.append(1))
    run(model, inputs)
    assert len(calls) == 4  # two layers × (gate_up_proj, down_proj)
