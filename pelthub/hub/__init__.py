"""Remote exchange: the Hugging Face Hub (push, pull, search) and PEFT's adapter format (export, import).

`Registry.push` / `Registry.pull` call `push` / `pull` here. Every Hub error
surfaces as a `pelthub.errors.HubError` subclass whose message says what to
do, and every downloaded file is checked against its recorded sha256.
"""
from .peft import export, from_peft, import_peft, to_peft
from .search import HubModule, search
from .sync import pull, push

__all__ = ["HubModule", "export", "from_peft", "import_peft", "pull", "push", "search", "to_peft"]
