"""`verify` replays the supervisor's runtime-image lookup (builder/trust/runtime_lookup.py).

The release tests run on the session's real build (`built`: lock → fetch → build through the
loopback mirror, amd64 and arm64), each on a private copy of one arch's files. A tampered archive
is rewritten with its checksum line updated, so the lookup is the only check that can fail: a
manifest.json whose runtime entry is renamed, loses or reorders a layer, or points at an image
without bin/ or charts/. The names and the layer flattening are also pinned on their own against
what go-containerregistry does (values taken from its pkg/name and pkg/v1/mutate code).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from builder import cli
from builder.oci.layout import blob_member
from builder.trust import checksums, runtime_lookup
from builder.trust.runtime_lookup import (
    BadName,
    LayerSeen,
    flatten,
    read_layer,
    supervisor_reads,
    tag_name,
)
from builder.trust.verify import ARCHIVE_SUFFIXES, arch_of, parse_release_env, verify_release
from tests.tamper import member, rewrite_tar
from tests.test_verify import _rewrite_bundle

ARCHES = ("amd64", "arm64")
SUFFIXES = (".tar.zst", ".tar.gz")
Members = list[tuple[tarfile.TarInfo, bytes | None]]


# -- the supervisor's rules on their own ---------------------------------------------------------

@pytest.mark.parametrize("text", [
    "docker.io/rancher/rke2-runtime:v1.32.13-rke2r1",
    "rancher/rke2-runtime:v1.32.13-rke2r1",
    "index.docker.io/rancher/rke2-runtime:v1.32.13-rke2r1",
])
def test_one_name_however_docker_hub_is_spelled(text: str) -> None:
    assert tag_name(text) == "index.docker.io/rancher/rke2-runtime:v1.32.13-rke2r1"


@pytest.mark.parametrize(("text", "name"), [
    ("busybox", "index.docker.io/library/busybox:latest"),
    ("docker.io/busybox:1", "index.docker.io/library/busybox:1"),
    ("127.0.0.1:5000/rancher/rke2-runtime:v1", "127.0.0.1:5000/rancher/rke2-runtime:v1"),
    ("localhost:5000/x/y", "localhost:5000/x/y:latest"),  # ':' makes it a registry
    ("localhost/x/y:t", "index.docker.io/localhost/x/y:t"),  # no '.' or ':': a repository
    ("registry.example/rancher/rke2-runtime:v1", "registry.example/rancher/rke2-runtime:v1"),
])
def test_names_resolve_as_go_containerregistry(text: str, name: str) -> None:
    assert tag_name(text) == name


@pytest.mark.parametrize("text", [
    "", "Rancher/rke2-runtime:v1", "rancher/rke2-runtime:v1+rke2r1", "r:t",
    "rancher/rke2-runtime@sha256:" + "0" * 64, "rancher/rke2-runtime:" + "v" * 129,
    "host name/x:t",
])
def test_names_the_supervisor_refuses(text: str) -> None:
    with pytest.raises(BadName):
        tag_name(text)


def test_the_supervisor_reads_these_file_names() -> None:
    for name in ("rke2-images.linux-amd64.tar.zst", "x.tar.gz", "x.TAR", "x.tar.lz4", "x.tbz",
                 "x.tar.bz2", "x.tgz", "x.tzst"):
        assert supervisor_reads(name), name
    for name in ("rke2-images.linux-amd64.txt", ".hidden.tar.zst", "x.zst", "x.tar.xz"):
        assert not supervisor_reads(name), name
    # Every archive format verify checks (and the build writes) is one the supervisor opens.
    assert all(supervisor_reads(f"rke2-images.linux-amd64{s}") for s in ARCHIVE_SUFFIXES)


def _layer(*entries: tuple[str, str]) -> LayerSeen:
    return LayerSeen("m", "sha256:" + "0" * 64, list(entries))


def test_flatten_honours_whiteouts_like_mutate_extract() -> None:
    base = _layer(("bin", "dir"), ("bin/containerd", "file"), ("charts", "dir"),
                  ("charts/a.yaml", "file"))
    assert [n for n, _ in flatten([base])] == ["bin", "bin/containerd", "charts", "charts/a.yaml"]
    # .wh.bin hides bin/ below; a file named charts hides the directory and what it holds.
    top = _layer((".wh.bin", "file"), ("charts", "file"))
    assert flatten([base, top]) == [("charts", "file")]
    # The top layer wins for one name; a whiteout in a lower layer hides nothing above it.
    assert flatten([top, base]) == [("bin", "dir"), ("bin/containerd", "file"),
                                    ("charts", "dir"), ("charts/a.yaml", "file")]


# -- the real build --------------------------------------------------------------------------------

@pytest.fixture
def arch_dir(built, tmp_path: Path) -> Callable[[str], Path]:
    """A private copy of one arch's release files (the `built` artifacts are shared)."""
    def copy(arch: str) -> Path:
        dest = tmp_path / arch
        dest.mkdir()
        for path in built.out.iterdir():
            if path.is_file() and arch_of(path.name) == arch:
                shutil.copy2(path, dest / path.name)
        return dest
    return copy


