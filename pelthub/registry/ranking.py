"""`Ranking`: registry modules (or any candidates) sorted by a score, best first.

One result type for both ways pelthub ranks modules for a new task: `rank_sources`
(soft prompts, by a transfer metric) and `Registry.search(examples=...)` (LoRAs, by how
often Arrow would route to them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError


@dataclass
class Ranking:
    """Candidates sorted by score, best first; `excluded` lists (name, reason) of those not scored."""

    metric: str
    rows: list[tuple[str, float]]
    excluded: list[tuple[str, str]] = field(default_factory=list)
    modules: dict[str, Any] = field(default_factory=dict, repr=False)
    target_prompt: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    def names(self, k: int | None = None) -> list[str]:
        return [name for name, _ in self.rows[:k]]

    def top(self, k: int = 1) -> dict[str, Any]:
        """{name: module} of the k best, in rank order: sources for `AttentionMix`, or `init_from`.

        Modules are what was passed (PromptModule or ModularModel); tensors and
        registry refs come back as PromptModules.
        """
        return {name: self.modules[name] for name in self.names(k)}

    @property
    def best(self) -> Any:
        """The best candidate's module."""
        if not self.rows:
            raise ConfigError(f"nothing was ranked; excluded: {self.excluded}")
        return self.modules[self.rows[0][0]]

    def table(self) -> str:
        width = max([4, *(len(n) for n, _ in self.rows)])
        lines = [f"{'RANK':>4}  {'NAME':<{width}}  {self.metric.upper()}"]
        lines += [f"{i:>4}  {name:<{width}}  {score:.4f}" for i, (name, score) in enumerate(self.rows, 1)]
        lines += [f"excluded {name}: {reason}" for name, reason in self.excluded]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric,
                "ranking": [{"rank": i, "name": n, "score": s} for i, (n, s) in enumerate(self.rows, 1)],
                "excluded": [{"name": n, "reason": r} for n, r in self.excluded]}
