"""Image archives checked by real consumers: skopeo, umoci, podman, containerd 1.6 (import and
run), zstd and gzip; plus determinism, de-duplication, atomicity and the arch check."""

from __future__ import annotations

import gzip
import io
import json
import os
import platform
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder.errors import BuilderError, DigestMismatch
from builder.oci import compress
from builder.oci import model as m
from builder.oci.archive import (
    BLOB_MTIME,
    ArchiveImage,
    ArchiveReader,
    read_archive_index,
    write_archive,
)
from builder.oci.image import load_image
from builder.store import Store
from tests.plugins.oci import EPOCH, Containerd, busybox_image, host_arch
from tests.rig import podman

ARCHES = ("amd64", "arm64")
ELF_MACHINE = {"amd64": 0x3E, "arm64": 0xB7}  # e_machine: EM_X86_64, EM_AARCH64


@dataclass(frozen=True)
class Built:
    store: Store
    images: dict[str, list[ArchiveImage]]  # arch → images
    archives: dict[str, Path]  # arch → uncompressed tar


def build_all(root: Path) -> Built:
    """Per arch: an OCI and a Docker-schema-2 busybox image sharing their layers, one archive."""
    store = Store(root / "store")
    images: dict[str, list[ArchiveImage]] = {}
    archives: dict[str, Path] = {}
    for arch in ARCHES:
        platform = m.Platform.for_arch(arch)
        oci = busybox_image(store, arch, label="oci")
        docker = busybox_image(store, arch, label="docker", media="docker")
        images[arch] = [ArchiveImage("docker.io/rancher/busybox-fixture:v1", oci.digest, platform),
                        ArchiveImage("docker.io/rancher/busybox-docker:v2", docker.digest, platform)]
        archives[arch] = root / f"images.linux-{arch}.tar"
        write_archive(store, images[arch], archives[arch], EPOCH)
    return Built(store, images, archives)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_all(tmp_path_factory.mktemp("build-a"))


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path, "r:") as tar:
        return tar.getmembers()


def test_two_builds_are_byte_identical(built: Built, tmp_path: Path) -> None:
    other = build_all(tmp_path)
    for arch in ARCHES:
        a, b = built.archives[arch], other.archives[arch]
        assert a.read_bytes() == b.read_bytes(), arch
        za = compress.zstd_file(a, tmp_path / f"a-{arch}.tar.zst")
        zb = compress.zstd_file(b, tmp_path / f"b-{arch}.tar.zst", threads=1)
        assert za.digest == zb.digest
        ga = compress.gzip_file(a, tmp_path / f"a-{arch}.tar.gz")
        gb = compress.gzip_file(b, tmp_path / f"b-{arch}.tar.gz")
        assert ga.digest == gb.digest
        subprocess.run(["zstd", "-q", "-t", str(za.path)], check=True)
        subprocess.run(["gzip", "-t", str(ga.path)], check=True)


def test_layout_metadata_first_blobs_once(built: Built) -> None:
    members = _members(built.archives["amd64"])
    names = [t.name for t in members]
    assert names[:6] == ["oci-layout", "index.json", "manifest.json", "repositories",
                         "blobs", "blobs/sha256"]
    blobs = names[6:]
    assert len(blobs) == len(set(blobs))
    # Two manifests, two configs, two shared layers.
    assert len(blobs) == 6
    for t in members:
        # Blobs at BLOB_MTIME (a blob's member is then the same in every archive: framed.py).
        mtime = BLOB_MTIME if t.name.startswith("blobs/sha256/") else EPOCH
        assert (t.uid, t.gid, t.uname, t.gname, t.mtime, t.pax_headers) == (0, 0, "", "", mtime, {})
    with tarfile.open(built.archives["amd64"]) as tar:
        index = json.load(tar.extractfile("index.json"))
        docker = json.load(tar.extractfile("manifest.json"))
        repos = json.load(tar.extractfile("repositories"))
    names_in_index = [(d["annotations"][m.ANNOTATION_CONTAINERD_NAME],
                       d["annotations"][m.ANNOTATION_REF_NAME], d["digest"])
                      for d in index["manifests"]]
    assert names_in_index == [(i.name, i.name.rsplit(":", 1)[1], i.manifest_digest)
                              for i in built.images["amd64"]]
    assert [e["RepoTags"] for e in docker] == [[i.name] for i in built.images["amd64"]]
    for entry in docker:
        assert all(p in names for p in [entry["Config"], *entry["Layers"]])
    assert set(repos) == {"docker.io/rancher/busybox-fixture", "docker.io/rancher/busybox-docker"}


