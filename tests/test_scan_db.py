"""The offline database: our bbolt writer, the directory source, the OCI source through the
project's registry client (a real loopback registry), and the checks before any scan."""

from __future__ import annotations

import datetime as dt
import json
import struct

import pytest

from builder import digest as dg
from builder.fetch.registry import RegistryClient
from builder.lock.lockfile import Mirrors
from builder.scan import DatabaseError, scan, terminal_table
from builder.scan.db import (
    DB_LAYER_TYPE,
    check_bolt,
    open_directory,
    pull_database,
)
from builder.scan.db import fnv1a64 as db_fnv1a64
from tests.plugins.scan import VULN_ID, VULN_SOURCE
from tests.rig.trivydb import PAGE_SIZE, TrivyDB, push_artifact
from tests.rig.trivydb import fnv1a64 as rig_fnv1a64


def _db_dir(tmp_path, **kw):
    db = TrivyDB(**kw).add("debian 12", VULN_SOURCE, VULN_ID, fixed="1.0-2")
    return db.write(tmp_path / "db")


# -- bbolt's format, from sources independent of the code under test ---------------------------
# FNV-1a 64 from its definition (http://www.isthe.com/chongo/tech/comp/fnv/): the prime is
# 2**40 + 2**8 + 0xb3, the offset basis is the FNV-0 hash of the string below, and the published
# test vectors pin the result. bbolt's meta page (go.etcd.io/bbolt, db.go / page.go): a 16-byte
# page header (id u64, flags u16 = 0x04 for meta, count u16, overflow u32), then magic u32
# 0xED0CDAED, version u32 2, page size u32, flags u32, root bucket (pgid u64, sequence u64),
# freelist pgid u64, high-water pgid u64, txid u64, and the FNV-1a 64 of those 56 bytes.
FNV_PRIME = 2**40 + 2**8 + 0xB3
FNV_VECTORS = {b"": 0xCBF29CE484222325, b"a": 0xAF63DC4C8601EC8C, b"foobar": 0x85944171F73967E8}
BOLT_MAGIC, BOLT_VERSION, META_FLAG = 0xED0CDAED, 2, 0x04


def _fnv0_64(data: bytes, basis: int = 0) -> int:
    h = basis
    for byte in data:
        h = (h * FNV_PRIME) % 2**64 ^ byte
    return h


def _fnv1a_64(data: bytes) -> int:
    h = _fnv0_64(b"chongo <Landon Curt Noll> /\\../\\")  # the offset basis, by definition
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) % 2**64
    return h


def _meta(raw: bytes, page_size: int, n: int) -> dict[str, int]:
    """Meta page ``n`` read at bbolt's offsets, with its checksum recomputed here."""
    at = n * page_size
    (_, flags), body = struct.unpack_from("<QH", raw, at), raw[at + 16: at + 72]
    magic, version, size = struct.unpack_from("<III", body)
    (checksum,) = struct.unpack_from("<Q", raw, at + 72)
    return {"page_flags": flags, "magic": magic, "version": version, "page_size": size,
            "checksum_ok": checksum == _fnv1a_64(body)}


def test_fnv1a64_matches_its_definition_and_published_vectors():
    assert {data: _fnv1a_64(data) for data in FNV_VECTORS} == FNV_VECTORS
    samples = [*FNV_VECTORS, bytes(range(256)), b"\xff" * 56]
    for implementation in (rig_fnv1a64, db_fnv1a64):  # the test DB writer's and builder's own
        assert [implementation(d) for d in samples] == [_fnv1a_64(d) for d in samples]


def test_check_bolt_accepts_a_file_the_real_bbolt_wrote(containerd):
    """containerd keeps its metadata in bbolt (go.etcd.io/bbolt, the library Trivy reads its DB
    with): the format read here is the real one, not our writer's idea of it."""
    meta_db = containerd.root / "root" / "io.containerd.metadata.v1.bolt" / "meta.db"
    raw = meta_db.read_bytes()
    page_size = struct.unpack_from("<I", raw, 24)[0]
    want = {"page_flags": META_FLAG, "magic": BOLT_MAGIC, "version": BOLT_VERSION,
            "page_size": page_size, "checksum_ok": True}
    assert [_meta(raw, page_size, n) for n in (0, 1)] == [want, want]
    check_bolt(meta_db)


def test_writer_meta_pages_carry_the_bbolt_checksum(tmp_path):
    raw = (_db_dir(tmp_path) / "trivy.db").read_bytes()
    assert len(raw) % 4096 == 0
    want = {"page_flags": META_FLAG, "magic": BOLT_MAGIC, "version": BOLT_VERSION,
            "page_size": 4096, "checksum_ok": True}
    assert [_meta(raw, 4096, n) for n in (0, 1)] == [want, want]
    check_bolt(tmp_path / "db" / "trivy.db")


