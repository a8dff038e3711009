"""Sites derived from structure on every family: the right modules, exact attach, exact detach.

Every family is a tiny model built from its config (pelthub.tiny.FAMILIES, and the vision,
speech, mixture-of-experts and fused-FFN families of tests/tiny_more.py). The expected
sites are written out by hand per family below, so a derivation that picks another module
fails; identity is checked against the untouched base's own outputs.
"""
import copy

import pytest
import torch
from torch import nn

import pelthub as ph
from pelthub.errors import UnsupportedModelError
from pelthub.modules.bottleneck import AdapterLayer
from pelthub.sites import Sites
from tests import tiny, tiny_more
from tests.test_modules import WEIGHT_KINDS

FAMILIES = [*tiny.FAMILIES, *tiny_more.SPECS]
TASKS = ("a", "b")
# Kinds whose fresh module is the identity (LoRA B = 0, adapter up = 0, IA3 = 1, LN Δ = 0, Poly B = 0).
IDENTITY_KINDS = {
    **WEIGHT_KINDS,  # LoRA, bottleneck in all placements, Compacter(++), IA3, LN-tuning
    "lora-o-up-down": ph.LoRA(r=2, targets=("o", "up", "down")),
    "poly": ph.Poly(tasks=TASKS, skills=2, rank=2),
    "unipelt-lora-adapter": ph.UniPELT(lora=ph.LoRA(r=4), adapter=ph.Bottleneck(reduction=4)),
}
PREFIX_KINDS = {
    "prefix": ph.Prefix(length=3, hidden=16),
    "unipelt-apl": ph.UniPELT(lora=ph.LoRA(r=4), prefix=ph.Prefix(length=3, hidden=None),
                              adapter=ph.Bottleneck(reduction=4)),
}
OTHER_KINDS = {"prompt": ph.Prompt(length=4), **PREFIX_KINDS}
ALL_KINDS = {**IDENTITY_KINDS, **OTHER_KINDS}
# attention forwards that take no key/value cache
NO_CACHE = {"distilbert", "deberta-v2", "mpnet", "vit", "deit", "clip-vision", "modernbert"}


def _block(prefix, roles):
    return {role: [f"{prefix}.{s}" for s in (suffix if isinstance(suffix, tuple) else (suffix,))]
            for role, suffix in roles.items()}


def _bert_like(prefix):
    return _block(prefix, {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                           "o": "attention.output.dense", "up": "intermediate.dense", "down": "output.dense",
                           "attn": "attention.self", "ffn_in": "intermediate", "ffn_out": "output.dense"})


def _llama_like(prefix, o="o_proj", mlp=("up_proj", "gate_proj", "down_proj")):
    roles = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": f"self_attn.{o}",
             "up": f"mlp.{mlp[0]}", "down": f"mlp.{mlp[2]}", "attn": "self_attn", "ffn_in": "mlp", "ffn_out": "mlp"}
    if mlp[1]:
        roles["gate"] = f"mlp.{mlp[1]}"
    return _block(prefix, roles)


def _fused(prefix, attn, o="dense"):
    return _block(prefix, {"qkv": f"{attn}.query_key_value", "o": f"{attn}.{o}", "up": "mlp.dense_h_to_4h",
                           "down": "mlp.dense_4h_to_h", "attn": attn, "ffn_in": "mlp", "ffn_out": "mlp"})


def _vit_like(prefix):
    return _block(prefix, {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
                           "o": "attention.o_proj", "up": "mlp.fc1", "down": "mlp.fc2", "attn": "attention",
                           "ffn_in": "mlp", "ffn_out": "mlp"})


def _merge(*tables):
    out = {}
    for table in tables:
        for role, names in table.items():
            out.setdefault(role, []).extend(names)
    return out


def _bart_layer(prefix, cross):
    attn = ("self_attn", "encoder_attn") if cross else ("self_attn",)
    return _block(prefix, {"q": tuple(f"{a}.q_proj" for a in attn), "k": tuple(f"{a}.k_proj" for a in attn),
                           "v": tuple(f"{a}.v_proj" for a in attn), "o": tuple(f"{a}.out_proj" for a in attn),
                           "up": "fc1", "down": "fc2", "attn": "self_attn", "ffn_in": "fc1", "ffn_out": "fc2"})


def _t5_block(prefix, cross):
    attn = ("layer.0.SelfAttention", "layer.1.EncDecAttention") if cross else ("layer.0.SelfAttention",)
    ffn = f"layer.{len(attn)}.DenseReluDense"
    return _block(prefix, {**{r: tuple(f"{a}.{r}" for a in attn) for r in "qkvo"}, "up": f"{ffn}.wi",
                           "down": f"{ffn}.wo", "attn": "layer.0.SelfAttention", "ffn_in": ffn, "ffn_out": ffn})


