"""Differentially private training of a model's modules (DP-SGD, Abadi et al. 2016) with Opacus.

Each step draws a Poisson batch (every example joins independently with probability
q = batch_size / n), takes each example's gradient g_i of its own loss with respect to the
module parameters (the base is frozen: nothing else trains), clips it and adds noise:

    g̃ = ( Σ_{i ∈ batch} g_i · min(1, C / ‖g_i‖) + N(0, σ²C²·I) ) / (q·n)

where ‖g_i‖ is the norm over all module parameters together, C = `max_grad_norm` and
σ = `noise_multiplier`; AdamW then steps on g̃. Opacus' `DPOptimizer` does the clipping,
the noise and the scaling, and its RDP accountant turns (σ, q, steps) into ε at the given δ.

Per-example gradients: Opacus' samplers hook the layer that owns a parameter and read that
layer's input and output gradient, but pelthub's modules act inside hooks on the base's
layers (a LoRA's A and B are used in the hook on the frozen linear layer, never by a forward
of their own), so those samplers would see nothing; and vmapping the whole model over the
examples stops at transformers' data-dependent mask checks. Instead the batch runs in
microbatches of m examples: one forward gives their losses l_i, and one backward vectorised
over the m cotangents e_i (`torch.autograd.grad(..., is_grads_batched=True)`) gives ∂l_i/∂θ
for each, for every module kind. That backward costs m backward passes of the microbatch,
so a step costs about B/m · m² = B·m example-passes: m = 1 (the default: one forward and
backward per example) was the fastest on CPU. On MiniLM with a LoRA at B = 16 a step took
4.0-8.9 s with m = 1, 25-46 s with m = 16, and 4.2-5.5 s without privacy (2 shared cores at
load 13-21, `python -m benchmarks.privacy`).

The per-step losses `fit_private` returns are not private: they are for watching training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import ConfigError
from .model import ModularModel
from .modules.config import check_fields
from .tasks import from_datasets
from .tasks.generative import is_generative
from .training import Columns, Data, _flatten, encode, param_groups


@dataclass(frozen=True)
class Privacy:
    """DP-SGD settings: noise_multiplier σ (noise std over the clipping norm), max_grad_norm C (each
    example's gradient norm bound), delta δ of the (ε, δ) guarantee (below 1 / the number of examples)."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float = 1e-5

    def __post_init__(self) -> None:
        check_fields(self)
        if self.noise_multiplier <= 0:
            raise ConfigError(f"Privacy.noise_multiplier must be > 0, got {self.noise_multiplier!r} (σ = 0 adds no "
                              "noise: ε = ∞); 0.5-2 is usual")
        if self.max_grad_norm <= 0:
            raise ConfigError(f"Privacy.max_grad_norm must be > 0, got {self.max_grad_norm!r}; e.g. 1.0")
        if not 0 < self.delta < 1:
            raise ConfigError(f"Privacy.delta must be in (0, 1), got {self.delta!r}; pick it below 1 / the number "
                              "of training examples, e.g. 1e-5")


@dataclass(frozen=True)
class PrivateRun:
    """What `fit_private` did: the per-step mean losses (NaN for an empty Poisson batch) and the
    (ε, δ) the RDP accountant gives for `steps` steps at sample rate q with `privacy`'s σ."""

    losses: list[float]
    epsilon: float
    delta: float
    steps: int
    sample_rate: float
    privacy: Privacy

    def record(self) -> dict[str, Any]:
        """The entry saved in pelthub.json and on the registry card (`privacy`)."""
        return {"epsilon": self.epsilon, "delta": self.delta, "noise_multiplier": self.privacy.noise_multiplier,
                "max_grad_norm": self.privacy.max_grad_norm, "sample_rate": self.sample_rate, "steps": self.steps,
                "accountant": "rdp", "sampling": "poisson"}


def example_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) cross-entropy of each example's logits against its label."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return F.cross_entropy(model(**inputs).logits.float(), batch["labels"], reduction="none")