def release_env(directory: Path, arch: str) -> dict[str, str]:
    with tarfile.open(directory / f"rke2.linux-{arch}.tar.gz") as t:
        info = next(i for i in t.getmembers() if i.name.endswith("/release.env"))
        return parse_release_env(t.extractfile(info).read())  # type: ignore[union-attr]


def holders(arch: str) -> list[str]:
    return [f"{base}.linux-{arch}{suffix}" for base in ("rke2-images-core", "rke2-images")
            for suffix in SUFFIXES]


def problems(directory: Path, arch: str) -> list[str]:
    return [str(p) for p in verify_release(directory, [arch]).problems]


@pytest.mark.parametrize("arch", ARCHES)
def test_real_build_yields_the_runtime_in_every_archive_that_holds_it(arch_dir, arch: str,
                                                                     capsys, monkeypatch) -> None:
    directory = arch_dir(arch)
    reads: list[str] = []

    def counted(member: str, fh):  # a spy on the real function: how often a layer is decompressed
        reads.append(member)
        return read_layer(member, fh)

    monkeypatch.setattr(runtime_lookup, "read_layer", counted)
    report = verify_release(directory, [arch])
    assert report.passed, report.summary()
    # Each runtime layer (one per component file, then the manifests: assemble/runtime.py), in
    # four archives: decompressed once (the blob is re-hashed in each).
    layers = release_env(directory, arch)["RUNTIME_LAYERS"].split()
    assert len(layers) > 1 and sorted(reads) == sorted(blob_member(la) for la in layers), reads
    held = report.runtime[arch]
    assert [h.split(" ")[0] for h in held] == sorted(holders(arch))
    assert all(f"{len(layers)} layers, bin/ " in h and "charts/" in h for h in held), held
    assert cli.main(["verify", str(directory), "--arch", arch]) == 0
    out = "".join(capsys.readouterr())
    assert f"{arch}: the supervisor finds the runtime image in " in out
    for name in holders(arch):
        assert name in out
    assert f"rke2-images-canal.linux-{arch}" not in out.split("runtime image in ", 1)[1]


# -- tampering -------------------------------------------------------------------------------------

def _resum(directory: Path, arch: str) -> None:
    """The checksum file (and the provenance statement's subjects, when the build wrote one)
    rewritten after the change, as a builder with that bug would: only the lookup can object."""
    sums = directory / checksums.checksum_name(arch)
    files = [directory / e.name for e in checksums.parse_file(sums)]
    statement = directory / f"provenance.linux-{arch}.json"
    if statement.exists():
        doc = json.loads(statement.read_bytes())
        for subject in doc["subject"]:
            data = (directory / subject["name"]).read_bytes()
            subject["digest"]["sha256"] = hashlib.sha256(data).hexdigest()
        # canonical JSON, as the build writes it (sorted keys, no spaces, ASCII)
        statement.write_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":"),
                                         ensure_ascii=True).encode())
    checksums.write_for_arch(directory, arch, files)


def _runtime_entry(members: Members, image: str) -> tuple[list[dict], dict]:
    manifest = next(json.loads(d or b"") for i, d in members if i.name == "manifest.json")
    entry = next(e for e in manifest if image in e["RepoTags"])
    return manifest, entry


def _put(members: Members, name: str, data: bytes) -> None:
    """Replace member ``name`` (manifest.json) or append a new blob."""
    for k, (info, _) in enumerate(members):
        if info.name == name:
            info.size = len(data)
            members[k] = (info, data)
            return
    members.append(member(name, data))


