"""dtype and device: every kind on a bf16 and an fp16 base, `.to(dtype)`, `torch.autocast`, the base's device.

The rule (README, "dtype and device"): modules are built on the base's device in fp32,
whatever the base's dtype, and their outputs are cast to the base's dtype where they
meet it (like PEFT's default); `model.to(dtype)` casts them with the base when asked.
The reference for each half-precision run is the same modules on the fp32 base.
"""
import pytest
import torch
import transformers
from packaging.version import Version

import pelthub as ph
from tests import tiny
from tests.tiny import perturb

TASKS = ("a", "b")
SOURCES = [torch.randn(3, 32, generator=torch.Generator().manual_seed(s)) * 0.3 for s in range(2)]
KINDS = {
    "lora": ph.LoRA(r=2), "pfeiffer": ph.Bottleneck(reduction=4), "houlsby": ph.Bottleneck(placement="houlsby"),
    "parallel": ph.Bottleneck(placement="parallel"), "compacter": ph.Compacter(reduction=4),
    "prefix": ph.Prefix(length=2), "ia3": ph.IA3(), "ln": ph.LNTuning(), "prompt": ph.Prompt(length=2),
    "poly": ph.Poly(tasks=TASKS, skills=2, rank=2),
    "unipelt": ph.UniPELT(lora=ph.LoRA(r=2), prefix=ph.Prefix(length=2), adapter=ph.Bottleneck(reduction=4)),
    "attempt": ph.AttentionMix(SOURCES, target=ph.Prompt(length=3)),
}
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def kwargs(kind):
    return {"task_ids": ["a", "b", "a"]} if kind == "poly" else {}


def fp32_and_half(arch, kind, dtype):
    """The same modules on an fp32 base and on a copy of it cast to `dtype` (modules moved across as they are)."""
    model = ph.compose(tiny.BUILDERS[arch](), KINDS[kind]).eval()
    perturb(model, scale=0.5)
    half = ph.compose(tiny.BUILDERS[arch]().to(dtype), KINDS[kind]).eval()
    half.load_state_dict(model.state_dict())
    return model, half


# Open bug: on transformers 5.12.1 (our oldest) a LoRA on a bf16 T5 is off by 3.2 where the modules' effect is 5.5
# (the bare bf16 T5 is within 0.03); on 5.24 it holds. Strict: it flags the day it is fixed.
OLD_T5_BF16_LORA = pytest.mark.xfail(
    Version(transformers.__version__) < Version("5.24"), strict=True,
    reason="LoRA on a bf16 T5 drifts on transformers < 5.24 (see the issue 15 closing note)")


def _cases():
    return [pytest.param(arch, kind, dtype, marks=[OLD_T5_BF16_LORA] * ((arch, kind, dtype) == ("t5", "lora", "bf16")))
            for arch in ("llama", "t5") for kind in KINDS for dtype in HALF]


@pytest.mark.parametrize("arch, kind, dtype", _cases())
def test_every_kind_runs_forward_backward_and_generate_on_a_half_base(arch, kind, dtype):
    model, half = fp32_and_half(arch, kind, HALF[dtype])
    inputs = tiny.batch(arch)
    want = tiny.run(model, inputs, **kwargs(kind))
    bare = tiny.run(tiny.BUILDERS[arch](), inputs)
    assert all(p.dtype == torch.float32 for _, p in half.module_parameters())  # the default: modules stay fp32
    out = half(**inputs, **kwargs(kind)).logits
    assert out.dtype == HALF[dtype]
    error, effect = (out.float() - want).abs().max(), (want[:, -bare.shape[1]:] - bare).abs().max()  # prompts prepend
    assert error < 0.25 * effect, f"half error {error:.3g} vs the modules' effect {effect:.3g}"
    out.float().square().mean().backward()
    trained = [(n, p) for n, p in half.module_parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trained)
    ids = inputs["input_ids"]
    new = half.generate(ids, attention_mask=inputs["attention_mask"], max_new_tokens=2, min_new_tokens=2,
                        do_sample=False, **kwargs(kind))
    assert new.shape[0] == ids.shape[0] and new.shape[1] == (ids.shape[1] if arch != "t5" else 1) + 2


@pytest.mark.parametrize("kind", ["lora", "prefix", "prompt", "poly", "unipelt"])
def test_to_dtype_casts_the_modules_with_the_base(kind):
    model, _ = fp32_and_half("llama", kind, torch.bfloat16)
    inputs = tiny.batch("llama")
    want = tiny.run(model, inputs, **kwargs(kind))
    assert model.to(torch.float16) is model
    assert model.dtype == torch.float16
    assert all(p.dtype == torch.float16 for _, p in model.module_parameters())
    assert all(p.dtype == torch.float16 for p in model.base.parameters())
    torch.testing.assert_close(tiny.run(model, inputs, **kwargs(kind)).float(), want, rtol=0, atol=2e-2)
    model.float()
    assert all(p.dtype == torch.float32 for _, p in model.module_parameters())


@pytest.mark.parametrize("kind", ["lora", "pfeiffer", "prefix", "ia3", "prompt", "poly", "unipelt", "attempt"])
def test_autocast_gives_the_fp32_outputs_within_bf16_precision_and_fp32_gradients(kind):
    model, _ = fp32_and_half("llama", kind, torch.bfloat16)
    inputs = tiny.batch("llama")
    want = tiny.run(model, inputs, **kwargs(kind))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs, **kwargs(kind)).logits
    assert out.dtype == torch.bfloat16  # autocast reached the base's matmuls
    torch.testing.assert_close(out.float(), want, rtol=0, atol=5e-2)
    out.float().sum().backward()
    grads = [p.grad for _, p in model.module_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)


def test_modules_are_built_on_the_base_device_even_when_it_is_meta():
    """A weightless (meta) base: the modules hold real tensors on the CPU, ready for a later `to_empty`/load."""
    with torch.device("meta"):
        base = tiny.bert()
    assert base.device.type == "meta"
    model = ph.attach(base, ph.LoRA(r=2), head=True)
    assert all(p.device.type == "cpu" for p in model.adapters.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_modules_follow_a_cuda_base_and_to_moves_them_back():
    model = ph.attach(tiny.bert().cuda(), ph.LoRA(r=2), head=True)
    assert all(p.device.type == "cuda" for _, p in model.module_parameters())
    model.to("cpu")
    assert all(p.device.type == "cpu" for _, p in model.module_parameters())
