"""The content store: every blob by sha256 under one directory, shared by all stages and arches.

Layout (OCI-layout-like, so blobs can be hard-linked or read by other tools)::

    ROOT/blobs/sha256/<hex>     verified blobs, read-only; the only place a blob is trusted from
    ROOT/ingest/<hex>           a partial download of a known digest, kept for resume
    ROOT/ingest/<hex>.json      what the partial came from (URL, validator) so a resume can use If-Range
    ROOT/locks/<hex>.lock       per-digest advisory locks (two builds at once wait for each other)
    ROOT/tmp/<pid>-<rand>       blobs whose digest is not known in advance (built here)
    ROOT/index/...              small derived caches keyed by digest

`python -m builder store verify` (``Store.check_all``) re-hashes every blob and removes the bad
ones; everything that ships bytes from the store reads them through ``open_verified``.

A blob reaches ``blobs/`` only by rename after its bytes hashed to the expected digest, so a file
there was verified by this store; a crash at any point leaves at worst a partial under ``ingest/``
(resumed next time) or a temp file (swept when its writer's pid is gone).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO, TypeVar

from builder import digest as dg
from builder.errors import BuilderError, DigestMismatch
from builder.humanize import human

ENV_STORE = "BUILDER_STORE"
T = TypeVar("T")


def default_root(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get(ENV_STORE):
        return Path(env[ENV_STORE])
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "airgap-builder"


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Files every writer hands out (artifacts, records, keys' public halves): readable by all,
# writable by the owner, whatever the umask says.
FILE_MODE = 0o644


# Temp names carry their writer's pid, so that a later run can tell what a killed writer left
# (Store._sweep_dead removes it) from what a live one still holds: atomic_file's
# ".<final name>.<pid>-<8 hex>.tmp", and "<pid>-<random>" under the store's tmp/.
_ATOMIC_TEMP = re.compile(r"\..+\.(\d+)-[0-9a-f]{8}\.tmp")
_STORE_TEMP = re.compile(r"(\d+)(?:-.*)?")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Write ``path`` all or nothing: a temp file in the same directory, fsync, rename, fsync
    of the directory. The one way every stage writes a file it names.

    A reader sees the old file or the complete new one, never part of one; any exception
    (KeyboardInterrupt too) removes the temp file, so an interrupted run leaves nothing partial
    under the final name. The file gets FILE_MODE.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def read_named(path: Path, missing: BuilderError,
               read: Callable[[Path], T] = Path.read_bytes) -> T:  # type: ignore[assignment]
    """``read(path)`` of a file a person named (a lock, a policy): when there is no such file,
    ``missing``, the error that says which file it was meant to be and what to do."""
    try:
        return read(Path(path))
    except FileNotFoundError:
        raise missing from None


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``atomic_file``."""
    with atomic_file(path) as fh:
        fh.write(data)


