"""What HyperPrompt and Hyperformer share: per-task tensors, the batch's tasks, the hypernetwork's MLP.

Both kinds generate a module per (task τ, layer m) from I = MLP([k_τ; z_m]), k_τ a task
embedding and z_m a layer embedding. A call computes the generated tensors once per task
present in the batch (`batch_tasks`: the unique ids, and each example's row among them) and
gathers them per example, so a mixed-task batch is one vectorised forward.

Each task's own tensors (its embedding k_τ, and HyperPrompt's global prompt P_τ) are their
own parameters, one `nn.ParameterDict` per task: `add_task` appends one for a new task and
freezes everything else, so only the new task's tensors train (a new task = a new embedding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ConfigError, RoutingError
from .base import CallContext, PeltModule
from .config import ModuleConfig, positive_int, task_names


@dataclass(frozen=True)
class GeneratedConfig(ModuleConfig):
    """The fields of a generated kind's config that size its hypernetwork input.

    tasks: task names (or their number); embedding: e, the size of the task and layer embeddings;
    hidden: h, the width of the MLP.
    """

    tasks: tuple[str, ...] = ()
    embedding: int = 64
    hidden: int = 128

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", task_names(type(self).__name__, self.tasks))
        super().__post_init__()

    def validate(self) -> None:
        owner, tasks = type(self).__name__, self.tasks
        if (not isinstance(tasks, tuple) or not tasks or len(set(tasks)) != len(tasks)
                or not all(isinstance(t, str) and t for t in tasks)):
            raise ConfigError(f"{owner}.tasks must be a non-empty list of distinct task names (or their number), "
                              f"got {tasks!r}")
        positive_int(owner, "embedding", self.embedding)
        positive_int(owner, "hidden", self.hidden)


def mlp(inputs: int, hidden: int) -> nn.Sequential:
    """I = W₂ ReLU(W₁ x + b₁) + b₂ ∈ R^hidden: the hypernetwork's shared trunk."""
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden))


class TaskConditioned(PeltModule):
    """Base of the generated kinds: `rows[t]` holds task t's own tensors (named alike for every task)."""

    unmergeable = ""  # why the kind cannot merge into the base weights, said by each kind

    def __init__(self, config: Any, rows: list[Mapping[str, torch.Tensor]]):
        super().__init__()
        self.config = config
        self.rows = nn.ModuleList(nn.ParameterDict({k: nn.Parameter(v) for k, v in row.items()}) for row in rows)

    def stacked(self, name: str, tasks: torch.Tensor) -> torch.Tensor:
        """Tensor `name` of the given tasks, stacked: (len(tasks), ...)."""
        return torch.stack([row[name] for row in self.rows]).index_select(0, tasks)

    def batch_tasks(self, ctx: CallContext, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the distinct task ids of this call, each example's index among them), on the module's device.

        Generated tensors are computed once per distinct task and gathered per example by the
        second tensor (`torch.unique`: one host sync on an accelerator).
        """
        ids = ctx.task_ids_for(batch)
        if ids is None and len(self.rows) > 1:
            raise RoutingError(f"{type(self.config).__name__} generates each example's module from its task: call "
                               f"model(..., task_ids=...) with one task per example, names from "
                               f"{list(self.config.tasks)} or their indices")
        device = next(self.rows.parameters()).device
        ids = torch.zeros(batch, dtype=torch.long, device=device) if ids is None else ids.to(device)
        return torch.unique(ids, return_inverse=True)

    @torch.no_grad()
    def add_task(self, name: str) -> None:
        """Append task `name`, its tensors the mean of the other tasks'; it alone trains from now on."""
        if not isinstance(name, str) or not name or name in self.config.tasks:
            raise ConfigError(f"add_task needs a new, non-empty task name; {name!r} is not (tasks: "
                              f"{list(self.config.tasks)})")
        row = {k: torch.stack([r[k] for r in self.rows]).mean(0) for k in self.rows[0].keys()}
        self.requires_grad_(False)
        self.rows.append(nn.ParameterDict({k: nn.Parameter(v) for k, v in row.items()}))
        self.config = self.config.replace(tasks=(*self.config.tasks, name))

    def check_merge(self, base: nn.Module) -> None:
        raise ConfigError(f"{self.config.kind} modules cannot be merged into the base weights: {self.unmergeable}; "
                          "keep the model attached (save it with save_pretrained or Registry.add)")

    def merge_into(self, base: nn.Module) -> None:
        self.check_merge(base)


def add_task(model: nn.Module, name: str) -> TaskConditioned:
    """Add task `name` to the model's one HyperPrompt or Hyperformer module and to `model.task_names`.

    The new task gets its own task embedding (and HyperPrompt its global prompt), started at the mean of
    the existing tasks'; every other parameter of the module is frozen, so training on the new task's
    data moves only its tensors and leaves every other task's outputs as they were.
    """
    found = [m for m in model.modules() if isinstance(m, TaskConditioned)]
    if len(found) != 1:
        kinds = sorted({m.config.kind for m in found})
        raise RoutingError(f"add_task needs exactly one HyperPrompt or Hyperformer module in the model, found "
                           f"{len(found)} {kinds}")
    found[0].add_task(name)
    if hasattr(model, "task_names"):
        model.task_names = list(found[0].config.tasks)
    return found[0]
