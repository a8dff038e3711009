"""QLoRA smoke: a LoRA training step on a 4-bit (nf4) base against the same base unquantized.

    PYTHONPATH=. python -m benchmarks.qlora            # Llama hidden 1024, 8 layers, batch 8 x 256
    PYTHONPATH=. python -m benchmarks.qlora --quick    # hidden 256, 2 layers, batch 4 x 64

A randomly initialised Llama (no download; widths are multiples of 32, which bitsandbytes' CPU
inference kernel needs) is saved once and loaded twice the way QLoRA users load one:
`from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, nf4))` and plainly; both get `ph.LoRA(r=16)` on every decoder linear with the same weights. The table gives median
milliseconds of a training step (forward, backward, AdamW on the LoRA only), the base's weight
bytes, the peak device memory of a step (CUDA only), and the largest logit difference between the
two (what 4 bits cost). Runs on CUDA when available, else on CPU (bitsandbytes' CPU layers).
"""
from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch

import pelthub as ph
from benchmarks.common import interleaved, median, print_table, setup


def bases(quick: bool, device: str) -> dict[str, torch.nn.Module]:
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
    size = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2) if quick else \
        dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8)
    config = LlamaConfig(vocab_size=1000, num_attention_heads=8, num_key_value_heads=8, **size)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as folder:
        LlamaForCausalLM(config).save_pretrained(folder)
        four_bit = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        return {"unquantized": LlamaForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device),
                "nf4": LlamaForCausalLM.from_pretrained(folder, quantization_config=four_bit, device_map=device)}


def run(quick: bool = False) -> list[dict[str, Any]]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch, seq = (4, 64) if quick else (8, 256)
    ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    models = {name: ph.attach(base, ph.LoRA(r=16, targets=("q", "k", "v", "o", "gate", "up", "down"))) for name, base in bases(quick, device).items()}
    state = models["unquantized"].state_dict()
    models["nf4"].load_state_dict(state)  # the same LoRA weights on both bases
    with torch.no_grad():
        logits = {name: m(input_ids=ids).logits.float() for name, m in models.items()}
    gap = (logits["nf4"] - logits["unquantized"]).abs().max().item()
    optims = {name: torch.optim.AdamW([p for _, p in m.module_parameters()], lr=1e-4) for name, m in models.items()}

    def step(name: str) -> None:
        models[name](input_ids=ids, labels=ids).loss.backward()
        optims[name].step()
        optims[name].zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()

    peaks = {}
    for name in models:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step(name)
        peaks[name] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    times = interleaved({name: (lambda n=name: step(n)) for name in models}, repeats=3 if quick else 10)
    rows = []
    for name, m in models.items():
        base_bytes = sum(p.numel() * p.element_size() for p in m.base.parameters())
        rows.append({"base": name, "device": device, "step_ms": median(times[name]), "base_MiB": base_bytes / 2**20,
                     "peak_MiB": peaks[name] if peaks[name] is not None else "n/a (CPU)",
                     "max logit gap": gap if name == "nf4" else 0.0})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="hidden 256, 2 layers, batch 4 x 64")
    args = parser.parse_args()
    setup()
    print_table(run(args.quick), [(k, k) for k in ("base", "device", "step_ms", "base_MiB", "peak_MiB",
                                                   "max logit gap")])


if __name__ == "__main__":
    main()