def test_read_archive_index_plain_gz_zst(built: Built, tmp_path: Path) -> None:
    tar = built.archives["arm64"]
    expected = [(i.name, i.manifest_digest) for i in built.images["arm64"]]
    for path in (tar, compress.zstd_file(tar, tmp_path / "x.tar.zst").path,
                 compress.gzip_file(tar, tmp_path / "x.tar.gz").path):
        for verify in (False, True):
            found = read_archive_index(path, verify=verify)
            assert [(i.name, i.manifest_digest) for i in found] == expected
            assert {i.platform for i in found} == {m.Platform.for_arch("arm64")}


def test_verify_catches_corruption_and_truncation(built: Built, tmp_path: Path) -> None:
    data = bytearray(built.archives["amd64"].read_bytes())
    last = _members(built.archives["amd64"])[-1]
    bad = tmp_path / "bad.tar"
    data[last.offset_data + 10] ^= 0xFF
    bad.write_bytes(bytes(data))
    read_archive_index(bad)  # metadata is intact: listing still works
    with pytest.raises(DigestMismatch):
        read_archive_index(bad, verify=True)
    short = tmp_path / "short.tar"
    short.write_bytes(bytes(data[: last.offset_data + 100]))
    assert len(read_archive_index(short)) == 2
    with pytest.raises(BuilderError):
        read_archive_index(short, verify=True)


def test_arm64_archive_holds_only_arm64_binaries(built: Built) -> None:
    for arch in ARCHES:
        machines = set()
        with tarfile.open(built.archives[arch]) as outer:
            layer_members = {n for e in json.load(outer.extractfile("manifest.json"))
                             for n in e["Layers"]}
            for name in sorted(layer_members):
                with gzip.open(outer.extractfile(name)) as gz, \
                        tarfile.open(fileobj=gz, mode="r|") as layer:
                    for member in layer:
                        if not member.isfile():
                            continue
                        head = layer.extractfile(member).read(20)
                        if head[:4] == b"\x7fELF":
                            machines.add(int.from_bytes(head[18:20], "little"))
        assert machines == {ELF_MACHINE[arch]}, arch


def test_wrong_arch_is_refused_and_nothing_written(built: Built, tmp_path: Path) -> None:
    amd = built.images["amd64"][0]
    wrong = ArchiveImage(amd.name, amd.manifest_digest, m.Platform.for_arch("arm64"))
    out = tmp_path / "images.linux-arm64.tar"
    with pytest.raises(BuilderError, match="busybox-fixture.*linux/amd64, not linux/arm64/v8"):
        write_archive(built.store, [built.images["arm64"][1], wrong], out, EPOCH)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_no_file(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    desc = busybox_image(store, "amd64")
    manifest, _ = load_image(store, desc.digest)
    # A store blob damaged on disk is noticed while streaming, after the tar was started.
    blob = store.blob_path(manifest.layers[0].digest)
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-100] ^= 0xFF
    blob.write_bytes(bytes(data))
    out = tmp_path / "out" / "a.tar"
    with pytest.raises(DigestMismatch):
        write_archive(store, [ArchiveImage("docker.io/rancher/bb:v1", desc.digest,
                                           m.Platform.for_arch("amd64"))], out, EPOCH)
    assert list(out.parent.iterdir()) == []


def test_duplicate_names_and_bad_names(built: Built, tmp_path: Path) -> None:
    a, b = built.images["amd64"]
    with pytest.raises(BuilderError, match="listed twice"):
        write_archive(built.store, [a, ArchiveImage(a.name, b.manifest_digest, b.platform)],
                      tmp_path / "x.tar", EPOCH)
    for name in ("docker.io/rancher/x", "rancher/x:v1", f"docker.io/rancher/x:v1@{a.manifest_digest}"):
        with pytest.raises(BuilderError, match="full tagged reference"):
            write_archive(built.store, [ArchiveImage(name, a.manifest_digest, a.platform)],
                          tmp_path / "x.tar", EPOCH)
    # The same image listed twice is packed once.
    out = write_archive(built.store, [a, a], tmp_path / "y.tar", EPOCH)
    assert len(read_archive_index(out.path, verify=True)) == 1