def test_real_trivy_checks_the_meta_checksum_so_its_reading_our_db_proves_the_format(
        make_image, trivy, tmp_path):
    """Trivy opens trivy.db with bbolt, which refuses a file whose meta checksums are both wrong;
    the same file with the writer's checksums is read and the planted advisory found. (Every
    scan test that finds VULN_ID therefore also vouches for the writer's checksum.)"""
    from builder.scan import TrivyError
    from builder.scan import trivy as tv

    image = make_image()

    def trivy_scan(db: bytes, name: str) -> list[str]:
        cache = tmp_path / name
        source = _db_dir(cache)
        (source / "trivy.db").write_bytes(db)
        report = cache / "report.json"
        tv.run(trivy, ["image", *trivy.offline_args(cache), *trivy.hermetic_args(), "--scanners",
                       "vuln", "--format", "json", "--output", str(report), "--input",
                       str(image.path)], cache / "trivy.log", f"scan with the {name} DB")
        results = json.loads(report.read_text()).get("Results") or []
        return [v["VulnerabilityID"] for r in results for v in r.get("Vulnerabilities") or []]

    good = (_db_dir(tmp_path / "src") / "trivy.db").read_bytes()
    assert trivy_scan(good, "good") == [VULN_ID]
    bad = bytearray(good)
    for page in (0, 1):
        at = page * 4096 + 72
        bad[at:at + 8] = struct.pack("<Q", _fnv1a_64(bytes(bad[at - 56:at])) ^ 1)
    with pytest.raises(TrivyError):
        trivy_scan(bytes(bad), "bad")
    assert "checksum" in (tmp_path / "bad" / "trivy.log").read_text()


def test_big_buckets_span_pages_and_trivy_still_reads_them(make_image, write_policy, trivy,
                                                           tmp_path):
    """Hundreds of advisories: the vulnerability bucket is a non-inline leaf with overflow
    pages, the package buckets inline; Trivy must find the one that matches."""
    db = TrivyDB()
    for i in range(400):
        db.add("debian 12", f"pkg{i:03d}", f"CVE-2098-{i:04d}", fixed="9.9-1", severity="LOW")
    db.add("debian 12", VULN_SOURCE, VULN_ID, fixed="1.0-2")
    directory = db.write(tmp_path / "big")
    assert (directory / "trivy.db").stat().st_size > 10 * PAGE_SIZE
    verdict = scan([make_image()], write_policy(), open_directory(directory),
                   tmp_path / "out", trivy)
    assert [d.finding.id for d in verdict.failing] == [VULN_ID], terminal_table(verdict)


def test_a_trivy_cache_directory_works_too(tmp_path):
    TrivyDB().write(tmp_path / "cache" / "db")
    assert open_directory(tmp_path / "cache").dir == tmp_path / "cache" / "db"


@pytest.mark.parametrize("damage, message", [
    ("no-dir", "does not exist"),
    ("no-db", "trivy.db: missing"),
    ("random", "not a valid bbolt database"),
    ("truncated", "not a valid bbolt database"),
    ("flipped", "not a valid bbolt database"),
    ("no-metadata", "metadata.json: missing"),
    ("bad-json", "metadata.json: not valid JSON"),
    ("version-1", "Version is 1, expected 2"),
    ("no-updated", "UpdatedAt is missing"),
])
def test_missing_or_corrupt_database_is_refused(tmp_path, damage, message):
    directory = _db_dir(tmp_path)
    db_file, meta = directory / "trivy.db", directory / "metadata.json"
    if damage == "no-dir":
        directory = tmp_path / "nowhere"
    elif damage == "no-db":
        db_file.unlink()
    elif damage == "random":
        db_file.write_bytes(b"\x17" * 3 * PAGE_SIZE)
    elif damage == "truncated":
        db_file.write_bytes(db_file.read_bytes()[: 3 * PAGE_SIZE])
    elif damage == "flipped":  # one bit in each meta page: both checksums fail
        raw = bytearray(db_file.read_bytes())
        raw[40] ^= 1
        raw[PAGE_SIZE + 40] ^= 1
        db_file.write_bytes(bytes(raw))
    elif damage == "no-metadata":
        meta.unlink()
    elif damage == "bad-json":
        meta.write_text("{not json")
    elif damage == "version-1":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "Version": 1}))
    elif damage == "no-updated":
        data = json.loads(meta.read_text())
        del data["UpdatedAt"]
        meta.write_text(json.dumps(data))
    with pytest.raises(DatabaseError, match=message):
        open_directory(directory)


