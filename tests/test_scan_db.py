"""The offline database: our bbolt writer, the directory source, the OCI source through the
project's registry client (a real loopback registry), and the checks before any scan."""

from __future__ import annotations

import datetime as dt
import json
import struct

import pytest

from builder import digest as dg
from builder.lockfile import Mirrors
from builder.scan import DatabaseError, scan, terminal_table
from builder.scan.db import (
    DB_LAYER_TYPE,
    check_bolt,
    open_directory,
    pull_database,
)
from builder.sources.registry import RegistryClient
from rig.trivydb import PAGE_SIZE, TrivyDB, fnv1a64, push_artifact
from tests.plugins.scan import VULN_ID, VULN_SOURCE


def _db_dir(tmp_path, **kw):
    db = TrivyDB(**kw).add("debian 12", VULN_SOURCE, VULN_ID, fixed="1.0-2")
    return db.write(tmp_path / "db")


def test_writer_meta_pages_carry_the_bbolt_checksum(tmp_path):
    raw = (_db_dir(tmp_path) / "trivy.db").read_bytes()
    assert len(raw) % PAGE_SIZE == 0
    for page in (0, 1):
        body = raw[page * PAGE_SIZE + 16: page * PAGE_SIZE + 72]
        magic, version, page_size = struct.unpack_from("<III", body)
        (checksum,) = struct.unpack_from("<Q", raw, page * PAGE_SIZE + 72)
        assert (magic, version, page_size) == (0xED0CDAED, 2, PAGE_SIZE)
        assert checksum == fnv1a64(body)
    check_bolt(tmp_path / "db" / "trivy.db")


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
