"""The content store: verified on write, atomic, resumable, safe with two writers."""

from __future__ import annotations

import multiprocessing
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from builder import digest as dg
from builder.errors import DigestMismatch
from builder.store import FILE_MODE, Store, StoreCorrupt, atomic_file, default_root, write_atomic
from tests.adversarial.test_keys import umask, watching


def test_put_and_read_back(store):
    d = store.put_bytes(b"hello")
    assert d == dg.of_bytes(b"hello")
    assert store.read_bytes(d) == b"hello"
    assert store.blob_path(d) == store.root / "blobs" / "sha256" / dg.hex_of(d)
    # The mode bits themselves (os.access says "writable" to root whatever they are): no write
    # bit for anyone, so only someone who chmods a blob first can change it.
    mode = stat.S_IMODE(store.blob_path(d).stat().st_mode)
    assert mode & 0o222 == 0 and oct(mode) == "0o444"
    assert stat.S_ISREG(store.blob_path(d).lstat().st_mode)  # a file, not a link to one


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _opens_for_writing(root: Path) -> tuple[list[str], Callable[[str, tuple], None]]:
    """Record every open under ``root/blobs`` that could write (flags or a w/a/x/+ mode)."""
    blobs = str(root / "blobs")
    seen: list[str] = []

    def watch(event: str, args: tuple) -> None:
        if event != "open" or not isinstance(args[0], str | bytes | os.PathLike):
            return
        path, mode, flags = os.fsdecode(args[0]), args[1], args[2]
        writes = bool((flags or 0) & _WRITE_FLAGS) or any(c in (mode or "") for c in "wax+")
        if path.startswith(blobs) and writes:
            seen.append(f"{path} ({mode!r}, {flags})")

    return seen, watch


def test_the_store_never_opens_a_blob_for_writing(store):
    """Meaningful as root too: what the store itself does to blobs/, seen by an audit hook on
    every open; bytes reach blobs/ only by rename of a verified file, never by writing there."""
    seen, watch = _opens_for_writing(store.root)
    data = os.urandom(300_000)
    with watching(watch):
        d = store.put_bytes(b"hello")
        store.put_bytes(b"hello")  # already there
        with store.ingest(dg.of_bytes(data), "x") as ing:
            ing.write(data)
            ing.commit()
        store.read_bytes(d)
        with store.open_verified(d, "x") as reader:
            reader.finish()
        store.verify(d)
        assert store.check_all().checked == 2
    assert seen == []
    # Not vacuous: the hook does see a write under blobs/ when one happens.
    with watching(watch):
        store.blob_path(d).chmod(0o644)
        store.blob_path(d).write_bytes(b"hello")
    assert len(seen) == 1


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


def _dead_pid() -> int:
    proc = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_atomic_temps_of_a_killed_writer_are_swept_live_ones_kept(tmp_path):
    # What a kill -9 inside set_meta / index_put leaves: atomic_file's temp beside its target.
    s = Store(tmp_path)
    digest_hex = "ab" * 32
    dead = [tmp_path / "ingest" / f".{digest_hex}.json.{_dead_pid()}-0123abcd.tmp",
            tmp_path / "index" / "frames" / f".{digest_hex}.{_dead_pid()}-89abcdef.tmp"]
    live = tmp_path / "ingest" / f".{digest_hex}.json.{os.getpid()}-0123abcd.tmp"
    partial = tmp_path / "ingest" / digest_hex  # a resumable partial: never a temp
    dead[1].parent.mkdir()
    for path in (*dead, live, partial):
        path.write_bytes(b"{}")
    Store(tmp_path)
    assert [p.exists() for p in dead] == [False, False]
    assert live.exists() and partial.exists()
    assert s.root == tmp_path


def _tampered(store: Store) -> str:
    """A stored blob whose bytes were changed on disk afterwards (its digest)."""
    d = store.put_bytes(b"payload")
    path = store.blob_path(d)
    path.chmod(0o644)
    path.write_bytes(b"tampered")
    return d


def test_verify_removes_a_tampered_blob(store):
    d = _tampered(store)
    with pytest.raises(DigestMismatch) as err:
        store.verify(d)
    assert not store.has(d)
    assert "`python -m builder fetch`" in str(err.value)


def test_read_bytes_and_open_verified_refuse_a_tampered_blob(store):
    d = _tampered(store)
    with pytest.raises(StoreCorrupt) as err:
        store.read_bytes(d)
    assert str(err.value).startswith(f"store blob {d}: digest mismatch: expected {d}, "
                                     f"got {dg.of_bytes(b'tampered')}")
    assert f"`python -m builder --store {store.root} store verify`" in str(err.value)
    with store.open_verified(d, "components.x.amd64") as reader, pytest.raises(StoreCorrupt) as err:
        reader.read(3)  # a consumer that stops early: finish() still reads and checks the rest
        reader.finish()
    assert str(err.value).startswith(f"components.x.amd64: store blob {d}: digest mismatch")
    assert store.has(d)  # reading never deletes; `store verify` does


def test_default_root_honours_env():
    assert default_root({"BUILDER_STORE": "/x/y"}) == Path("/x/y")
    assert default_root({"XDG_CACHE_HOME": "/c"}) == Path("/c/airgap-builder")


# -- the one atomic file writer every stage uses ------------------------------------------------
@pytest.mark.parametrize("mask", [0o000, 0o077])
def test_write_atomic_replaces_whole_file_with_mode_0644_whatever_the_umask(tmp_path, mask):
    path = tmp_path / "sub" / "record.json"
    with umask(mask):
        write_atomic(path, b"old\n")
        write_atomic(path, b"new\n")
    assert path.read_bytes() == b"new\n"
    assert stat.S_IMODE(path.stat().st_mode) == FILE_MODE == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]  # no temp file left


def test_atomic_file_interrupted_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "artifact.tar"
    write_atomic(path, b"complete old bytes")
    with pytest.raises(KeyboardInterrupt), atomic_file(path) as fh:
        fh.write(b"half of the new")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"complete old bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["artifact.tar"]