# family → per layer i → the sites each role must resolve to (written out by hand from the modeling code)
PER_LAYER = {
    "bert": lambda i: _bert_like(f"bert.encoder.layer.{i}"),
    "roberta": lambda i: _bert_like(f"roberta.encoder.layer.{i}"),
    "electra": lambda i: _bert_like(f"electra.encoder.layer.{i}"),
    "xlm-roberta": lambda i: _bert_like(f"roberta.encoder.layer.{i}"),
    "deberta-v2": lambda i: {**_bert_like(f"deberta.encoder.layer.{i}"), **_block(
        f"deberta.encoder.layer.{i}.attention.self", {"q": "query_proj", "k": "key_proj", "v": "value_proj"})},
    "mpnet": lambda i: {**_bert_like(f"mpnet.encoder.layer.{i}"), **_block(
        f"mpnet.encoder.layer.{i}.attention.attn", {"q": "q", "k": "k", "v": "v", "o": "o"}),
                        "attn": [f"mpnet.encoder.layer.{i}.attention.attn"]},
    "distilbert": lambda i: _block(f"distilbert.transformer.layer.{i}", {
        "q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin", "o": "attention.out_lin",
        "up": "ffn.lin1", "down": "ffn.lin2", "attn": "attention", "ffn_in": "ffn", "ffn_out": "ffn"}),
    "gpt2": lambda i: _block(f"transformer.h.{i}", {"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc",
                                                    "down": "mlp.c_proj", "attn": "attn", "ffn_in": "mlp",
                                                    "ffn_out": "mlp"}),
    "llama": lambda i: _llama_like(f"model.layers.{i}"),
    "mistral": lambda i: _llama_like(f"model.layers.{i}"),
    "qwen2": lambda i: _llama_like(f"model.layers.{i}"),
    "qwen3": lambda i: _llama_like(f"model.layers.{i}"),
    "gemma": lambda i: _llama_like(f"model.layers.{i}"),
    "phi": lambda i: _llama_like(f"model.layers.{i}", o="dense", mlp=("fc1", None, "fc2")),
    "opt": lambda i: _block(f"model.decoder.layers.{i}", {
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
        "up": "fc1", "down": "fc2", "attn": "self_attn", "ffn_in": "fc1", "ffn_out": "fc2"}),
    "falcon": lambda i: _fused(f"transformer.h.{i}", "self_attention"),
    "gpt_neox": lambda i: _fused(f"gpt_neox.layers.{i}", "attention"),
    "bart": lambda i: _merge(_bart_layer(f"model.encoder.layers.{i}", False),
                             _bart_layer(f"model.decoder.layers.{i}", True)),
    "t5": lambda i: _merge(_t5_block(f"encoder.block.{i}", False), _t5_block(f"decoder.block.{i}", True)),
    "vit": lambda i: _vit_like(f"vit.layers.{i}"),
    "deit": lambda i: _vit_like(f"deit.layers.{i}"),
    "clip-vision": lambda i: _block(f"encoder.layers.{i}", {
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
        "up": "mlp.fc1", "down": "mlp.fc2", "attn": "self_attn", "ffn_in": "mlp", "ffn_out": "mlp"}),
    "whisper": lambda i: _merge(_bart_layer(f"model.encoder.layers.{i}", False),
                                _bart_layer(f"model.decoder.layers.{i}", True)),
    # the experts are fused 3-D parameters (EXPERTS below): the MoE block is the FFN
    "mixtral": lambda i: _block(f"model.layers.{i}", {
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
        "attn": "self_attn", "ffn_in": "mlp", "ffn_out": "mlp"}),
    # fused GLU input projections (gate and up in one linear) are the `up`
    "modernbert": lambda i: _block(f"model.layers.{i}", {
        "qkv": "attn.Wqkv", "o": "attn.Wo", "up": "mlp.Wi", "down": "mlp.Wo", "attn": "attn", "ffn_in": "mlp",
        "ffn_out": "mlp"}),
    "phi3": lambda i: _block(f"model.layers.{i}", {
        "qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "up": "mlp.gate_up_proj", "down": "mlp.down_proj",
        "attn": "self_attn", "ffn_in": "mlp", "ffn_out": "mlp"}),
}
# family → the fused expert parameters per role (the other families have none)
EXPERTS = {"mixtral": {"up": [f"model.layers.{i}.mlp.experts.gate_up_proj" for i in range(2)],
                       "down": [f"model.layers.{i}.mlp.experts.down_proj" for i in range(2)]}}


