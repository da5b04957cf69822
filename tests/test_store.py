"""The content store: verified on write, atomic, resumable, safe with two writers."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from builder import digest as dg
from builder.errors import DigestMismatch
from builder.store import Store, default_root


def test_put_and_read_back(store):
    d = store.put_bytes(b"hello")
    assert d == dg.of_bytes(b"hello")
    assert store.read_bytes(d) == b"hello"
    assert store.blob_path(d) == store.root / "blobs" / "sha256" / dg.hex_of(d)
    assert not os.access(store.blob_path(d), os.W_OK) or os.geteuid() == 0
    assert oct(store.blob_path(d).stat().st_mode & 0o777) == "0o444"


def test_wrong_expected_digest_leaves_nothing(store):
    with pytest.raises(DigestMismatch) as err:
        store.put_bytes(b"hello", expected=dg.of_bytes(b"other"), what="thing")
    assert "expected sha256:" in str(err.value) and "got sha256:" in str(err.value)
    assert list((store.root / "blobs" / "sha256").iterdir()) == []
    assert list((store.root / "tmp").iterdir()) == []


def test_ingest_resumes_and_verifies(store):
    data = os.urandom(300_000)
    d = dg.of_bytes(data)
    with pytest.raises(RuntimeError), store.ingest(d, "x") as ing:
        ing.write(data[:100_000])
        raise RuntimeError("connection lost")
    assert not store.has(d)
    with store.ingest(d, "x") as ing:
        assert ing.offset == 100_000  # the partial survived
        ing.write(data[100_000:])
        ing.commit()
    assert store.read_bytes(d) == data
    assert list((store.root / "ingest").iterdir()) == []


def test_ingest_mismatch_discards_partial(store):
    d = dg.of_bytes(b"right")
    with pytest.raises(DigestMismatch), store.ingest(d, "x") as ing:
        ing.write(b"wrong")
        ing.commit()
    assert not store.has(d)
    assert list((store.root / "ingest").iterdir()) == []


def _writer(root: str, data: bytes, q) -> None:
    s = Store(Path(root))
    d = dg.of_bytes(data)
    with s.ingest(d, "race") as ing:
        if ing.done:
            q.put("skipped")
            return
        for i in range(0, len(data), 4096):
            ing.write(data[i:i + 4096])
        ing.commit()
        q.put("wrote")


def test_two_processes_one_blob(tmp_path):
    data = os.urandom(2_000_000)
    q = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_writer, args=(str(tmp_path), data, q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    results = sorted(q.get() for _ in procs)
    assert results == ["skipped", "wrote"]
    assert Store(tmp_path).read_bytes(dg.of_bytes(data)) == data


def test_stale_tmp_of_dead_process_is_swept(tmp_path):
    s = Store(tmp_path)
    dead = tmp_path / "tmp" / "999999999-abcd"
    dead.write_bytes(b"half")
    Store(tmp_path)
    assert not dead.exists()
    assert s.root == tmp_path


def test_verify_removes_a_tampered_blob(store):
    d = store.put_bytes(b"payload")
    path = store.blob_path(d)
    path.chmod(0o644)
    path.write_bytes(b"tampered")
    with pytest.raises(DigestMismatch):
        store.verify(d)
    assert not store.has(d)


def test_default_root_honours_env():
    assert default_root({"BUILDER_STORE": "/x/y"}) == Path("/x/y")
    assert default_root({"XDG_CACHE_HOME": "/c"}) == Path("/c/airgap-builder")