def test_old_database_is_a_warning(make_image, write_policy, trivy, tmp_path):
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    db = open_directory(_db_dir(tmp_path, updated_at=old))
    verdict = scan([make_image()], write_policy(), db, tmp_path / "out", trivy)
    [warning] = [w for w in verdict.warnings if "trivy DB" in w]
    assert "30.0 days ago, older than the allowed 7 days" in warning
    assert "NextUpdate" in warning
    assert warning in verdict.summary_path.read_text()


def test_old_database_is_an_error_under_strict_mode(make_image, write_policy, trivy, tmp_path):
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    db = open_directory(_db_dir(tmp_path, updated_at=old))
    out = tmp_path / "out"
    with pytest.raises(DatabaseError, match="older than the allowed 7 days"):
        scan([make_image()], write_policy(), db, out, trivy, strict=True)
    assert not (out / "logs").exists()  # refused before Trivy ran at all


# -- pulled from an OCI repository ------------------------------------------------------------

def _client(registry) -> RegistryClient:
    return RegistryClient(mirrors=Mirrors(insecure=(registry.host,)))


def _push_db_artifact(client, registry, store, tarball: bytes, layer_type: str = DB_LAYER_TYPE) -> str:
    return push_artifact(client, registry.host, store, tarball, layer_type)


def test_database_pulled_by_digest_from_a_registry(registry, store, make_image, write_policy,
                                                   trivy, tmp_path):
    client = _client(registry)
    tarball = TrivyDB().add("debian 12", VULN_SOURCE, VULN_ID, fixed="1.0-2").tarball()
    reference = _push_db_artifact(client, registry, store, tarball)

    db = pull_database(client, reference, store, tmp_path / "dbs")
    assert db.digest == reference.split("@", 1)[1]
    assert store.has(dg.of_bytes(tarball))  # the layer went through the content store
    verdict = scan([make_image()], write_policy(), db, tmp_path / "out", trivy)
    assert [d.finding.id for d in verdict.failing] == [VULN_ID]
    status = json.loads(verdict.status_path.read_text())
    assert status["database"]["digest"] == db.digest

    # Pinned and already unpacked: no network needed any more.
    registry.stop()
    again = pull_database(_client(registry), reference, store, tmp_path / "dbs")
    assert again.dir == db.dir


def test_pull_refuses_what_is_not_a_trivy_db(registry, store, tmp_path):
    client = _client(registry)
    reference = _push_db_artifact(client, registry, store, b"not a db",
                                  layer_type="application/vnd.oci.image.layer.v1.tar+gzip")
    with pytest.raises(DatabaseError, match="not a trivy-db artifact: expected one layer of "
                                            "application/vnd.aquasec.trivy.db.layer.v1.tar\\+gzip"):
        pull_database(client, reference, store, tmp_path / "dbs")


def test_pull_refuses_a_corrupt_tarball(registry, store, tmp_path):
    client = _client(registry)
    reference = _push_db_artifact(client, registry, store, b"\x1f\x8b garbage")
    with pytest.raises(DatabaseError, match="db.tar.gz is not a readable tar.gz"):
        pull_database(client, reference, store, tmp_path / "dbs")
    assert not list((tmp_path / "dbs").iterdir())  # nothing half-unpacked left behind


def test_pull_needs_a_digest(store, tmp_path):
    with pytest.raises(DatabaseError, match="not pinned by digest"):
        pull_database(RegistryClient(), "127.0.0.1:5000/aquasec/trivy-db:2", store, tmp_path)


def test_pull_refuses_a_database_blob_changed_in_the_store(registry, store, tmp_path):
    """The store already holds the layer, so nothing is downloaded: the blob on disk is what gets
    unpacked, and bytes that no longer hash to its name are refused (here: bytes appended after the
    gzip stream, which a streaming tar reader would otherwise never look at)."""
    from builder.store import StoreCorrupt

    client = _client(registry)
    tarball = TrivyDB().add("debian 12", VULN_SOURCE, VULN_ID, fixed="1.0-2").tarball()
    reference = _push_db_artifact(client, registry, store, tarball)
    blob = store.blob_path(dg.of_bytes(tarball))
    blob.chmod(0o644)
    blob.write_bytes(tarball + b"tampered")
    with pytest.raises(StoreCorrupt, match="db.tar.gz: store blob sha256:.*digest mismatch") as err:
        pull_database(client, reference, store, tmp_path / "dbs")
    assert "store verify" in (err.value.hint or "")
    assert not list((tmp_path / "dbs").iterdir())  # nothing unpacked is kept
