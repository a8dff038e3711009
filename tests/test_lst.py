"""LST (ALGORITHMS.md §7.3) against references computed here.

- the side forward written out by hand for a tiny BERT (gates σ(α/T), ladder, explicit masked softmax
  attention, post-LN blocks, W_up·LN(g) into the frozen pooler and classifier), hidden states read
  off the plain base;
- the backbone runs with gradients off, its parameters' .grad stay None; the output depends on every
  laddered layer and on no other;
- at r = 1 with the gates shut (μ = 1) the side network is a copy of the backbone, on every family
  it supports: the head reads W_up·LN(last hidden state);
- pruning keeps the dimensions of largest weight magnitude, found here by loops over them;
- registry round trip; merge, PEFT export, per-example serving and other families refused.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import pelthub as ph
from pelthub.errors import ConfigError, RoutingError, UnsupportedModelError
from pelthub.hub.peft import export
from pelthub.modules.lst import LST
from pelthub.routing.tasks import PerTask
from tests import tiny

run = tiny.run
ENCODERS = ["bert", "roberta", "xlm-roberta", "electra", "distilbert"]


def _attach(base, config):
    return ph.attach(base, config, head=False).eval()


def _layer_outputs(base, inputs):
    """x_emb (the first layer's input) and every layer's output, read off the plain base by hooks."""
    layers, seen = base.bert.encoder.layer, {}
    handles = [layers[0].register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0]))]
    handles += [layer.register_forward_hook(lambda _m, _a, out, i=i: seen.__setitem__(i, out))
                for i, layer in enumerate(layers)]
    with torch.no_grad():
        base(**inputs)
    for h in handles:
        h.remove()
    return seen["x"], [seen[i] for i in range(len(layers))]


def _block_by_hand(block, g, mask):
    """One post-LN side block with attention written out: softmax(QKᵀ/√d_h + mask) V per head."""
    b, n, width = g.shape
    heads = block.heads
    q, k, v = ((x.weight @ g.unsqueeze(-1)).squeeze(-1) + x.bias for x in (block.q, block.k, block.v))
    q, k, v = (t.view(b, n, heads, width // heads).permute(0, 2, 1, 3) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    attended = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(b, n, width)
    g = F.layer_norm(g + attended @ block.o.weight.T + block.o.bias, (width,), block.norm1.weight, block.norm1.bias,
                     block.norm1.eps)
    ffn = F.gelu(g @ block.up.weight.T + block.up.bias) @ block.down.weight.T + block.down.bias
    return F.layer_norm(g + ffn, (width,), block.norm2.weight, block.norm2.bias, block.norm2.eps)


def _perturbed(model, seed=0):
    tiny.perturb(model, seed=seed, scale=0.3)
    return model.adapters["default"]["lst"]


def test_side_forward_equals_the_hand_computation():
    base, inputs = tiny.bert(), tiny.batch("bert")
    reference = copy.deepcopy(base)
    model = _attach(base, LST(reduction=2, temperature=0.5))
    module = _perturbed(model)
    x, hidden = _layer_outputs(reference, inputs)
    with torch.no_grad():
        g = x @ module.first.weight.T + module.first.bias
        for i, (block, down) in enumerate(zip(module.blocks, module.downs)):
            mu = 1 / (1 + math.exp(-module.gates[i].item() / 0.5))
            g = mu * g + (1 - mu) * (hidden[i] @ down.weight.T + down.bias)
            g = _block_by_hand(block, g, inputs["attention_mask"])
        out = F.layer_norm(g, (16,), module.norm.weight, module.norm.bias, 1e-5) @ module.up.weight.T + module.up.bias
        expected = reference.classifier(reference.bert.pooler(out))
    assert module.gates.abs().min() > 0 and g.shape[-1] == 16
    torch.testing.assert_close(run(model, inputs), expected, rtol=1e-5, atol=1e-5)


def test_gates_start_at_one_half():
    module = _attach(tiny.bert(), LST(reduction=2)).adapters["default"]["lst"]
    assert module.gates.tolist() == [0.0, 0.0]
    assert module.mu().tolist() == [0.5, 0.5]


def test_backbone_runs_without_gradients_and_its_parameters_get_none():
    base, inputs = tiny.bert(), tiny.batch("bert")
    modes = []
    for layer in base.bert.encoder.layer:
        layer.register_forward_hook(lambda _m, _a, _o: modes.append(torch.is_grad_enabled()))
    model = ph.attach(base, LST(reduction=2), head=True).train()
    model(**inputs).logits.square().sum().backward()
    assert modes == [False, False] and torch.is_grad_enabled()
    assert all(p.grad is None for p in base.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in model.module_parameters())


def test_grad_mode_is_restored_when_the_backbone_raises():
    model = ph.attach(tiny.bert(), LST(reduction=2), head=True)

    def fail(_m, _a, _o):
        raise ValueError("a layer failed")
    model.base.bert.encoder.layer[1].register_forward_hook(fail)
    with pytest.raises(ValueError, match="a layer failed"):
        model(**tiny.batch("bert"))
    assert torch.is_grad_enabled()


def _side_output(model, inputs, shift=None):
    """The side output (a BertModel's last hidden state), with backbone layer `shift`'s output moved by fixed
    noise (a hook of the test's own, run before LST's)."""
    noise = torch.randn(inputs["input_ids"].shape + (32,), generator=torch.Generator().manual_seed(3))
    handles = [] if shift is None else [
        model.base.encoder.layer[shift].register_forward_hook(lambda _m, _a, out: out + noise, prepend=True)]
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
    for h in handles:
        h.remove()
    return out


def test_side_output_depends_on_every_laddered_layer_and_no_other():
    inputs = tiny.batch("bert")
    model = _attach(tiny.bert().bert, LST(reduction=2))
    plain = _side_output(model, inputs)
    for layer in (0, 1):
        assert (_side_output(model, inputs, layer) - plain).abs().max() > 0.1
    first_only = _attach(tiny.bert().bert, LST(reduction=2, layers=(0,)))
    assert len(first_only.adapters["default"]["lst"].blocks) == 1
    torch.testing.assert_close(_side_output(first_only, inputs, 1), _side_output(first_only, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("family", ENCODERS)
def test_unpruned_side_network_with_shut_gates_copies_the_backbone(family):
    """r = 1, μ = 1: g₀ = x_emb and the blocks are the backbone's layers, so the head reads LN(h_last)."""
    base, inputs = tiny.FAMILIES[family](), tiny.batch(family)
    reference = copy.deepcopy(base)
    model = _attach(base, LST(reduction=1))
    with torch.no_grad():
        model.adapters["default"]["lst"].gates.fill_(1000.0)
    encoder = next(m for m in reference.modules() if type(m).__name__ in ("BertEncoder", "RobertaEncoder",
                                                                            "XLMRobertaEncoder", "ElectraEncoder",
                                                                            "Transformer"))

    def normalise(_m, _a, out):
        out.last_hidden_state = F.layer_norm(out.last_hidden_state, out.last_hidden_state.shape[-1:])
        return out
    encoder.register_forward_hook(normalise)
    torch.testing.assert_close(run(model, inputs), run(reference, inputs), rtol=1e-5, atol=1e-5)


def _importance_by_loops(layer):
    """Per hidden dim j: Σ|w| over q, k, v, up columns j and o, down rows j (BERT names)."""
    reads = [layer.attention.self.query, layer.attention.self.key, layer.attention.self.value,
             layer.intermediate.dense]
    writes = [layer.attention.output.dense, layer.output.dense]
    return torch.tensor([sum(float(m.weight[:, j].detach().abs().sum()) for m in reads) +
                         sum(float(m.weight[j].detach().abs().sum()) for m in writes) for j in range(32)])


def test_pruned_blocks_keep_the_largest_magnitude_dimensions():
    base = tiny.bert().requires_grad_(False)
    module = _attach(copy.deepcopy(base), LST(reduction=2)).adapters["default"]["lst"]
    layers = base.bert.encoder.layer
    score = sum(_importance_by_loops(layer) for layer in layers)
    kept = sorted(sorted(range(32), key=lambda j: -score[j])[:16])
    torch.testing.assert_close(module.first.weight, torch.eye(32)[kept], rtol=0, atol=0)
    for block, layer in zip(module.blocks, layers):
        query, key = layer.attention.self.query.weight, layer.attention.self.key.weight
        qk = [h * 8 + j for h in range(4) for j in sorted(
            sorted(range(8), key=lambda j: -float(query[h * 8 + j].abs().sum() + key[h * 8 + j].abs().sum()))[:4])]
        torch.testing.assert_close(block.q.weight, query[qk][:, kept], rtol=0, atol=0)
        torch.testing.assert_close(block.norm2.bias, layer.output.LayerNorm.bias[kept], rtol=0, atol=0)
        assert block.norm1.eps == block.norm2.eps == base.config.layer_norm_eps == 1e-12
        up, down = layer.intermediate.dense.weight, layer.output.dense.weight
        units = sorted(sorted(range(64), key=lambda u: -float(up[u].abs().sum() + down[:, u].abs().sum()))[:32])
        torch.testing.assert_close(block.down.weight, down[kept][:, units], rtol=0, atol=0)


def test_round_trip_and_refusals(tmp_path):
    inputs = tiny.batch("bert")
    model = _attach(tiny.bert(), LST(reduction=2, layers=(1,)))
    _perturbed(model)
    reg = ph.Registry(tmp_path / "reg")
    loaded = reg.load(reg.add(model, name="m"), tiny.bert())
    assert loaded.adapters["default"]["lst"].config == LST(reduction=2, layers=(1,))
    torch.testing.assert_close(run(loaded, inputs), run(model, inputs), rtol=0, atol=0)
    before = run(model, inputs)
    with pytest.raises(ConfigError, match="lst modules cannot be merged"):
        model.merge_and_unload()
    torch.testing.assert_close(run(model, inputs), before, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="PEFT has no format for pelthub's 'lst'.*format='pelthub'"):
        export(model, tmp_path / "peft")
    with pytest.raises(ConfigError, match="PerTask.modules must be one config per kind"):
        PerTask(LST(), tasks=["a", "b"])
    with pytest.raises(RoutingError, match="not \\['lst'\\]"):
        model(**inputs, adapter_names=["default", "__base__", "default"])
    with pytest.raises(ConfigError, match="call the ModularModel, not its base"):
        model.base(**inputs)
    with model.disable_adapter():
        torch.testing.assert_close(run(model, inputs), run(tiny.bert(), inputs), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gpt2", "t5", "llama", "mpnet", "deberta-v2"])
def test_other_families_are_refused(family):
    with pytest.raises(UnsupportedModelError, match="post-LN encoder layers .*is not one of them"):
        ph.attach(tiny.FAMILIES[family](), LST())


def test_config_checks():
    with pytest.raises(ConfigError, match="LST.reduction=3 must divide the head size 8.*\\[1, 2, 4, 8\\]"):
        ph.attach(tiny.bert(), LST(reduction=3))
    with pytest.raises(ConfigError, match="LST.layers=\\[0, 2\\] names layers beyond the 2"):
        ph.attach(tiny.bert(), LST(layers=(0, 2)))
    for bad in ((1, 0), (), (0, 0), (-1,), (True,)):
        with pytest.raises(ConfigError, match="LST.layers must be None"):
            LST(layers=bad)
    with pytest.raises(ConfigError, match="LST.temperature must be a finite number above 0"):
        LST(temperature=0.0)
    assert ph.modules.config_from_dict(LST(layers=(1, 3)).to_dict()) == LST(layers=(1, 3))