def _gzip_layer(*files: tuple[str, bytes | None]) -> tuple[bytes, str]:
    """(gzip blob, diff_id) of a layer with these entries (data None: a directory)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files:
            info, payload = member(name, data, mode=0o755, kind=tarfile.DIRTYPE if data is None
                                   else tarfile.REGTYPE)
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0), "sha256:" + hashlib.sha256(raw).hexdigest()


def _blob(members: Members, data: bytes) -> str:
    name = blob_member("sha256:" + hashlib.sha256(data).hexdigest())
    _put(members, name, data)
    return name


def _with_layers(members: Members, entry: dict, extra: list[tuple[bytes, str]],
                 keep_original: bool = True) -> None:
    """Point the runtime entry at a new image: the original layer (or not) plus ``extra`` layers,
    with a config whose diff_ids say so (a consistent image other than the one built)."""
    config = json.loads(next(d or b"" for i, d in members if i.name == entry["Config"]))
    layers = list(entry["Layers"]) if keep_original else []
    diff_ids = list(config["rootfs"]["diff_ids"]) if keep_original else []
    for blob, diff_id in extra:
        layers.append(_blob(members, blob))
        diff_ids.append(diff_id)
    config["rootfs"]["diff_ids"] = diff_ids
    entry["Config"], entry["Layers"] = _blob(members, json.dumps(config).encode()), layers


def rename(members: Members, entry: dict) -> None:
    entry["RepoTags"] = [t.replace("rke2-runtime:", "rke2-runtime:renamed-") for t in entry["RepoTags"]]


def drop_layer(members: Members, entry: dict) -> None:
    entry["Layers"] = entry["Layers"][:-1]


def drop_layers(members: Members, entry: dict) -> None:
    entry["Layers"] = []


def reorder(members: Members, entry: dict) -> None:
    _with_layers(members, entry, [_gzip_layer(("etc", None), ("etc/extra", b"x\n"))])
    entry["Layers"].reverse()


def no_bin(members: Members, entry: dict) -> None:
    _with_layers(members, entry, [_gzip_layer(("charts", None), ("charts/a.yaml", b"a: 1\n"))],
                 keep_original=False)


def bin_whited_out(members: Members, entry: dict) -> None:
    _with_layers(members, entry, [_gzip_layer((".wh.bin", b""))])


def dot_slash(members: Members, entry: dict) -> None:
    """The layer stored as ./blobs/sha256/HEX: our reader cleans the name, go-containerregistry
    matches member names exactly and would not find blobs/sha256/HEX."""
    for info, _ in members:
        if info.name == entry["Layers"][0]:
            info.name = "./" + info.name


def no_charts(members: Members, entry: dict) -> None:
    _with_layers(members, entry, [_gzip_layer(("bin", None), ("bin/x", b"x"))],
                 keep_original=False)


TAMPERS: dict[str, tuple[Callable[[Members, dict], None], str]] = {
    "RepoTags renamed": (rename, "manifest.json has no entry whose RepoTags resolve to "
                                 "index.docker.io/rancher/rke2-runtime:"),
    "layer dropped": (drop_layer, "(a layer dropped or added)"),
    "layers dropped": (drop_layers, "lists no layers: the supervisor would extract nothing"),
    "layers reordered": (reorder, "which is diff_ids[1]: layers out of order"),
    "bin/ missing": (no_bin, "no file under bin/ in its layers"),
    "bin/ whited out": (bin_whited_out, "no file under bin/ in its layers"),
    "charts/ missing": (no_charts, "no charts/ in its layers"),
    "layer named ./blobs/...": (dot_slash, "is not a member of the archive (by exact name)"),
}


def tamper(directory: Path, arch: str, file: str, edit: Callable[[Members, dict], None]) -> None:
    image = release_env(directory, arch)["RUNTIME_IMAGE"]

    def rewrite(members: Members) -> None:
        manifest, entry = _runtime_entry(members, image)
        edit(members, entry)
        _put(members, "manifest.json", json.dumps(manifest).encode())

    rewrite_tar(directory / file, rewrite)
    _resum(directory, arch)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("case", list(TAMPERS))
def test_archive_the_supervisor_would_not_boot_from_is_named(arch_dir, arch: str, suffix: str,
                                                             case: str, capsys) -> None:
    directory = arch_dir(arch)
    image = release_env(directory, arch)["RUNTIME_IMAGE"]
    file = f"rke2-images-core.linux-{arch}{suffix}"
    edit, expected = TAMPERS[case]
    tamper(directory, arch, file, edit)
    found = problems(directory, arch)
    assert found, f"{case}: verify passed"
    # Only the lookup objects, and only for the file changed.
    prefix = f"{file}: runtime image {image}, as the supervisor looks it up: "
    assert all(p.startswith(prefix) for p in found), found
    assert any(expected in p for p in found), found
    assert cli.main(["verify", str(directory), "--arch", arch]) != 0
    assert prefix + "manifest.json" in capsys.readouterr().err


def test_every_spelling_of_the_reference_is_found(arch_dir) -> None:
    """RepoTags spelled as the supervisor's compile-time default (no registry) still match."""
    arch = "amd64"
    directory = arch_dir(arch)
    file = f"rke2-images.linux-{arch}.tar.gz"

    def short(members: Members, entry: dict) -> None:
        entry["RepoTags"] = [t.removeprefix("docker.io/") for t in entry["RepoTags"]]

    tamper(directory, arch, file, short)
    report = verify_release(directory, [arch])
    assert report.passed, report.summary()
    assert any(h.startswith(file) for h in report.runtime[arch])


