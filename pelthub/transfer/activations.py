"""How a soft prompt stimulates a frozen model: the FFN activations behind ON and PANDA.

For each prompt P (L, d) the model reads `inputs_embeds = [P; e(filler)]`
(L + 1 positions, all attended) and every layer's FFN activation is read at
one position:

    a_ℓ(P) = σ(W_up^ℓ h_ℓ + b^ℓ)[keep]        ∈ R^F     ℓ = 1..N (encoder layers)

where σ is the model's FFN nonlinearity. It is captured generically as the
*input* of each layer's second FFN linear (the "down" site: BERT
`output.dense`, T5 `DenseReluDense.wo`, GPT-2 `mlp.c_proj`, Llama
`down_proj`), which is the activated intermediate in every family (for gated
FFNs it is act(gate)·up). `keep` is the filler's position by default (Su et
al. 2022 keep one position) or the mean over the L prompt positions with
`position="mean"`. Encoder-decoder models run their encoder only.

Many prompts go through in one stacked forward: prompts of equal length are
batched together, `chunk` at a time. The model runs in eval mode (no dropout)
and without gradients; its training flag is restored afterwards.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..sites import Sites

POSITIONS = ("filler", "mean")


def down_sites(base: nn.Module) -> list[str]:
    """Names of the per-layer second FFN linears, in layer order (encoder only for encoder-decoder models)."""
    sites = Sites(base)
    names = sites.require("down", "transferability by activations (ON, activation_cosine)")
    if sites.geometry.encoder_decoder:
        names = [n for n in names if ".encoder." in f".{n}"]
    return names


@torch.no_grad()
def prompt_activations(base: nn.Module, prompts: torch.Tensor | Sequence[torch.Tensor], filler_id: int | None = None,
                       position: str = "filler", chunk: int = 64, progress: bool = False) -> torch.Tensor:
    """FFN activations (B, N_layers, F) of B prompts, each (L_b, d), on the frozen `base`.

    `filler_id`: the token appended after the prompt (default: the config's
    `pad_token_id`, else 0; `rank_sources` passes the tokenizer's mask token).
    """
    if position not in POSITIONS:
        raise ConfigError(f"position must be one of {POSITIONS}, got {position!r}")
    if chunk < 1:
        raise ConfigError(f"chunk must be a positive int, got {chunk!r}")
    items = [p.detach() for p in (prompts.unbind(0) if isinstance(prompts, torch.Tensor) and prompts.dim() == 3
                                  else prompts)]
    if not items:
        raise ConfigError("no prompts given")
    embed = base.get_input_embeddings()
    d = embed.weight.shape[1]
    bad = [tuple(p.shape) for p in items if p.dim() != 2 or p.shape[1] != d]
    if bad:
        raise ConfigError(f"prompts must be (length, {d}) tensors for this base model, got shapes {bad[:3]}")
    if filler_id is None:
        filler_id = getattr(base.config, "pad_token_id", None) or 0
    device, dtype = embed.weight.device, embed.weight.dtype
    filler = embed(torch.tensor([filler_id], device=device)).to(dtype)       # (1, d)
    names = down_sites(base)
    captured: list[torch.Tensor] = []
    handles = [base.get_submodule(n).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
               for n in names]
    runner = base.get_encoder() if Sites(base).geometry.encoder_decoder else base
    was_training = base.training
    base.eval()
    out: list[torch.Tensor | None] = [None] * len(items)
    try:
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(items):
            by_length.setdefault(p.shape[0], []).append(i)
        parts = [(length, idx[s:s + chunk]) for length, idx in by_length.items() for s in range(0, len(idx), chunk)]
        for length, part in tqdm(parts, desc="activations", disable=not progress, leave=False):
            x = torch.stack([items[i].to(device, dtype) for i in part])                # (b, L, d)
            x = torch.cat([x, filler.expand(len(part), 1, d)], dim=1)                # (b, L+1, d)
            captured.clear()
            runner(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long, device=device))
            acts = torch.stack(captured, dim=1).float()                               # (b, N, L+1, F)
            kept = acts[:, :, length] if position == "filler" else acts[:, :, :length].mean(2)
            for j, i in enumerate(part):
                out[i] = kept[j].cpu()
    finally:
        for h in handles:
            h.remove()
        base.train(was_training)
    return torch.stack(out)  # type: ignore[arg-type]
