"""Many task modules trained and served in one mixed batch: `PerTask`.

`ph.compose(base, ph.PerTask(ph.LoRA(r=8), tasks=["a", "b", "c"]))` holds one LoRA per task (any of
LoRA, IA3, bottleneck, Compacter, LN-tuning, soft prompts and prefixes, several kinds at once) and
runs each example of a `task_ids=` batch through its own task's modules only: the layer kinds by
the hooks of `pelthub.modules.bank`, prompts and prefixes by gathering each example's task's
tensors from the tasks' stack (one config, so every task's prompt or prefix has one length). Each
task's modules are ordinary modules with their own parameters, so:

- each example's loss reaches only its task's parameters (the others get zero gradient from it);
- with a per-task optimiser state (Adam keeps state per parameter element, so one AdamW over all
  tasks is per-task) and the loss a SUM over tasks of each task's mean (`sum_of_task_means`), N tasks
  trained together step exactly as N separate runs on the same per-task batches would;
- `save_tasks` writes each task's modules to the registry on its own, as a plain module.

The rule for unbalanced batches: sum each task's mean loss, never take one mean over the batch (that
weighs a task by its share of the batch, which plain SGD sees and Adam nearly hides). A task absent
from a batch gets a zero gradient; AdamW still moves it by its momentum and weight decay, where its
separate run would not have stepped: call `drop_absent_grads` before `optimizer.step()` (AdamW skips
parameters whose grad is None). Global-norm gradient clipping couples the tasks; clip per task.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ..errors import ConfigError, RoutingError
from ..model import ModularModel
from ..modules.bank import SELECTABLE, Bank
from ..modules.base import CallContext, Handle, PeltModule
from ..modules.config import ModuleConfig, config_from_dict, task_names
from ..modules.grouped import RoutePlan, as_ids, plan_once
from ..modules.prefix import layer_pairs
from ..sites import Sites
from .poly_export import fresh_copy

INPUT_KINDS = ("prompt", "prefix")  # kinds that act on the inputs, served outside the bank


@dataclass(frozen=True)
class PerTask(ModuleConfig):
    """One set of modules per task, each example running its own task's set (by `task_ids=`).

    modules: the config(s) every task gets (one per kind: LoRA, IA3, Bottleneck, Compacter, LNTuning,
    Prompt, Prefix);
    tasks: task names (or their number). Every task's modules start from their kind's own
    initialisation, drawn one task after another.
    """

    kind: ClassVar[str] = "per_task"
    modules: tuple[ModuleConfig, ...] = ()
    tasks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        modules = (self.modules,) if isinstance(self.modules, ModuleConfig) else tuple(self.modules)
        object.__setattr__(self, "modules", tuple(config_from_dict(m) if isinstance(m, dict) else m for m in modules))
        object.__setattr__(self, "tasks", task_names("PerTask", self.tasks))
        super().__post_init__()

    def validate(self) -> None:
        kinds = [getattr(m, "kind", None) for m in self.modules]
        if not kinds or len(set(kinds)) != len(kinds) or any(k not in (*SELECTABLE, *INPUT_KINDS) for k in kinds):
            raise ConfigError(f"PerTask.modules must be one config per kind, kinds from "
                              f"{[*SELECTABLE, *INPUT_KINDS]}, got {kinds}")
        if (not isinstance(self.tasks, tuple) or not self.tasks or len(set(self.tasks)) != len(self.tasks)
                or not all(isinstance(t, str) and t for t in self.tasks)):
            raise ConfigError(f"PerTask.tasks must be a non-empty list of distinct task names (or their number), "
                              f"got {self.tasks!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "modules": [m.to_dict() for m in self.modules], "tasks": list(self.tasks)}

    def build(self, base: nn.Module, sites: Sites, init: bool = True, **kwargs: Any) -> "PerTaskModule":
        rows = [nn.ModuleDict({c.kind: c.build(base, sites, init=init, **kwargs) for c in self.modules})
                for _ in self.tasks]
        return PerTaskModule(self, rows)


class PerTaskModule(PeltModule):
    """The task sets (`tasks[t][kind]`, plain modules) behind one bank of per-example hooks."""

    def __init__(self, config: PerTask, rows: Sequence[nn.ModuleDict]):
        super().__init__()
        self.config = config
        self.tasks = nn.ModuleList(rows)

    def reads_call_state(self) -> bool:
        return True

    def provides(self, method: str) -> bool:
        """`prompt` / `prefix` when the tasks hold that kind, besides what every PeltModule offers."""
        if method in INPUT_KINDS:
            return method in self.tasks[0]
        return super().provides(method)

    def install(self, base: nn.Module, ctx: CallContext) -> list[Handle]:
        layered = [{k: m for k, m in row.items() if k not in INPUT_KINDS} for row in self.tasks]
        if not layered[0]:
            return []
        return Bank(layered, lambda batch: self.route(ctx, batch), "PerTask").install(base, ctx)

    def prompt(self, embeds: torch.Tensor, mask: torch.Tensor | None, ctx: CallContext) -> torch.Tensor:
        """Each example's task's prompt, (B, L, d)."""
        stack = torch.stack([row["prompt"].embeddings for row in self.tasks])          # (T, L, d)
        return stack.index_select(0, self._ids(ctx, embeds.shape[0]))

    def prefix(self, batch: int, ctx: CallContext) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each example's task's prefix, per layer (key, value) of (B, heads, L, head_dim)."""
        rows = [row["prefix"] for row in self.tasks]
        stack = torch.stack([m.flat() for m in rows])                                  # (T, L, width)
        return layer_pairs(stack.index_select(0, self._ids(ctx, batch)), rows[0].shape)

    def route(self, ctx: CallContext, batch: int) -> RoutePlan | None:
        return plan_once(ctx, self, batch, lambda b: self._ids(ctx, b))

    def _ids(self, ctx: CallContext, batch: int) -> torch.Tensor:
        ids = ctx.task_ids_for(batch)
        if ids is None and len(self.config.tasks) > 1:
            raise RoutingError(f"PerTask runs each example through its task's modules: call model(..., task_ids=...) "
                               f"with one task per example, names from {list(self.config.tasks)} or their indices")
        ids = torch.zeros(batch, dtype=torch.long) if ids is None else ids
        return ids.to(next(self.parameters()).device)

    def task(self, task: str | int) -> nn.ModuleDict:
        """The modules of one task ({kind: module}), by name or index (never a negative one, nor 1.9 read as 1)."""
        return self.tasks[int(as_ids([task], len(self.tasks), "task", self.config.tasks)[0])]


