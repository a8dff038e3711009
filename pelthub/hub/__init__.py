"""Remote exchange: the Hugging Face Hub (push, pull, search) and PEFT's adapter format (export, import).

`Registry` is the local registry plus `push` / `pull` as methods (what `pelthub.Registry` is). Every Hub error
surfaces as a `pelthub.errors.HubError` subclass whose message says what to
do, and every downloaded file is checked against its recorded sha256. A token
goes only to the Hub it belongs to (`client.token_for`), and every answer is
bounded in time, hops and bytes (`wire.py`, `limits.py`).
"""
from .peft import export, from_peft, import_peft, to_peft
from .peft_arrow import export_arrow_peft
from .search import HubModule, search
from .registry import Registry
from .sync import pull, push

__all__ = ["HubModule", "Registry", "export", "export_arrow_peft", "from_peft", "import_peft", "pull", "push", "search", "to_peft"]
