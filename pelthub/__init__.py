"""pelthub: reuse parameter-efficient modules across tasks.

Attach module kinds to any transformers model, keep them in a registry, share
them through the Hugging Face Hub, rank source prompts for a new task, and
compose modules by routing, gating and attention.
"""
from .composition import compose
from .errors import PeltError
from .model import ModularModel, attach, from_pretrained
from .modules import IA3, Bottleneck, Compacter, LNTuning, LoRA, Prefix, Prompt

__version__ = "0.1.0"

__all__ = ["IA3", "Bottleneck", "Compacter", "LNTuning", "LoRA", "ModularModel", "PeltError", "Prefix", "Prompt",
           "attach", "compose", "from_pretrained", "__version__"]
