"""Transferability metrics between two soft prompts (or their activations).

Prompt-space metrics, on P (L₁, d) and Q (L₂, d) with tokens p_i, q_j:

    cosine_avg(P, Q)    = cos(mean_i p_i, mean_j q_j)                             SPoT, Vu et al. 2022
    cosine_tokens(P, Q) = (1/L₁L₂) Σ_i Σ_j cos(p_i, q_j) = ⟨ū_P, ū_Q⟩,  ū_P = mean_i p_i/‖p_i‖
                                                                                    SPoT / Su et al. 2022
    euclidean(P, Q)     = 1 / (1 + ‖flat(P) − flat(Q)‖)        (L₁ = L₂)          Su et al. 2022

cosine_tokens is the papers' per-token average by default. It is below 1 for a
prompt with itself unless all its tokens point the same way; `normalize=True`
divides by √(⟨ū_P, ū_P⟩⟨ū_Q, ū_Q⟩), i.e. gives cos(ū_P, ū_Q) with
self-similarity 1. That is not the default because dividing by the sources'
self-similarity re-orders sources against the papers' metric (a source with
spread-out tokens gains), so rankings would not be the published ones.
Activation metrics, on activations
a, b (N_layers, F) from `activations.prompt_activations`, over a window of
layers (`layers`: indices or a slice, default all):

    on(a, b)                = |β_a ∧ β_b| / √(|β_a| · |β_b|),  β = flat(a[layers]) > 0   Su et al. 2022
    activation_cosine(a, b) = cos(flat(a[layers]), flat(b[layers]))                        PANDA

ON is 0 when either prompt activates no neuron. For patterns that share nothing beyond
chance (bits set independently with densities p_a, p_b) ON ≈ √(p_a·p_b), so it could
favour dense sources; on MiniLM that is not why it fails (`benchmarks/on_diagnostic.py`:
densities 0.14-0.18, ρ(ON, density) −0.53 and −0.10, the chance-corrected φ ranks as ON
does): ON and activation_cosine put an *untrained* random or vocab prompt 2nd-3rd of 6
for a briefly tuned target, above most trained sources — the activations under a prompt
say more about prompts in general than about the task.

A source module's own predictions on the target data, LEEP (Nguyen et al. 2020), with
θ(x_i) ∈ Δ^Z the source head's label distribution on target example i (label y_i of Y):

    P̂(y, z) = (1/n) Σ_i θ(x_i)_z [y_i = y],   P̂(y | z) = P̂(y, z) / Σ_y' P̂(y', z)
    leep     = (1/n) Σ_i log Σ_z P̂(y_i | z) θ(x_i)_z                 ≤ 0

the log-likelihood of the best "source label → target label" map learnt from the data
itself, so it needs neither aligned label ids nor equal label counts. That map is fitted
on the same n examples it scores, so it overfits by more the more labels Z the source
has: on 64 examples, 3- and 4-label heads that know nothing of the target outscored
related 2-label ones. adjusted_leep removes that bias as adjusted mutual information
does for MI, by subtracting the expectation under no relation, estimated with the
target labels permuted (π_1..π_P, fixed seed):

    adjusted_leep = leep(θ, y) − (1/P) Σ_p leep(θ, y∘π_p)          ≈ 0 for an unrelated source

Both depend on the target labels only through which examples share one, so the ids are
renumbered 0..K−1 (K ≤ n distinct labels) before the one-hot (P, n, K) is built; ids must be
integers in [0, `MAX_LABELS`), checked first, so a stray huge id is an error, not an allocation.

Every prompt metric here is symmetric and gives 1 for a prompt with itself, except the
raw cosine_tokens; `zero_shot` (in `rank`) and the leeps are directional. `score_matrix`
computes any prompt or activation metric for all pairs of two lists at once.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from ..tasks import MAX_LABELS

Layers = Sequence[int] | slice | None
Prompts = torch.Tensor | Sequence[torch.Tensor]


def _prompts(xs: Prompts) -> list[torch.Tensor]:
    items = list(xs.unbind(0)) if isinstance(xs, torch.Tensor) and xs.dim() == 3 else list(xs)
    bad = [tuple(x.shape) for x in items if x.dim() != 2]
    if bad:
        raise ConfigError(f"prompts must be (length, hidden) tensors, got shapes {bad[:3]}")
    return [x.detach().float().cpu() for x in items]


def _cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(n, D) × (m, D) → (n, m) cosines."""
    return F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T


