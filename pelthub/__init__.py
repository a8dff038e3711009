"""pelthub: reuse parameter-efficient modules across tasks.

Attach module kinds to any transformers model, keep them in a registry, share
them through the Hugging Face Hub, rank source prompts for a new task, and
compose modules by routing, gating and attention.
"""
from .composition import Average, Stack, WeightedSum, compose, merge, search_weights
from .composition.merge import merge_prefixes
from .errors import PeltError
from .generative import evaluate, generate_texts
from .model import ModularModel, attach, from_pretrained, hotswap
from .modules import (DSEE, IA3, LST, MAM, VPT, Bottleneck, Compacter, HyperPrompt, Hyperformer, KAdaptation,
                      LNTuning, LoRA, Prefix, Prompt)
from .hub import Registry
from .routing import Arrow, Poly
from .routing.attention import AttentionMix
from .routing.gates import UniPELT
from .routing.spt import SPT
from .routing.tasks import PerTask
from .tasks import as_examples
from .tasks.generative import GenerativeExample
from .privacy import Privacy, fit_private
from .recycle import recycle
from .tfew import choice_batches, tfew_ia3, tfew_loss
from .transfer import rank_sources
from .transfer.projector import Projector, ProjectorConfig, project_prompts, train_projector
from .version import __version__


def __getattr__(name: str) -> type:
    """SaveModulesCallback loads transformers' Trainer modules (seconds: they import peft), so only when used."""
    if name == "SaveModulesCallback":
        from .model.trainer import SaveModulesCallback
        return SaveModulesCallback
    raise AttributeError(f"module 'pelthub' has no attribute {name!r}")


def doctor(quick: bool = False) -> int:
    """Print the installed versions and run the exactness checks; 0 when all hold (see pelthub.doctor)."""
    from .selfcheck import report
    return report(quick=quick)


__all__ = [
    "Arrow", "AttentionMix", "Average", "Bottleneck", "Compacter", "DSEE", "GenerativeExample", "HyperPrompt",
    "Hyperformer", "IA3", "KAdaptation", "LNTuning", "LST", "LoRA", "MAM", "ModularModel", "PeltError", "PerTask",
    "Poly", "Prefix", "Privacy", "Projector", "ProjectorConfig", "Prompt", "Registry", "SPT", "SaveModulesCallback",
    "Stack", "UniPELT", "VPT", "WeightedSum", "__version__", "as_examples", "attach", "choice_batches", "compose",
    "doctor", "evaluate", "fit_private", "from_pretrained", "generate_texts", "hotswap", "merge", "merge_prefixes",
    "project_prompts", "rank_sources", "recycle", "search_weights", "tfew_ia3", "tfew_loss", "train_projector",
]