def expected_sites(family):
    return {role: sorted(names) for role, names in _merge(PER_LAYER[family](0), PER_LAYER[family](1)).items()}


def run(model, inputs, **kw):
    with torch.no_grad():
        return tiny_more.output(model(**inputs, **kw))


_BASES: dict = {}


def shared(family):
    """(base, inputs, base outputs) of one family, built once: every test detaches, which is exact.

    A base left with hooks (a failed test) is rebuilt, so one failure does not spread.
    """
    base = _BASES.get(family, (None,))[0]
    if base is None or any(m._forward_hooks or m._forward_pre_hooks for m in base.modules()):
        more = family in tiny_more.SPECS
        base = tiny_more.family(family) if more else tiny.FAMILIES[family]()
        inputs = (tiny_more.batch if more else tiny.batch)(family)
        _BASES[family] = (base, inputs, run(base, inputs))
    return _BASES[family]


# test_modules.py already runs these kinds on tiny.BUILDERS' families: here they are the slow part
COVERED = {*WEIGHT_KINDS, "prompt", "prefix"}


def _families(kinds):
    return [pytest.param(f, k, marks=[pytest.mark.slow] * (f in tiny.BUILDERS and k in COVERED))
            for f in FAMILIES for k in kinds]


def test_every_family_is_expected():
    assert set(PER_LAYER) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_roles_resolve_to_the_right_modules(family):
    sites = Sites(shared(family)[0])
    assert {role: sorted(names) for role, names in sites.by_role.items()} == expected_sites(family)
    assert sites.experts == EXPERTS.get(family, {})


def test_deberta_position_projections_are_not_attention_roles():
    """Without shared keys DeBERTa adds pos_key_proj / pos_query_proj (hidden → hidden) beside q, k, v."""
    base = tiny.family("deberta-v2", share_att_key=False)
    assert "deberta.encoder.layer.0.attention.self.pos_key_proj" in dict(base.named_modules())
    sites = Sites(base)
    assert {role: sorted(names) for role, names in sites.by_role.items()} == expected_sites("deberta-v2")


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_lands_on_the_derived_sites(family):
    """LoRA 'q' (or the fused 'qkv') is built on exactly those linears, every layer."""
    role = "qkv" if "qkv" in expected_sites(family) else "q"
    model = ph.attach(shared(family)[0], ph.LoRA(r=2, targets=(role,)))
    adapted = sorted(k.replace("-", ".") for k in model.adapters["default"]["lora"].layers)
    model.detach()
    assert adapted == expected_sites(family)[role]


@pytest.mark.parametrize("family", FAMILIES)
def test_geometry_reads_key_value_heads_off_the_projections(family):
    g = Sites(shared(family)[0]).geometry
    # Falcon's tiny config is multi-query (one key/value head) though its config says 4
    assert (g.hidden, g.layers, g.head_dim) == (32, 2, 8)
    assert g.kv_heads == {"falcon": 1, "llama": 2, "mistral": 2, "qwen2": 2, "qwen3": 2, "gemma": 2, "mixtral": 2,
                          "phi3": 2}.get(family, 4)
    assert g.decoder_only == (family in {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi", "opt",
                                         "falcon", "gpt_neox", "mixtral", "phi3"})


def _kwargs(kind, inputs):
    return {"task_ids": [0, 1, 0][:next(iter(inputs.values())).shape[0]]} if kind == "poly" else {}


def _config(family, kind):
    if kind == "poly" and family == "deberta-v2":
        # DeBERTa's shared q/k projections also project the (batch-free) relative position embeddings,
        # which per-example routing cannot route: Poly goes on v and o there
        return ph.Poly(tasks=TASKS, skills=2, rank=2, targets=("v", "o"))
    return ALL_KINDS[kind]


@pytest.mark.parametrize("family,kind", _families(IDENTITY_KINDS))
def test_fresh_module_is_the_identity_and_detach_is_exact(family, kind):
    base, inputs, before = shared(family)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = ph.attach(base, _config(family, kind))
    assert torch.equal(run(model, inputs, **_kwargs(kind, inputs)), before)
    tiny.perturb(model)
    assert not torch.equal(run(model, inputs, **_kwargs(kind, inputs)), before)
    assert model.detach() is base
    assert torch.equal(run(base, inputs), before)
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in base.modules())