def per_example_gradients(losses: torch.Tensor, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
    """∂l_i/∂θ as one (B, *θ.shape) tensor per parameter: one backward vectorised over the B cotangents e_i."""
    eye = torch.eye(len(losses), dtype=losses.dtype, device=losses.device)
    grads = torch.autograd.grad(losses, params, eye, is_grads_batched=True, allow_unused=True)
    return [p.new_zeros(len(losses), *p.shape) if g is None else g for g, p in zip(grads, params)]


def set_grad_samples(model: nn.Module, batch: dict[str, torch.Tensor] | None, params: Sequence[nn.Parameter],
                     microbatch: int = 1) -> torch.Tensor:
    """Store each example's gradient where `DPOptimizer` reads it (`p.grad_sample`, (B, *p.shape)), computed
    `microbatch` examples per forward; the (B,) losses. `batch=None` is an empty Poisson batch: zero
    examples, so the step is noise alone."""
    if batch is None:
        for p in params:
            p.grad_sample = p.new_zeros(0, *p.shape)
        return torch.zeros(0)
    losses, grads = [], []
    for start in range(0, len(batch["labels"]), microbatch):  # time grows with B · microbatch (module docstring)
        part = example_losses(model, {k: v[start:start + microbatch] for k, v in batch.items()})
        grads.append(per_example_gradients(part, params))
        losses.append(part.detach())
    for p, g in zip(params, zip(*grads)):
        p.grad_sample = torch.cat(g).to(p.dtype)
    return torch.cat(losses)


def fit_private(model: ModularModel, data: Data, tokenizer: Any, privacy: Privacy, steps: int = 100,
                batch_size: int = 32, lr: float = 1e-3, lr_routing: float | None = None, weight_decay: float = 0.0,
                seed: int = 0, max_length: int = 64, progress: bool | str = True, microbatch: int = 1, *,
                split: str | None = None, columns: Columns | None = None) -> PrivateRun:
    """Train `model`'s modules with DP-SGD for `steps` steps of expected batch `batch_size`; (ε, δ) as run.

    Learning rates per group as in `training.param_groups`; `microbatch` examples share a forward for
    their per-example gradients (see the module docstring: 1 is fastest on CPU). The run's `record()` is kept on
    `model.privacy`, so `save_pretrained` and `Registry.add` write it to pelthub.json and the card.
    Needs Opacus (`pip install 'pelthub[dp]'`), imported here: it takes seconds and sets up logging.
    """
    try:
        from opacus.accountants import RDPAccountant
        from opacus.optimizers import DPOptimizer
    except ImportError:
        raise ConfigError("fit_private needs Opacus: pip install 'pelthub[dp]'") from None
    if not isinstance(model, ModularModel):
        raise ConfigError(f"fit_private trains the modules of a ModularModel (ph.attach(base, ...)), got "
                          f"{type(model).__name__}")
    if is_generative(data):
        raise ConfigError("fit_private trains on labelled classification examples; input/target (generative) "
                          "examples are not supported yet")
    own = {id(p) for _, p in model.module_parameters()}
    base = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in own]
    if base:
        raise ConfigError(f"fit_private trains module parameters only, but base parameters require grad "
                          f"({base[:3]}); freeze them with model.base.requires_grad_(False)")
    examples, task_ids = _flatten(from_datasets(data, split, columns), model.task_names)
    if type(microbatch) is not int or microbatch < 1:
        raise ConfigError(f"microbatch must be a positive integer (examples per forward), got {microbatch!r}")
    if len(examples) < batch_size:
        raise ConfigError(f"batch_size={batch_size} exceeds the {len(examples)} examples; the sample rate "
                          "batch_size / examples must be at most 1")
    sample_rate = batch_size / len(examples)
    torch.manual_seed(seed)
    device = model.device
    params = [p for _, p in model.module_parameters() if p.requires_grad]
    optimizer = DPOptimizer(torch.optim.AdamW(param_groups(model, lr, lr_routing, weight_decay)),
                            noise_multiplier=privacy.noise_multiplier, max_grad_norm=privacy.max_grad_norm,
                            expected_batch_size=batch_size, generator=torch.Generator(device).manual_seed(seed))
    accountant = RDPAccountant()
    sampler = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc=progress if isinstance(progress, str) else "train (DP)", disable=not progress,
               leave=False)
    for _ in bar:
        idx = (torch.rand(len(examples), generator=sampler) < sample_rate).nonzero().flatten().tolist()  # Poisson
        batch = None
        if idx:
            batch = encode(tokenizer, [examples[i] for i in idx], max_length)
            if task_ids is not None:
                batch["task_ids"] = torch.tensor([task_ids[i] for i in idx])
            batch = {k: v.to(device) for k, v in batch.items()}
        step_losses = set_grad_samples(model, batch, params, microbatch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        accountant.step(noise_multiplier=privacy.noise_multiplier, sample_rate=sample_rate)
        losses.append(step_losses.mean().item())  # NaN for an empty batch
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    run = PrivateRun(losses, accountant.get_epsilon(privacy.delta), privacy.delta, steps, sample_rate, privacy)
    model.privacy = run.record()
    return run
