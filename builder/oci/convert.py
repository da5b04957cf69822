"""Recompress a pulled image's layers as OCI ``tar+zstd`` (the ``zstd`` layer mode, issue 14).

``to_zstd(store, manifest_digest)`` reads a registry image manifest and its config from the
content store and writes a converted OCI image manifest beside it:

- the SAME config blob (bytes and digest unchanged), so the image's identity (its diff_ids) is
  the registry's; a Docker config descriptor is retyped ``application/vnd.oci.image.config.v1+json``;
- each gzip (or uncompressed ``tar``) layer decompressed, its uncompressed sha256 checked against
  the config's ``rootfs.diff_ids[i]``, and compressed as ``tar+zstd`` with ``ZstdLayerParams``
  (single-threaded streaming mode: the same bytes on every machine); a layer that is already zstd is
  kept as it is;
- each layer descriptor annotated with the registry blob it came from, the manifest with the
  registry manifest, so a person (and ``verify``) can trace one to the other.

Everything streams (gzip → sha256 → zstd → a hashing temp file adopted by the store), so memory
is bounded by the compressor, never by a layer's size. Memos under ``STORE/derived/zstd-<recipe>/``
make a rebuild convert nothing; a memo is only a shortcut, checked on use and redone when it does
not hold.
"""

from __future__ import annotations

import gzip
import os
import secrets
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from builder import digest as dg
from builder.errors import BuilderError, DigestMismatch
from builder.oci import model as m
from builder.oci.compress import CHUNK, HashingWriter
from builder.oci.image import load_image
from builder.store import BlobReader, Store, StoreCorrupt, write_atomic

# -- parameters, chosen from measurements on real bytes ------------------------------------------
# One 110 MiB tar of real ELF files (/usr/lib/x86_64-linux-gnu + /usr/bin of the build host;
# gzip -6: 34.44 MB), window 2**25, checksum on, zstandard 0.25 / libzstd 1.5.7, 2 threads, default
# job size, on the shared 2-core build machine. Bytes out, CPU seconds, peak RSS of the process:
#   level 16: 26.73 MB  36.7 s  181 MiB | long-distance matching: 26.86 MB  36.5 s  178 MiB
#   level 17: 26.22 MB  44.3 s  196 MiB |                          26.24 MB  57.1 s  249 MiB
#   level 18: 24.90 MB  66.0 s  195 MiB |                          24.91 MB  73.4 s  248 MiB
#   level 19: 24.65 MB  64.1 s  227 MiB |                          24.62 MB  77.3 s  328 MiB
# So level 19 (-7.8 % against 16, -28 % against the registry's gzip), without long-distance
# matching: within one layer a 32 MiB window already sees the matches, ldm saved 0.1 % at best and
# cost 20 % more CPU and 100 MiB more memory.
# Threads: zstd's multi-threaded mode cuts the input into jobs of 4 windows (128 MiB), buffered
# whole, and each worker holds its own level-19 match tables (~80 MiB): two workers peaked at
# 227 MiB (one job: no layer under 128 MiB is split at all) and smaller fixed jobs re-index a
# 32 MiB overlap each, doubling the CPU (8 MiB jobs: 124 s, 302 MiB with 2 threads, 215 MiB with 1).
# The single-threaded streaming mode holds one window and one set of tables: to_zstd converting
# that 110 MiB layer from the store peaked at 138 MiB RSS (22 MiB before), 65.6 s CPU, 24.64 MB.
# Its bytes depend on nothing but the parameters and the libzstd version (both in the recipe), so
# every machine writes the same layers; parallelism belongs to the caller (one layer per worker).
ZSTD_LAYER_LEVEL = 19
ZSTD_LAYER_WINDOW_LOG = 25  # 32 MiB: the most the rke2/k3s importer decodes
ZSTD_LAYER_LDM = False

REGISTRY_MANIFEST = "io.airgap-builder.registry.manifest"
REGISTRY_LAYER = "io.airgap-builder.registry.layer"

GZIP_LAYERS = (m.OCI_LAYER_GZIP, m.DOCKER_LAYER_GZIP)
TAR_LAYERS = (m.OCI_LAYER, "application/vnd.docker.image.rootfs.diff.tar")
ZSTD_LAYERS = (m.OCI_LAYER_ZSTD,)
CONFIG_TYPES = {m.DOCKER_CONFIG: m.OCI_CONFIG, m.OCI_CONFIG: m.OCI_CONFIG}

_BROKEN_IMAGE = ("the registry served a broken or tampered image (a layer that is not what its "
                 "manifest and config say); nothing converted was stored. Pull the image again "
                 "from a source you trust, or ship it in the registry layer mode")


