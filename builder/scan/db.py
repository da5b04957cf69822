"""The offline Trivy vulnerability database: from a directory, or pulled by digest from an OCI
repository that mirrors ``trivy-db:2``; checked before any scan starts.

Trivy is never allowed to download it. A database is a directory with ``trivy.db`` (bbolt) and
``metadata.json``; each scan gets a fresh cache directory whose ``db/`` links to those two files,
so the database itself is only read.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import struct
import tarfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder import digest as dg
from builder.errors import BuilderError
from builder.store import Store, read_named

if TYPE_CHECKING:
    from builder.fetch.registry import RegistryClient

SCHEMA_VERSION = 2
DB_LAYER_TYPE = "application/vnd.aquasec.trivy.db.layer.v1.tar+gzip"
DB_ARTIFACT_TYPE = "application/vnd.aquasec.trivy.config.v1+json"
DB_FILES = ("trivy.db", "metadata.json")
MAX_DB_SIZE = 8 << 30  # a real trivy.db is around 1 GiB; anything far bigger is not a trivy DB

# bbolt meta page (see tests/rig/trivydb.py for the layout): magic, version, page size ... checksum.
BOLT_MAGIC = 0xED0CDAED
BOLT_META = struct.Struct("<IIII QQ QQQ")  # 56 bytes, followed by the FNV-1a-64 checksum
_PAGE_HEADER = 16


class DatabaseError(BuilderError):
    """The vulnerability database is missing, corrupt, or too old under strict mode."""


@dataclass(frozen=True)
class DBMetadata:
    version: int
    updated_at: datetime
    next_update: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "updated_at": _iso(self.updated_at),
                "next_update": _iso(self.next_update) if self.next_update else None}


@dataclass(frozen=True)
class TrivyDatabase:
    dir: Path  # holds trivy.db and metadata.json
    metadata: DBMetadata
    source: str  # where it came from, for the summary
    digest: str | None = None  # the OCI manifest digest it was pulled by

    def age(self, now: datetime | None = None) -> timedelta:
        return (now or datetime.now(UTC)) - self.metadata.updated_at

    def check_age(self, max_age_days: float, strict: bool,
                  now: datetime | None = None) -> str | None:
        """A warning when older than ``max_age_days`` (an error when ``strict``), else None."""
        age = self.age(now)
        if age <= timedelta(days=max_age_days):
            return None
        message = (f"trivy DB from {self.source} was updated {_iso(self.metadata.updated_at)}, "
                   f"{age.total_seconds() / 86400:.1f} days ago, older than the allowed "
                   f"{max_age_days:g} days")
        if self.metadata.next_update:
            message += f" (its NextUpdate was {_iso(self.metadata.next_update)})"
        hint = "mirror a fresh trivy-db:2 and pass it with --db (or raise database.max_age_days)"
        if strict:
            raise DatabaseError(message, hint)
        return message

    def install(self, cache_dir: Path) -> Path:
        """Make ``cache_dir/db`` point at this database, the layout ``--cache-dir`` expects."""
        target = cache_dir / "db"
        target.mkdir(parents=True, exist_ok=True)
        for name in DB_FILES:
            link = target / name
            link.unlink(missing_ok=True)
            link.symlink_to((self.dir / name).resolve())
        return target

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "digest": self.digest, **self.metadata.to_json()}


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: object, field: str, where: str) -> datetime:
    if not isinstance(value, str):
        raise DatabaseError(f"{where}: {field} is missing or not a time string: {value!r}",
                            "the metadata.json of a trivy-db:2 artifact has RFC 3339 times")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise DatabaseError(f"{where}: {field} is not an RFC 3339 time: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _missing(where: str) -> DatabaseError:
    return DatabaseError(f"{where}: missing", "a Trivy DB directory holds trivy.db and "
                         "metadata.json (the contents of db.tar.gz)")


def read_metadata(path: Path) -> DBMetadata:
    where = str(path)
    try:
        data = json.loads(read_named(path, _missing(where), Path.read_text))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DatabaseError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DatabaseError(f"{where}: expected a JSON object")
    if data.get("Version") != SCHEMA_VERSION:
        raise DatabaseError(f"{where}: Version is {data.get('Version')!r}, expected {SCHEMA_VERSION}",
                            "this Trivy reads trivy-db schema 2 (the trivy-db:2 tag)")
    updated = _parse_time(data.get("UpdatedAt"), "UpdatedAt", where)
    next_update = None
    if data.get("NextUpdate") is not None:
        next_update = _parse_time(data.get("NextUpdate"), "NextUpdate", where)
    return DBMetadata(SCHEMA_VERSION, updated, next_update)


def fnv1a64(data: bytes) -> int:
    """bbolt's meta-page checksum."""
    h = 0xCBF29CE484222325
    for byte in data:
        h ^= byte
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def _meta_ok(page: bytes, file_size: int) -> int | None:
    """The page size a valid meta page declares, or None."""
    need = _PAGE_HEADER + BOLT_META.size + 8
    if len(page) < need:
        return None
    body = page[_PAGE_HEADER:_PAGE_HEADER + BOLT_META.size]
    magic, version, page_size, _flags, _root, _seq, _free, high_water, _txid = BOLT_META.unpack(body)
    (checksum,) = struct.unpack_from("<Q", page, _PAGE_HEADER + BOLT_META.size)
    if magic != BOLT_MAGIC or version != 2 or checksum != fnv1a64(body):
        return None
    if not page_size or high_water * page_size > file_size:
        return None  # truncated: the meta names pages past the end of the file
    return page_size