def per_task_module(model: nn.Module) -> PerTaskModule:
    """The one PerTaskModule of a ModularModel (or the module itself)."""
    found = [m for m in (model.modules() if not isinstance(model, PerTaskModule) else [model])
             if isinstance(m, PerTaskModule)]
    if len(found) != 1:
        raise RoutingError(f"expected one PerTask module in the model, found {len(found)}")
    return found[0]


def sum_of_task_means(losses: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """Σ_t mean_{i ∈ t} ℓ_i for per-example losses (b,): each task's gradient is its separate run's."""
    task_ids = as_ids(task_ids, None, "task ids").to(losses.device)
    if task_ids.shape != losses.shape[:1] or losses.dim() != 1:
        raise RoutingError(f"sum_of_task_means takes one loss and one task id per example, got losses of shape "
                           f"{tuple(losses.shape)} and {task_ids.shape[0]} task ids")
    counts = torch.bincount(task_ids, minlength=int(task_ids.max()) + 1).to(losses.dtype)
    return (losses / counts[task_ids]).sum()


def drop_absent_grads(model: nn.Module, task_ids: torch.Tensor) -> None:
    """Set the grads of tasks absent from this batch to None, so the optimiser leaves them as their runs would."""
    module = per_task_module(model)
    present = set(torch.unique(as_ids(task_ids, len(module.tasks), "task ids")).tolist())
    for t, row in enumerate(module.tasks):  # the optimiser step, not the forward path
        if t not in present:
            for p in row.parameters():
                p.grad = None


def save_tasks(model: nn.Module, registry: Any, prefix: str = "", **card: Any) -> dict[str, str]:
    """Register each task's modules on its own, as a plain module set named after the task; {task: ref}.

    The modules are copied onto a fresh copy of the base (the routed model's base keeps its hooks).
    """
    module = per_task_module(model)
    if not hasattr(model, "base"):
        raise ConfigError("save_tasks needs the ModularModel that holds the PerTask module, not the module alone")
    refs = {}
    for name in module.config.tasks:
        row = module.task(name)
        exported = ModularModel(fresh_copy(model.base))
        set_name = name.replace(".", "-").replace("/", "-")
        exported.add(set_name, [m.config for m in row.values()], init=False)
        for kind, m in row.items():
            exported.adapters[set_name][kind].load_state_dict(m.state_dict())
        refs[name] = registry.add(exported, name=f"{prefix}{set_name}", task=name, **card)
        exported.detach()
    return refs
