"""Every module kind on every architecture: identities, exact detach, gradients, save/load, merge."""
import pytest
import torch

import pelthub as ph
from tests import tiny

ARCHS = list(tiny.BUILDERS)
WEIGHT_KINDS = {
    "lora": ph.LoRA(r=4),
    "bottleneck-pfeiffer": ph.Bottleneck(reduction=4),
    "bottleneck-houlsby": ph.Bottleneck(placement="houlsby", reduction=4, activation="swish"),
    "bottleneck-parallel": ph.Bottleneck(placement="parallel", reduction=4, scale=4.0),
    "compacter": ph.Compacter(n=4, reduction=4),
    "compacter++": ph.Compacter(n=2, reduction=4, placement="pfeiffer"),
    "ia3": ph.IA3(),
    "ln": ph.LNTuning(),
}
INPUT_KINDS = {"prompt": ph.Prompt(length=4), "prefix": ph.Prefix(length=3, hidden=16),
               "prefix-direct": ph.Prefix(length=3, hidden=None)}
ALL_KINDS = {**WEIGHT_KINDS, **INPUT_KINDS}


run, perturb = tiny.run, tiny.perturb


def tail(x, n):
    return x[:, -n:]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", list(WEIGHT_KINDS))
def test_fresh_module_leaves_outputs_unchanged(arch, kind):
    base, inputs = tiny.BUILDERS[arch](), tiny.batch(arch)
    before = run(base, inputs)
    model = ph.attach(base, WEIGHT_KINDS[kind])
    assert torch.equal(run(model, inputs), before)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", list(ALL_KINDS))
def test_detach_restores_base_bit_for_bit(arch, kind):
    base, inputs = tiny.BUILDERS[arch](), tiny.batch(arch)
    before = run(base, inputs)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    model = ph.attach(base, ALL_KINDS[kind])
    perturb(model)
    changed = run(model, inputs)
    assert not torch.equal(tail(changed, before.shape[1]), before)  # the module does something
    restored = model.detach()
    assert restored is base
    assert torch.equal(run(base, inputs), before)
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items()) and state.keys() == base.state_dict().keys()
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    assert not base._forward_hooks and all(not m._forward_hooks and not m._forward_pre_hooks for m in base.modules())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", list(ALL_KINDS))
def test_gradients_reach_module_parameters_only(arch, kind):
    base, inputs = tiny.BUILDERS[arch](), tiny.batch(arch)
    model = ph.attach(base, ALL_KINDS[kind])
    model.train()
    model(**inputs).logits.float().pow(2).mean().backward()
    own = {id(p) for _, p in model.module_parameters()}
    assert all(p.grad is None for p in base.parameters() if id(p) not in own)
    grads = [p.grad for _, p in model.module_parameters()]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert model.trainable_parameters().trainable == sum(p.numel() for _, p in model.module_parameters())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", list(ALL_KINDS))
def test_save_load_gives_identical_outputs(arch, kind, tmp_path):
    base, inputs = tiny.BUILDERS[arch](), tiny.batch(arch)
    model = ph.attach(base, ALL_KINDS[kind], name="task")
    perturb(model)
    expected = run(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = ph.from_pretrained(tiny.BUILDERS[arch](), tmp_path)
    assert torch.equal(run(loaded, inputs), expected)
    assert list(loaded.adapters) == ["task"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["lora", "ia3", "ln"])
def test_merge_and_unload_equals_unmerged(arch, kind):
    cfg = ph.LoRA(r=4, targets=("o", "down") if arch != "gpt2" else ("qkv", "down")) if kind == "lora" else WEIGHT_KINDS[kind]
    base, inputs = tiny.BUILDERS[arch](), tiny.batch(arch)
    model = ph.attach(base, cfg)
    perturb(model)
    expected = run(model, inputs)
    merged = model.merge_and_unload()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in merged.modules())
    torch.testing.assert_close(run(merged, inputs), expected, atol=1e-5, rtol=1e-5)


def test_head_is_trained_as_a_copy_and_saved(tmp_path):
    base, inputs = tiny.bert(num_labels=3), tiny.batch("bert")
    original = base.classifier.weight.clone()
    model = ph.attach(base, ph.Prompt(length=2), head=True)
    assert all(p.requires_grad for p in model.heads.parameters())
    with torch.no_grad():
        model.heads["default"]["classifier"].weight.add_(1.0)
    expected = run(model, inputs)
    model.save_pretrained(tmp_path)
    assert torch.equal(base.classifier.weight, original)  # the base head is never written
    assert torch.equal(run(ph.from_pretrained(tiny.bert(num_labels=3), tmp_path), inputs), expected)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prefix_from_own_cache_equals_text_before_input(arch):
    """A prefix set to the frozen model's cache over s gives the logits of running s + x."""
    base = tiny.BUILDERS[arch]()
    s = torch.randint(3, tiny.VOCAB, (1, 5))
    x = torch.randint(3, tiny.VOCAB, (2, 6))
    with torch.no_grad():
        cache = base(input_ids=s, use_cache=True).past_key_values
        full = base(input_ids=torch.cat([s.expand(2, -1), x], 1)).logits[:, 5:]
    model = ph.attach(base, ph.Prefix(length=5, hidden=None))
    model.adapters["default"]["prefix"].load_pairs([(layer.keys, layer.values) for layer in cache.layers])
    torch.testing.assert_close(run(model, {"input_ids": x}), full, atol=1e-5, rtol=1e-5)