@pytest.mark.parametrize("family,kind", _families(OTHER_KINDS))
def test_prompt_and_prefix_change_outputs_and_detach_is_exact(family, kind):
    if kind in PREFIX_KINDS and family in NO_CACHE:
        pytest.skip("no key/value cache: see test_prefix_is_refused_where_attention_takes_no_cache")
    base, inputs, before = shared(family)
    model = ph.attach(base, ALL_KINDS[kind])
    tiny.perturb(model)
    changed = run(model, inputs)
    assert not torch.equal(changed[:, -before.shape[1]:], before)
    model.detach()
    assert torch.equal(run(base, inputs), before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in base.modules())


@pytest.mark.parametrize("family", sorted(NO_CACHE))
@pytest.mark.parametrize("kind", list(PREFIX_KINDS))
def test_prefix_is_refused_where_attention_takes_no_cache(family, kind):
    base = shared(family)[0]
    with pytest.raises(UnsupportedModelError, match=r"takes no cache.*ph\.Prompt.*roles found: (q|qkv) ×2"):
        ph.attach(base, ALL_KINDS[kind])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in base.modules())


class _NoFFN(nn.Module):
    """Attention-only blocks: nothing produces an FFN output."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"model_type": "attention-only", "hidden_size": 8,
                                          "num_attention_heads": 2})()
        self.layers = nn.ModuleList(nn.ModuleDict({n: nn.Linear(8, 8) for n in ("q_proj", "k_proj", "v_proj",
                                                                                 "o_proj")}) for _ in range(2))


@pytest.mark.parametrize("config", [ph.Bottleneck(reduction=2), ph.Compacter(n=2, reduction=2)])
def test_a_kind_without_its_sites_fails_naming_the_sites_found(config):
    with pytest.raises(UnsupportedModelError, match=r"'ffn_out'.*layers.*q ×2 \(e\.g\. layers\.0\.q_proj\)"):
        ph.attach(_NoFFN(), config)


class _Wrapped(nn.Module):
    """module(x) followed by fn(x, module(x)): an adapter written into the graph, not hooked."""

    def __init__(self, module, fn):
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, x):
        return self.fn(x, self.module(x))


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby", "parallel"])
def test_opt_adapters_compute_the_placement_by_hand(placement):
    """OPT has no FFN submodule: adapters sit on fc2 (and read fc1's input for 'parallel')."""
    base, inputs = tiny.family("opt"), tiny.batch("opt")
    reference = copy.deepcopy(base)
    model = ph.attach(base, ph.Bottleneck(placement=placement, reduction=4, scale=2.0))
    tiny.perturb(model, scale=0.3)
    adapters = model.adapters["default"]["bottleneck"].layers
    assert all(isinstance(a, AdapterLayer) for a in adapters.values())
    for i, layer in enumerate(reference.model.decoder.layers):
        adapter = adapters[f"model-decoder-layers-{i}-fc2"]
        if placement == "parallel":  # fc2(act(fc1(x))) + s·adapter(x), x the FFN input (fc1's input)
            seen = []
            layer.fc1 = _Wrapped(layer.fc1, lambda x, y, seen=seen: seen.append(x) or y)
            layer.fc2 = _Wrapped(layer.fc2, lambda x, y, a=adapter, seen=seen: y + a(seen.pop()))
        else:  # h + adapter(h) on the FFN output, before the residual
            layer.fc2 = _Wrapped(layer.fc2, lambda x, y, a=adapter: y + a(y))
        if placement == "houlsby":
            o = adapters[f"model-decoder-layers-{i}-self_attn-out_proj"]
            layer.self_attn.out_proj = _Wrapped(layer.self_attn.out_proj, lambda x, y, a=o: y + a(y))
    torch.testing.assert_close(run(model, inputs), run(reference, inputs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["opt", "falcon", "gpt_neox", "phi", "gemma", "mistral", "qwen2", "qwen3"])
def test_prefix_from_own_cache_equals_text_before_input(family):
    """A prefix set to the frozen model's cache over s gives the logits of s + x: the cache layout
    (key/value heads read off the projections, head size) is the one the family's attention reads."""
    base = shared(family)[0]
    s = torch.randint(3, tiny.VOCAB, (1, 5))
    x = torch.randint(3, tiny.VOCAB, (2, 6))
    with torch.no_grad():
        cache = base(input_ids=s, use_cache=True).past_key_values
        full = base(input_ids=torch.cat([s.expand(2, -1), x], 1)).logits[:, 5:]
    model = ph.attach(base, ph.Prefix(length=5, hidden=None))
    model.adapters["default"]["prefix"].load_pairs([(layer.keys, layer.values) for layer in cache.layers])
    try:
        torch.testing.assert_close(run(model, {"input_ids": x}), full, atol=1e-5, rtol=1e-5)
    finally:
        model.detach()
