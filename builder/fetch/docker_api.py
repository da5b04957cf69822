"""Images from a local Docker-API daemon (an image a CI job just built): ``docker-daemon:NAME:TAG``.

The daemon's description (``Architecture``/``Os``) is checked against the arch first, then the
image is saved *with its name* (``image.save(named=TAG)``; the SDK's default drops RepoTags)
to a temp file in the store and read as a ``docker save`` tar. Both layouts are handled:

- legacy (older Docker, podman): ``manifest.json`` → ``<hex>.json`` config, ``<id>/layer.tar``
  or ``<hex>.tar`` layers;
- OCI layout in the tar (Docker 25+): ``manifest.json`` pointing into ``blobs/sha256/``, and
  ``index.json``/``oci-layout``; without a ``manifest.json`` the OCI index is followed.

Layers arrive uncompressed (sometimes gzip or zstd); each is checked against the config's
``diff_ids`` and stored gzip-compressed with the deterministic writer (mtime 0, no name, fixed
level), so the same image always gives the same blobs. The result is a normal, pushable Docker
schema 2 manifest in the store whose config is the daemon's config byte for byte (its digest is
the daemon's image ID, which is checked).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import secrets
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import zstandard

from builder import digest as dg
from builder.errors import BuilderError
from builder.oci import model as m
from builder.oci.compress import GZIP_MAGIC, ZSTD_MAGIC, ZSTD_MAX_WINDOW, HashingWriter, gzip_writer
from builder.oci.reference import parse as parse_ref
from builder.store import Store

SCHEME = "docker-daemon:"
CHUNK = 1 << 20
MAX_JSON = 16 << 20  # manifest.json / config / index.json are small; refuse absurd ones


@dataclass(frozen=True)
class ArchiveImage:
    """An image taken from a docker-save tar into the store."""

    manifest: m.Descriptor  # Docker schema 2 manifest, with platform
    config: str
    layers: tuple[str, ...]  # gzip blobs in the store
    diff_ids: tuple[str, ...]
    repo_tags: tuple[str, ...]
    platform: m.Platform


@dataclass(frozen=True)
class DaemonImage:
    ref: str  # the normalised reference the image is known by (e.g. docker.io/ci/app:dev)
    name: str  # the name the daemon was asked for / saved it as
    image: ArchiveImage


def strip_scheme(source: str) -> str:
    """``docker-daemon:NAME:TAG`` → ``NAME:TAG`` (a bare name is accepted too)."""
    name = source[len(SCHEME):] if source.startswith(SCHEME) else source
    if not name:
        raise BuilderError(f"{source!r}: no image name after {SCHEME}", "write docker-daemon:NAME:TAG")
    return name


def check_daemon_platform(attrs: dict[str, Any], arch: str, name: str) -> None:
    want = m.Platform.for_arch(arch)
    got = m.Platform(attrs.get("Os") or "", attrs.get("Architecture") or "", attrs.get("Variant") or None)
    if not got.matches(want):
        raise BuilderError(f"{name}: the daemon's image is {got}, not {want} ({arch})",
                           "build the image for this arch (e.g. docker buildx --platform) or take "
                           "it only for the arch it was built for")


# ---------------------------------------------------------------------------------------------
# The daemon
# ---------------------------------------------------------------------------------------------


@dataclass
class DaemonSource:
    """A Docker-API daemon; ``base_url`` like ``unix:///run/docker.sock`` (None: DOCKER_HOST)."""

    base_url: str | None = None
    timeout: float = 300.0

    def _client(self):
        import docker

        try:
            if self.base_url:
                return docker.DockerClient(base_url=self.base_url, timeout=int(self.timeout))
            return docker.from_env(timeout=int(self.timeout))
        except docker.errors.DockerException as exc:
            raise BuilderError(f"docker daemon {self.base_url or '(DOCKER_HOST)'}: cannot connect: "
                               f"{exc}", "start the daemon or set DOCKER_HOST") from None

    def take(self, source: str, arch: str, store: Store) -> DaemonImage:
        """Put ``docker-daemon:NAME:TAG`` into the store for ``arch``; platform checked twice."""
        import docker

        name = strip_scheme(source)
        client = self._client()
        try:
            try:
                image = client.images.get(name)
            except docker.errors.ImageNotFound:
                raise BuilderError(f"{source}: no such image in the daemon",
                                   "build or load it first (docker images lists what is there)") from None
            except docker.errors.APIError as exc:
                raise BuilderError(f"{source}: daemon error: {exc.explanation or exc}") from None
            check_daemon_platform(image.attrs, arch, name)
            tag = _saved_name(name, image.tags)
            with _temp_file(store) as tmp:
                with open(tmp, "wb") as out:
                    for chunk in image.save(chunk_size=CHUNK, named=tag):
                        out.write(chunk)
                taken = import_archive(store, tmp, tag)
        finally:
            client.close()
        if image.id != taken.config:
            raise BuilderError(f"{source}: the daemon saved config {taken.config}, but its image ID "
                               f"is {image.id}", "the image changed while it was saved; try again")
        if not taken.platform.matches(m.Platform.for_arch(arch)):
            raise BuilderError(f"{source}: the saved config says {taken.platform}, not {arch}")
        return DaemonImage(str(parse_ref(tag)), tag, taken)


