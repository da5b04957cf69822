"""Small Trivy vulnerability databases for tests: a bbolt file writer plus trivy-db's bucket shapes.

bbolt on-disk format (go.etcd.io/bbolt), all little-endian, page size 4096:

    page header (16 B)   id u64 · flags u16 (branch 1, leaf 2, meta 4, freelist 16) · count u16 · overflow u32
    page 0, 1: meta      magic u32 0xED0CDAED · version u32 2 · page_size u32 · flags u32 ·
                         root bucket (root pgid u64, sequence u64) · freelist pgid u64 ·
                         high-water pgid u64 · txid u64 · checksum u64 = FNV-1a-64 of the 56 bytes before it
    page 2: freelist     empty (count 0)
    leaf pages           count elements of (flags u32, pos u32, ksize u32, vsize u32); ``pos`` is the
                         offset from the element to its key; key and value bytes follow the elements
    bucket values        element flag 1; value = bucket header (root pgid u64, sequence u64), and for an
                         inline bucket (root 0) the bucket's own leaf page follows the header

Every bucket here is one leaf page (with overflow pages when it is bigger than a page), which bbolt
reads like any other; the small ones without sub-buckets are inlined, the way bbolt itself stores
them. Enough for test databases of a few hundred entries; not a general bbolt writer.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from builder import digest as dg
from builder.fetch.registry import RegistryClient
from builder.oci import model as m
from builder.oci.reference import parse as parse_ref
from builder.scan.db import DB_ARTIFACT_TYPE, DB_LAYER_TYPE
from builder.store import Store

# bbolt's format constants, restated from its source (go.etcd.io/bbolt: db.go `magic uint32 =
# 0xED0CDAED` and `version = 2`; the meta struct; meta.sum64() is hash/fnv's New64a over the meta
# up to its checksum field). Deliberately NOT imported from builder.scan.db: this writer makes the
# databases builder's check_bolt is tested with, so a constant shared by both would let a wrong
# value pass both. tests/test_scan_db.py holds both to bbolt's format (a file written by the real
# bbolt, FNV from its definition, and the real Trivy reading what this writes).
PAGE_SIZE = 4096
MAGIC = 0xED0CDAED
VERSION = 2
META_BODY = struct.Struct("<IIII QQ QQQ")  # magic version page_size flags · root (pgid, sequence) ·
#                                            freelist · high-water pgid · txid; checksum follows
FNV64_OFFSET_BASIS = 0xCBF29CE484222325
FNV64_PRIME = 0x100000001B3
BRANCH, LEAF, META, FREELIST = 0x01, 0x02, 0x04, 0x10
BUCKET_LEAF_FLAG = 0x01
PAGE_HEADER = struct.Struct("<QHHI")
LEAF_ELEMENT = struct.Struct("<IIII")
BUCKET_HEADER = struct.Struct("<QQ")
MAX_INLINE = PAGE_SIZE // 4

# A bucket: key → value bytes, or key → nested bucket.
Bucket = dict[bytes, "bytes | Bucket"]


def fnv1a64(data: bytes) -> int:
    """FNV-1a, 64 bits: bbolt's meta-page checksum (see above for why it is not imported)."""
    h = FNV64_OFFSET_BASIS
    for byte in data:
        h = ((h ^ byte) * FNV64_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def _leaf_body(items: list[tuple[int, bytes, bytes]]) -> tuple[int, bytes]:
    """Elements then key/value bytes, for a leaf page whose header is written by the caller."""
    count = len(items)
    if count > 0xFFFF:
        raise ValueError("this writer keeps a bucket in one leaf page: at most 65535 keys")
    elements = bytearray()
    data = bytearray()
    data_start = count * LEAF_ELEMENT.size
    for i, (flags, key, value) in enumerate(items):
        pos = data_start + len(data) - i * LEAF_ELEMENT.size
        elements += LEAF_ELEMENT.pack(flags, pos, len(key), len(value))
        data += key + value
    return count, bytes(elements + data)


@dataclass
class _Writer:
    page_size: int = PAGE_SIZE
    pages: list[bytes] = field(default_factory=list)  # page-sized chunks from pgid 3 on

    @property
    def next_pgid(self) -> int:
        return 3 + len(self.pages)

    def _alloc(self, flags: int, count: int, body: bytes) -> int:
        pgid = self.next_pgid
        size = PAGE_HEADER.size + len(body)
        npages = -(-size // self.page_size)
        raw = PAGE_HEADER.pack(pgid, flags, count, npages - 1) + body
        raw += b"\0" * (npages * self.page_size - len(raw))
        for i in range(npages):
            self.pages.append(raw[i * self.page_size:(i + 1) * self.page_size])
        return pgid

    def bucket_value(self, bucket: Bucket) -> bytes:
        """The value stored under a bucket's key in its parent: header (+ inline page)."""
        items = self._items(bucket)
        has_sub = any(flags & BUCKET_LEAF_FLAG for flags, _, _ in items)
        count, body = _leaf_body(items)
        inline = PAGE_HEADER.pack(0, LEAF, count, 0) + body
        if not has_sub and BUCKET_HEADER.size + len(inline) <= MAX_INLINE:
            return BUCKET_HEADER.pack(0, 0) + inline
        return BUCKET_HEADER.pack(self._alloc(LEAF, count, body), 0)

    def root_page(self, bucket: Bucket) -> int:
        count, body = _leaf_body(self._items(bucket))
        return self._alloc(LEAF, count, body)

    def _items(self, bucket: Bucket) -> list[tuple[int, bytes, bytes]]:
        items = []
        for key in sorted(bucket):  # bbolt keeps keys in byte order within a page
            value = bucket[key]
            if isinstance(value, dict):
                items.append((BUCKET_LEAF_FLAG, key, self.bucket_value(value)))
            else:
                items.append((0, key, value))
        return items


def _meta_page(pgid: int, root: int, high_water: int, txid: int, page_size: int) -> bytes:
    body = META_BODY.pack(MAGIC, VERSION, page_size, 0, root, 0, 2, high_water, txid)
    raw = PAGE_HEADER.pack(pgid, META, 0, 0) + body + struct.pack("<Q", fnv1a64(body))
    return raw + b"\0" * (page_size - len(raw))


def bolt_bytes(root: Bucket, page_size: int = PAGE_SIZE) -> bytes:
    """A complete bbolt file holding ``root``'s buckets (top-level values must be buckets)."""
    for key, value in root.items():
        if not isinstance(value, dict):
            raise ValueError(f"bbolt keeps only buckets at the top level, not {key!r}")
    writer = _Writer(page_size)
    root_pgid = writer.root_page(root)
    high_water = writer.next_pgid
    freelist = PAGE_HEADER.pack(2, FREELIST, 0, 0).ljust(page_size, b"\0")
    head = b"".join([
        _meta_page(0, root_pgid, high_water, 0, page_size),
        _meta_page(1, root_pgid, high_water, 1, page_size),
        freelist,
    ])
    return head + b"".join(writer.pages)


def write_bolt(path: Path, root: Bucket, page_size: int = PAGE_SIZE) -> Path:
    path.write_bytes(bolt_bytes(root, page_size))
    return path


# -- trivy-db shapes --------------------------------------------------------------------------

SEVERITIES = ("UNKNOWN", "LOW", "MEDIUM", "HIGH", "CRITICAL")
DATA_SOURCES = {
    "debian": {"ID": "debian", "Name": "Debian Security Tracker",
               "URL": "https://salsa.debian.org/security-tracker-team/security-tracker"},
    "alpine": {"ID": "alpine", "Name": "Alpine Secdb", "URL": "https://secdb.alpinelinux.org/"},
}


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class TrivyDB:
    """A trivy-db v2 with OS advisories: ``add(...)`` then ``write(dir)`` or ``tarball(path)``."""

    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    next_update: datetime | None = None
    buckets: Bucket = field(default_factory=dict)

    def add(self, platform: str, package: str, vuln_id: str, *, fixed: str = "",
            severity: str = "HIGH", title: str = "", source: str = "debian",
            status: int | None = None) -> TrivyDB:
        """An advisory: ``platform`` is the bucket name ('debian 12'), ``package`` the source
        package name; no ``fixed`` version means unfixed (status 2 'affected' unless given)."""
        advisory: dict[str, object] = {}
        if fixed:
            advisory["FixedVersion"] = fixed
        else:
            advisory["Status"] = 2 if status is None else status
        platform_bucket = self.buckets.setdefault(platform.encode(), {})
        assert isinstance(platform_bucket, dict)
        platform_bucket.setdefault(package.encode(), {})[vuln_id.encode()] = _json(advisory)  # type: ignore[index]
        level = SEVERITIES.index(severity)
        vulns = self.buckets.setdefault(b"vulnerability", {})
        vulns[vuln_id.encode()] = _json({  # type: ignore[index]
            "Title": title or f"test advisory {vuln_id} in {package}",
            "Description": f"A synthetic advisory for tests ({package}).",
            "Severity": severity,
            "VendorSeverity": {source: level},
            "References": [],
        })
        self.buckets.setdefault(b"data-source", {})[platform.encode()] = _json(  # type: ignore[index]
            DATA_SOURCES.get(source, {"ID": source, "Name": source, "URL": ""}))
        return self

    def metadata(self) -> dict[str, object]:
        next_update = self.next_update or self.updated_at + timedelta(hours=24)
        return {"Version": 2, "NextUpdate": _time(next_update), "UpdatedAt": _time(self.updated_at),
                "DownloadedAt": "0001-01-01T00:00:00Z"}

    def write(self, directory: Path) -> Path:
        """trivy.db + metadata.json in ``directory`` (the layout of ``<cache>/db/``)."""
        directory.mkdir(parents=True, exist_ok=True)
        write_bolt(directory / "trivy.db", self.buckets or {b"vulnerability": {}})
        (directory / "metadata.json").write_text(json.dumps(self.metadata()))
        return directory

    def tarball(self) -> bytes:
        """db.tar.gz as trivy-db publishes it: trivy.db and metadata.json at the archive root."""
        files = {
            "trivy.db": bolt_bytes(self.buckets or {b"vulnerability": {}}),
            "metadata.json": json.dumps(self.metadata()).encode(),
        }
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name, data in files.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    info.mode = 0o644
                    tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()


def push_artifact(client: RegistryClient, host: str, store: Store, tarball: bytes,
                  layer_type: str = DB_LAYER_TYPE) -> str:
    """Push db.tar.gz as ``HOST/aquasec/trivy-db:2`` the way `oras push --artifact-type ...` lays
    it out (one titled layer, empty config); returns ``HOST/aquasec/trivy-db@sha256:...``."""
    ref = parse_ref(f"{host}/aquasec/trivy-db:2")
    layer = store.put_bytes(tarball)
    config = store.put_bytes(b"{}")
    for digest in (layer, config):
        client.push_blob(ref, digest, store.size(digest), lambda d=digest: store.open(d))
    manifest = m.canonical_json({
        "schemaVersion": 2, "mediaType": m.OCI_MANIFEST, "artifactType": DB_ARTIFACT_TYPE,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config, "size": 2},
        "layers": [{"mediaType": layer_type, "digest": layer, "size": len(tarball),
                    "annotations": {m.ANNOTATION_TITLE: "db.tar.gz"}}],
    })
    digest = client.push_manifest(ref, "2", manifest, m.OCI_MANIFEST)
    if digest != dg.of_bytes(manifest):
        raise RuntimeError(f"registry returned {digest} for a manifest of {dg.of_bytes(manifest)}")
    return f"{ref.name}@{digest}"
