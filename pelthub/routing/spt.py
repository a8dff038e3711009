"""SPT (semi-parametric prompt tuning, Bari et al. 2022): soft prompt plus memory prompts retrieved per input.

A memory bank holds N frozen prompts M_1..M_N (each l × d), prompts trained on other tasks,
and a key k_j ∈ R^d for each. Every example x retrieves its own k of them::

    q        = mean_{t: mask_t = 1} Emb(x)_t                   (B, d)    frozen input embeddings
    s_bj     = cos(q_b, k_j)                                   (B, N)
    J_b      = the top_k indices j by s_bj, best first         (B, k)
    input_b  = [P_soft; M_{J_b1}; …; M_{J_bk}; Emb(x_b)]       (L + k·l + n, d)

P_soft (L × d) is a trainable soft prompt started like `Prompt` (same config, same draws), so
top_k = 0 is prompt tuning exactly. Retrieval is a top-k, not differentiable: the gradient
reaches P_soft and, with `train_bank=True`, the retrieved memory prompts; never the keys.
A batch retrieves per example in one gather (mixed batches need no grouping).

Keys. By default k_j = mean_t M_j,t, the memory prompt's own mean token, which lives in the same
space as q. The better key is the mean query over the prompt's training inputs: `memory_key(base,
data, tokenizer)` computes it (mean over examples of q), and `keys=` gives it per memory prompt.
(Registry routing signatures are LoRA prototypes, one per layer, and do not fit prompts.)

The config (`SPTConfig`) is data: bank names (registry refs "name@version" or labels), top_k, the
soft prompt's `Prompt` config and, once built, `memory_length` l. `SPT(bank, ...)` pairs it with the
memory values and keys as build inputs (`Sourced`). Bank members are given like ATTEMPT's sources:
tensors, PromptModules or ModularModels holding one prompt (a mapping names them, otherwise they are
"memory0", ...), or names resolved through `registry=` when the module is built. Built, the bank and
keys are parameters of the module, so `save_pretrained` writes them and a saved SPT model loads
stand-alone; `parents()` lists the bank members that are registry modules, for the registry's
dependency graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..modules.base import CallContext, PeltModule
from ..modules.config import MAX_SIZE, ModuleConfig, Sourced, config_from_dict, flag, positive_int
from ..modules.prompt import Prompt, initial_prompt
from ..registry import parent_entries
from ..sites import Sites
from ..tasks import as_examples
from ..training import batches
from .attention import _source_values, _split_sources, pool_tokens


def SPT(bank: Any = (), keys: Any = None, registry: Any = None, **fields: Any) -> Sourced:
    """An SPT block for `compose` or `attach`: the config over `bank`, with the memory values and keys as build inputs.

    bank: the memory prompts: names (registry refs), or the prompts themselves (tensors, PromptModules,
    models holding one prompt); a list or a {name: prompt} mapping. keys: None (each prompt's mean
    token), a {name: (d,) key} mapping or an (N, d) tensor in bank order, e.g. from `memory_key`.
    registry: resolves the names when the module is built (`compose(registry=...)` also does).
    fields: see `SPTConfig` (top_k, prompt, train_bank).
    """
    names, values = _split_sources(bank, "SPT", "bank", "memory")
    return Sourced(SPTConfig(bank=names, **fields), {"values": values, "keys": _keys(names, keys),
                                                     "registry": registry})


@dataclass(frozen=True)
class SPTConfig(ModuleConfig):
    """Config of an SPT module: pure data (build it through `SPT`).

    bank: memory prompt names (see the module docstring). top_k: memory prompts retrieved per example
    (0 to the bank size; 0 is prompt tuning). prompt: the Prompt config of the trainable soft prompt
    (length L and init). train_bank: let the memory prompts train (frozen by default). memory_length:
    l, filled at build (the bank's prompts must share it).
    """

    kind: ClassVar[str] = "spt"
    bank: tuple[str, ...] = ()
    top_k: int = 1
    prompt: Prompt = Prompt(length=20)
    train_bank: bool = False
    memory_length: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.prompt, Mapping):
            object.__setattr__(self, "prompt", config_from_dict({"kind": "prompt", **self.prompt}))
        super().__post_init__()

    def validate(self) -> None:
        if (not isinstance(self.bank, tuple) or not all(isinstance(n, str) and n for n in self.bank)
                or len(set(self.bank)) != len(self.bank) or len(self.bank) > MAX_SIZE):
            raise ConfigError(f"SPT.bank must have at most {MAX_SIZE:,} distinct non-empty names, "
                              f"got {list(self.bank)!r:.120}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not 0 <= self.top_k <= len(self.bank):
            raise ConfigError(f"SPT.top_k must be an integer from 0 to the bank size {len(self.bank)}, "
                              f"got {self.top_k!r:.80}")
        if not isinstance(self.prompt, Prompt):
            raise ConfigError(f"SPT.prompt must be a Prompt config, e.g. Prompt(length=20), got {self.prompt!r:.80}")
        flag("SPT", "train_bank", self.train_bank)
        if self.memory_length is not None:
            positive_int("SPT", "memory_length", self.memory_length)
            if not self.bank:
                raise ConfigError("SPT.memory_length is the length of the bank's prompts; an empty bank has none")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "prompt": self.prompt.to_dict()}

    def build(self, base: nn.Module, sites: Sites, tokenizer: Any = None, init: bool = True,
              values: Mapping[str, torch.Tensor] | None = None, keys: Mapping[str, torch.Tensor] | None = None,
              registry: Any = None, **_: object) -> "SPTModule":
        """The module; `values` ({name: (l, d)}), `keys` ({name: (d,)}) and `registry` give the bank."""
        reads = getattr(base, "main_input_name", "input_ids")
        if reads != "input_ids":
            raise UnsupportedModelError(f"SPT retrieves by the input's token embeddings, which {type(base).__name__} "
                                        f"(it reads {reads}) has none of; use VPT or Prompt there")
        embedding = base.get_input_embeddings().weight
        d = embedding.shape[1]
        if not init:  # values come from a saved state
            if self.bank and self.memory_length is None:
                raise ConfigError("an SPT config with a bank but no memory_length cannot be rebuilt empty; it is "
                                  "filled when the SPT model is first built from its bank")
            n, length = len(self.bank), self.memory_length or 0
            return SPTModule(self, torch.zeros(self.prompt.length, d), torch.zeros(n, length, d), torch.zeros(n, d))
        soft = initial_prompt(self.prompt, embedding, tokenizer)  # first, so k = 0 draws as Prompt does
        values = dict(values or {})
        memory = [_source_values(name, values, registry, base, d, "SPT memory") for name in self.bank]
        lengths = {name: m.shape[0] for name, m in zip(self.bank, memory)}
        if len(set(lengths.values())) > 1 or self.memory_length not in (None, *lengths.values()):
            raise ConfigError(f"SPT memory prompts must share one length (memory_length={self.memory_length}), "
                              f"got {lengths} (name: length)")
        stacked = torch.stack(memory) if memory else torch.zeros(0, 0, d)
        key_rows = dict(keys or {})
        bad = {n: tuple(k.shape) for n, k in key_rows.items() if k.shape != (d,)}
        if bad:
            raise ConfigError(f"SPT keys must be ({d},) vectors, the width of this model's embeddings; got {bad}")
        found = torch.stack([key_rows[n].detach().float().cpu() if n in key_rows else m.mean(0)
                             for n, m in zip(self.bank, memory)]) if memory else torch.zeros(0, d)
        config = self.replace(memory_length=stacked.shape[1] if memory else None)
        module = SPTModule(config, soft, stacked, found)
        module.resolved = parent_entries(registry, [n for n in self.bank if n not in values])
        return module


class SPTModule(PeltModule):
    """Built SPT module: the trainable soft prompt `soft` (L, d), the `memory` bank (N, l, d), frozen unless
    `train_bank`, and its frozen `keys` (N, d)."""

    def __init__(self, config: SPTConfig, soft: torch.Tensor, memory: torch.Tensor, keys: torch.Tensor):
        super().__init__()
        self.config = config
        self.soft = nn.Parameter(soft)
        self.memory = nn.Parameter(memory, requires_grad=config.train_bank)
        self.keys = nn.Parameter(keys, requires_grad=False)
        self.resolved: list[dict[str, Any]] = []  # {"ref", "sha256"} of the bank members a registry gave at build

    def retrieve(self, embeds: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices into the bank (B, top_k), best first, and their cosine scores (B, top_k) for input
        embeddings (B, n, d) with padding mask (B, n) (None: every position is real)."""
        q = pool_tokens(embeds.to(self.keys.dtype), mask, "mean")                       # (B, d)
        scores = F.cosine_similarity(q[:, None], self.keys[None], dim=-1)              # (B, N)
        top, chosen = scores.topk(self.config.top_k, dim=1)
        return chosen, top

    def prompt(self, embeds: torch.Tensor, mask: torch.Tensor | None, ctx: CallContext) -> torch.Tensor:
        batch, d = embeds.shape[0], self.soft.shape[1]
        soft = self.soft.expand(batch, -1, -1)
        if self.config.top_k == 0:
            return soft
        chosen, _ = self.retrieve(embeds, mask)
        return torch.cat([soft, self.memory[chosen].reshape(batch, -1, d)], dim=1)    # (B, L + k·l, d)

    def parents(self) -> list[dict[str, Any]]:
        """{"ref", "sha256"} of the bank members that were registry modules when the module was built
        (labels of values given directly are not refs); `compose` records them in `model.parents`."""
        return list(self.resolved)


@torch.no_grad()
def memory_key(base: nn.Module, data: Any, tokenizer: Any, batch_size: int = 64, max_length: int = 64) -> torch.Tensor:
    """(d,) key of a memory prompt: the mean over its training inputs of the SPT query q (the mean frozen
    input embedding of each input, padding excluded). data: `Example`s or a 🤗 dataset."""
    examples = as_examples(data)
    if not examples:
        raise ConfigError("memory_key needs at least one example; got an empty dataset")
    embed = base.get_input_embeddings()
    total = torch.zeros(embed.weight.shape[1], dtype=torch.float64)
    for batch in batches(examples, tokenizer, batch_size, shuffle=False, max_length=max_length):
        ids = batch["input_ids"].to(embed.weight.device)
        total += pool_tokens(embed(ids).float(), batch["attention_mask"].to(ids.device), "mean").double().sum(0).cpu()
    return (total / len(examples)).float()


def _keys(names: tuple[str, ...], keys: Any) -> dict[str, torch.Tensor]:
    """{name: key} from None, a {name: key} mapping over bank names, or an (N, d) tensor in bank order."""
    if keys is None:
        return {}
    if isinstance(keys, torch.Tensor):
        if keys.dim() != 2 or keys.shape[0] != len(names):
            raise ConfigError(f"SPT keys as a tensor must be (N, d) with one row per bank prompt (N = {len(names)}), "
                              f"got {tuple(keys.shape)}")
        return dict(zip(names, keys))
    if not isinstance(keys, Mapping) or not set(keys) <= set(names):
        raise ConfigError(f"SPT keys must be None, an (N, d) tensor or a {{bank name: (d,) key}} mapping over "
                          f"{list(names)}, got {sorted(keys) if isinstance(keys, Mapping) else type(keys).__name__}")
    return {n: torch.as_tensor(k) for n, k in keys.items()}