# -- real consumers ----------------------------------------------------------------------------
def _skopeo_inspect(ref: str) -> dict:
    out = subprocess.run(["skopeo", "inspect", ref], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_skopeo_reads_both_views(built: Built, tmp_path: Path) -> None:
    for arch in ARCHES:
        tar = built.archives[arch]
        for image in built.images[arch]:
            tag = image.name.rsplit(":", 1)[1]
            docker = _skopeo_inspect(f"docker-archive:{tar}:{image.name}")
            assert docker["Architecture"] == arch and len(docker["Layers"]) == 2
            if load_image(built.store, image.manifest_digest)[0].media_type != m.OCI_MANIFEST:
                # containers/image's OCI-layout reader skips index entries that are Docker
                # schema 2 manifests (containerd reads them); the docker-archive view covers them.
                continue
            oci = _skopeo_inspect(f"oci-archive:{tar}:{tag}")
            assert oci["Architecture"] == arch and len(oci["Layers"]) == 2
            assert oci["Digest"] == image.manifest_digest  # the OCI view keeps our manifest
        # The extracted tar is a valid layout directory too.
        extracted = tmp_path / arch
        extracted.mkdir()
        subprocess.run(["tar", "-xf", str(tar), "-C", str(extracted)], check=True)  # GNU tar reads it
        first = built.images[arch][0]
        layout = _skopeo_inspect(f"oci:{extracted}:v1")
        assert layout["Digest"] == first.manifest_digest


def test_umoci_unpacks_extracted_archive(built: Built, tmp_path: Path,
                                         busybox_binaries: dict[str, Path]) -> None:
    extracted = tmp_path / "layout"
    extracted.mkdir()
    subprocess.run(["tar", "-xf", str(built.archives["arm64"]), "-C", str(extracted)], check=True)
    # umoci, like skopeo, reads OCI-typed manifests only: use the OCI image (tag v1).
    stat = subprocess.run(["umoci", "stat", "--json", "--image", f"{extracted}:v1"],
                          capture_output=True, text=True)
    assert stat.returncode == 0, stat.stderr
    assert len(json.loads(stat.stdout)["history"]) == 2
    bundle = tmp_path / "bundle"
    run = subprocess.run(["umoci", "unpack", "--image", f"{extracted}:v1", str(bundle)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (bundle / "rootfs/bin/busybox").read_bytes() == busybox_binaries["arm64"].read_bytes()
    assert os.readlink(bundle / "rootfs/bin/sh") == "busybox"


def test_podman_loads_archive(built: Built, tmp_path: Path) -> None:
    with podman.private(tmp_path) as pm:
        load = pm.run("load", "-i", str(built.archives["amd64"]))
        assert load.returncode == 0, load.stderr
        images = pm.run("images", "--format", "{{.Repository}}:{{.Tag}}")
        assert set(images.stdout.split()) == {i.name for i in built.images["amd64"]}
        arch = pm.run("image", "inspect", "--format", "{{.Architecture}}",
                      built.images["amd64"][0].name)
        assert arch.stdout.strip() == "amd64"


def test_containerd_imports_and_runs(built: Built, containerd: Containerd,
                                     tmp_path: Path) -> None:
    arch = host_arch()
    if arch is None:
        pytest.skip(f"no fixture image runs natively on {platform.machine()}")
    # rke2 ships .tar.zst; ctr 1.6 cannot read it, so decompress first as the node-side importer
    # would (under the same 32 MiB window cap).
    zst = compress.zstd_file(built.archives[arch], tmp_path / "images.tar.zst")
    tar = compress.decompress_file(zst.path, tmp_path / "images.tar")
    imp = containerd.ctr("images", "import", str(tar.path), timeout=120)
    assert imp.returncode == 0, imp.stderr
    images = containerd.images()
    for image in built.images[arch]:
        # Imported from the OCI layout, so the registry manifest digest is kept.
        assert images.get(image.name) == image.manifest_digest, images
    for image in built.images[arch]:
        run = containerd.ctr("run", "--rm", image.name, f"t-{os.getpid()}-{image.name[-2:]}",
                             "/bin/sh", "-c", "echo hello from $(cat /etc/motd)", timeout=60)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == "hello from built without docker"


# -- the one metadata-first reader (verify and release use it) --------------------------------

def _retar(src: Path, dest: Path, order: list[str] | None = None,
           extra: list[tuple[str, bytes]] = ()) -> Path:
    """``src``'s members in another ``order`` (member names), plus ``extra`` files first."""
    with tarfile.open(src, "r:") as tar:
        members = {i.name: (i, tar.extractfile(i).read() if i.isfile() else None)
                   for i in tar.getmembers()}
    with tarfile.open(dest, "w:") as out:
        for name, data in extra:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
        for name in order or list(members):
            info, data = members[name]
            out.addfile(info, io.BytesIO(data) if data is not None else None)
    return dest


def test_reader_gives_the_front_first_then_every_blob_checked(built: Built) -> None:
    path = built.archives["amd64"]
    names = [i.name for i in _members(path)]
    with ArchiveReader(path, strict=True) as reader:
        # The front is read before any blob: the images and manifest.json's entries are known.
        assert [(i.name, i.manifest_digest) for i in reader.front.images] == \
            [(i.name, i.manifest_digest) for i in built.images["amd64"]]
        assert len(reader.front.docker) == 2 and not reader.sizes
        streamed = [(b.member, b.size) for b in reader.blobs()]
        reader.check_complete()
        kept = reader.json
    assert [n for n, _ in streamed] == [n for n in names if n.startswith("blobs/sha256/")]
    for image in built.images["amd64"]:
        manifest, _config = load_image(built.store, image.manifest_digest)
        assert kept[image.manifest_digest] == manifest.raw  # manifests kept for the consumer
        assert manifest.config.digest in kept


def test_reader_refuses_blobs_before_the_metadata(built: Built, tmp_path: Path) -> None:
    """Metadata first: an archive whose blobs precede index.json is refused by the reader (so by
    verify and release too), in both modes, before any blob is handed out."""
    names = [i.name for i in _members(built.archives["amd64"])]
    blobs = [n for n in names if n.startswith("blobs/sha256/")]
    late_index = _retar(built.archives["amd64"], tmp_path / "late.tar",
                        [*blobs, *[n for n in names if n not in blobs]])
    for strict in (False, True):
        with pytest.raises(BuilderError, match="has no index.json before its blobs"):
            with ArchiveReader(late_index, strict=strict):
                pass
    late_docker = _retar(built.archives["amd64"], tmp_path / "late-docker.tar",
                         [n for n in names if n != "manifest.json"] + ["manifest.json"])
    with ArchiveReader(late_docker, strict=True) as reader, \
            pytest.raises(BuilderError, match="manifest.json after the blobs"):
        for _blob in reader.blobs():
            pass


def test_reader_hands_a_blob_out_once_and_checks_what_was_left(built: Built, tmp_path: Path) -> None:
    """A consumer may read part of a blob (or none): the reader drains and hashes the rest; a
    blob's bytes can be opened once (a registry retry cannot silently send a drained stream)."""
    data = bytearray(built.archives["amd64"].read_bytes())
    last = _members(built.archives["amd64"])[-1]
    data[last.offset_data + last.size - 1] ^= 0xFF  # the last byte: only a full read sees it
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    with ArchiveReader(bad) as reader, pytest.raises(DigestMismatch):
        for blob in reader.blobs():
            with blob.open() as fh:
                fh.read(10)
            with pytest.raises(BuilderError, match="can be read once only"):
                blob.open()


def test_release_copy_uses_the_guarded_reader(tmp_path: Path, built: Built) -> None:
    """release's archive copy gets the reader's guards: a member that leaves the archive root is
    refused before anything is pushed. (No registry: the refusal comes before any request, so
    the client is never used.)"""
    from builder.publish import release as rl

    hostile = _retar(built.archives["amd64"], tmp_path / "hostile.tar",
                     extra=[("../../etc/evil", b"x")])
    result = rl.PushResult()
    with pytest.raises(BuilderError, match="leaves the archive root"):
        rl._copy_archive(None, hostile, "registry.example.internal/x", "amd64", True, 0,  # type: ignore[arg-type]
                         result, {}, None)
    assert result.actions == []
