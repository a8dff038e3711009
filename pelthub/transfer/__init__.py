"""Prompt transferability: score and rank source prompts for a new task, and transfer from them.

Metrics (`metrics`, `activations`): cosine_avg, cosine_tokens, euclidean
(SPoT, Su et al.), on and activation_cosine (Su et al., PANDA), zero_shot, leep
(Nguyen et al.: a source's own head on the target data) and adjusted_leep (chance-corrected).
`rank_sources` tunes a short target prompt and ranks candidates into a
`Ranking`; `init_from` (SPoT) and `distill` (PANDA) transfer from a source;
`evaluate` measures how well each metric predicts real transfer gains.
"""
from .activations import prompt_activations
from .evaluate import TransferStudy, evaluate
from .methods import distill, init_from
from .metrics import activation_cosine, adjusted_leep, cosine_avg, cosine_tokens, euclidean, leep, on, score_matrix
from .rank import METRICS, Ranking, rank_sources, zero_shot

__all__ = ["METRICS", "Ranking", "TransferStudy", "activation_cosine", "adjusted_leep", "cosine_avg",
           "cosine_tokens", "distill", "euclidean", "evaluate", "init_from", "leep", "on", "prompt_activations",
           "rank_sources", "score_matrix", "zero_shot"]
