"""TEST-ONLY builder of a small artifact set that follows the artifact contract.

It exists to test install.sh's checks and staging, nothing else: a bundle made from the templates with a
release.env, image archives (an uncompressed tar holding an OCI layout plus docker manifest.json
and repositories, then compressed with the real ``zstd`` command and with gzip), their .txt lists,
``sha256sum-ARCH.txt`` written by builder.trust.checksums and, when a key is given, the signature written
by builder.trust.sign. The "runtime image" has real gzip layers holding bin/ and charts/ files; the
payload is deterministic pseudo-random bytes so its size can be chosen (disk-full tests).

The real builder replaces this module in the end-to-end test the lead adds once the build stage
lands; keep it simple rather than complete.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from builder.trust import checksums, sign

REPO = Path(__file__).resolve().parent.parent
BUNDLE_TEMPLATES = REPO / "builder" / "assemble" / "templates"
EPOCH = 1_700_000_000


@dataclass(frozen=True)
class Image:
    ref: str
    config: bytes
    manifest: bytes
    layers: tuple[bytes, ...]

    @property
    def manifest_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()

    @property
    def layer_digests(self) -> tuple[str, ...]:
        return tuple("sha256:" + hashlib.sha256(b).hexdigest() for b in self.layers)


@dataclass(frozen=True)
class Release:
    directory: Path
    name: str
    version: str
    arch: str
    groups: tuple[str, ...]
    runtime_ref: str
    data_key: str
    payload: bytes = field(repr=False)
    files: tuple[str, ...] = field(default=())
    # The key that verifies sha256sum-ARCH.txt.sig (set by fixtures that sign); tests/plugins/
    # install.Target passes it to install.sh while the .sig is there.
    public_key: Path | None = None

    @property
    def bundle(self) -> str:
        return f"{self.name}.linux-{self.arch}.tar.gz"

    @property
    def default_images(self) -> str:
        return f"{self.name}-images.linux-{self.arch}"

    def group(self, group: str) -> str:
        return f"{self.name}-images-{group}.linux-{self.arch}"

    @property
    def sums(self) -> Path:
        return self.directory / checksums.checksum_name(self.arch)

    def path(self, name: str) -> Path:
        return self.directory / name


def _tarinfo(name: str, size: int = 0, mode: int = 0o644, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.type, info.mtime = size, mode, kind, EPOCH
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


Entry = tuple[str, bytes | None, int] | tuple[tarfile.TarInfo, bytes | None]


def _tar(entries: list[Entry]) -> bytes:
    """An uncompressed tar of (name, data or None for a directory, mode), in the order given;
    a (header, data) pair (see ``member``) is written as it is."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for entry in entries:
            if isinstance(entry[0], tarfile.TarInfo):
                info, raw = entry[0], entry[1]
                tar.addfile(info, io.BytesIO(raw) if isinstance(raw, bytes) else None)
                continue
            name, data, mode = entry
            if data is None:
                tar.addfile(_tarinfo(name, mode=mode, kind=tarfile.DIRTYPE))
            else:
                tar.addfile(_tarinfo(name, len(data), mode), io.BytesIO(data))
    return buf.getvalue()


def _gzip(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as gz:
        gz.write(data)
    return buf.getvalue()


def _image(ref: str, arch: str, files: list[list[Entry]]) -> Image:
    layers = tuple(_gzip(_tar(entries)) for entries in files)
    diff_ids = ["sha256:" + hashlib.sha256(gzip.decompress(b)).hexdigest() for b in layers]
    config = json.dumps({
        "architecture": arch, "os": "linux",
        "config": {}, "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + hashlib.sha256(config).hexdigest(), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": "sha256:" + hashlib.sha256(b).hexdigest(), "size": len(b)}
                   for b in layers],
    }, sort_keys=True).encode()
    return Image(ref, config, manifest, layers)


