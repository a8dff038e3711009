"""`pelthub.Registry`: the local registry with the Hub's push and pull as methods.

The registry package knows nothing of the Hub; this subclass, one layer up, adds the two
methods as plain delegations to `pelthub.hub.push` / `pelthub.hub.pull`, so
`ph.Registry().push(...)` works without an import running back down into `pelthub.registry`.
"""
from __future__ import annotations

from ..registry import Registry as LocalRegistry
from .sync import pull, push


class Registry(LocalRegistry):
    """A local registry (see `pelthub.registry.Registry`) that can push to and pull from the Hub."""

    def push(self, ref: str, repo_id: str, revision: str | None = None, private: bool = False,
             token: str | None = None, endpoint: str | None = None, tag: str | None = None,
             timeout: float | None = None) -> str:
        """Upload module `ref` to Hub repo `repo_id` in one commit; returns the commit sha (see `pelthub.hub.push`)."""
        return push(self, ref, repo_id, revision=revision, private=private, token=token, endpoint=endpoint, tag=tag,
                    timeout=timeout)

    def pull(self, repo_id: str, revision: str | None = None, endpoint: str | None = None,
             token: str | None = None, name: str | None = None, timeout: float | None = None,
             max_depth: int | None = None, max_parents: int | None = None) -> str:
        """Download a module (and the modules it was built from) from the Hub, verified; returns its ref.

        name= is needed when the card's name is taken here by a module from elsewhere;
        timeout, max_depth, max_parents: see `pelthub.hub.pull`.
        """
        return pull(self, repo_id, revision=revision, endpoint=endpoint, token=token, name=name, timeout=timeout,
                    max_depth=max_depth, max_parents=max_parents)
