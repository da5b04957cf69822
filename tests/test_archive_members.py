"""Safe member extraction from .tar.gz and .deb archives, and the ELF arch check."""

from __future__ import annotations

import io
import tarfile

import pytest

from builder.errors import BuilderError, UnsafeArchive
from builder.fetch import components
from builder.fetch.unpack import extract_member
from builder.lock import lockfile
from tests.rig import payloads


def _targz(entries: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info in entries:
            content = (data or {}).get(info.name)
            if content is not None:
                info.size = len(content)
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return buf.getvalue()


def _file(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def test_member_is_taken(store):
    d = store.put_bytes(_targz([_file("bin/tool")], {"bin/tool": b"tool bytes"}))
    got = extract_member(store, d, "tar.gz", "bin/tool", "components.tool.amd64")
    assert store.read_bytes(got) == b"tool bytes"
    # "./bin/tool" names the same member. (That the cache spares reading the archive is
    # tests/adversarial/test_guards.py, which deletes the archive between the two calls.)
    assert extract_member(store, d, "tar.gz", "./bin/tool", "x") == got


@pytest.mark.parametrize("bad, why", [
    (_file("../escape"), "'..'"),
    (_file("/etc/passwd"), "absolute"),
    (_link("bin/evil", "/etc/shadow"), "absolute"),
    (_link("bin/evil", "../../outside"), "escapes"),
    (_link("bin/hard", "../x", tarfile.LNKTYPE), "escapes"),
])
def test_unsafe_archives_are_refused(store, bad, why):
    entries = [_file("bin/tool"), bad]
    data = {"bin/tool": b"ok"}
    if bad.isfile():
        data[bad.name] = b"bad"
    d = store.put_bytes(_targz(entries, data))
    with pytest.raises(UnsafeArchive) as err:
        extract_member(store, d, "tar.gz", "bin/tool", "components.tool.amd64")
    assert "components.tool.amd64" in str(err.value) and why in str(err.value)


def test_device_is_refused(store):
    dev = tarfile.TarInfo("dev/null")
    dev.type = tarfile.CHRTYPE
    d = store.put_bytes(_targz([_file("bin/tool"), dev], {"bin/tool": b"ok"}))
    with pytest.raises(UnsafeArchive, match="device"):
        extract_member(store, d, "tar.gz", "bin/tool", "x")


def test_missing_member_lists_what_is_there(store):
    d = store.put_bytes(_targz([_file("bin/tool")], {"bin/tool": b"ok"}))
    with pytest.raises(BuilderError, match="(?s)no member 'bin/other'.*bin/tool"):
        extract_member(store, d, "tar.gz", "bin/other", "x")


def test_deb_member_through_symlink(store):
    """runc's .deb holds ./usr/bin/runc -> ../sbin/runc; the link is followed inside the archive."""
    deb = payloads.deb("runc", "arm64")
    d = store.put_bytes(deb.path.read_bytes())
    got = extract_member(store, d, "deb", "./usr/bin/runc", "components.runc.arm64")
    assert store.read_bytes(got) == payloads.binary("runc", "arm64").read_bytes()


def test_amd64_binary_pinned_for_arm64_is_refused(store):
    data = payloads.binary("runc", "amd64").read_bytes()
    d = store.put_bytes(data)
    comp = lockfile.Component("runc", "x", "raw", None, "runc", 0o755, {
        "arm64": lockfile.FileArtifact(url="https://fixtures.invalid/runc.arm64", sha256=d.split(":")[1]),
    })
    with pytest.raises(BuilderError) as err:
        components.file_digest(store, comp, "arm64")
    assert "amd64 ELF" in str(err.value) and "pinned for arm64" in str(err.value)
    assert components.file_digest(store, comp, "arm64", check_arch=False) == d
