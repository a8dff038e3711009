"""Quantized bases (bitsandbytes 4-bit nf4/fp4 and 8-bit, torchao int8 weight-only, on CPU): the reference is the
same model whose linears hold the dequantized weights in float32, so only the quantized kernels differ."""
import pytest
import torch
from torch import nn

import pelthub as ph
from pelthub.errors import UnsupportedModelError
from tests import tiny

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")
torchao = pytest.importorskip("torchao.quantization", reason="torchao is not installed (pip install torchao)")

KINDS = ("nf4", "fp4", "int8", "torchao-int8")
CONFIGS = {"lora": ph.LoRA(r=2), "ia3": ph.IA3(), "prompt": ph.Prompt(length=2), "bottleneck": ph.Bottleneck(reduction=4)}
# On CPU bitsandbytes dequantizes and multiplies in float32 for all three kinds (measured: at most 1.5e-7 from the
# reference on logits of size 0.4), so the tolerance is summation order; a CUDA int8 kernel would also round activations.
# torchao's int8 weight-only layer on CPU also multiplies in float32 (measured: at most 1.4e-7).
TOLERANCE = {kind: dict(rtol=1e-5, atol=1e-5) for kind in KINDS}


def quantized(kind: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(a tiny Llama whose decoder linears are bitsandbytes layers, the same Llama holding their dequantized weights)."""
    model, reference = tiny.llama(seed=seed), tiny.llama(seed=seed)
    if kind == "torchao-int8":
        torchao.quantize_(model.model.layers, torchao.Int8WeightOnlyConfig())
        for name, lin in model.model.layers.named_modules():
            if isinstance(lin, nn.Linear):
                reference.model.layers.get_submodule(name).weight.data.copy_(dequantized(lin))
        return model, reference
    for name, lin in list(model.model.layers.named_modules()):
        if type(lin) is not nn.Linear:
            continue
        parent, _, child = name.rpartition(".")
        w = lin.weight.data.clone()
        if kind == "int8":
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False)
            q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, quant_type=kind,
                                  compute_dtype=torch.float32)
            q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=kind)
        q = q.to("cpu")  # quantizes
        model.model.layers.get_submodule(parent).register_module(child, q)
        reference.model.layers.get_submodule(name).weight.data.copy_(dequantized(q))
    return model, reference


def dequantized(q: nn.Module) -> torch.Tensor:
    if type(q.weight).__module__.startswith("torchao."):
        return q.weight.dequantize()
    if isinstance(q, bnb.nn.Linear8bitLt):
        return q.weight.data.float() * q.weight.SCB.float()[:, None] / 127
    return bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)


def test_the_helper_quantizes_every_decoder_linear_and_the_reference_is_close_to_the_original():
    model, reference = quantized("nf4")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 14  # 7 linears x 2 layers
    ao, _ = quantized("torchao-int8")  # the tensor subclass merge_and_unload must recognise as quantized storage
    assert sum(isinstance(m, nn.Linear) and isinstance(m.weight, torchao.Int8Tensor) for m in ao.modules()) == 14
    original = tiny.llama()
    w, rw = original.model.layers[0].mlp.up_proj.weight, reference.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(w, rw) and (w - rw).norm() < 0.35 * w.norm()  # rounded to 4 bits (another matrix: ~1.4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config", CONFIGS)
def test_modules_on_a_quantized_base_equal_the_dequantized_reference_and_train_only_the_modules(kind, config):
    base, reference = quantized(kind)
    model, ref = ph.attach(base, CONFIGS[config]), ph.attach(reference, CONFIGS[config])
    tiny.perturb(model)
    ref.load_state_dict(model.state_dict())
    inputs = tiny.batch("llama")
    torch.testing.assert_close(tiny.run(model, inputs), tiny.run(ref, inputs), **TOLERANCE[kind])
    model(**inputs).logits.square().mean().backward()
    own = dict(model.module_parameters())
    assert own and all(p.grad is not None and p.grad.abs().sum() > 0 for p in own.values() if p.requires_grad)
    assert all(p.grad is None for p in base.parameters())  # the quantized weights and the rest of the base stay out


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_of_two_loras_on_a_quantized_base_equals_each_alone(kind):
    base, _ = quantized(kind)
    model = ph.attach(base, ph.LoRA(r=2), name="a")
    ph.attach(model, ph.LoRA(r=2), name="b")
    tiny.perturb(model)
    inputs = tiny.batch("llama")
    alone = {n: tiny.run(model, inputs, adapter_names=[n] * len(inputs["input_ids"])) for n in ("a", "b")}
    mixed = tiny.run(model, inputs, adapter_names=["a", "b", "a"][: len(inputs["input_ids"])])
    for row, n in enumerate(["a", "b", "a"][: len(inputs["input_ids"])]):
        torch.testing.assert_close(mixed[row], alone[n][row], **TOLERANCE[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_on_a_quantized_base_round_trips(kind, tmp_path):
    base, _ = quantized(kind)
    model = ph.attach(base, ph.LoRA(r=2))
    tiny.perturb(model)
    inputs = tiny.batch("llama")
    expected = tiny.run(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = ph.from_pretrained(quantized(kind)[0], tmp_path)
    torch.testing.assert_close(tiny.run(loaded, inputs), expected, **TOLERANCE[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_into_a_quantized_base_is_refused_and_leaves_the_model_as_it_was(kind):
    base, _ = quantized(kind)
    model = ph.attach(base, ph.LoRA(r=2))
    tiny.perturb(model)
    inputs = tiny.batch("llama")
    before = tiny.run(model, inputs)
    with pytest.raises(UnsupportedModelError, match="quantized.*model.layers.0.self_attn.q_proj.*without quantization"):
        model.merge_and_unload()
    torch.testing.assert_close(tiny.run(model, inputs), before, rtol=0, atol=0)  # still attached, nothing written


def test_qlora_loaded_as_users_load_it_trains_with_trainer_and_its_checkpoint_loads_on_either_base(tmp_path):
    """BitsAndBytesConfig through from_pretrained (what QLoRA users run), Trainer, then the checkpoint back onto a
    fresh 4-bit base (equal outputs) and onto the full-precision base (the usual way to serve it)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)  # widths of 64: bitsandbytes' CPU inference kernel needs in_features >= its block size
    config = transformers.LlamaConfig(vocab_size=tiny.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    four_bit = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32)

    def load(**kw):
        return transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu", **kw)

    model = ph.attach(load(quantization_config=four_bit), ph.LoRA(r=2))
    assert isinstance(model.base.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    inputs = tiny.batch("llama")
    data = [{"input_ids": ids, "attention_mask": mask, "labels": ids}
            for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, max_steps=2,
                                          save_steps=2, learning_rate=1e-2)
    start = {n: p.clone() for n, p in model.module_parameters()}
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[ph.SaveModulesCallback()]).train()
    assert all(not torch.equal(p, start[n]) for n, p in model.module_parameters() if n.endswith("B"))  # trained
    model.eval()
    expected = tiny.run(model, inputs)
    loaded = ph.from_pretrained(load(quantization_config=four_bit), tmp_path / "out" / "checkpoint-2")
    torch.testing.assert_close(tiny.run(loaded, inputs), expected, rtol=1e-5, atol=1e-5)
    full = ph.from_pretrained(load(), tmp_path / "out" / "checkpoint-2")  # the same architecture, unpacked
    trained = model.state_dict()
    assert trained and all(torch.equal(v, trained[k]) for k, v in full.state_dict().items())