def check_bolt(path: Path) -> None:
    """Cheap structural check of trivy.db: a bbolt file with at least one valid meta page.

    Catches a truncated download, an empty file or some other file under the right name
    before Trivy starts (Trivy would only fail halfway through a scan).
    """
    where = str(path)
    need = _PAGE_HEADER + BOLT_META.size + 8
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            first = _meta_ok(fh.read(need), size)
            if first is None:
                # bbolt falls back to the second meta page; it sits one page in (usually 4096).
                fh.seek(4096)
                first = _meta_ok(fh.read(need), size)
    except FileNotFoundError:
        raise _missing(where) from None
    except OSError as exc:
        raise DatabaseError(f"{where}: cannot read: {exc.strerror or exc}") from None
    if first is None:
        raise DatabaseError(f"{where}: not a valid bbolt database (no meta page with the right "
                            f"magic, version and checksum; {size} bytes)",
                            "the file is corrupt or truncated: copy or pull the database again")


def open_directory(path: Path, source: str | None = None, digest: str | None = None) -> TrivyDatabase:
    """A database directory: ``trivy.db`` + ``metadata.json`` in ``path`` or in ``path/db``
    (so a Trivy cache directory works too). Both files are checked here."""
    path = Path(path)
    if not path.is_dir():
        raise DatabaseError(f"trivy DB directory {path} does not exist",
                            "pass the directory holding trivy.db and metadata.json, "
                            "or pull one with --db-ref REPO@sha256:...")
    if not (path / "trivy.db").exists() and (path / "db" / "trivy.db").exists():
        path = path / "db"
    check_bolt(path / "trivy.db")
    metadata = read_metadata(path / "metadata.json")
    return TrivyDatabase(path, metadata, source or f"directory {path}", digest)


# -- pulled from an OCI repository -------------------------------------------------------------

