"""(IA)³ against a base whose weights are rescaled by hand (ALGORITHMS.md §6, ia3.py).

    attention targets: l ⊙ (W x + b)  ⇔  rows of W (Linear) / columns of W (Conv1D) and b scaled by l
    feed-forward targets: W (l ⊙ x)   ⇔  columns of W (Linear) / rows of W (Conv1D) scaled by l
"""
from __future__ import annotations

import pytest
import torch

import pelthub as ph
from tests import tiny
from tests.reference.handmade import biased, logits, with_weights


def vectors(model: ph.ModularModel) -> dict[str, torch.Tensor]:
    state = model.adapters["default"]["ia3"].state_dict()
    return {k.removeprefix("scales.").replace("-", "."): v for k, v in state.items()}


def scaled_reference(arch: str, scales: dict[str, torch.Tensor], on_input: set[str]):
    fresh = biased(arch)
    params = dict(fresh.named_parameters())
    conv1d = arch == "gpt2"
    edits = {}
    for site, l in scales.items():
        w, b = params[f"{site}.weight"], params[f"{site}.bias"]
        if site in on_input:    # scale the input features
            edits[f"{site}.weight"] = w * (l[:, None] if conv1d else l[None, :])
        else:                   # scale the output features and the bias
            edits[f"{site}.weight"] = w * (l[None, :] if conv1d else l[:, None])
            edits[f"{site}.bias"] = b * l
    return with_weights(fresh, edits)


def randomise(model: ph.ModularModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("arch,expected", [
    ("bert", {f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in ("attention.self.key", "attention.self.value",
                                                                        "output.dense")}),
    ("gpt2", {f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_proj")})])
def test_default_ia3_equals_rescaled_weights(arch, expected):
    model = ph.attach(biased(arch), ph.IA3())
    randomise(model)
    scales = vectors(model)
    assert set(scales) == expected
    ffn = {s for s in scales if s.endswith(("output.dense", "mlp.c_proj")) and "attention" not in s}
    assert all(scales[s].numel() == 64 if arch == "bert" else 128 for s in ffn)   # input width of the FFN's W₂
    batch = tiny.batch(arch)
    ref = scaled_reference(arch, scales, ffn)
    torch.testing.assert_close(logits(model, **batch), logits(ref, **batch), atol=1e-5, rtol=1e-5)


def test_targets_and_feedforward_arguments():
    """`feedforward` decides input versus output scaling; `targets` which layers."""
    batch = tiny.batch("bert")
    sites = [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)]
    for feedforward, on_input in (((), set()), (("up",), set(sites))):
        model = ph.attach(biased("bert"), ph.IA3(targets=["up"], feedforward=feedforward))
        randomise(model)
        scales = vectors(model)
        assert set(scales) == set(sites)
        assert {v.numel() for v in scales.values()} == {32 if on_input else 64}
        ref = scaled_reference("bert", scales, on_input)
        torch.testing.assert_close(logits(model, **batch), logits(ref, **batch), atol=1e-5, rtol=1e-5)


def test_merge_is_the_rescaled_base():
    model = ph.attach(biased("gpt2"), ph.IA3())
    randomise(model)
    scales = vectors(model)
    ref = scaled_reference("gpt2", scales, {f"transformer.h.{i}.mlp.c_proj" for i in range(2)})
    merged = dict(model.merge_and_unload().named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(merged[name], p, atol=1e-6, rtol=1e-6)