@dataclass(frozen=True)
class ZstdLayerParams:
    """How layers are compressed: everything here decides the bytes (see ``recipe``)."""

    level: int = ZSTD_LAYER_LEVEL
    window_log: int = ZSTD_LAYER_WINDOW_LOG
    long_distance: bool = ZSTD_LAYER_LDM

    @property
    def recipe(self) -> str:
        """Everything that decides the bytes (the libzstd version too): names the memo directory,
        and belongs in any recipe of what is built from converted layers."""
        ldm = "-ldm" if self.long_distance else ""
        version = ".".join(str(part) for part in zstandard.ZSTD_VERSION)
        return f"l{self.level}-w{self.window_log}{ldm}-zstd{version}"

    def compressor(self) -> zstandard.ZstdCompressor:
        if not 10 <= self.window_log <= 25:
            raise BuilderError(f"zstd layers: window log {self.window_log} is outside 10..25",
                               "the rke2/k3s decoder accepts at most a 32 MiB (2**25) window")
        # threads=0: the single-threaded streaming mode (bounded memory, one output per input).
        params = zstandard.ZstdCompressionParameters.from_level(
            self.level, window_log=self.window_log, enable_ldm=self.long_distance, threads=0,
            write_checksum=True, write_content_size=False, write_dict_id=False)
        return zstandard.ZstdCompressor(compression_params=params)


@dataclass(frozen=True)
class ConvertedLayer:
    source: str  # the registry blob's digest
    descriptor: m.Descriptor  # the layer as the converted manifest names it
    diff_id: str
    converted: bool  # compressed by this call (False: kept as it was, or found in a memo)


@dataclass(frozen=True)
class ConvertedImage:
    registry_digest: str  # the registry manifest converted
    digest: str  # the converted OCI manifest, in the store
    size: int
    config_digest: str  # the same in both manifests
    layers: tuple[ConvertedLayer, ...]

    @property
    def converted(self) -> int:
        """How many layers this call compressed (0 when everything came from memos)."""
        return sum(layer.converted for layer in self.layers)

    @property
    def media_type(self) -> str:
        return m.OCI_MANIFEST


# -- the conversion ---------------------------------------------------------------------------------

def to_zstd(store: Store, manifest_digest: str,
            params: ZstdLayerParams = ZstdLayerParams()) -> ConvertedImage:
    """The ``tar+zstd`` form of the image ``manifest_digest`` (a single-platform manifest in the
    store), converted now or found through the memo."""
    memo = _memo_dir(store, params) / dg.hex_of(manifest_digest)
    remembered = _recall_image(store, memo, manifest_digest)
    if remembered is not None:
        return remembered
    manifest, config = load_image(store, manifest_digest)
    where = f"image {manifest_digest}"
    config_type = CONFIG_TYPES.get(manifest.config.media_type)
    if config_type is None:
        raise BuilderError(f"{where}: config {manifest.config.digest} has media type "
                           f"{manifest.config.media_type!r}, not a container image config",
                           "only container images can be converted; an attestation or artifact "
                           "manifest ships in the registry layer mode")
    layers = tuple(_layer(store, params, where, i, desc, config.diff_ids[i])
                   for i, desc in enumerate(manifest.layers))
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": m.OCI_MANIFEST,
        "config": m.Descriptor(config_type, manifest.config.digest, manifest.config.size).to_json(),
        "layers": [layer.descriptor.to_json() for layer in layers],
        "annotations": dict(sorted({**manifest.annotations,
                                    REGISTRY_MANIFEST: manifest_digest}.items())),
    }
    raw = m.canonical_json(doc)
    digest = store.put_bytes(raw, what=f"{where} converted to zstd layers")
    write_atomic(memo, (digest + "\n").encode())
    return ConvertedImage(manifest_digest, digest, len(raw), manifest.config.digest, layers)


def convert_layer(store: Store, manifest_digest: str, index: int,
                  params: ZstdLayerParams = ZstdLayerParams()) -> ConvertedLayer:
    """Layer ``index`` of the image ``manifest_digest``, converted now or found through its memo:
    what ``to_zstd`` does for each layer, for a caller that converts the distinct layers of many
    images in parallel (one layer per worker) and then calls ``to_zstd``, which finds them all."""
    manifest, config = load_image(store, manifest_digest)
    return _layer(store, params, f"image {manifest_digest}", index, manifest.layers[index],
                  config.diff_ids[index])


def _layer(store: Store, params: ZstdLayerParams, where: str, index: int,
           desc: m.Descriptor, diff_id: str) -> ConvertedLayer:
    annotations = {**desc.annotations, REGISTRY_LAYER: desc.digest}
    if desc.media_type in ZSTD_LAYERS:
        kept = m.Descriptor(desc.media_type, desc.digest, desc.size, annotations=annotations)
        return ConvertedLayer(desc.digest, kept, diff_id, converted=False)
    if desc.media_type not in GZIP_LAYERS + TAR_LAYERS:
        raise BuilderError(f"{where}: layer {index} ({desc.digest}) has media type "
                           f"{desc.media_type!r}, which cannot be recompressed",
                           "expected a tar, tar+gzip or tar+zstd layer; ship this image in the "
                           "registry layer mode")
    memo = _memo_dir(store, params) / "layers" / dg.hex_of(desc.digest)
    found = _recall_layer(store, memo, diff_id)
    converted = found is None
    if found is None:
        found = _compress_layer(store, params, f"{where} layer {index} ({desc.digest})",
                                desc, diff_id)
        write_atomic(memo, f"{found[0]} {diff_id} {found[1]}\n".encode())
    out = m.Descriptor(m.OCI_LAYER_ZSTD, found[0], found[1], annotations=annotations)
    return ConvertedLayer(desc.digest, out, diff_id, converted)


