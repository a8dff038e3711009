"""Polytropon (Ponti et al. 2022) and Multi-Head Routing (Caccia et al. 2023).

Per adapted linear layer `Linear(in, out)` a Poly module keeps K LoRA skills cut into h heads,

    A ∈ R^{h×K×(in/h)×r},   B ∈ R^{h×K×r×(out/h)},

and routing logits Z ∈ R^{T×(h·K)}: one per layer, per transformer block or per model
(`granularity`). For an example of task t, with ℓ = Z[t] viewed as (h, K):

    training:  w̃ = σ(ℓ + log u − log(1 − u)),  u ~ U(0, 1)   (relaxed Bernoulli, τ = 1, rsample)
    eval:      w̃ = σ(ℓ)
               w[q] = w̃[q] / (Σ_k w̃[q, k] + 1e−12)                       (fp32)
    A_b[q] = Σ_k w[q, k] A[q, k],   B_b[q] = Σ_k w[q, k] B[q, k]        (parameters mix, not outputs)
    Ā_b = [A_b[1]; …; A_b[h]] ∈ R^{in×r},   B̄_b = [B_b[1], …, B_b[h]] ∈ R^{r×out}
    y = W₀x + (α/r) · x Ā_b B̄_b

Variants (`Poly.variant`):
- "poly": learned routing (MHR when heads > 1);
- "mu":   fixed uniform weights, computed as the one collapsed LoRA Ā = mean_k A, B̄ = mean_k B;
- "z":    routing only, the skills are frozen;
- "hard": K = T, task t uses skill t alone (w one-hot): many single-task LoRAs served in one
          forward; a one-task batch runs as a plain LoRA, a mixed one gathers each example's A and B
          into one fused bmm per site (pelthub/modules/grouped.py).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ..errors import ConfigError, DuplicateNameError, RoutingError
from ..modules.base import CallContext, Handle, PeltModule, add_to_output, site_key, site_name
from ..modules.config import ModuleConfig, Sourced, one_of, positive_int, positive_number, probability, targets, task_names
from ..modules.grouped import as_ids, lora_into, plan_once
from ..sites import Sites, linear_dims
from .poly_sources import over_modules

VARIANTS = ("poly", "mu", "z", "hard")
GRANULARITIES = ("layer", "block", "model")
EPS = 1e-12
INIT_RANGE = 1e-3
# Routing logits' lr relative to the skills' lr. Ponti et al. and Caccia et al. train routing
# 20-100× faster than the skills; measured on MiniLM (module lr 5e-3), 20× (0.1) leaves the
# routing near uniform after 40 steps (entropy 1.32 of ln 4 = 1.39), 200× (1.0) specialises it.
ROUTING_LR_SCALE = 50.0


@dataclass(frozen=True)
class Poly(ModuleConfig):
    """Config of a Poly / MHR module.

    tasks: task names (or their number: 3 gives "0", "1", "2"); skills: K; rank: r;
    heads: h (must divide in and out of every target); targets: site roles or module-name
    suffixes, None = the family's query and value projections; granularity: one routing
    matrix per "layer", per "block" or for the whole "model"; alpha: the update is scaled
    by alpha / rank; variant: "poly", "mu", "z" or "hard".

    alpha defaults to 16, LoRA's default, so `Poly(rank=r)` and `LoRA(r=r)` take updates of
    the same size at the same learning rate (one α/r convention across LoRA, Poly, MHR; in
    UniPELT the gate takes the place of α/r, as in the paper). mttl's and PEFT's Poly scale
    by 1/r (alpha=1): at r=4 that is a 16× smaller update, which made Poly and MHR look
    worse than a shared LoRA (0.56 vs 0.65 on MiniLM) where scale-matched they tie
    (0.654 / 0.665 / 0.654). Use alpha=1 to reproduce mttl's numbers at its learning rates.
    The routing logits train at `ROUTING_LR_SCALE` × the module lr by default (see
    `pelthub.training.param_groups`).
    """

    kind: ClassVar[str] = "poly"
    tasks: tuple[str, ...] = ()
    skills: int = 4
    rank: int = 8
    heads: int = 1
    targets: tuple[str, ...] | None = None
    granularity: str = "layer"
    alpha: float = 16.0
    dropout: float = 0.0
    variant: str = "poly"

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", task_names("Poly", self.tasks))
        super().__post_init__()

    def validate(self) -> None:
        if (not isinstance(self.tasks, tuple) or not self.tasks or len(set(self.tasks)) != len(self.tasks)
                or not all(isinstance(t, str) and t for t in self.tasks)):
            raise ConfigError(f"Poly.tasks must be a non-empty list of distinct task names (or their number), "
                              f"got {self.tasks!r}")
        for field in ("skills", "rank", "heads"):
            positive_int("Poly", field, getattr(self, field))
        targets("Poly", self.targets)
        one_of("Poly", "granularity", self.granularity, GRANULARITIES)
        positive_number("Poly", "alpha", self.alpha)
        probability("Poly", "dropout", self.dropout)
        one_of("Poly", "variant", self.variant, VARIANTS)
        if self.variant == "hard" and self.skills != len(self.tasks):
            raise ConfigError(f"Poly.skills must equal the number of tasks ({len(self.tasks)}) with "
                              f"variant='hard' (one skill per task), got {self.skills}")

    def build(self, base: nn.Module, sites: Sites, init: bool = True,
              skills: Sequence[dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None,
              **_: object) -> "PolyModule":
        """The module; `skills` (from `from_modules`) are LoRA weights to start the skills from."""
        resolved = sites.resolve(self.targets or sites.default_targets("poly"), linear=True, what="Poly")
        dims = {n: linear_dims(sites.names[n]) for found in resolved.values() for n in found}
        bad = {n: d for n, d in dims.items() if d[0] % self.heads or d[1] % self.heads}
        if bad:
            name, (d_in, d_out) = next(iter(bad.items()))
            common = math.gcd(*(x for d in dims.values() for x in d))
            divisors = [h for h in range(1, common + 1) if common % h == 0]
            raise ConfigError(f"Poly.heads={self.heads} must divide the input and output sizes of every target; "
                              f"{name} is (in={d_in}, out={d_out}). Heads that fit these targets: {divisors[-8:]}")
        module = PolyModule(self, dims)
        if init and skills:
            module.load_skills(skills)
        return module

    @classmethod
    def from_modules(cls, modules: Sequence[Any], tasks: Sequence[str] | None = None, variant: str = "hard",
                     heads: int = 1, granularity: str = "layer", registry: Any = None,
                     base: nn.Module | None = None) -> Sourced:
        """A Poly whose skills are trained LoRAs (LoRAModule, a ModularModel holding one, or registry refs).

        With variant="hard" (default) task i is served by module i exactly; "poly" or "z" learn
        routing over the inventory for `tasks`. Registry refs need `registry=` (anything with
        `.load(ref, base, heads=False)`) and `base=`. Returns the config with the LoRA weights as its build
        input (`Sourced`), for `compose`. See `poly_sources.over_modules`.
        """
        return over_modules(cls, modules, tasks, variant, heads, granularity, registry, base)


def block_of(name: str, granularity: str) -> str:
    """Key of the routing matrix a site uses: the site, its transformer block ("encoder.layer.3"), or the model."""
    if granularity == "model":
        return "model"
    match = re.match(r"(.*?\.\d+)(\.|$)", name) if granularity == "block" else None
    return site_key(match.group(1) if match else name)


class PolyLinear(nn.Module):
    """The K skills of one linear layer, cut into h heads: A (h, K, in/h, r), B (h, K, r, out/h).

    Each A block is kaiming-uniform(a=√5) on (r, in/h), i.e. U(±1/√(in/h)); B is zero.
    """

    def __init__(self, in_features: int, out_features: int, skills: int, rank: int, heads: int,
                 scale: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.scale = in_features, out_features, rank, scale
        bound = 1.0 / math.sqrt(in_features // heads)
        self.lora_a = nn.Parameter(torch.empty(heads, skills, in_features // heads, rank).uniform_(-bound, bound))
        self.lora_b = nn.Parameter(torch.zeros(heads, skills, rank, out_features // heads))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def mixed(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ā_b (b, in, r) and B̄_b (b, r, out) for weights w (b, h, K)."""
        b = w.shape[0]
        a = torch.einsum("bqk,qkir->bqir", w, self.lora_a).reshape(b, self.in_features, self.rank)
        bb = torch.einsum("bqk,qkro->brqo", w, self.lora_b).reshape(b, self.rank, self.out_features)
        return a, bb

    def skill(self, k: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Skill k's Āᵀ (r, in), B̄ᵀ (out, r) and scale, in the layout `modules.grouped` wants (a contiguous
        copy of Āᵀ: in·r values, small next to the activations); k=None: every skill's, (K, r, in), (K, out, r)."""
        skills = self.lora_a.shape[1]
        if k is not None:
            a = self.lora_a[:, k].reshape(self.in_features, self.rank).T.contiguous()
            return a, self.lora_b[:, k].transpose(0, 1).reshape(self.rank, self.out_features).T, self.scale
        a = self.lora_a.transpose(0, 1).reshape(skills, self.in_features, self.rank).transpose(1, 2).contiguous()
        b = self.lora_b.permute(1, 2, 0, 3).reshape(skills, self.rank, self.out_features).transpose(1, 2)
        return a, b, self.scale

    def collapsed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Ā (in, r), B̄ (r, out) of the uniform mixture: the means over skills, per head."""
        a = self.lora_a.mean(1).reshape(self.in_features, self.rank)
        bb = self.lora_b.mean(1).transpose(0, 1).reshape(self.rank, self.out_features)
        return a, bb

    def forward(self, x: torch.Tensor, a: torch.Tensor, bb: torch.Tensor) -> torch.Tensor:
        """(α/r)·dropout(x)·Ā·B̄ for x (b, …, in) and Ā, B̄ per example (3-D) or shared (2-D)."""
        lead = x.shape[:-1]
        x = self.dropout(x.to(a.dtype))
        if a.dim() == 2:
            return x @ a @ (bb * self.scale)
        x = x.reshape(x.shape[0], -1, self.in_features)
        return x.bmm(a).bmm(bb * self.scale).reshape(*lead, self.out_features)


class PolyModule(PeltModule):
    """Skills per adapted layer (`layers`) and routing logits per layer / block / model (`router`)."""

    def __init__(self, config: Poly, dims: dict[str, tuple[int, int]]):
        super().__init__()
        self.config = config
        c = config
        self.layers = nn.ModuleDict({
            site_key(n): PolyLinear(d_in, d_out, c.skills, c.rank, c.heads, c.alpha / c.rank, c.dropout)
            for n, (d_in, d_out) in dims.items()})
        self.groups = {site_key(n): block_of(n, c.granularity) for n in dims}
        learned = c.variant in ("poly", "z")
        self.router = nn.ParameterDict({
            g: nn.Parameter(torch.empty(len(c.tasks), c.heads * c.skills).uniform_(-INIT_RANGE, INIT_RANGE))
            for g in dict.fromkeys(self.groups.values())} if learned else {})
        self.layers.requires_grad_(c.variant != "z")

    def lr_scales(self) -> list[tuple[str, float, list[nn.Parameter]]]:
        """(group, lr relative to the module lr, parameters): the routing logits, `ROUTING_LR_SCALE`."""
        return [("routing", ROUTING_LR_SCALE, list(self.router.parameters()))] if len(self.router) else []

    def reads_call_state(self) -> bool:
        return self.config.variant != "mu"

    def install(self, base: nn.Module, ctx: CallContext) -> list[Handle]:
        if self.config.variant == "hard":
            return [base.get_submodule(site_name(k)).register_forward_hook(partial(self._hard, k, ctx))
                    for k in self.layers]
        return [add_to_output(base.get_submodule(site_name(k)), partial(self._delta, k, ctx), ctx) for k in self.layers]

    def _hard(self, key: str, ctx: CallContext, _m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """Hard routing: each example's own skill, the update fused into the output (`modules.grouped`)."""
        if ctx.bare:
            return out
        layer = self.layers[key]
        route = plan_once(ctx, self, out.shape[0], lambda b: self.task_ids(ctx, b, layer.lora_a.device))
        return lora_into(out, layer.dropout(args[0].to(layer.lora_a.dtype)), route, layer.skill)

    def _delta(self, key: str, ctx: CallContext, x: torch.Tensor) -> torch.Tensor:
        layer = self.layers[key]
        if self.config.variant == "mu":
            return layer(x, *layer.collapsed())
        ids = self.task_ids(ctx, x.shape[0], layer.lora_a.device)
        w = self.weights(self.groups[key], ids, sample=self.training)
        return layer(x, *layer.mixed(w.to(layer.lora_a.dtype)))

    def task_ids(self, ctx: CallContext, batch: int, device: torch.device) -> torch.Tensor:
        """The call's task ids (b,); a single-task module needs none."""
        ids = ctx.task_ids_for(batch)
        if ids is not None:
            return ids.to(device)
        if len(self.config.tasks) == 1:
            return torch.zeros(batch, dtype=torch.long, device=device)
        raise RoutingError(f"Poly routes by task: call model(..., task_ids=...) with one task per example, "
                           f"names from {list(self.config.tasks)} or their indices")

    def weights(self, group: str, ids: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Routing weights (b, h, K) in fp32 for task ids (b,); Σ_k w = 1 per head.

        sample=True draws the relaxed Bernoulli (τ = 1) by reparameterisation, noise per (b, q, k).
        """
        c = self.config
        logits = self.router[group].index_select(0, ids).float().view(-1, c.heads, c.skills)
        if sample:
            eps = torch.finfo(logits.dtype).eps
            u = torch.rand_like(logits).clamp_(eps, 1 - eps)
            logits = logits + u.log() - (-u).log1p()
        probs = torch.sigmoid(logits)
        return probs / (probs.sum(-1, keepdim=True) + EPS)

    def mixing(self, key: str, ids: torch.Tensor) -> torch.Tensor:
        """Eval weights (b, h, K) of any variant for one layer: learned, one-hot (hard) or 1/K (mu)."""
        c = self.config
        if c.variant == "hard":
            return nn.functional.one_hot(ids, c.skills).float()[:, None].expand(-1, c.heads, -1)
        if c.variant == "mu":
            return torch.full((ids.shape[0], c.heads, c.skills), 1.0 / c.skills, device=ids.device)
        return self.weights(self.groups[key], ids)

    @torch.no_grad()
    def routing_weights(self) -> dict[str, torch.Tensor]:
        """Eval routing weights of every task per adapted layer: {site name: (T, h, K)}."""
        device = next(self.parameters()).device
        ids = torch.arange(len(self.config.tasks), device=device)
        return {site_name(k): self.mixing(k, ids).cpu() for k in self.layers}

    def task_index(self, task: str | int) -> int:
        """A task's index, by name or index (never a negative one, nor 1.9 read as 1)."""
        return int(as_ids([task], len(self.config.tasks), "task", self.config.tasks)[0])

    @torch.no_grad()
    def add_task(self, name: str, init: str = "uniform") -> None:
        """Append a routing row for a new task to every routing matrix.

        init: "uniform" (fresh U(±1e−3): ≈ the uniform mixture), "mean" (mean of the existing
        rows) or the name of an existing task to start from. The router parameters are
        replaced: build the optimizer after adding tasks.
        """
        c = self.config
        if name in c.tasks:
            raise DuplicateNameError(f"task {name!r} is already routed; tasks: {list(c.tasks)}")
        if c.variant == "hard":
            raise RoutingError("variant='hard' serves one trained skill per task; add a task by building "
                               "Poly.from_modules with the new task's LoRA among the modules")
        if init not in ("uniform", "mean") and init not in c.tasks:
            raise ConfigError(f"add_task init must be 'uniform', 'mean' or an existing task {list(c.tasks)}, "
                              f"got {init!r}")
        for group, z in list(self.router.items()):
            row = (torch.empty_like(z[0]).uniform_(-INIT_RANGE, INIT_RANGE) if init == "uniform"
                   else z.mean(0) if init == "mean" else z[c.tasks.index(init)])
            self.router[group] = nn.Parameter(torch.cat([z, row[None]]), requires_grad=z.requires_grad)
        self.config = c.replace(tasks=(*c.tasks, name))

    def freeze_skills(self, frozen: bool = True) -> None:
        """Train routing only (variant "z") or skills and routing ("poly")."""
        if self.config.variant not in ("poly", "z"):
            raise ConfigError(f"freeze_skills applies to learned routing (variant 'poly' or 'z'), "
                              f"not {self.config.variant!r}")
        self.layers.requires_grad_(not frozen)
        self.config = self.config.replace(variant="z" if frozen else "poly")

    @torch.no_grad()
    def load_skills(self, skills: Sequence[dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Skill k ← a LoRA {site: (A (r, in), B (out, r))} with its scale folded into B.

        A LoRA of lower rank is zero-padded; a site a LoRA lacks gets B = 0 for that skill.
        """
        h = self.config.heads
        for k, lora in enumerate(skills):
            for site, (a, b) in lora.items():
                layer = self.layers[site_key(site)]
                r = a.shape[0]
                full_a = a.new_zeros(layer.in_features, layer.rank)
                full_a[:, :r] = a.T
                full_b = b.new_zeros(layer.rank, layer.out_features)
                full_b[:r] = b.T / layer.scale
                layer.lora_a[:, k] = full_a.reshape(h, -1, layer.rank)
                layer.lora_b[:, k] = full_b.reshape(layer.rank, h, -1).transpose(0, 1)


def poly_module(model: nn.Module) -> PolyModule:
    """The one PolyModule of a ModularModel (or the module itself)."""
    if isinstance(model, PolyModule):
        return model
    found = [m for m in model.modules() if isinstance(m, PolyModule)]
    if len(found) != 1:
        raise RoutingError(f"expected one Poly module in the model, found {len(found)}; "
                           "pass the module itself (model.adapters[name]['poly'])")
    return found[0]


def add_task(model: nn.Module, name: str, init: str = "uniform", tune: str = "all") -> PolyModule:
    """Add a task to a composed model's Poly module and to `model.task_names`.

    tune: "all" (few-shot Poly / MHR: skills and routing train) or "routing" (Poly-z: skills frozen).
    """
    one_of("add_task", "tune", tune, ("all", "routing"))
    module = poly_module(model)
    module.add_task(name, init)
    if module.config.variant in ("poly", "z"):
        module.freeze_skills(tune == "routing")
    if hasattr(model, "task_names"):
        model.task_names = list(module.config.tasks)
    return module