def _archive(images: list[Image]) -> bytes:
    """One tar with docker manifest.json/repositories first, then the OCI layout."""
    blobs: dict[str, bytes] = {}
    docker_manifest, repositories, index = [], {}, []
    for img in images:
        cfg = hashlib.sha256(img.config).hexdigest()
        blobs[cfg] = img.config
        blobs[hashlib.sha256(img.manifest).hexdigest()] = img.manifest
        layer_hex = [d.split(":", 1)[1] for d in img.layer_digests]
        blobs.update(zip(layer_hex, img.layers, strict=True))
        docker_manifest.append({"Config": f"blobs/sha256/{cfg}", "RepoTags": [img.ref],
                                "Layers": [f"blobs/sha256/{h}" for h in layer_hex]})
        repo, tag = img.ref.rsplit(":", 1)
        repositories.setdefault(repo, {})[tag] = layer_hex[-1]
        index.append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "digest": img.manifest_digest, "size": len(img.manifest),
                      "annotations": {"io.containerd.image.name": img.ref,
                                      "org.opencontainers.image.ref.name": tag}})
    entries: list[tuple[str, bytes | None, int]] = [
        ("manifest.json", json.dumps(docker_manifest).encode(), 0o644),
        ("repositories", json.dumps(repositories).encode(), 0o644),
        ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}', 0o644),
        ("index.json", json.dumps({"schemaVersion": 2, "manifests": index}).encode(), 0o644),
        ("blobs/", None, 0o755),
        ("blobs/sha256/", None, 0o755),
    ]
    entries += [(f"blobs/sha256/{h}", blobs[h], 0o644) for h in sorted(blobs)]
    return _tar(entries)


def _write_archive(out: Path, base: str, images: list[Image]) -> list[str]:
    tar_bytes = _archive(images)
    tar_path = out / f"{base}.tar"
    tar_path.write_bytes(tar_bytes)
    subprocess.run(["zstd", "-q", "-f", "-3", "--long=25", str(tar_path), "-o",
                    str(out / f"{base}.tar.zst")], check=True)
    tar_path.unlink()
    (out / f"{base}.tar.gz").write_bytes(_gzip(tar_bytes))
    (out / f"{base}.txt").write_text("".join(f"{img.ref}\n" for img in images))
    return [f"{base}.tar.zst", f"{base}.tar.gz", f"{base}.txt"]


def supervisor_data_key(runtime_ref: str) -> str:
    """The supervisor's runtime directory name, restated from upstream (releaseRefDigest in
    rancher/rke2 pkg/bootstrap): the tag, '-', 12 hex of sha256 of the reference without its
    registry host. Kept independent of install.sh and builder so a test can hold them to it."""
    first, _, rest = runtime_ref.partition("/")
    path = rest if rest and ("." in first or ":" in first or first == "localhost") else runtime_ref
    tag = runtime_ref.rsplit(":", 1)[1]
    return f"{tag}-{hashlib.sha256(path.encode()).hexdigest()[:12]}"


def _bundle(name: str, version: str, release_env: str) -> bytes:
    upper = name.upper().replace("-", "_").replace(".", "_")
    files: dict[str, tuple[bytes, int]] = {}
    for src in sorted(BUNDLE_TEMPLATES.rglob("*")):
        if not src.is_file() or src.name == "README.md":
            continue
        rel = src.relative_to(BUNDLE_TEMPLATES).as_posix().replace("NAME", name)
        text = src.read_text().replace("@NAME_UPPER@", upper).replace("@NAME@", name)
        files[rel] = (text.encode(), 0o755 if rel.startswith("bin/") else 0o644)
    files[f"bin/{name}"] = (f"#!/bin/sh\necho {name} {version} \"$@\"\n".encode(), 0o755)
    files[f"share/{name}/release.env"] = (release_env.encode(), 0o644)
    dirs = ["bin/", "lib/", "lib/systemd/", "lib/systemd/system/", "share/", f"share/{name}/"]
    entries: list[tuple[str, bytes | None, int]] = [(d, None, 0o755) for d in dirs]
    entries += [(rel, data, mode) for rel, (data, mode) in sorted(files.items())]
    return _gzip(_tar(entries))