def _compress_layer(store: Store, params: ZstdLayerParams, what: str, desc: m.Descriptor,
                    diff_id: str) -> tuple[str, int]:
    """Stream the stored blob through decompression, the diff_id check and zstd into the store;
    return (zstd digest, size). Nothing is stored unless the uncompressed bytes are ``diff_id``."""
    tmp = store.root / "tmp" / f"{os.getpid()}-{secrets.token_hex(8)}"
    try:
        with store.open_verified(desc.digest, what) as blob, open(tmp, "wb") as raw:
            out = HashingWriter(raw)
            with params.compressor().stream_writer(out, closefd=False) as z:  # type: ignore[arg-type]
                tar = HashingWriter(z)
                error = _decompress(blob, desc.media_type in GZIP_LAYERS, tar.write)
            # First: bytes changed on disk are the store's fault (its repair hint), not the registry's.
            blob.finish()
        if error is not None:
            raise BuilderError(f"{what}: not a valid gzip stream: {error}", _BROKEN_IMAGE)
        if tar.digest != diff_id:
            raise DigestMismatch(f"{what}: uncompressed", f"{diff_id} (the config's "
                                 "rootfs.diff_ids entry)", tar.digest, _BROKEN_IMAGE)
        store.adopt(tmp, out.digest)  # hashed while written: no second read
        return out.digest, out.size
    finally:
        tmp.unlink(missing_ok=True)


def _decompress(blob: BlobReader, gzipped: bool, write: Callable[[bytes], object]) -> str | None:
    """Copy the (gunzipped) blob to ``write``; the decoder's complaint, if the gzip is broken."""
    source = gzip.GzipFile(fileobj=blob, mode="rb") if gzipped else blob  # type: ignore[call-overload]
    try:
        while chunk := source.read(CHUNK):
            write(chunk)
    except StoreCorrupt:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        return str(exc) or type(exc).__name__
    return None


# -- memos ------------------------------------------------------------------------------------------

def _memo_dir(store: Store, params: ZstdLayerParams) -> Path:
    return store.root / "derived" / f"zstd-{params.recipe}"


def _read_memo(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except (OSError, UnicodeDecodeError):
        return []


def _recall_layer(store: Store, memo: Path, diff_id: str) -> tuple[str, int] | None:
    """(zstd digest, size) from the layer memo, if it holds: a stored blob of that size, made
    from a layer whose uncompressed digest is this config's diff_id (another image's config
    could claim a different diff_id for the same registry blob: that one is checked afresh)."""
    fields = _read_memo(memo)
    if len(fields) != 3 or not dg.is_digest(fields[0]) or fields[1] != diff_id:
        return None
    digest, size = fields[0], fields[2]
    if not size.isdigit() or not store.has(digest) or store.size(digest) != int(size):
        return None
    return digest, int(size)


def _recall_image(store: Store, memo: Path, registry_digest: str) -> ConvertedImage | None:
    """The converted image the memo names, if it is still the conversion of ``registry_digest``:
    in the store, annotated with it, same config, one stored layer per registry layer in order."""
    fields = _read_memo(memo)
    if len(fields) != 1 or not dg.is_digest(fields[0]) or not store.has(fields[0]):
        return None
    if not store.has(registry_digest):
        return None  # load_image below names the missing registry manifest
    try:
        registry, _ = load_image(store, registry_digest)
        converted, config = load_image(store, fields[0])
    except StoreCorrupt:
        raise  # the store's problem, with its repair hint; redoing would not fix it
    except BuilderError:
        return None
    sources = [layer.annotations.get(REGISTRY_LAYER) for layer in converted.layers]
    if (converted.annotations.get(REGISTRY_MANIFEST) != registry_digest
            or converted.config.digest != registry.config.digest
            or sources != [layer.digest for layer in registry.layers]
            or not all(store.has(layer.digest) and store.size(layer.digest) == layer.size
                       for layer in converted.layers)):
        return None
    layers = tuple(ConvertedLayer(src, layer, diff_id, converted=False)  # type: ignore[arg-type]
                   for src, layer, diff_id in zip(sources, converted.layers, config.diff_ids,
                                                  strict=True))
    return ConvertedImage(registry_digest, fields[0], len(converted.raw), converted.config.digest,
                          layers)