def _mean_unit(prompts: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([F.normalize(p, dim=-1).mean(0) for p in prompts])


def _cosine_avg(xs: Prompts, ys: Prompts) -> torch.Tensor:
    return _cos(torch.stack([p.mean(0) for p in _prompts(xs)]), torch.stack([q.mean(0) for q in _prompts(ys)]))


def _cosine_tokens(xs: Prompts, ys: Prompts, normalize: bool = False) -> torch.Tensor:
    u, v = _mean_unit(_prompts(xs)), _mean_unit(_prompts(ys))
    return _cos(u, v) if normalize else u @ v.T


def _euclidean(xs: Prompts, ys: Prompts) -> torch.Tensor:
    a, b = _prompts(xs), _prompts(ys)
    shapes = {tuple(p.shape) for p in a + b}
    if len(shapes) > 1:
        raise ConfigError(f"euclidean compares prompts of one shape, got {sorted(shapes)}; "
                          "use cosine_avg or cosine_tokens for prompts of different lengths")
    return 1.0 / (1.0 + torch.cdist(torch.stack(a).flatten(1), torch.stack(b).flatten(1)))


def window(acts: torch.Tensor, layers: Layers = None) -> torch.Tensor:
    """Activations (n, N_layers, F), or one (N_layers, F) or flat (F,), cut to a layer window and flattened: (n, D)."""
    if acts.dim() < 3:
        acts = acts.reshape(1, 1, -1) if acts.dim() == 1 else acts[None]
    if acts.dim() != 3:
        raise ConfigError(f"activations must be (N_layers, F) or (n, N_layers, F), got {tuple(acts.shape)}")
    if layers is not None:
        index = list(range(acts.shape[1]))[layers] if isinstance(layers, slice) else list(layers)
        if not index or any(not -acts.shape[1] <= i < acts.shape[1] for i in index):
            raise ConfigError(f"layers {layers!r} select nothing or fall outside 0..{acts.shape[1] - 1}")
        acts = acts[:, index]
    return acts.flatten(1).float()


def _on(a: torch.Tensor, b: torch.Tensor, layers: Layers = None) -> torch.Tensor:
    x, y = (window(a, layers) > 0).float(), (window(b, layers) > 0).float()
    both = x @ y.T                                                   # |β_a ∧ β_b|
    sizes = torch.sqrt(x.sum(1)[:, None] * y.sum(1)[None, :])      # √(|β_a|·|β_b|)
    return torch.where(sizes > 0, both / sizes.clamp(min=1), torch.zeros_like(both))


def _activation_cosine(a: torch.Tensor, b: torch.Tensor, layers: Layers = None) -> torch.Tensor:
    return _cos(window(a, layers), window(b, layers))


PROMPT_METRICS: dict[str, Callable[..., torch.Tensor]] = {
    "cosine_avg": _cosine_avg, "cosine_tokens": _cosine_tokens, "euclidean": _euclidean}
ACTIVATION_METRICS: dict[str, Callable[..., torch.Tensor]] = {"on": _on, "activation_cosine": _activation_cosine}


def score_matrix(metric: str, xs: Prompts | torch.Tensor, ys: Prompts | torch.Tensor, layers: Layers = None,
                 normalize: bool = False) -> torch.Tensor:
    """(n, m) scores of `metric` for every pair of n prompts (or activations) and m others."""
    if metric in ACTIVATION_METRICS:
        return ACTIVATION_METRICS[metric](xs, ys, layers)
    if metric == "cosine_tokens":
        return _cosine_tokens(xs, ys, normalize)
    if metric in PROMPT_METRICS:
        return PROMPT_METRICS[metric](xs, ys)
    raise ConfigError(f"unknown metric {metric!r}; choose one of {sorted([*PROMPT_METRICS, *ACTIVATION_METRICS])}")


def cosine_avg(p: torch.Tensor, q: torch.Tensor) -> float:
    """cos(mean_i p_i, mean_j q_j) of two prompts (L, d)."""
    return float(_cosine_avg([p], [q])[0, 0])


def cosine_tokens(p: torch.Tensor, q: torch.Tensor, normalize: bool = False) -> float:
    """Per-token average cosine of two prompts (the papers' metric); normalize=True: cos(ū_P, ū_Q) (module doc)."""
    return float(_cosine_tokens([p], [q], normalize)[0, 0])


def euclidean(p: torch.Tensor, q: torch.Tensor) -> float:
    """1 / (1 + ‖flat(P) − flat(Q)‖) of two prompts of the same shape."""
    return float(_euclidean([p], [q])[0, 0])


def on(a: torch.Tensor, b: torch.Tensor, layers: Layers = None) -> float:
    """Overlap of activated neurons of two prompts' activations (N_layers, F) over a window of layers."""
    return float(_on(a, b, layers)[0, 0])


def activation_cosine(a: torch.Tensor, b: torch.Tensor, layers: Layers = None) -> float:
    """Cosine of two prompts' (unbinarised) activations (N_layers, F) over a window of layers."""
    return float(_activation_cosine(a, b, layers)[0, 0])


def _leeps(p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """LEEP (formula above) of probabilities p (n, Z) for each row of labels (P, n): (P,)."""
    names, labels = torch.unique(labels, return_inverse=True)                        # ids 0..K-1, K ≤ n
    one_hot = F.one_hot(labels, len(names)).to(p.dtype)                              # (P, n, K)
    joint = torch.einsum("pny,nz->pyz", one_hot, p) / p.shape[0]                    # P̂(y, z)
    given = joint / joint.sum(1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)  # P̂(y | z)
    expected = torch.einsum("nz,pyz->pny", p, given).gather(2, labels[..., None]).squeeze(2)
    return expected.log().mean(1)


def _checked(probs: torch.Tensor, labels: torch.Tensor, what: str) -> torch.Tensor:
    if probs.dim() != 2 or labels.shape != probs.shape[:1] or len(labels) == 0:
        raise ConfigError(f"{what} needs probabilities (n, Z) and n labels, got {tuple(probs.shape)} and "
                          f"{tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise DataError(f"{what} needs integer label ids, got a {labels.dtype} tensor")
    if int(labels.min()) < 0 or int(labels.max()) >= MAX_LABELS:
        raise DataError(f"{what}: label ids must lie in [0, {MAX_LABELS:,}), got {int(labels.min())}.."
                        f"{int(labels.max())}; is the label column a row id?")
    return probs.double()


def leep(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """LEEP of a source's label distributions `probs` (n, Z) for target labels `labels` (n,); formula above."""
    return float(_leeps(_checked(probs, labels, "leep"), labels[None])[0])


def adjusted_leep(probs: torch.Tensor, labels: torch.Tensor, permutations: int = 64, seed: int = 0) -> float:
    """LEEP minus its mean over `permutations` shuffles of the labels (formula above); 0 ≈ no relation."""
    p = _checked(probs, labels, "adjusted_leep")
    if not isinstance(permutations, int) or permutations < 1:
        raise ConfigError(f"permutations must be a positive int, got {permutations!r}")
    g = torch.Generator().manual_seed(seed)
    shuffled = labels[torch.argsort(torch.rand(permutations, len(labels), generator=g), dim=1)]
    return float(_leeps(p, labels[None])[0] - _leeps(p, shuffled).mean())