def build(
    out: Path,
    *,
    name: str = "rke2",
    version: str = "v1.32.13+rke2r1",
    arch: str = "amd64",
    groups: tuple[str, ...] = ("core", "canal", "cilium"),
    payload_size: int = 256 * 1024,
    key: sign.PrivateKey | None = None,
    release_arch: str | None = None,
    runtime_extra: tuple[tuple[tarfile.TarInfo, bytes | None], ...] = (),
    data_key: str | None = None,
    charts: bool = True,
) -> Release:
    """Write a release for one arch into ``out``. ``release_arch`` mislabels release.env;
    ``runtime_extra`` adds members (``member``) to the runtime image's last layer; ``data_key``
    writes another DATA_KEY than the supervisor's (a builder with another formula); ``charts=False``
    leaves /charts out of the runtime image."""
    out.mkdir(parents=True, exist_ok=True)
    tag = version.replace("+", "-")
    runtime_ref = f"docker.io/rancher/{name}-runtime:{tag}"
    payload = random.Random(f"{name}{version}{arch}").randbytes(payload_size)
    runtime = _image(runtime_ref, arch, [
        [("bin/", None, 0o755), ("bin/containerd", payload, 0o755),
         ("bin/runc", b"#!/bin/sh\necho runc\n", 0o755)],
        [("bin/", None, 0o755), ("bin/kubectl", f"#!/bin/sh\necho kubectl {tag}\n".encode(), 0o755),
         *([("charts/", None, 0o755), ("charts/coredns.yaml", f"# chart for {tag}\n".encode(), 0o644)]
           if charts else []), *runtime_extra],
    ])
    by_group: dict[str, list[Image]] = {"core": [runtime, _image(
        "docker.io/rancher/mirrored-pause:3.6", arch, [[("pause", b"pause\n", 0o755)]])]}
    for group in groups:
        if group != "core":
            by_group[group] = [_image(f"docker.io/rancher/fixture-{group}:v1", arch,
                                      [[(group, f"{group}\n".encode(), 0o644)]])]
    names: list[str] = []
    for group in groups:
        names += _write_archive(out, f"{name}-images-{group}.linux-{arch}", by_group[group])
    default = by_group["core"] + by_group.get("canal", [])
    names += _write_archive(out, f"{name}-images.linux-{arch}", default)
    all_refs = sorted({img.ref for imgs in by_group.values() for img in imgs})
    all_list = f"{name}-images-all.linux-{arch}.txt"
    (out / all_list).write_text("".join(f"{r}\n" for r in all_refs))
    names.append(all_list)

    data_key = data_key or supervisor_data_key(runtime_ref)
    release_env = "".join(f"{k}='{v}'\n" for k, v in [
        ("RELEASE_NAME", name), ("RELEASE_VERSION", version),
        ("RELEASE_ARCH", release_arch or arch), ("RUNTIME_IMAGE", runtime_ref),
        ("RUNTIME_MANIFEST", runtime.manifest_digest),
        ("RUNTIME_LAYERS", " ".join(runtime.layer_digests)),
        ("RUNTIME_ARCHIVE", f"{name}-images-core.linux-{arch}"), ("DATA_KEY", data_key),
        ("DEFAULT_IMAGES", f"{name}-images.linux-{arch}"), ("IMAGE_GROUPS", " ".join(groups)),
    ])
    bundle = f"{name}.linux-{arch}.tar.gz"
    (out / bundle).write_bytes(_bundle(name, version, release_env))
    names.append(bundle)
    checksums.write_for_arch(out, arch, [out / n for n in names])
    if key is not None:
        sign.sign_checksums(out, key)
    return Release(out, name, version, arch, tuple(groups), runtime_ref, data_key, payload,
                   tuple(sorted(names)))


def copy(release: Release, out: Path) -> Release:
    """A copy of the release in ``out`` (to tamper with)."""
    shutil.copytree(release.directory, out)
    return replace(release, directory=out)


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


def rewrite_tar(path: Path, edit: Callable[[list[tuple[tarfile.TarInfo, bytes | None]]], None]) -> None:
    """Rewrite the archive ``path`` (.tar.gz, .tar.zst or a gzip layer blob) in place through
    ``edit``, which changes the list of (member header, data) pairs as it likes."""
    raw = path.read_bytes()
    zst = path.name.endswith(".tar.zst")
    plain = (subprocess.run(["zstd", "-dcq"], input=raw, capture_output=True, check=True).stdout
             if zst else gzip.decompress(raw))
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    with tarfile.open(fileobj=io.BytesIO(plain), mode="r:") as tar:
        for info in tar:
            fh = tar.extractfile(info) if info.isfile() else None
            members.append((info, fh.read() if fh else None))
    edit(members)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    out = buf.getvalue()
    path.write_bytes(subprocess.run(["zstd", "-q", "-3"], input=out, capture_output=True,
                                    check=True).stdout if zst else _gzip(out))


def member(name: str, data: bytes | None = None, mode: int = 0o644,
           kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    """One (header, data) pair for rewrite_tar: a file by default, any tar type on request."""
    info = _tarinfo(name, len(data) if data is not None else 0, mode, kind)
    info.linkname = linkname
    return info, data
