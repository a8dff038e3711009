"""Content-addressed file store: `blobs/ab/abcdef...` holds the bytes whose sha256 is `abcdef...`.

A blob appears only by renaming a complete, fsynced temporary file into
place, so a process killed mid-write leaves at most a stray temporary file
(under `tmp/`, named after its process id so `gc` can tell it is dead) and
never a partial blob. Bytes are re-hashed whenever they are read out, so a
file changed on disk is reported, not loaded.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from ..errors import IntegrityError, RegistryError
from .card import SHA_RE

CHUNK = 1 << 20
SHARD_RE = re.compile(r"^[0-9a-f]{2}\Z")
PID_MAX = 1 << 22  # Linux's ceiling; a larger "pid" in a tmp/ name is not one of ours
READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (the directory entry, not just the file's bytes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _copy_hashing(src: BinaryIO, dst: BinaryIO) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    while chunk := src.read(CHUNK):
        h.update(chunk)
        dst.write(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class BlobStore:
    """Files named by their sha256 under `root/blobs`; temporary files under `root/tmp`."""

    def __init__(self, root: Path):
        self.dir = root / "blobs"
        self.tmp = root / "tmp"
        self.checkouts = root / "checkouts"
        for d in (self.dir, self.tmp, self.checkouts):
            if d.exists() and not d.is_dir():
                raise RegistryError(f"{d} is not a directory, but the registry keeps its {d.name} there; move it "
                                    "out of the registry folder")
            d.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        return self.dir / sha[:2] / sha

    def exists(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def temp_file(self) -> tuple[int, str]:
        """A new temporary file (fd, path) named after this process, so `clean_temps` knows when it is stale."""
        return tempfile.mkstemp(dir=self.tmp, prefix=f"{os.getpid()}-", suffix=".tmp")

    def temp_dir(self) -> str:
        return tempfile.mkdtemp(dir=self.tmp, prefix=f"{os.getpid()}-")

    def put(self, src: Path, link: bool = False, sha: str | None = None) -> tuple[str, int]:
        """Store a file's bytes; returns (sha256, size). An intact copy already there is kept as is.

        Hashing first costs a read but saves the temporary copy and its fsync
        when the content is already stored (re-adds, shared pelthub.json).
        `link=True` hard-links a file that is already durable (written and
        fsynced by us, in `tmp/`) instead of copying it. `sha`: the file's sha256, when the caller hashed it.
        """
        sha = sha or file_sha256(src)
        final = self.path(sha)
        if final.is_file() and file_sha256(final) == sha:
            return sha, final.stat().st_size
        final.parent.mkdir(exist_ok=True)
        if link:
            try:
                os.link(src, final)
                os.chmod(final, READ_ONLY)
                fsync_dir(final.parent)
                return sha, final.stat().st_size
            except OSError:  # a damaged copy is in the way, or no hard links here: copy instead
                pass
        fd, tmp = self.temp_file()
        try:
            with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
                copied, size = _copy_hashing(fin, fout)
                fout.flush()
                os.fsync(fout.fileno())
            if copied != sha:
                raise IntegrityError(f"{src} changed while it was being added; add it again")
            os.chmod(tmp, READ_ONLY)
            os.replace(tmp, final)  # also repairs a corrupt copy: same name, right bytes
            fsync_dir(final.parent)
            return sha, size
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def check(self, sha: str, label: str) -> None:
        """Raise IntegrityError naming the blob if it is missing or its bytes no longer hash to `sha`."""
        path = self.path(sha)
        if not path.is_file():
            raise IntegrityError(f"blob {path} ({label}) is missing; re-add the module or restore the file")
        actual = file_sha256(path)
        if actual != sha:
            raise _corrupt(path, label, sha, actual)

    def copy_out(self, sha: str, dest: Path, label: str) -> None:
        """Copy a blob to `dest`, verifying its sha256 on the way."""
        path = self.path(sha)
        if not path.is_file():
            raise IntegrityError(f"blob {path} ({label}) is missing; re-add the module or restore the file")
        with open(path, "rb") as fin, open(dest, "wb") as fout:
            actual, _ = _copy_hashing(fin, fout)
        if actual != sha:
            dest.unlink()
            raise _corrupt(path, label, sha, actual)

    def checkout(self, key: str, files: dict[str, str], label: str) -> Path:
        """A read-only directory `checkouts/<key>` holding `files` (name -> sha256), shared by its readers.

        Each call re-hashes the blobs and the directory's files. An intact
        directory is never removed or replaced, so a reader in another process
        never sees it disappear; only one found damaged is moved aside (one
        rename) and rebuilt from the blobs.
        """
        target = self.checkouts / key
        if _matches(target, files):
            for name, sha in files.items():
                self.check(sha, f"{label}: {name}")
            return target
        build = Path(self.temp_dir())
        try:
            for name, sha in files.items():
                self.copy_out(sha, build / name, f"{label}: {name}")
                os.chmod(build / name, READ_ONLY)
            for _ in range(3):
                try:
                    os.rename(build, target)  # fails if a directory is there (another reader's, or damaged)
                    return target
                except OSError:
                    if _matches(target, files):  # another process finished first: share theirs
                        return target
                    self._move_aside(target)
            raise IntegrityError(f"{target} ({label}) keeps changing while being rebuilt; is another program "
                                 "writing there?")
        finally:
            if build.exists():
                shutil.rmtree(build)

    def _move_aside(self, target: Path) -> None:
        """Rename a damaged checkout into tmp/ (atomic), then delete it there."""
        aside = Path(tempfile.mkdtemp(dir=self.tmp, prefix=f"{os.getpid()}-")) / "damaged"
        try:
            os.rename(target, aside)
        except FileNotFoundError:
            pass
        shutil.rmtree(aside.parent, ignore_errors=True)

    def __iter__(self) -> Iterator[str]:
        """The sha256 of every blob on disk: regular files named by a sha256 in their shard, nothing else.

        Symlinks and other strays are never listed, so gc can neither follow one out of the
        registry nor trip over a directory.
        """
        for shard in sorted(self.dir.iterdir()):
            if _is_shard(shard):
                yield from sorted(p.name for p in shard.iterdir() if _is_blob(p, shard.name))

    def strays(self) -> list[str]:
        """Entries under blobs/ and checkouts/ that pelthub did not write (gc leaves them alone)."""
        found = []
        for shard in sorted(self.dir.iterdir()):
            if not _is_shard(shard):
                found.append(str(shard))
                continue
            found += [str(p) for p in sorted(shard.iterdir()) if not _is_blob(p, shard.name)]
        return found + [str(p) for p in sorted(self.checkouts.iterdir()) if not _is_checkout(p)]

    def remove(self, sha: str) -> int:
        """Delete a blob; returns the bytes freed."""
        path = self.path(sha)
        size = path.stat().st_size
        path.unlink()
        return size

    def clean_temps(self) -> int:
        """Remove temporary files and directories left by processes that died; returns how many."""
        removed = 0
        for entry in self.tmp.iterdir():
            pid = entry.name.split("-", 1)[0]
            if pid.isdigit() and 0 < int(pid) < PID_MAX and not entry.is_symlink() and not _pid_alive(int(pid)):
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed += 1
        return removed

    def clean_checkouts(self, keep: set[str]) -> int:
        """Remove checkout directories whose content no card references any more (not strays: see `strays`)."""
        removed = 0
        for entry in self.checkouts.iterdir():
            if _is_checkout(entry) and entry.name not in keep:
                shutil.rmtree(entry)
                removed += 1
        return removed


def _is_shard(path: Path) -> bool:
    return SHARD_RE.match(path.name) is not None and stat.S_ISDIR(_mode(path))


def _is_blob(path: Path, shard: str) -> bool:
    return SHA_RE.match(path.name) is not None and path.name[:2] == shard and stat.S_ISREG(_mode(path))


def _is_checkout(path: Path) -> bool:
    return SHA_RE.match(path.name) is not None and stat.S_ISDIR(_mode(path))


def _mode(path: Path) -> int:
    """The entry's own type and mode (a symlink is a symlink, not what it points at); 0 once it is gone."""
    try:
        return path.lstat().st_mode
    except FileNotFoundError:
        return 0


def _matches(directory: Path, files: dict[str, str]) -> bool:
    if not directory.is_dir() or sorted(os.listdir(directory)) != sorted(files):
        return False
    return all(file_sha256(directory / name) == sha for name, sha in files.items())


def _corrupt(path: Path, label: str, expected: str, actual: str) -> IntegrityError:
    return IntegrityError(f"blob {path} ({label}) is corrupt: its sha256 is {actual[:16]}..., expected "
                          f"{expected[:16]}...; restore the file or re-add the module (`pelthub verify` lists "
                          "every damaged blob)")
