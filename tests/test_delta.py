"""Delta releases (issue 15): `build --since PREV` and `verify DIR --base PREV`.

The piece planner is tested on FrameIndex values; everything else on real releases the builder
builds from the session's store (tests/plugins/releases.py: lock variants, only `build` runs).
"""

from __future__ import annotations

import dataclasses
import filecmp
import hashlib
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from builder import artifacts
from builder.assemble.delta import plan_pieces
from builder.humanize import human
from builder.oci import framed
from builder.oci.framed import Frame, FrameIndex
from builder.trust import checksums, delta_check, sign
from builder.trust import delta as d
from tests import tamper
from tests.plugins.built import Built
from tests.plugins.releases import V1, V2, Release, build_variant, variant


def sha(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def blob(name: str) -> str:
    return sha("blob " + name)


def index(*frames: tuple[str, int, str]) -> FrameIndex:
    """Frames (label, length, content) laid end to end."""
    out, at = [], 0
    for label, length, content in frames:
        out.append(Frame(label, at, length, sha(content)))
        at += length
    return FrameIndex(tuple(out))


NEW = index(("head", 100, "head v2"), (blob("config"), 10, "config"), (blob("lower"), 5000, "lower"),
            (blob("top"), 700, "top v2"), (blob("runtime"), 900, "runtime v2"), ("tail", 20, "tail"))
BASE = index(("head", 90, "head v1"), (blob("runtime"), 900, "runtime v1"),  # same size
             (blob("config"), 10, "config"), (blob("top"), 600, "top v1"),
             (blob("lower"), 5000, "lower"), ("tail", 20, "tail"))
LAYERS = frozenset({blob("lower"), blob("top"), blob("runtime")})


def test_only_layers_the_base_holds_as_the_same_bytes_come_from_the_base():
    planned = plan_pieces(NEW, BASE, LAYERS)
    assert [(p.source, p.label) for p in planned.pieces] == [
        ("delta", "head"), ("delta", blob("config")),  # metadata: always carried
        ("base", blob("lower")),  # the same compressed bytes in the base
        ("delta", blob("top")), ("delta", blob("runtime")),  # changed: another sha256
        ("delta", "tail")]
    lower = planned.pieces[2]
    assert (lower.offset, lower.length) == (BASE.by_label()[blob("lower")].offset, 5000)
    assert [p.offset for p in planned.pieces if p.source == d.DELTA] == [0, 100, 110, 810, 1710]
    assert [f.label for f in planned.carried] == ["head", blob("config"), blob("top"),
                                                  blob("runtime"), "tail"]
    assert sum(p.length for p in planned.pieces) == NEW.size


def test_without_a_base_everything_is_carried():
    planned = plan_pieces(NEW, None, LAYERS)
    assert all(p.source == d.DELTA for p in planned.pieces)
    assert planned.carried == NEW.frames


def test_a_blob_that_is_no_layer_is_carried_even_when_the_base_has_it():
    planned = plan_pieces(NEW, BASE, frozenset({blob("top")}))
    assert {p.label for p in planned.pieces if p.source == d.BASE} == set()


# -- real releases -------------------------------------------------------------------------------

def _rebuild(archive: d.ArchiveDelta, prev: Path, delta_dir: Path, out: Path) -> None:
    """What install.sh does: FILE as the concatenation of its pieces, each hashed."""
    with open(out, "wb") as dest:
        for piece in archive.pieces:
            src = prev / archive.file if piece.source == d.BASE else delta_dir / archive.delta_file
            with open(src, "rb") as fh:
                fh.seek(piece.offset)
                data = fh.read(piece.length)
            assert hashlib.sha256(data).hexdigest() == piece.hex, piece
            dest.write(data)


@dataclass
class Pair:
    prev: Release  # v1, signed, with its archives
    new: Path  # the v2 artifacts directory (signed)
    delta: Path  # its delta against prev
    lock: Path  # the v2 lock variant
    output: str  # what `build --since` printed
    built: Built
    public_key: Path

    def description(self, arch: str = "amd64") -> d.Description:
        name = artifacts.delta_description_name(arch)
        return d.parse((self.delta / name).read_bytes(), name)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return dataclasses.replace(self.built, lock=self.lock).cli(*args, check=check)

    def since(self, prev: Path, out: Path, *more: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.cli("build", "--arch", "amd64", "--artifacts", str(self.new), "--since",
                        str(prev), "--delta-out", str(out), *more, check=check)

    def verify(self, directory: Path, base: Path, *more: str) -> subprocess.CompletedProcess:
        return self.cli("verify", str(directory), "--base", str(base), *more, check=False)


@pytest.fixture(scope="module")
def pair(fetched: Built, releases: dict[str, Release], fixture_signing_key,
         tmp_path_factory: pytest.TempPathFactory) -> Pair:
    """v1 (the session's signed release) and v2 built here (signed with the same key, as a
    release is before it ships), then the delta of v2 against v1."""
    base = tmp_path_factory.mktemp("delta")
    new = build_variant(fetched, base / "new", arches=("amd64",), change=variant(V2))
    sign.sign_checksums(new, fixture_signing_key[0])
    p = Pair(releases["v1"], new, base / "delta", base / "new.lock", "", fetched,
             fixture_signing_key[1])
    res = p.since(p.prev.directory, p.delta)
    p.output = res.stdout + res.stderr
    return p


def test_the_delta_rebuilds_every_archive_byte_for_byte(pair: Pair, tmp_path: Path):
    desc = pair.description()
    listed = {e.name for e in checksums.parse_file(pair.new / "sha256sum-amd64.txt")}
    archives = {f for f in listed if f.endswith((".tar.zst", ".tar.gz")) and "-images" in f}
    assert {a.file for a in desc.archives} == archives
    assert (desc.name, desc.version, desc.base_version) == ("rke2", V2, V1)
    assert desc.base_sums == hashlib.sha256(pair.prev.sums.read_bytes()).hexdigest()
    for archive in desc.archives:
        _rebuild(archive, pair.prev.directory, pair.delta, tmp_path / archive.file)
        assert filecmp.cmp(tmp_path / archive.file, pair.new / archive.file, shallow=False)
    # The delta directory: the new checksum file, its signature and every listed small file;
    # the delta archives and the description; no full archive.
    assert sorted(p.name for p in pair.delta.iterdir()) == sorted(
        (listed - archives) | {"sha256sum-amd64.txt", "sha256sum-amd64.txt.sig",
                               "provenance.linux-amd64.dsse.json", "delta.linux-amd64.txt"}
        | {artifacts.delta_archive_name(f) for f in archives})
    assert artifacts.discover_arches(pair.delta) == ["amd64"]


def test_only_the_runtime_and_metadata_are_carried(pair: Pair):
    """v1 and v2 share every image but the runtime (another version): the delta carries the
    runtime's layers v1 lacks (the HelmChart manifests', which carry the Kubernetes version; the
    runtime's component layers are v1's very blobs), the metadata and nothing else."""
    desc = pair.description()
    env = Release.read(pair.new, "amd64").env
    runtime_layers = set(env["RUNTIME_LAYERS"].split()) - set(pair.prev.env["RUNTIME_LAYERS"].split())
    assert runtime_layers == {env["RUNTIME_LAYERS"].split()[-1]}
    full = sum(a.full_size for a in desc.archives)
    carried = sum(a.delta_size for a in desc.archives)
    for archive in desc.archives:
        layers = {p.label for p in archive.pieces if p.source == d.DELTA
                  and p.label.startswith("sha256:") and p.length > 64 << 10}
        assert layers <= runtime_layers, archive.file  # every big carried frame: the runtime's
        assert archive.base_hex is not None
    runtime = sum(p.length for a in desc.archives for p in a.pieces
                  if p.source == d.DELTA and p.label in runtime_layers)
    assert carried - runtime < len(desc.archives) * (4 << 10), (carried, runtime)  # metadata only
    for archive in desc.archives:
        if not runtime_layers & {p.label for p in archive.pieces}:
            assert archive.delta_size < archive.full_size / 100, archive  # no runtime: ~nothing
    line = next(x for x in pair.output.splitlines() if x.startswith("  amd64: from "))
    assert line.startswith(f"  amd64: from {V1}: image archives {human(full)} full, "
                           f"{human(carried)} delta ("), line
    assert f"rke2-images.linux-amd64.tar.zst {human(desc.archive('rke2-images.linux-amd64.tar.zst').full_size)} -> " in line
    print(f"\nfull {full} bytes, delta {carried} bytes ({100 * carried / full:.1f}%)\n{line}")


def test_verify_base_passes_with_the_signature_that_travelled(pair: Pair):
    res = pair.verify(pair.delta, pair.prev.directory, "--public-key", str(pair.public_key),
                      "--require-signature")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert f"{pair.delta}: OK (" in out and "amd64: signature verified)" in out
    assert re.search(rf"note: amd64: 8 of 8 image archives rebuilt from "
                     rf"{re.escape(str(pair.prev.directory))} \({re.escape(V1)}\) and the delta, "
                     r"which carries [0-9.]+ (KiB|MiB) of their [0-9.]+ MiB", out), out
    assert f"{pair.delta}: OK (15 files;" in out  # 7 small files and the 8 archives rebuilt
    assert "amd64: the supervisor finds the runtime image in rke2-images-core.linux-amd64.tar.gz" in out


def test_sign_signs_a_delta_directory_like_a_release(pair: Pair, tmp_path: Path, fixture_signing_key):
    copy = tmp_path / "delta"
    shutil.copytree(pair.delta, copy)
    for sig in [copy / "sha256sum-amd64.txt.sig", copy / "provenance.linux-amd64.dsse.json"]:
        sig.unlink()
    env = {"BUILDER_SIGNING_PASSPHRASE": "fixture"}
    key = fixture_signing_key[1].with_name("release.key")
    pair.built.cli("sign", "--key", str(key), "--artifacts", str(copy), env=env)
    assert (copy / "sha256sum-amd64.txt.sig").read_bytes() == \
        (pair.new / "sha256sum-amd64.txt.sig").read_bytes()
    res = pair.verify(copy, pair.prev.directory, "--public-key", str(pair.public_key),
                      "--require-signature")
    assert res.returncode == 0, res.stdout + res.stderr


def test_verify_of_a_delta_without_base_says_to_give_it(pair: Pair):
    res = pair.cli("verify", str(pair.delta), check=False)
    assert res.returncode == 1
    assert (f"error: {pair.delta}: a delta directory (delta.linux-amd64.txt): its image archives "
            "are rebuilt from the release it updates") in res.stderr
    assert f"hint: give the base release's directory: verify {pair.delta} --base PREV" in res.stderr


def test_a_wrong_base_is_refused_naming_both(pair: Pair, releases: dict[str, Release]):
    res = pair.verify(pair.delta, releases["v2"].directory)
    assert res.returncode == 1
    want = hashlib.sha256(pair.prev.sums.read_bytes()).hexdigest()
    got = hashlib.sha256(releases["v2"].sums.read_bytes()).hexdigest()
    assert (f"delta.linux-amd64.txt: wrong base: this delta updates {V1} (sha256sum-amd64.txt "
            f"sha256 {want}); {releases['v2'].directory} holds {V2} (sha256sum-amd64.txt sha256 "
            f"{got}): give --base the directory of {V1}, or use the full release of {V2}"
            ) in res.stderr, res.stderr
    # The hint points at the problems' own advice, not at copying the delta again.
    assert "hint: do not install from this delta: each problem says what to do" in res.stderr


def _without_frame(path: Path, label: str, frames: list[tuple[str, int, int]] | None = None) -> None:
    """Rewrite a framed archive without the frame ``label`` (a blob gone; still a valid tar).
    ``frames``: (label, offset, end) of a delta archive (its description's pieces), else scanned."""
    if frames is None:
        frames = [(f.label, f.offset, f.end) for f in framed.scan_frames(path).frames]
    data = path.read_bytes()
    kept = b"".join(data[start:end] for name, start, end in frames if name != label)
    assert len(kept) < len(data)
    tamper.replace_bytes(path, kept)


def _copy_dir(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _owner(pair: Pair, layer: str) -> str:
    env = Release.read(pair.new, "amd64").env
    assert layer in env["RUNTIME_LAYERS"].split()
    return env["RUNTIME_IMAGE"]


def test_a_blob_removed_from_a_delta_archive_is_named(pair: Pair, tmp_path: Path):
    delta = _copy_dir(pair.delta, tmp_path / "delta")
    archive = pair.description().archive("rke2-images.linux-amd64.tar.zst")
    assert archive is not None
    # A carried layer: the runtime's manifests layer (its component layers are v1's very blobs).
    runtime = set(Release.read(pair.new, "amd64").env["RUNTIME_LAYERS"].split())
    layer = next(p.label for p in archive.pieces if p.source == d.DELTA and p.label in runtime)
    _without_frame(delta / archive.delta_file, layer,
                   [(p.label, p.offset, p.end) for p in archive.pieces if p.source == d.DELTA])
    res = pair.verify(delta, pair.prev.directory)
    assert res.returncode == 1
    assert ("rke2-images.linux-amd64.delta.tar.zst: sha256 ") in res.stderr
    assert "the description says " + archive.delta_hex in res.stderr
    assert (f"rke2-images.linux-amd64.tar.zst: blob {layer} (a layer of {_owner(pair, layer)}) is "
            f"in neither the delta nor {pair.prev.directory}/rke2-images.linux-amd64.tar.zst"
            ) in res.stderr, res.stderr


def test_a_base_with_a_changed_layer_names_the_blob(pair: Pair, tmp_path: Path):
    prev = _copy_dir(pair.prev.directory, tmp_path / "prev")
    archive = pair.description().archive("rke2-images.linux-amd64.tar.zst")
    assert archive is not None
    layer = max((p for p in archive.pieces if p.source == d.BASE), key=lambda p: p.length).label
    _without_frame(prev / archive.file, layer)
    res = pair.verify(pair.delta, prev)
    assert res.returncode == 1
    assert (f"{prev}/rke2-images.linux-amd64.tar.zst: sha256 ") in res.stderr
    assert ("not the base file the delta was made against (changed since it was installed?)"
            in res.stderr)
    assert re.search(rf"rke2-images.linux-amd64.tar.zst: blob {layer} \(a layer of [^)]+\) is in "
                     rf"neither the delta nor {re.escape(str(prev))}/rke2-images.linux-amd64"
                     r"\.tar\.zst: rke2-images.linux-amd64.tar.zst cannot be rebuilt", res.stderr), \
        res.stderr


def test_a_base_without_its_archive_is_refused(pair: Pair, tmp_path: Path):
    prev = _copy_dir(pair.prev.directory, tmp_path / "prev")
    (prev / "rke2-images.linux-amd64.tar.gz").unlink()
    res = pair.verify(pair.delta, prev)
    assert res.returncode == 1
    assert re.search(rf"{re.escape(str(prev))}/rke2-images.linux-amd64.tar.gz: missing: the delta "
                     r"takes \d+ pieces of rke2-images.linux-amd64.tar.gz from the base release",
                     res.stderr), res.stderr


def test_a_description_of_another_release_is_refused(pair: Pair, tmp_path: Path):
    delta = _copy_dir(pair.delta, tmp_path / "delta")
    shutil.copy(pair.prev.sums, delta / "sha256sum-amd64.txt")
    (delta / "sha256sum-amd64.txt.sig").unlink()
    res = pair.verify(delta, pair.prev.directory)
    assert res.returncode == 1
    assert ("delta.linux-amd64.txt: describes the release whose sha256sum-amd64.txt has sha256 "
            f"{pair.description().sums}; sha256sum-amd64.txt here has "
            f"{hashlib.sha256(pair.prev.sums.read_bytes()).hexdigest()}") in res.stderr, res.stderr


def test_pieces_that_each_match_but_rebuild_another_file_are_refused(pair: Pair, tmp_path: Path):
    """A coherent forgery: two base pieces swapped, each still hashing to its line; the rebuilt
    archive is checked as a whole against the signed checksum file."""
    delta = _copy_dir(pair.delta, tmp_path / "delta")
    desc = pair.description()
    archive = desc.archive("rke2-images.linux-amd64.tar.zst")
    assert archive is not None
    first, second = [i for i, p in enumerate(archive.pieces) if p.source == d.BASE][:2]
    pieces = list(archive.pieces)
    pieces[first], pieces[second] = pieces[second], pieces[first]
    forged = dataclasses.replace(desc, archives=tuple(
        dataclasses.replace(a, pieces=tuple(pieces)) if a is archive else a
        for a in desc.archives))
    (delta / "delta.linux-amd64.txt").write_bytes(forged.render())
    res = pair.verify(delta, pair.prev.directory)
    assert res.returncode == 1
    assert re.search(r"rke2-images.linux-amd64.tar.zst: the pieces rebuild it with sha256 "
                     rf"[0-9a-f]{{64}}, its checksum file lists {archive.full_hex}", res.stderr), \
        res.stderr


def test_prev_with_only_checksums_and_lists_gives_the_same_delta(pair: Pair, tmp_path: Path):
    """The frames of PREV's archives come from the store's memo (the build remembered them)."""
    prev = tmp_path / "prev"
    prev.mkdir()
    for f in pair.prev.directory.iterdir():  # checksums, signature, lists, provenance statement
        if f.name.endswith((".txt", ".sig", ".json")):
            shutil.copy(f, prev / f.name)
    assert not list(prev.glob("*.tar.*"))
    out = tmp_path / "delta"
    res = pair.since(prev, out, "--json")
    for f in pair.delta.iterdir():
        assert filecmp.cmp(f, out / f.name, shallow=False), f.name
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in pair.delta.iterdir())
    summary = json.loads(res.stdout)["delta"]["arches"][0]
    desc = pair.description()
    assert (summary["arch"], summary["base_version"]) == ("amd64", V1)
    assert summary["full_bytes"] == sum(a.full_size for a in desc.archives)
    assert summary["delta_bytes"] == sum(a.delta_size for a in desc.archives)
    assert all(a["carried_whole"] is None for a in summary["archives"])


def test_an_unframed_base_archive_is_carried_whole(pair: Pair, tmp_path: Path):
    """A base archive from before framing (one zstd stream) is carried whole, said in a line."""
    prev = _copy_dir(pair.prev.directory, tmp_path / "prev")
    file = "rke2-images.linux-amd64.tar.zst"
    plain = zstandard.ZstdDecompressor().stream_reader((prev / file).read_bytes(),
                                                       read_across_frames=True).read()
    tamper.replace_bytes(prev / file, zstandard.ZstdCompressor().compress(plain))
    tamper.resum(Release.read(prev, "amd64"))  # the base as it was shipped then (unsigned)
    out = tmp_path / "delta"
    res = pair.since(prev, out)
    assert (f"    {file}: carried whole ({prev.name}/{file} is not a framed archive (built before "
            "delta support))") in res.stdout + res.stderr
    desc = d.parse((out / "delta.linux-amd64.txt").read_bytes(), "x")
    whole = desc.archive(file)
    assert whole is not None and whole.base_hex is None and whole.delta_size == whole.full_size
    res = pair.verify(out, prev)
    assert res.returncode == 0, res.stdout + res.stderr


def test_since_refuses_a_base_without_the_arch(pair: Pair, releases: dict[str, Release],
                                              tmp_path: Path):
    res = pair.since(releases["arm64"].directory, tmp_path / "delta", check=False)
    assert res.returncode == 1
    assert (f"error: --since {releases['arm64'].directory}: no sha256sum-amd64.txt: it holds no "
            "amd64 release to make a delta against") in res.stderr
    assert not (tmp_path / "delta").exists()


def test_the_realistic_update_carries_the_changed_layer_the_runtime_and_metadata(
        update_pair, tmp_path: Path):
    """tests/plugins/releases.py update_pair: one image's top layer and one runtime binary
    change. The delta carries that layer, the runtime's layer and the metadata; the changed
    image's lower layers and every other image come from the base; verify --base passes."""
    from builder.assemble.delta import write_delta
    from builder.store import Store

    base, patch = update_pair.base["amd64"], update_pair.patch["amd64"]
    out = tmp_path / "delta"
    report = write_delta(patch.directory, base.directory, out, ["amd64"],
                         Store(update_pair.store), patch.name, patch.version)
    old_top, new_top = update_pair.changed_layer("amd64")
    lower = set(update_pair.layers["amd64"][1][:-1])
    # The runtime's layers the base lacks (bin/kubectl's and the manifests'): every other
    # runtime layer is the base's blob (tests/test_runtime_layers.py).
    runtime = set(patch.env["RUNTIME_LAYERS"].split()) - set(base.env["RUNTIME_LAYERS"].split())
    desc = d.parse((out / "delta.linux-amd64.txt").read_bytes(), "delta.linux-amd64.txt")
    group_files = set(artifacts.image_files(patch.group(update_pair.group))[:2])
    for archive in desc.archives:
        with open(out / archive.delta_file, "rb") as fh:
            owners = delta_check.layer_owners(out / archive.delta_file, fh)
        carried = {p.label for p in archive.pieces if p.source == d.DELTA and p.label in owners}
        held = {p.label for p in archive.pieces} & set(owners)
        assert carried == held & ({new_top} | runtime), archive.file
        if archive.file in group_files:
            assert new_top in carried and lower <= {p.label for p in archive.pieces
                                                    if p.source == d.BASE}
    figures = report.arches[0]
    print(f"\n{report.summary()}")
    assert figures.delta < figures.full
    result = delta_check.verify_delta(out, base.directory, public_key=patch.public_key,
                            require_signature=True)
    assert result.passed, result.summary()


def test_a_damaged_description_is_named_without_noise(pair: Pair, tmp_path: Path):
    """The description's error names its line; the archives it would rebuild are not reported
    missing and the delta files not reported unlisted on top of it."""
    delta = _copy_dir(pair.delta, tmp_path / "delta")
    with open(delta / "delta.linux-amd64.txt", "ab") as fh:
        fh.write(b"piece delta 0 1 " + b"0" * 64 + b" head\n")
    lines = (delta / "delta.linux-amd64.txt").read_text().count("\n")
    res = pair.verify(delta, pair.prev.directory)
    assert res.returncode == 1
    assert (f"verify {delta}: 1 problem(s):\n  delta.linux-amd64.txt: line {lines}: expected a line "
            "starting with `archive`, got 'piece delta 0 1 ") in res.stderr, res.stderr