def _safe_extract_db(store: Store, blob_digest: str, dest: Path, where: str) -> None:
    """Unpack db.tar.gz from the store: only the two expected regular files, size-capped."""
    found: set[str] = set()
    try:
        # Hashed while read and finished below: the unpacked files are kept (renamed into
        # place by the caller) only when the whole blob still is the digest it is stored under.
        # (The ignore: a stream mode ("r|gz") only calls read(); typeshed's fileobj type asks
        # for the whole file API, seek and tell included, that the one-pass reader lacks.)
        with store.open_verified(blob_digest, f"{where}: db.tar.gz") as raw, \
                tarfile.open(fileobj=raw, mode="r|gz") as tar:  # type: ignore[call-overload]
            for member in tar:
                name = member.name.removeprefix("./")
                if name not in DB_FILES:
                    continue  # anything else in the tarball is not ours to unpack
                if not member.isreg():
                    raise DatabaseError(f"{where}: {name} in db.tar.gz is not a regular file")
                if member.size > MAX_DB_SIZE:
                    raise DatabaseError(f"{where}: {name} is {member.size} bytes, over the limit")
                src = tar.extractfile(member)
                assert src is not None
                with open(dest / name, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                found.add(name)
            raw.finish()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DatabaseError(f"{where}: db.tar.gz is not a readable tar.gz: {exc}",
                            "the artifact is corrupt; pull it again or check the mirror") from None
    missing = [n for n in DB_FILES if n not in found]
    if missing:
        raise DatabaseError(f"{where}: db.tar.gz lacks {', '.join(missing)}",
                            "a trivy-db:2 layer holds trivy.db and metadata.json at its root")


def unpack_artifact(store: Store, manifest_raw: bytes, where: str, dest_root: Path,
                    fetch_layer) -> TrivyDatabase:
    """Check a trivy-db manifest (one layer of the DB media type), get the layer into the store
    with ``fetch_layer(descriptor) -> digest`` and unpack it under ``dest_root/<manifest hex>``.
    An unpacked directory from an earlier run is reused (it is named by the verified digest)."""
    from builder.oci import model as m

    manifest_digest = dg.of_bytes(manifest_raw)
    doc = m.parse_document(manifest_raw, where)
    if not isinstance(doc, m.Manifest):
        raise DatabaseError(f"{where}: is an index, not a trivy-db manifest",
                            "pull the trivy-db:2 manifest digest, not an index")
    if len(doc.layers) != 1 or doc.layers[0].media_type != DB_LAYER_TYPE:
        got = ", ".join(layer.media_type for layer in doc.layers) or "no layers"
        raise DatabaseError(f"{where}: not a trivy-db artifact: expected one layer of "
                            f"{DB_LAYER_TYPE}, got {got}",
                            "the reference must name a mirror of trivy-db:2")
    final = Path(dest_root) / dg.hex_of(manifest_digest)
    if not (final / ".complete").exists():
        layer = doc.layers[0]
        digest = fetch_layer(layer)
        if digest != layer.digest:
            raise DatabaseError(f"{where}: layer fetch returned {digest}, expected {layer.digest}")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        tmp.mkdir()
        try:
            _safe_extract_db(store, layer.digest, tmp, where)
            (tmp / ".complete").write_text(layer.digest + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return open_directory(final, source=where, digest=manifest_digest)


def pull_database(client: RegistryClient, reference_text: str, store: Store,
                  dest_root: Path) -> TrivyDatabase:
    """The database from an OCI mirror of trivy-db:2, pinned by digest
    (``host/aquasec/trivy-db@sha256:...``), through the project's registry client and store.

    A digest already unpacked under ``dest_root`` is used without any network call, so a rerun
    on a disconnected host works once the database has been pulled.
    """
    from builder.oci import reference

    try:
        ref = reference.parse(reference_text)
    except ValueError as exc:
        raise DatabaseError(f"trivy DB reference {reference_text!r}: {exc}") from None
    if not ref.digest:
        raise DatabaseError(f"trivy DB reference {reference_text} is not pinned by digest",
                            "write it as REPOSITORY@sha256:<manifest digest> so every scan uses "
                            "the database that was reviewed")
    where = f"{ref.name}@{ref.digest}"
    cached = Path(dest_root) / dg.hex_of(ref.digest)
    if (cached / ".complete").exists():
        return open_directory(cached, source=where, digest=ref.digest)
    manifest = client.get_manifest(ref)  # hashed against the pin before anything parses it
    return unpack_artifact(
        store, manifest.raw, where, dest_root,
        lambda desc: client.fetch_blob(ref, desc, store, what="trivy DB layer").digest)