@dataclass
class Ingest:
    """A resumable write of a blob whose digest is known before the first byte arrives."""

    store: Store
    digest: str
    what: str
    path: Path
    done: bool = False
    offset: int = 0
    meta: dict = field(default_factory=dict)
    _hash: hashlib._Hash = field(default_factory=hashlib.sha256)
    _file: BinaryIO | None = None

    def _open(self) -> None:
        # Re-hash what an earlier attempt left so the final digest covers every byte.
        if self.path.exists():
            with open(self.path, "rb") as f:
                while chunk := f.read(dg.CHUNK):
                    self._hash.update(chunk)
                    self.offset += len(chunk)
            meta_path = self._meta_path()
            if meta_path.exists():
                try:
                    self.meta = json.loads(meta_path.read_text())
                except ValueError:
                    self.meta = {}
        self._file = open(self.path, "ab")

    def _meta_path(self) -> Path:
        return self.path.with_suffix(".json")

    def set_meta(self, **values: object) -> None:
        self.meta.update(values)
        write_atomic(self._meta_path(), json.dumps(self.meta, sort_keys=True).encode())

    def reset(self) -> None:
        """Forget the partial bytes (the source changed or ignored our Range)."""
        assert self._file is not None
        self._file.truncate(0)
        self._file.seek(0)
        self._hash = hashlib.sha256()
        self.offset = 0
        self.meta = {}
        self._meta_path().unlink(missing_ok=True)

    def write(self, chunk: bytes) -> None:
        assert self._file is not None
        self._file.write(chunk)
        self._hash.update(chunk)
        self.offset += len(chunk)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def commit(self) -> int:
        """Verify and move into ``blobs/``. On a mismatch the partial is discarded."""
        assert self._file is not None
        actual = "sha256:" + self._hash.hexdigest()
        self._file.flush()
        if actual != self.digest:
            self.discard()
            raise DigestMismatch(self.what, self.digest, actual)
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self.store._install(self.path, self.digest)
        self._meta_path().unlink(missing_ok=True)
        self.done = True
        return self.offset

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)
        self._meta_path().unlink(missing_ok=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        for sub in ("blobs/sha256", "ingest", "locks", "tmp", "index"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._sweep_tmp()

    # -- reading -------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir() / dg.hex_of(digest)

    def has(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def size(self, digest: str) -> int:
        return self.blob_path(digest).stat().st_size

    def open(self, digest: str) -> BinaryIO:
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise BuilderError(
                f"store: {digest} is not in the content store at {self.root}",
                "run `python -m builder fetch` first",
            ) from None

    def open_verified(self, digest: str, what: str) -> BlobReader:
        """A reader that hashes what passes through; ``finish()`` reads the rest and raises
        StoreCorrupt unless the bytes are the blob's digest. For everything shipped from the store."""
        return BlobReader(self.open(digest), digest, what)

    def read_bytes(self, digest: str) -> bytes:
        """A small blob (a manifest, a config), checked against its digest before anyone parses it."""
        with self.open_verified(digest, "") as reader:
            data = reader.read()
            reader.finish()
        return data

    def repair_hint(self) -> str:
        return repair_hint(self.root)

    def verify(self, digest: str) -> None:
        """Re-hash one stored blob; a bad one is removed (a fetch or build then makes it again)."""
        actual, _ = self._rehash(digest)
        if actual != digest:
            raise StoreCorrupt(f"store blob {digest}", digest, actual,
                               "the store was modified on disk; the blob was removed: run "
                               "`python -m builder fetch` to download it again")

    def _rehash(self, digest: str) -> tuple[str, int]:
        """(what the blob hashes to, its size), under the digest's lock so a fetch installing
        the same digest is never disturbed; a blob that does not hash to its name is removed."""
        path = self.blob_path(digest)
        with self.locked(digest):
            actual, size = dg.of_file(path)
            if actual != digest:
                path.unlink(missing_ok=True)
        return actual, size

    def check_all(self) -> StoreCheck:
        """Re-hash every blob; remove the bad ones and the index entries that point at them.

        A symlink, or a file not named by 64 hex digits, in ``blobs/sha256/`` is not a blob this
        store wrote, and is removed too. Each blob is checked under its digest's lock, so a fetch
        installing the same digest at the same time is never disturbed.
        """
        report = StoreCheck(self.root)
        for entry in sorted(self.blobs_dir().iterdir()):
            name = entry.name
            if entry.is_dir() and not entry.is_symlink():
                continue  # never read as a blob (has() wants a file); not ours to delete
            if not dg.is_hex64(name) or entry.is_symlink():
                entry.unlink(missing_ok=True)
                report.removed.append(f"{name} (not a blob written by this store)")
                continue
            digest = dg.from_hex(name)
            try:
                actual, size = self._rehash(digest)
            except FileNotFoundError:
                continue  # removed by someone else meanwhile
            report.checked += 1
            report.bytes += size
            if actual != digest:
                report.removed.append(f"{digest} (bytes hash to {actual})")
                report.bad.add(digest)
        if report.bad:
            report.index_removed = self._drop_index_entries(report.bad)
        return report

    def _drop_index_entries(self, digests: set[str]) -> int:
        """Index entries are shortcuts to a blob; one pointing at a removed blob is deleted."""
        removed = 0
        for path in sorted((self.root / "index").rglob("*")):
            if not path.is_file():
                continue
            try:
                value = path.read_text().strip()
            except (OSError, UnicodeDecodeError):
                continue
            if value in digests:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def blobs_dir(self) -> Path:
        return self.root / "blobs" / "sha256"

    # -- locking ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, digest: str) -> Iterator[None]:
        lock_path = self.root / "locks" / f"{dg.hex_of(digest)}.lock"
        with open(lock_path, "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    # -- writing -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def ingest(self, digest: str, what: str) -> Iterator[Ingest]:
        """Hold the digest's lock and yield a resumable writer.

        ``ing.done`` is already true when the blob is present (maybe written by another build
        while we waited for the lock). An exception leaves the partial for the next attempt,
        except a digest mismatch, which discards it.
        """
        if not dg.is_digest(digest):
            raise BuilderError(f"{what}: not a sha256 digest: {digest!r}")
        with self.locked(digest):
            ing = Ingest(self, digest, what, self.root / "ingest" / dg.hex_of(digest))
            if self.has(digest):
                ing.done = True
                yield ing
                return
            ing._open()
            try:
                yield ing
            finally:
                ing.close()

    def _install(self, src: Path, digest: str) -> None:
        dest = self.blob_path(digest)
        os.chmod(src, 0o444)
        os.replace(src, dest)
        fsync_dir(dest.parent)

    def put_stream(self, stream: IO[bytes], expected: str | None = None, what: str = "blob") -> str:
        """Store bytes whose digest is computed here (or checked, when ``expected`` is given)."""
        tmp = self.root / "tmp" / f"{os.getpid()}-{secrets.token_hex(8)}"
        h = hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                while chunk := stream.read(dg.CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            actual = "sha256:" + h.hexdigest()
            if expected is not None and actual != expected:
                raise DigestMismatch(what, expected, actual)
            with self.locked(actual):
                if self.has(actual):
                    tmp.unlink()
                else:
                    self._install(tmp, actual)
            return actual
        finally:
            tmp.unlink(missing_ok=True)

    def adopt(self, tmp: Path, digest: str) -> None:
        """Install a file under ``tmp/`` that this process wrote while hashing every byte of it
        (e.g. a layer written through a hashing writer), without copying or re-reading it."""
        if Path(tmp).parent != self.root / "tmp":
            raise BuilderError(f"store: {tmp} is not in {self.root / 'tmp'}; use put_stream")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        with self.locked(digest):
            if self.has(digest):
                Path(tmp).unlink()
            else:
                self._install(Path(tmp), digest)

    def put_bytes(self, data: bytes, expected: str | None = None, what: str = "blob") -> str:
        import io

        return self.put_stream(io.BytesIO(data), expected, what)

    # -- small derived caches ------------------------------------------------------------------
    def index_get(self, namespace: str, key: str) -> str | None:
        path = self._index_path(namespace, key)
        try:
            value = path.read_text().strip()
        except FileNotFoundError:
            return None
        # An index entry is only a shortcut: trust it only if it points at a stored blob.
        return value if dg.is_digest(value) and self.has(value) else None

    def index_put(self, namespace: str, key: str, value: str) -> None:
        write_atomic(self._index_path(namespace, key), (value + "\n").encode())

    def _index_path(self, namespace: str, key: str) -> Path:
        name = hashlib.sha256(key.encode()).hexdigest()
        return self.root / "index" / namespace / name

    def _sweep_tmp(self) -> None:
        _sweep_dead(self.root / "tmp", _STORE_TEMP)
        # A kill -9 mid set_meta or index_put leaves an atomic_file temp beside the partials.
        _sweep_dead(self.root / "ingest", _ATOMIC_TEMP)
        for namespace in (self.root / "index").iterdir():
            if namespace.is_dir() and not namespace.is_symlink():
                _sweep_dead(namespace, _ATOMIC_TEMP)


def _sweep_dead(directory: Path, temp_name: re.Pattern[str]) -> None:
    """Remove what killed writers left in ``directory`` (SIGKILL skips every cleanup): the
    entries named by ``temp_name`` whose writer pid (its group 1) is no longer alive."""
    for entry in directory.iterdir():
        m = temp_name.fullmatch(entry.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def repair_hint(root: Path) -> str:
    """What to do about a store blob whose bytes do not match its name (names real commands)."""
    return (f"the content store was modified on disk; run `python -m builder --store {root} store "
            "verify` (re-hashes every blob and removes the bad ones), then `python -m builder fetch` "
            "downloads them again (`python -m builder build` remakes what it built itself)")


class StoreCorrupt(DigestMismatch):
    """A blob under blobs/sha256/ does not hash to its name: changed on disk after it was verified."""


class BlobReader:
    """A stored blob read through sha256: what is shipped from the store is what was verified.

    ``finish()`` reads whatever the consumer left (a tar reader may stop at the end-of-archive
    marker) and raises StoreCorrupt, naming ``what``, unless every byte hashed to the digest.
    """

    def __init__(self, fh: BinaryIO, digest: str, what: str):
        self.fh, self.digest, self.what = fh, digest, what
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data

    def finish(self) -> None:
        while self.read(dg.CHUNK):
            pass
        actual = "sha256:" + self.hash.hexdigest()
        if actual != self.digest:
            # The file is ROOT/blobs/sha256/<hex>: the hint names the store it is in.
            root = Path(self.fh.name).parents[2] if isinstance(self.fh.name, str) else Path("STORE")
            where = f"{self.what}: store blob {self.digest}" if self.what else f"store blob {self.digest}"
            raise StoreCorrupt(where, self.digest, actual, repair_hint(root))

    def close(self) -> None:
        self.fh.close()

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class StoreCheck:
    """What `python -m builder store verify` found."""

    root: Path
    checked: int = 0
    bytes: int = 0
    removed: list[str] = field(default_factory=list)
    bad: set[str] = field(default_factory=set)
    index_removed: int = 0

    def summary(self) -> str:
        line = (f"store {self.root}: checked {self.checked} blobs ({human(self.bytes)}), "
                f"removed {len(self.removed)}")
        if self.index_removed:
            line += f" and {self.index_removed} index entries pointing at them"
        return "\n".join([line, *(f"  removed: {r}" for r in self.removed)])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
