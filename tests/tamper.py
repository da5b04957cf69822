"""Tampering with a real release (tests/plugins/releases.py): what a compromised builder, a bad
copy or a forger would leave on the media, for the tests that check install.sh and `verify`
refuse it.

Nothing here writes a release: every helper edits the artifacts the builder made. Each write
replaces the file (a new inode), so a scratch copy may hard-link the session's big archives
(tests/plugins/releases.scratch_copy) without a test ever changing the session's bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from builder import artifacts
from builder.trust import checksums, sign

if TYPE_CHECKING:
    from tests.plugins.releases import Release

EPOCH = 1_700_000_000
Members = list[tuple[tarfile.TarInfo, bytes | None]]


def replace_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` as a new file at ``path`` (never through a hard link into another copy)."""
    tmp = path.with_name(f".{path.name}.tamper")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def flip_byte(path: Path, offset: int = 100) -> None:
    """One bit pattern changed: a bad copy or a forger's edit (the checksum no longer matches)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    replace_bytes(path, bytes(data))


def truncate(path: Path) -> None:
    """The first half of the file: an interrupted copy."""
    replace_bytes(path, path.read_bytes()[: path.stat().st_size // 2])


def resum(release: Release) -> None:
    """Rewrite the checksum file after a deliberate change (a builder that produced bad bytes)."""
    checksums.write_for_arch(release.directory, release.arch,
                             [release.directory / n for n in release.files])


def unsign(release: Release) -> None:
    """Remove the signature: an unsigned release (install.sh installs it with a warning)."""
    for sig in release.directory.glob("sha256sum-*.txt.sig"):
        sig.unlink()


def resign(release: Release, key: sign.PrivateKey) -> None:
    """Checksum file and signature rewritten after a change: what a builder (or a holder of the
    key) would publish, so install.sh's later checks are what stops the change."""
    resum(release)
    sign.sign_checksums(release.directory, key)


