"""The kinds of module: one file each, a config dataclass plus its nn.Module."""
from .bottleneck import Bottleneck
from .compacter import Compacter
from .config import ModuleConfig, config_from_dict, known_kinds
from .ia3 import IA3
from .ln import LNTuning
from .lora import LoRA
from .prefix import Prefix
from .prompt import Prompt

__all__ = ["Bottleneck", "Compacter", "IA3", "LNTuning", "LoRA", "ModuleConfig", "Prefix", "Prompt",
           "config_from_dict", "known_kinds"]
