"""One exception hierarchy for pelthub.

Every message says what was wrong and how to fix it. Catch `PeltError` to
catch them all; the subclasses exist so that callers can react to one cause.
"""
from __future__ import annotations


class PeltError(Exception):
    """Base class of every error pelthub raises on purpose."""


class ConfigError(PeltError, ValueError):
    """A config field has a bad value; the message names the field and the allowed values."""


class SiteNotFoundError(PeltError, LookupError):
    """A module targets sites the model does not have; the message lists those it has."""


class UnsupportedModelError(PeltError):
    """pelthub does not know where to attach on this architecture."""


class DuplicateNameError(PeltError, ValueError):
    """A module of that name is already attached or registered."""


class IncompatibleModuleError(PeltError):
    """A module was trained on a base model whose architecture differs from this one."""


class ModuleFormatError(PeltError, ValueError):
    """A saved module (directory, card or weights file) is malformed."""


class IntegrityError(PeltError):
    """Stored bytes no longer match their recorded sha256."""


class RegistryError(PeltError):
    """A registry operation cannot be done as asked (missing ref, dependants, bad name)."""


class NotFoundError(RegistryError, KeyError):
    """A module name, version or ref is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class HubError(PeltError):
    """Talking to the Hugging Face Hub failed; the message says what to do."""


class DataError(PeltError, ValueError):
    """User data (JSONL/CSV rows) is malformed; the message names the row and the problem."""


class RoutingError(PeltError, ValueError):
    """Task ids or routing settings are inconsistent with the composed model."""


class HubAuthError(HubError):
    """The Hub refused the request for want of a (valid, write-scoped) token."""


class HubNotFoundError(HubError, LookupError):
    """A Hub repo, revision or file does not exist (or is private and invisible to this token)."""


class HubConnectionError(HubError):
    """The Hub cannot be reached: offline mode, no network, or a wrong endpoint."""


class HubIntegrityError(HubError, IntegrityError):
    """A file downloaded from the Hub does not match the sha256 its card or the Hub records."""


class HubPushError(HubError):
    """A push committed (its sha is `.commit`) but a later step, such as the tag, failed."""

    commit: str | None = None