def _gzip(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as gz:
        gz.write(data)
    return buf.getvalue()


def _read_members(plain: bytes) -> Members:
    members: Members = []
    with tarfile.open(fileobj=io.BytesIO(plain), mode="r:") as tar:
        for info in tar:
            fh = tar.extractfile(info) if info.isfile() else None
            members.append((info, fh.read() if fh else None))
    return members


def _write_members(members: Members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def edit_gzip_tar(raw: bytes, edit: Callable[[Members], None]) -> bytes:
    """A gzip tar (a bundle or an image layer blob) rewritten through ``edit``."""
    members = _read_members(gzip.decompress(raw))
    edit(members)
    return _gzip(_write_members(members))


def rewrite_tar(path: Path, edit: Callable[[Members], None]) -> None:
    """Rewrite the archive ``path`` (.tar.gz, .tar.zst or a gzip layer blob) in place through
    ``edit``, which changes the list of (member header, data) pairs as it likes."""
    raw = path.read_bytes()
    if not path.name.endswith(".tar.zst"):
        replace_bytes(path, edit_gzip_tar(raw, edit))
        return
    plain = subprocess.run(["zstd", "-dcq"], input=raw, capture_output=True, check=True).stdout
    members = _read_members(plain)
    edit(members)
    replace_bytes(path, subprocess.run(["zstd", "-q", "-3"], input=_write_members(members),
                                       capture_output=True, check=True).stdout)


def member(name: str, data: bytes | None = None, mode: int = 0o644,
           kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    """One (header, data) pair for rewrite_tar: a file by default, any tar type on request."""
    info = tarfile.TarInfo(name)
    info.size = len(data) if data is not None else 0
    info.mode, info.type, info.mtime, info.linkname = mode, kind, EPOCH, linkname
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, data


def edit_release_env(release: Release, edit: Callable[[str], str]) -> None:
    """The bundle's share/NAME/release.env rewritten through ``edit`` (text in, text out)."""
    wanted = artifacts.release_env_member(release.name)

    def change(members: Members) -> None:
        for i, (info, data) in enumerate(members):
            if info.name == wanted:
                assert data is not None
                new = edit(data.decode()).encode()
                info.size = len(new)
                members[i] = (info, new)
    rewrite_tar(release.path(release.bundle), change)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _blob(members: Members, digest: str) -> bytes:
    name = "blobs/sha256/" + digest.split(":", 1)[1]
    for info, data in members:
        if info.name == name and data is not None:
            return data
    raise AssertionError(f"{name} not in the archive")


def add_to_runtime_layer(release: Release, *extra: tuple[tarfile.TarInfo, bytes | None]) -> None:
    """The runtime image's last layer gains ``extra`` members, and everything that names it is
    rewritten to match (config diff_ids, manifest, index.json, manifest.json, repositories, the
    bundle's RUNTIME_MANIFEST/RUNTIME_LAYERS): a compromised build, consistent throughout, so only
    install.sh's member checks stand between the layer and the node. Resum or resign afterwards."""
    env = release.env
    old_manifest = env["RUNTIME_MANIFEST"]
    old_layer = env["RUNTIME_LAYERS"].split()[-1]
    renames: dict[str, tuple[str, bytes]] = {}  # old hex -> (new hex, new bytes)

    def plan(members: Members) -> None:
        manifest = json.loads(_blob(members, old_manifest))
        layer = edit_gzip_tar(_blob(members, old_layer), lambda m: m.extend(extra))
        config_old = manifest["config"]["digest"]
        config = json.loads(_blob(members, config_old))
        config["rootfs"]["diff_ids"][-1] = _digest(gzip.decompress(layer))
        config_raw = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        manifest["layers"][-1].update(digest=_digest(layer), size=len(layer))
        manifest["config"].update(digest=_digest(config_raw), size=len(config_raw))
        manifest_raw = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        for old, new in ((old_layer, layer), (config_old, config_raw), (old_manifest, manifest_raw)):
            renames[old.split(":", 1)[1]] = (hashlib.sha256(new).hexdigest(), new)

    def apply(members: Members) -> None:
        if not renames:
            plan(members)
        for i, (info, data) in enumerate(members):
            hexname = info.name.rsplit("/", 1)[-1]
            if info.name.startswith("blobs/sha256/") and hexname in renames:
                new_hex, new = renames[hexname]
                info.name, info.size = f"blobs/sha256/{new_hex}", len(new)
                members[i] = (info, new)
            elif info.name in ("index.json", "manifest.json", "repositories") and data is not None:
                text = data.decode()
                for old_hex, (new_hex, _) in renames.items():
                    text = text.replace(old_hex, new_hex)
                if info.name == "index.json":
                    new_manifest_hex, manifest_raw = renames[old_manifest.split(":", 1)[1]]
                    index = json.loads(text)
                    for entry in index["manifests"]:
                        if entry["digest"] == f"sha256:{new_manifest_hex}":
                            entry["size"] = len(manifest_raw)
                    text = json.dumps(index, sort_keys=True, separators=(",", ":"))
                info.size = len(text.encode())
                members[i] = (info, text.encode())

    for name in release.files:
        path = release.path(name)
        if not name.endswith((".tar.zst", ".tar.gz")) or name == release.bundle:
            continue
        listed = subprocess.run(["tar", "-tf", str(path)] if name.endswith(".gz") else
                                ["sh", "-c", 'zstd -dcq "$1" | tar -tf -', "sh", str(path)],
                                capture_output=True, text=True, check=True).stdout.split()
        if f"blobs/sha256/{old_manifest.split(':', 1)[1]}" in listed:
            rewrite_tar(path, apply)

    def env_edit(text: str) -> str:
        for old_hex, (new_hex, _) in renames.items():
            text = text.replace(old_hex, new_hex)
        return text
    edit_release_env(release, env_edit)
