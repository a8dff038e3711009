"""pelthub: reuse parameter-efficient modules across tasks.

Attach module kinds to any transformers model, keep them in a registry, share
them through the Hugging Face Hub, rank source prompts for a new task, and
compose modules by routing, gating and attention.
"""
from .composition import Average, Stack, WeightedSum, compose, merge, search_weights
from .composition.merge import merge_prefixes
from .errors import PeltError
from .generative import evaluate, generate_texts
from .model import ModularModel, attach, from_pretrained
from .modules import IA3, Bottleneck, Compacter, LNTuning, LoRA, Prefix, Prompt
from .modules import DSEE, MAM, VPT, KAdaptation
from .hub import Registry
from .routing import Arrow, Poly
from .routing.attention import AttentionMix
from .routing.gates import UniPELT
from .routing.tasks import PerTask
from .tasks import as_examples
from .tasks.generative import GenerativeExample
from .recycle import recycle
from .tfew import choice_batches, tfew_ia3, tfew_loss
from .transfer import rank_sources
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


__all__ = ["AttentionMix", "IA3", "Bottleneck", "Compacter", "LNTuning", "LoRA", "ModularModel", "PeltError",
           "Poly", "Prefix", "Prompt", "Registry", "attach", "compose", "from_pretrained", "__version__"]
__all__ += ["Average", "Stack", "UniPELT", "WeightedSum", "merge", "search_weights"]
__all__ += ["Arrow", "PerTask", "doctor", "rank_sources"]
__all__ += ["as_examples"]
__all__ += ["GenerativeExample", "evaluate", "generate_texts"]
__all__ += ["SaveModulesCallback"]
__all__ += ["merge_prefixes"]
__all__ += ["DSEE", "KAdaptation", "MAM", "VPT"]
__all__ += ["choice_batches", "tfew_ia3", "tfew_loss"]
__all__ += ["recycle"]