def _short_name(name: str) -> str:
    # docker.io/library/app, library/app, app and podman's localhost/app are one local name.
    for prefix in ("localhost/", "docker.io/", "library/"):
        name = name.removeprefix(prefix)
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _saved_name(name: str, tags: list[str]) -> str:
    """The daemon's own spelling of ``name`` among the image's tags (podman adds ``localhost/``)."""
    if name in tags:
        return name
    for tag in tags:
        if _short_name(tag) == _short_name(name):
            return tag
    raise BuilderError(f"{name}: the daemon found an image but not under this name (tags: "
                       f"{', '.join(tags) or 'none'})", "refer to the image by one of its tags")


@contextlib.contextmanager
def _temp_file(store: Store) -> Iterator[Path]:
    # Named <pid>-<rand> so the store sweeps it if this process dies.
    path = store.root / "tmp" / f"{os.getpid()}-{secrets.token_hex(8)}"
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# docker save tar → store
# ---------------------------------------------------------------------------------------------


def _member(tar: tarfile.TarFile, names: dict[str, tarfile.TarInfo], name: str, where: str) -> IO[bytes]:
    info = names.get(name.removeprefix("./"))
    if info is None or not info.isfile():
        raise BuilderError(f"{where}: {name} is missing from the archive (or not a file)")
    fh = tar.extractfile(info)
    assert fh is not None
    return fh


def _json_member(tar, names, name: str, where: str) -> tuple[Any, bytes]:
    info = names.get(name.removeprefix("./"))
    if info is not None and info.size > MAX_JSON:
        raise BuilderError(f"{where}: {name} is {info.size} bytes; refusing it")
    raw = _member(tar, names, name, where).read()
    try:
        return json.loads(raw), raw
    except ValueError as exc:
        raise BuilderError(f"{where}: {name} is not valid JSON: {exc}") from None


def _blob_path(digest: str) -> str:
    return f"blobs/sha256/{dg.hex_of(digest)}"


def _entry_from_manifest_json(tar, names, where: str, name: str | None) -> tuple[str, list[str], list[str]]:
    entries, _ = _json_member(tar, names, "manifest.json", where)
    if not isinstance(entries, list) or not entries:
        raise BuilderError(f"{where}: manifest.json lists no image")
    if name is not None:
        chosen = [e for e in entries if name in (e.get("RepoTags") or [])]
        if not chosen and len(entries) > 1:
            raise BuilderError(f"{where}: no image tagged {name} in manifest.json")
        entry = chosen[0] if chosen else entries[0]
    elif len(entries) == 1:
        entry = entries[0]
    else:
        raise BuilderError(f"{where}: holds {len(entries)} images; name the one to take")
    try:
        return entry["Config"], list(entry["Layers"]), list(entry.get("RepoTags") or [])
    except (KeyError, TypeError):
        raise BuilderError(f"{where}: manifest.json entry without Config/Layers") from None


def _entry_from_oci_index(tar, names, where: str, name: str | None) -> tuple[str, list[str], list[str]]:
    index, _ = _json_member(tar, names, "index.json", where)
    descs = [m.Descriptor.from_json(d, where) for d in index.get("manifests") or []]
    if name is not None:
        named = [d for d in descs if d.annotations.get(m.ANNOTATION_CONTAINERD_NAME) == name]
        descs = named or descs
    if len(descs) != 1:
        raise BuilderError(f"{where}: index.json lists {len(descs)} images; expected one")
    _, raw = _json_member(tar, names, _blob_path(descs[0].digest), where)
    if dg.of_bytes(raw) != descs[0].digest:
        raise BuilderError(f"{where}: OCI manifest does not match its digest {descs[0].digest}")
    doc = m.parse_document(raw, where, descs[0].media_type)
    if not isinstance(doc, m.Manifest):
        raise BuilderError(f"{where}: index.json points at an index; expected one image")
    tag = descs[0].annotations.get(m.ANNOTATION_CONTAINERD_NAME)
    return (_blob_path(doc.config.digest), [_blob_path(layer.digest) for layer in doc.layers],
            [tag] if tag else [])


