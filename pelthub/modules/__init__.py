"""The kinds of module: one file each, a config dataclass plus its nn.Module."""
from .bottleneck import Bottleneck
from .compacter import Compacter
from .config import ModuleConfig, config_from_dict, known_kinds
from .dsee import DSEE
from .hyperformer import Hyperformer
from .hyperprompt import HyperPrompt
from .ia3 import IA3
from .kadaptation import KAdaptation
from .ln import LNTuning
from .lora import LoRA
from .lst import LST
from .mam import MAM
from .prefix import Prefix
from .prompt import Prompt
from .vpt import VPT

__all__ = ["Bottleneck", "Compacter", "DSEE", "HyperPrompt", "Hyperformer", "IA3", "KAdaptation", "LNTuning", "LST",
           "LoRA", "MAM", "ModuleConfig", "Prefix", "Prompt", "VPT", "config_from_dict", "known_kinds"]