def test_t5_prompt_from_text_embeddings_equals_text_before_input():
    base = tiny.t5()
    s = torch.randint(3, tiny.VOCAB, (1, 4))
    x, dec = torch.randint(3, tiny.VOCAB, (2, 6)), torch.randint(3, tiny.VOCAB, (2, 3))
    expected = run(base, {"input_ids": torch.cat([s.expand(2, -1), x], 1), "decoder_input_ids": dec})
    model = ph.attach(base, ph.Prompt(length=4))
    with torch.no_grad():
        model.adapters["default"]["prompt"].embeddings.copy_(base.get_input_embeddings()(s)[0])
    torch.testing.assert_close(run(model, {"input_ids": x, "decoder_input_ids": dec}), expected, atol=1e-6, rtol=1e-6)


class WordTokenizer:
    """Maps words to ids, enough for Prompt(init='text')."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [5 + (sum(map(ord, w)) % 80) for w in text.split()]}


def test_prompt_text_init_cycles_the_text_embeddings():
    base = tiny.bert()
    model = ph.attach(base, ph.Prompt(length=5, init="text", text="classify the review"), tokenizer=WordTokenizer())
    ids = torch.tensor(WordTokenizer()("classify the review")["input_ids"] * 2)[:5]
    assert torch.equal(model.adapters["default"]["prompt"].embeddings, base.get_input_embeddings().weight[ids])


def test_collapsed_prefix_gives_the_same_outputs():
    base, inputs = tiny.gpt2(), tiny.batch("gpt2")
    model = ph.attach(base, ph.Prefix(length=3, hidden=16))
    perturb(model)
    expected = run(model, inputs)
    module = model.adapters["default"]["prefix"]
    module.collapse()
    assert module.config.hidden is None and not hasattr(module, "mlp")
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-6, rtol=1e-6)


def test_compacter_kronecker_sum_equals_torch_kron():
    from pelthub.modules.compacter import kron_sum
    n, p, q = 4, 3, 5
    a, s, t = torch.randn(n, n, n), torch.randn(n, p), torch.randn(n, q)
    explicit = sum(torch.kron(a[i], torch.outer(s[i], t[i])) for i in range(n))
    torch.testing.assert_close(kron_sum(a, s, t), explicit)


def test_compacter_slow_weights_are_shared_across_layers():
    model = ph.attach(tiny.bert(), ph.Compacter(n=2, reduction=4))
    module = model.adapters["default"]["compacter"]
    slows = {id(layer.down._slow[0]) for layer in module.layers.values()}
    assert slows == {id(module.slow.down)} and len(module.layers) == 4  # houlsby: 2 per layer


@pytest.mark.parametrize("arch", ["t5", "gpt2", "llama"])
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_generate_equals_greedy_decoding_by_hand(arch, kind):
    base = tiny.BUILDERS[arch]()
    model = ph.attach(base, INPUT_KINDS[kind])
    perturb(model)
    ids = torch.randint(3, tiny.VOCAB, (2, 5))
    mask = torch.ones_like(ids)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    seq = torch.zeros(2, 1, dtype=torch.long) if arch == "t5" else ids
    for _ in range(3):
        kwargs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": seq} if arch == "t5" else \
            {"input_ids": seq, "attention_mask": torch.ones_like(seq)}
        seq = torch.cat([seq, run(model, kwargs)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq)


def test_a_prompt_on_a_decoder_only_classifier_keeps_sequence_labels():
    """(B,) class labels are not token labels: they must reach the head's loss unchanged."""
    from transformers import GPT2Config, GPT2ForSequenceClassification
    torch.manual_seed(0)
    base = GPT2ForSequenceClassification(GPT2Config(vocab_size=tiny.VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                    n_positions=128, pad_token_id=0, num_labels=3)).eval()
    model = ph.attach(base, ph.Prompt(length=4))
    inputs, labels = tiny.batch("gpt2"), torch.tensor([0, 2, 1])
    out = model(**inputs, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
