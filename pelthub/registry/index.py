"""The catalogue: one SQLite database in WAL mode, one row per card plus lookup tables.

WAL lets readers run while a process writes. Every change is one
`BEGIN IMMEDIATE` transaction, so writers in several processes queue on
SQLite's lock (busy_timeout) instead of failing or interleaving, and a
process killed mid-transaction leaves nothing behind: SQLite discards the
uncommitted WAL frames on the next open. The card JSON is the truth; the
other columns and tables exist so that search stays fast at tens of
thousands of cards.

Two promises keep a copied or damaged index from costing data. Every commit is
checkpointed into `index.sqlite` itself (`wal_checkpoint(TRUNCATE)`), so a
copy of the folder without `index.sqlite-wal` (a backup tool, a cloud sync)
still holds every committed card. And the `stored` table names every blob an
add was about to write (committed before the blob appears), so `gc` deletes
only blobs the index accounts for: a blob it does not know about means the
index lost commits (an old or partial copy), not that the blob is garbage.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ..errors import RegistryError
from .card import Card

SCHEMA_VERSION = 2
BUSY_TIMEOUT_S = 120.0
SCHEMA = (
    "CREATE TABLE names (name TEXT PRIMARY KEY, next_version INTEGER NOT NULL)",
    "CREATE TABLE cards (id INTEGER PRIMARY KEY, name TEXT NOT NULL, version INTEGER NOT NULL, "
    "identity TEXT NOT NULL, digest TEXT NOT NULL, task TEXT, base_sha TEXT NOT NULL, base_name TEXT NOT NULL, "
    "created TEXT NOT NULL, haystack TEXT NOT NULL, card TEXT NOT NULL, UNIQUE (name, version))",
    "CREATE INDEX cards_identity ON cards (identity)",
    "CREATE INDEX cards_base_sha ON cards (base_sha)",
    "CREATE INDEX cards_base_name ON cards (base_name)",
    "CREATE INDEX cards_task ON cards (task)",
    "CREATE TABLE kinds (card_id INTEGER NOT NULL, kind TEXT NOT NULL, PRIMARY KEY (card_id, kind)) WITHOUT ROWID",
    "CREATE INDEX kinds_kind ON kinds (kind)",
    "CREATE TABLE tags (card_id INTEGER NOT NULL, tag TEXT NOT NULL, PRIMARY KEY (card_id, tag)) WITHOUT ROWID",
    "CREATE INDEX tags_tag ON tags (tag)",
    "CREATE TABLE files (card_id INTEGER NOT NULL, file TEXT NOT NULL, sha256 TEXT NOT NULL, "
    "PRIMARY KEY (card_id, file)) WITHOUT ROWID",
    "CREATE INDEX files_sha ON files (sha256)",
    "CREATE TABLE parents (card_id INTEGER NOT NULL, ref TEXT NOT NULL, PRIMARY KEY (card_id, ref)) WITHOUT ROWID",
    "CREATE INDEX parents_ref ON parents (ref)",
)
# Schema 1 -> 2: the blobs an index accounts for; those its cards reference are accounted for from the start.
STORED = ("CREATE TABLE stored (sha256 TEXT PRIMARY KEY) WITHOUT ROWID",
          "INSERT INTO stored SELECT DISTINCT sha256 FROM files")
TABLES = ("names", "cards", "kinds", "tags", "files", "parents", "stored")
CHILD_TABLES = ("kinds", "tags", "files", "parents")
RESTORE = ("restore index.sqlite together with index.sqlite-wal from a backup or the folder it was copied from, or "
           "move both aside to start an empty index (the blobs stay: `pelthub gc` keeps what an index does not "
           "account for)")


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _checkpoint(conn: sqlite3.Connection) -> None:
    """Copy every committed page into the database file and empty the WAL: a copy without `-wal` is complete.

    A reader in another process can keep part of the WAL from being copied (SQLite then says busy); the
    next commit's checkpoint finishes the job, so a busy answer is not an error.
    """
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def haystack(card: Card) -> str:
    """The lower-cased text that `search(text=...)` looks in."""
    words = [card.name, card.description, card.task or "", *card.tags, *card.kinds, card.base_model["name"],
             *card.metrics]
    return "\n".join(words).lower()


class Index:
    """SQLite catalogue of cards. Use `write()` around every change; reads need no transaction."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1

    @property
    def conn(self) -> sqlite3.Connection:
        """This process's connection (a fork gets its own: SQLite connections must not cross fork())."""
        if self._conn is None or self._pid != os.getpid():
            self._conn, self._pid = self._open(), os.getpid()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        with self._translated():
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            try:
                self._prepare(conn)
            except BaseException:
                conn.close()
                raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """WAL mode, then create the schema (empty file), migrate it (older pelthub) or check it."""
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RegistryError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); keep the registry on a local "
                                "file system (PELTHUB_HOME), not a network share")
        conn.execute("PRAGMA synchronous = FULL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RegistryError(f"{self.path} was written by a newer pelthub (index schema {version}, this one reads "
                                f"{SCHEMA_VERSION}); upgrade pelthub")
        if version < SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]  # another process may have won
                tables = _tables(conn)
                if version == 0 and tables:
                    raise RegistryError(f"{self.path} is an SQLite database pelthub did not write (tables "
                                        f"{', '.join(sorted(tables))}); move it out of the registry folder")
                for statement in (SCHEMA + STORED if version == 0 else STORED if version == 1 else ()):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            _checkpoint(conn)
        missing = set(TABLES) - _tables(conn)
        if missing:
            raise RegistryError(f"{self.path} lacks the tables {', '.join(sorted(missing))}: it is not a pelthub "
                                f"index; {RESTORE}")

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """SQLite's errors as RegistryError naming the file and the fix (a damaged file, or a lock held too long)."""
        try:
            yield
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise RegistryError(f"{self.path} stayed locked for {BUSY_TIMEOUT_S:.0f} s ({e}); another pelthub "
                                    "process holds it: wait for it to finish, or stop it") from None
            raise RegistryError(f"cannot use {self.path} ({e}): it is damaged or unreadable; {RESTORE}") from None
        except sqlite3.Error as e:
            raise RegistryError(f"cannot use {self.path} ({e}): it is damaged or not a pelthub index; "
                                f"{RESTORE}") from None

    @contextmanager
    def write(self, checkpoint: bool = True) -> Iterator["Index"]:
        """One write transaction, holding SQLite's write lock from the start (no lock upgrades, no deadlock).

        The commit is then checkpointed into the database file, so the file alone is complete (about 15 ms:
        one more fsync). `checkpoint=False` is for a change a copy may miss without losing data (a claim:
        the copy then keeps the blob), and the next commit's checkpoint carries it.
        """
        with self._lock, self._translated():
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield self
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if checkpoint:
                _checkpoint(conn)

    def _rows(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock, self._translated():
            return self.conn.execute(sql, params).fetchall()

    # ----- changes (inside write()) -----
    def allocate_version(self, name: str) -> int:
        """The next version number of `name`; numbers are never reused, even after a remove."""
        return self._rows("INSERT INTO names (name, next_version) VALUES (?, 2) ON CONFLICT (name) DO UPDATE SET "
                          "next_version = next_version + 1 RETURNING next_version - 1", (name,))[0][0]

    def insert(self, card: Card) -> None:
        conn = self.conn
        cur = conn.execute(
            "INSERT INTO cards (name, version, identity, digest, task, base_sha, base_name, created, haystack, card) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (card.name, card.version, card.identity(), card.digest, card.task, card.base_sha,
             card.base_model["name"], card.created, haystack(card), json.dumps(card.to_dict(), sort_keys=True)))
        cid = cur.lastrowid
        conn.executemany("INSERT INTO kinds VALUES (?, ?)", [(cid, k) for k in card.kinds])
        conn.executemany("INSERT INTO tags VALUES (?, ?)", [(cid, t) for t in card.tags])
        conn.executemany("INSERT INTO files VALUES (?, ?, ?)", [(cid, n, f["sha256"]) for n, f in card.files.items()])
        conn.executemany("INSERT INTO parents VALUES (?, ?)", [(cid, p["ref"]) for p in card.parents])
        self.claim(f["sha256"] for f in card.files.values())

    def claim(self, shas: Iterable[str]) -> None:
        """Account for blobs about to be written: commit this before they appear, so `gc` may reclaim them."""
        self.conn.executemany("INSERT OR IGNORE INTO stored VALUES (?)", [(sha,) for sha in shas])

    def forget(self, shas: Sequence[str]) -> None:
        """Stop accounting for blobs `gc` deleted."""
        self.conn.executemany("DELETE FROM stored WHERE sha256 = ?", [(sha,) for sha in shas])

    def delete(self, ids: Sequence[int]) -> None:
        marks = ",".join("?" * len(ids))
        for table in CHILD_TABLES:
            self.conn.execute(f"DELETE FROM {table} WHERE card_id IN ({marks})", tuple(ids))
        self.conn.execute(f"DELETE FROM cards WHERE id IN ({marks})", tuple(ids))

    # ----- reads -----
    def by_identity(self, identity: str) -> str | None:
        """The ref of the card with this identity, if one exists."""
        rows = self._rows("SELECT name, version FROM cards WHERE identity = ? ORDER BY version LIMIT 1", (identity,))
        return f"{rows[0][0]}@{rows[0][1]}" if rows else None

    def get(self, name: str, version: int | None) -> tuple[int, str, int, str] | None:
        """(id, name, version, card JSON) of one version, or of the latest when `version` is None."""
        if version is None:
            rows = self._rows("SELECT id, name, version, card FROM cards WHERE name = ? ORDER BY version DESC "
                              "LIMIT 1", (name,))
        else:
            rows = self._rows("SELECT id, name, version, card FROM cards WHERE name = ? AND version = ?",
                              (name, version))
        return rows[0] if rows else None

    def versions(self, name: str) -> list[tuple[int, str, int, str]]:
        return self._rows("SELECT id, name, version, card FROM cards WHERE name = ? ORDER BY version", (name,))

    def all(self) -> list[tuple[int, str, int, str]]:
        return self._rows("SELECT id, name, version, card FROM cards ORDER BY name, version")

    def names(self) -> list[str]:
        return [r[0] for r in self._rows("SELECT DISTINCT name FROM cards")]

    def count(self) -> int:
        return self._rows("SELECT count(*) FROM cards")[0][0]

    def dependants(self, refs: Sequence[str], excluding: Sequence[int]) -> list[str]:
        """Refs of cards (other than `excluding`) that list one of `refs` as a parent."""
        rows = self._rows(
            f"SELECT DISTINCT c.name, c.version FROM parents p JOIN cards c ON c.id = p.card_id WHERE p.ref IN "
            f"({','.join('?' * len(refs))}) AND c.id NOT IN ({','.join('?' * len(excluding))}) "
            "ORDER BY c.name, c.version", (*refs, *excluding))
        return [f"{n}@{v}" for n, v in rows]

    def referenced_blobs(self) -> set[str]:
        return {r[0] for r in self._rows("SELECT DISTINCT sha256 FROM files")}

    def accounted(self) -> set[str]:
        """The blobs this index knows it wrote: referenced by a card, or claimed by an add or a removed card."""
        return {r[0] for r in self._rows("SELECT sha256 FROM stored")}

    def digests(self) -> set[str]:
        return {r[0] for r in self._rows("SELECT DISTINCT digest FROM cards")}

    def search(self, kind: str | None = None, base_sha: str | None = None, base_name: str | None = None,
               task: str | None = None, tags: Sequence[str] = (), text: str | None = None,
               compatible_only: bool = False, limit: int | None = None) -> list[tuple[int, str, int, str]]:
        """Matching rows: same fingerprint first, then same base name, each by name and newest version."""
        where, params = [], {}
        if kind is not None:
            where.append("c.id IN (SELECT card_id FROM kinds WHERE kind = :kind)")
            params["kind"] = kind
        for i, tag in enumerate(tags):
            where.append(f"c.id IN (SELECT card_id FROM tags WHERE tag = :tag{i})")
            params[f"tag{i}"] = tag
        if task is not None:
            where.append("c.task = :task")
            params["task"] = task
        if text:
            where.append("instr(c.haystack, :text) > 0")
            params["text"] = text.lower()
        order = ["c.name", "c.version DESC"]
        if base_sha or base_name:
            match = []
            if base_sha:
                match.append("c.base_sha = :sha")
                params["sha"] = base_sha
                order.insert(0, "c.base_sha != :sha")  # compatible (0) before same-name (1)
            if base_name and not (compatible_only and base_sha):
                match.append("c.base_name = :base_name")
                params["base_name"] = base_name
            where.append(f"({' OR '.join(match)})")
        sql = (f"SELECT c.id, c.name, c.version, c.card FROM cards c WHERE {' AND '.join(where) or '1'} "
               f"ORDER BY {', '.join(order)}")
        if limit is not None:
            sql += " LIMIT :limit"
            params["limit"] = limit
        return self._rows(sql, params)