@contextlib.contextmanager
def _plain(fh: IO[bytes], where: str) -> Iterator[IO[bytes]]:
    """The member's tar bytes: sniffed, not trusted by name; gzip and zstd decoded on the fly."""
    peek = fh.read(4)
    fh.seek(0)
    if peek.startswith(GZIP_MAGIC):
        with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
            yield gz  # type: ignore[misc]
    elif peek.startswith(ZSTD_MAGIC):
        dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        # Every frame: a multi-frame zstd stream (our framed archives, zstd -T) is one stream.
        with dctx.stream_reader(fh, read_size=CHUNK, closefd=False, read_across_frames=True) as reader:
            yield reader
    else:
        yield fh


def _store_layer(store: Store, fh: IO[bytes], diff_id: str, where: str) -> tuple[str, int]:
    """Gzip the layer deterministically into the store; checks the uncompressed digest."""
    with _temp_file(store) as tmp:
        with open(tmp, "wb") as raw:
            blob = HashingWriter(raw)
            with gzip_writer(blob) as gz:
                plain = HashingWriter(gz)
                try:
                    with _plain(fh, where) as src:
                        while chunk := src.read(CHUNK):
                            plain.write(chunk)
                except (OSError, EOFError, zstandard.ZstdError) as exc:
                    raise BuilderError(f"{where}: layer is corrupt: {exc}") from None
        if plain.digest != diff_id:
            raise BuilderError(f"{where}: layer content is {plain.digest}, but the config's "
                               f"diff_id is {diff_id}", "the archive is corrupt; save it again")
        with open(tmp, "rb") as f:
            digest = store.put_stream(f, expected=blob.digest, what=f"{where} layer")
        return digest, blob.size


def import_archive(store: Store, path: Path, name: str | None = None) -> ArchiveImage:
    """Take one image (``name`` among its RepoTags, or the only one) from a docker-save tar."""
    where = f"{path.name}" + (f" ({name})" if name else "")
    try:
        tar = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as exc:
        raise BuilderError(f"{where}: not a docker-save tar: {exc}") from None
    with tar:
        names = {i.name.removeprefix("./"): i for i in tar.getmembers()}
        if "manifest.json" in names:
            config_name, layer_names, tags = _entry_from_manifest_json(tar, names, where, name)
        elif "index.json" in names:
            config_name, layer_names, tags = _entry_from_oci_index(tar, names, where, name)
        else:
            raise BuilderError(f"{where}: neither manifest.json nor index.json in the archive",
                               "pass a tar written by `docker save` / `podman save`")
        _, config_raw = _json_member(tar, names, config_name, where)
        config_digest = store.put_bytes(config_raw, what=f"{where} config")
        # The config's file name is its digest in both layouts; a different one is a corrupt tar.
        stem = Path(config_name).name.removesuffix(".json")
        if dg.is_hex64(stem) and dg.from_hex(stem) != config_digest:
            raise BuilderError(f"{where}: config {config_name} hashes to {config_digest}")
        config = m.parse_config(config_raw, f"{where} config")
        if len(config.diff_ids) != len(layer_names):
            raise BuilderError(f"{where}: {len(layer_names)} layers but {len(config.diff_ids)} diff_ids")
        layers = []
        for layer_name, diff_id in zip(layer_names, config.diff_ids, strict=True):
            layers.append(_store_layer(store, _member(tar, names, layer_name, where), diff_id,
                                       f"{where} {layer_name}"))
    manifest = m.canonical_json({
        "schemaVersion": 2,
        "mediaType": m.DOCKER_MANIFEST,
        "config": {"mediaType": m.DOCKER_CONFIG, "digest": config_digest, "size": len(config_raw)},
        "layers": [{"mediaType": m.DOCKER_LAYER_GZIP, "digest": d, "size": size} for d, size in layers],
    })
    digest = store.put_bytes(manifest, what=f"{where} manifest")
    return ArchiveImage(m.Descriptor(m.DOCKER_MANIFEST, digest, len(manifest), platform=config.platform),
                        config_digest, tuple(d for d, _ in layers), config.diff_ids, tuple(tags),
                        config.platform)
