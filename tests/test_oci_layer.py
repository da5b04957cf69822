"""Layers, images and compression: determinism, normalised headers, and real readers
(gzip, zstd, umoci, skopeo) accepting what we write."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from builder.errors import BuilderError
from builder.oci import compress
from builder.oci import model as m
from builder.oci.image import build_image, build_index, load_image
from builder.oci.layer import FileEntry, write_layer
from builder.oci.layout import ArchiveImage, write_layout
from builder.store import Store
from tests.plugins.oci import EPOCH, busybox_image, host_arch

ENTRIES = [
    FileEntry("usr/share/doc/x/README", b"hello\n", 0o644),
    FileEntry("bin/tool", b"\x7fELF fake", 0o755),
    FileEntry("bin/alias", linkname="tool"),
    FileEntry("var/empty", is_dir=True, mode=0o700),
    FileEntry("d/" + "long-name-" * 20 + "/f", b"x", 0o600),
]


def _tar_members(store: Store, digest: str) -> list[tarfile.TarInfo]:
    with gzip.open(store.blob_path(digest)) as gz, tarfile.open(fileobj=gz, mode="r|") as tar:
        return list(tar)


def test_layer_is_deterministic_and_order_independent(tmp_path: Path) -> None:
    a = write_layer(Store(tmp_path / "a"), ENTRIES, EPOCH)
    b = write_layer(Store(tmp_path / "b"), list(reversed(ENTRIES)), EPOCH)
    assert a == b
    assert (tmp_path / "a/blobs/sha256" / a.digest[7:]).read_bytes() == \
        (tmp_path / "b/blobs/sha256" / b.digest[7:]).read_bytes()
    assert write_layer(Store(tmp_path / "c"), ENTRIES, EPOCH + 1).digest != a.digest


def test_layer_headers_are_normalised(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "on-disk"
    src.write_bytes(b"from a file")
    layer = write_layer(store, [*ENTRIES, FileEntry("/opt/file", src, 0o640)], EPOCH)
    members = _tar_members(store, layer.digest)
    names = [t.name for t in members]
    assert names == sorted(names)
    # Parents were added, each once, before their children.
    for name in ("bin", "usr", "usr/share", "usr/share/doc", "usr/share/doc/x", "opt", "d"):
        assert names.count(name) == 1
    for t in members:
        assert (t.uid, t.gid, t.uname, t.gname, t.mtime) == (0, 0, "", "", EPOCH)
        assert not t.name.startswith("/")
        assert set(t.pax_headers) <= {"path"}  # only for the long name: no times, no xattrs
    by_name = {t.name: t for t in members}
    assert by_name["bin/alias"].issym() and by_name["bin/alias"].linkname == "tool"
    assert by_name["var/empty"].isdir() and by_name["var/empty"].mode == 0o700
    assert by_name["opt/file"].mode == 0o640 and by_name["opt/file"].size == len(b"from a file")
    assert by_name["bin"].mode == 0o755


def test_layer_digests_and_gzip_header(store: Store) -> None:
    layer = write_layer(store, ENTRIES, EPOCH)
    blob = store.blob_path(layer.digest).read_bytes()
    assert layer.size == len(blob)
    assert layer.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert layer.diff_id == "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest()
    assert layer.media_type == m.OCI_LAYER_GZIP
    # gzip header: no FNAME flag, mtime 0.
    assert blob[3] & 0x08 == 0 and blob[4:8] == b"\0\0\0\0"
    subprocess.run(["gzip", "-t", str(store.blob_path(layer.digest))], check=True)


@pytest.mark.parametrize("bad", ["../etc/passwd", "a/../../b", "", ".", "/"])
def test_layer_refuses_escaping_paths(store: Store, bad: str) -> None:
    with pytest.raises(BuilderError):
        write_layer(store, [FileEntry(bad, b"x")], EPOCH)


def test_layer_refuses_conflicts(store: Store) -> None:
    with pytest.raises(BuilderError, match="twice"):
        write_layer(store, [FileEntry("a", b"1"), FileEntry("a", b"2")], EPOCH)
    with pytest.raises(BuilderError, match="twice"):
        write_layer(store, [FileEntry("d", is_dir=True, mode=0o700), FileEntry("d", is_dir=True)],
                    EPOCH)
    # The same entry twice is harmless.
    write_layer(store, [FileEntry("a", b"1"), FileEntry("a", b"1")], EPOCH)
    with pytest.raises(BuilderError, match="is a file"):
        write_layer(store, [FileEntry("a", b"1"), FileEntry("a/b", b"2")], EPOCH)


def test_build_image_config_and_manifest(store: Store) -> None:
    layer = write_layer(store, ENTRIES, EPOCH)
    desc = build_image(store, [layer], m.Platform.for_arch("arm64"), EPOCH,
                       labels={"k": "v"}, config={"Env": ["PATH=/bin"], "Entrypoint": ["/bin/tool"]})
    assert desc.media_type == m.OCI_MANIFEST and desc.platform == m.Platform("linux", "arm64", "v8")
    manifest, config = load_image(store, desc.digest)
    assert manifest.layers[0].digest == layer.digest and manifest.layers[0].media_type == m.OCI_LAYER_GZIP
    assert config.diff_ids == (layer.diff_id,)
    doc = json.loads(config.raw)
    assert doc["created"] == "2023-11-14T22:13:20Z"
    assert (doc["os"], doc["architecture"], doc["variant"]) == ("linux", "arm64", "v8")
    assert doc["config"] == {"Env": ["PATH=/bin"], "Entrypoint": ["/bin/tool"], "Labels": {"k": "v"}}
    assert len(doc["history"]) == 1
    assert manifest.raw == m.canonical_json(json.loads(manifest.raw))
    # Same inputs, same digest.
    again = build_image(store, [layer], m.Platform.for_arch("arm64"), EPOCH, labels={"k": "v"},
                        config={"Env": ["PATH=/bin"], "Entrypoint": ["/bin/tool"]})
    assert again == desc


def test_docker_media_and_indexes(store: Store) -> None:
    layer = write_layer(store, ENTRIES, EPOCH)
    amd = build_image(store, [layer], m.Platform.for_arch("amd64"), EPOCH, media="docker")
    arm = build_image(store, [layer], m.Platform.for_arch("arm64"), EPOCH, media="docker")
    manifest, _ = load_image(store, amd.digest)
    assert manifest.media_type == m.DOCKER_MANIFEST
    assert manifest.config.media_type == m.DOCKER_CONFIG
    assert manifest.layers[0].media_type == m.DOCKER_LAYER_GZIP
    lst = build_index(store, [amd, arm], media="docker")
    doc = m.parse_document(store.read_bytes(lst.digest), "test")
    assert isinstance(doc, m.Index) and doc.media_type == m.DOCKER_LIST
    assert doc.select(m.Platform.for_arch("arm64")).digest == arm.digest
    oci = build_index(store, [amd, arm], annotations={"org.opencontainers.image.version": "1"})
    assert oci.media_type == m.OCI_INDEX
    oci_img = build_image(store, [layer], m.Platform.for_arch("amd64"), EPOCH)
    with pytest.raises(BuilderError, match="Docker manifest list"):
        build_index(store, [oci_img], media="docker")
    with pytest.raises(BuilderError, match="index, not an image"):
        load_image(store, oci.digest)


# -- compression -----------------------------------------------------------------------------
@pytest.fixture
def payload(tmp_path: Path, busybox_binaries: dict[str, Path]) -> Path:
    """A few MB of real, compressible-but-not-trivial bytes."""
    path = tmp_path / "payload.tar"
    with open(path, "wb") as out:
        for _ in range(3):
            out.write(busybox_binaries["amd64"].read_bytes())
            out.write(busybox_binaries["arm64"].read_bytes())
    return path


def test_zstd_is_identical_for_any_thread_count(payload: Path, tmp_path: Path) -> None:
    one = compress.zstd_file(payload, tmp_path / "one.zst", threads=1)
    two = compress.zstd_file(payload, tmp_path / "two.zst", threads=2)
    assert one.digest == two.digest and one.size == two.size
    assert (tmp_path / "one.zst").read_bytes() == (tmp_path / "two.zst").read_bytes()
    subprocess.run(["zstd", "-q", "-t", str(tmp_path / "one.zst")], check=True)
    # The frame's window fits the rke2/k3s decoder cap.
    params = zstandard.get_frame_parameters((tmp_path / "one.zst").read_bytes()[:18])
    assert params.window_size <= 1 << 25 and params.has_checksum
    back = compress.decompress_file(tmp_path / "one.zst", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == payload.read_bytes()
    assert back.size == payload.stat().st_size


def test_zstd_refuses_nondeterministic_or_oversized_settings(payload: Path, tmp_path: Path) -> None:
    with pytest.raises(BuilderError, match="threads"):
        compress.zstd_file(payload, tmp_path / "x.zst", threads=0)
    with pytest.raises(BuilderError, match="window"):
        compress.zstd_file(payload, tmp_path / "x.zst", window_log=27)
    assert not list(tmp_path.glob("*.zst")) and not list(tmp_path.glob(".*tmp"))


def test_gzip_file_is_deterministic(payload: Path, tmp_path: Path) -> None:
    a = compress.gzip_file(payload, tmp_path / "a.gz")
    b = compress.gzip_file(payload, tmp_path / "b.gz")
    assert a.digest == b.digest
    data = (tmp_path / "a.gz").read_bytes()
    assert data[3] & 0x08 == 0 and data[4:8] == b"\0\0\0\0"
    subprocess.run(["gzip", "-t", str(tmp_path / "a.gz")], check=True)
    assert gzip.decompress(data) == payload.read_bytes()


def test_atomic_output_leaves_nothing_on_failure(tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), compress.atomic_output(dest) as out:
        out.write(b"partial")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


# -- real readers of a layout directory ------------------------------------------------------
def test_layout_directory_is_read_by_skopeo_and_umoci(store: Store, tmp_path: Path,
                                                      busybox_binaries: dict[str, Path]) -> None:
    desc = busybox_image(store, "amd64")
    layout = tmp_path / "layout"
    name = "docker.io/rancher/busybox-fixture:v1"
    write_layout(store, [ArchiveImage(name, desc.digest, m.Platform.for_arch("amd64"))], layout)
    index = json.loads((layout / "index.json").read_text())
    assert index["manifests"][0]["annotations"] == {
        m.ANNOTATION_CONTAINERD_NAME: name, m.ANNOTATION_REF_NAME: "v1"}
    out = subprocess.run(["skopeo", "inspect", f"oci:{layout}:v1"], check=True,
                         capture_output=True, text=True)
    info = json.loads(out.stdout)
    assert info["Digest"] == desc.digest and info["Architecture"] == "amd64"
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)], check=True,
                   capture_output=True)
    rootfs = bundle / "rootfs"
    assert (rootfs / "bin/busybox").read_bytes() == busybox_binaries["amd64"].read_bytes()
    assert (rootfs / "bin/sh").is_symlink() and (rootfs / "etc/motd").read_text()
    if host_arch() == "amd64":  # the real binary came through intact and runs
        run = subprocess.run([str(rootfs / "bin/busybox"), "echo", "ok"], capture_output=True,
                             text=True)
        assert run.stdout == "ok\n"
    # Rewriting the layout in place replaces it atomically.
    write_layout(store, [ArchiveImage(name, desc.digest, m.Platform.for_arch("amd64"))], layout)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "layout", "store"]
    assert json.loads((layout / "index.json").read_text()) == index