def test_an_unparsable_tag_before_the_runtime_stops_the_lookup(arch_dir) -> None:
    arch = "arm64"
    directory = arch_dir(arch)
    file = f"rke2-images-core.linux-{arch}.tar.zst"
    image = release_env(directory, arch)["RUNTIME_IMAGE"]

    def bad_first(members: Members, entry: dict) -> None:
        manifest = next(json.loads(d or b"") for i, d in members if i.name == "manifest.json")
        manifest.insert(0, {**manifest[-1], "RepoTags": ["Not/A:Reference+"]})
        _put(members, "manifest.json", json.dumps(manifest).encode())

    def rewrite(members: Members) -> None:
        bad_first(members, _runtime_entry(members, image)[1])

    rewrite_tar(directory / file, rewrite)
    _resum(directory, arch)
    found = problems(directory, arch)
    assert len(found) == 1 and "manifest.json entry 1: RepoTags value 'Not/A:Reference+' does " \
        "not parse as a reference" in found[0] and "lookup stops there" in found[0], found


def test_another_archive_claiming_the_runtime_must_hold_all_of_it(arch_dir) -> None:
    """The supervisor tries archives in no fixed order: a group archive that is not expected to
    hold the runtime but lists it in manifest.json (with no layers) is reported."""
    arch = "amd64"
    directory = arch_dir(arch)
    file = f"rke2-images-canal.linux-{arch}.tar.zst"
    image = release_env(directory, arch)["RUNTIME_IMAGE"]

    def claim(members: Members) -> None:
        manifest = next(json.loads(d or b"") for i, d in members if i.name == "manifest.json")
        manifest.append({"Config": manifest[0]["Config"], "RepoTags": [image], "Layers": []})
        _put(members, "manifest.json", json.dumps(manifest).encode())

    rewrite_tar(directory / file, claim)
    _resum(directory, arch)
    found = problems(directory, arch)
    assert len(found) == 1 and found[0].startswith(f"{file}: runtime image {image}") \
        and "lists no layers" in found[0], found


def test_a_runtime_reference_the_supervisor_cannot_parse_is_named(arch_dir) -> None:
    arch = "amd64"
    directory = arch_dir(arch)
    bundle = directory / f"rke2.linux-{arch}.tar.gz"
    _rewrite_bundle(bundle, lambda text: re.sub(r"RUNTIME_IMAGE='docker.io/rancher/",
                                                "RUNTIME_IMAGE='docker.io/Rancher/", text))
    _resum(directory, arch)
    found = problems(directory, arch)
    assert f"{bundle.name}: RUNTIME_IMAGE 'docker.io/Rancher/rke2-runtime:" in "\n".join(found)
    assert any("is not a reference the supervisor can parse (repository 'Rancher/rke2-runtime' is "
               "not 2-255 of [a-z0-9_./-]): no archive can hold it under that name" in p
               for p in found), found
