"""Pictures of transferability: a source × target heatmap and the task-similarity graph.

`heatmap` needs matplotlib (`pip install pelthub[plot]`); `similarity_graph`
returns a networkx graph, which `networkx.write_graphml(graph, path)` exports
(all node and edge attributes are strings or floats, as GraphML requires).
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import networkx as nx
import numpy as np

from ..errors import ConfigError


def heatmap(scores: Any, sources: Sequence[str], targets: Sequence[str], title: str = "",
            path: str | os.PathLike | None = None) -> Any:
    """A matplotlib Figure of `scores[source, target]` (NaN cells blank), saved to `path` when given."""
    try:
        from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone
    except ImportError:
        raise ConfigError("heatmap needs matplotlib: pip install 'pelthub[plot]'") from None
    m = np.asarray(scores, dtype=float)
    if m.shape != (len(sources), len(targets)):
        raise ConfigError(f"scores have shape {m.shape}, expected ({len(sources)}, {len(targets)}) "
                          "(sources × targets)")
    fig = Figure(figsize=(2.0 + 0.6 * len(targets), 1.5 + 0.5 * len(sources)))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(m), cmap="viridis")
    ax.set_xticks(range(len(targets)), labels=list(targets), rotation=60, ha="right")
    ax.set_yticks(range(len(sources)), labels=list(sources))
    ax.set_xlabel("target")
    ax.set_ylabel("source")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def similarity_graph(names: Sequence[str], scores: Any, threshold: float | None = None,
                     families: Sequence[str] | None = None) -> nx.Graph:
    """Undirected task graph: an edge of weight ½(S[i, j] + S[j, i]) between tasks i ≠ j.

    Edges below `threshold` (default: the median weight) are left out.
    Nodes carry `family` when given.
    """
    m = np.asarray(scores, dtype=float)
    if m.shape != (len(names), len(names)):
        raise ConfigError(f"scores have shape {m.shape}, expected a square ({len(names)}, {len(names)}) matrix")
    sym = (m + m.T) / 2
    weights = {(i, j): float(sym[i, j]) for i in range(len(names)) for j in range(i + 1, len(names))
               if not math.isnan(sym[i, j])}
    cut = float(np.median(list(weights.values()))) if threshold is None and weights else threshold
    graph = nx.Graph()
    for i, name in enumerate(names):
        graph.add_node(name, **({"family": families[i]} if families is not None else {}))
    for (i, j), w in weights.items():
        if cut is None or w >= cut:
            graph.add_edge(names[i], names[j], weight=w)
    return graph
