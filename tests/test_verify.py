"""`python -m builder verify` against a real build (tests/plugins/release.py builds it once).

The core promise: a single flipped byte in any artifact fails verify and the report names the
file; every failure is listed, not only the first.
"""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
from pathlib import Path

import pytest

from builder import cli
from builder.trust import checksums, provenance, sign
from builder.trust.verify import data_key, verify_release

ARCH = "amd64"


def run_verify(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(["verify", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(private, public, another public) Ed25519 keys."""
    d = tmp_path_factory.mktemp("keys")
    ours = sign.generate_key(d / "k.pem", allow_unencrypted=True)
    other = sign.generate_key(d / "other.pem", allow_unencrypted=True)
    return ours.private, ours.public, other.public


def signed(directory: Path, private: Path) -> Path:
    sign.sign_checksums(directory, sign.load_private_key(private))
    return directory


def flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def test_built_release_verifies(release_dir: Path, built_release, keys, capsys) -> None:
    signed(release_dir, keys[0])
    code, out = run_verify(capsys, str(release_dir), "--public-key", str(keys[1]),
                           "--require-signature")
    assert code == 0, out
    assert "signature verified" in out
    report = verify_release(release_dir)
    assert report.passed and report.arches == list(built_release.arches)


KINDS = {
    "zst archive": f"rke2-images-core.linux-{ARCH}.tar.zst",
    "gz archive": f"rke2-images-core.linux-{ARCH}.tar.gz",
    "all-in-one zst": f"rke2-images.linux-{ARCH}.tar.zst",
    "image list": f"rke2-images-core.linux-{ARCH}.txt",
    "union list": f"rke2-images-all.linux-{ARCH}.txt",
    "bundle": f"rke2.linux-{ARCH}.tar.gz",
    "checksum file": f"sha256sum-{ARCH}.txt",
    "signature": f"sha256sum-{ARCH}.txt.sig",
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_one_flipped_byte_fails_and_names_the_file(kind: str, release_dir: Path, keys,
                                                   capsys) -> None:
    signed(release_dir, keys[0])
    name = KINDS[kind]
    flip(release_dir / name)
    code, out = run_verify(capsys, str(release_dir), "--public-key", str(keys[1]), "--arch", ARCH)
    assert code != 0
    problems = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    # A signature that no longer verifies names both the checksum file and its .sig.
    assert any(p.startswith(f"{name}:") or f" {name} " in p for p in problems), out


def test_flip_in_archive_is_named_by_checksum_and_content(release_dir: Path) -> None:
    name = KINDS["zst archive"]
    flip(release_dir / name, 0.7)
    checksums.write_for_arch(release_dir, ARCH, [release_dir / e.name for e in
                                                  checksums.parse_file(release_dir / f"sha256sum-{ARCH}.txt")])
    # Re-summed: the checksum step passes, the archive's own blob digests still catch it.
    report = verify_release(release_dir, [ARCH])
    assert not report.passed
    by_file = {p.file: p.message for p in report.problems}
    assert sorted(by_file) == sorted([name, f"provenance.linux-{ARCH}.json"])
    assert "archive check failed" in by_file[name]
    # The provenance statement still names the old digest: it catches the re-summed file too.
    assert by_file[f"provenance.linux-{ARCH}.json"].startswith(f"subject {name}: the statement")


def test_every_failure_is_listed(release_dir: Path) -> None:
    flip(release_dir / KINDS["gz archive"])
    flip(release_dir / KINDS["image list"])
    (release_dir / f"rke2-images-extra.linux-{ARCH}.txt").write_text("x\n")
    (release_dir / KINDS["union list"]).unlink()
    report = verify_release(release_dir, [ARCH])
    files = {p.file for p in report.problems}
    assert {KINDS["gz archive"], KINDS["image list"], KINDS["union list"],
            f"rke2-images-extra.linux-{ARCH}.txt"} <= files, report.summary()
    assert any("not listed" in p.message for p in report.problems)


def test_wrong_key_and_signature_of_another_file(release_dir: Path, keys) -> None:
    signed(release_dir, keys[0])
    report = verify_release(release_dir, [ARCH], public_key=keys[2])
    fp = provenance.fingerprint(sign.load_public_key(keys[2]))
    assert [str(p) for p in report.problems] == [
        f"sha256sum-{ARCH}.txt: signature sha256sum-{ARCH}.txt.sig does not verify with the "
        "given public key (the file or signature changed, or another key signed it)",
        # The provenance envelope, signed by the same (other) key, is refused as well.
        f"provenance.linux-{ARCH}.dsse.json: no signature verifies with the given public key "
        f"({fp}): changed, or signed by another key"]
    shutil.copy(release_dir / "sha256sum-arm64.txt.sig", release_dir / f"sha256sum-{ARCH}.txt.sig")
    report = verify_release(release_dir, [ARCH], public_key=keys[1])
    assert [p.file for p in report.problems] == [f"sha256sum-{ARCH}.txt"]


def test_missing_or_required_signature(release_dir: Path, keys, capsys) -> None:
    code, out = run_verify(capsys, str(release_dir), "--require-signature", "--arch", ARCH)
    assert code != 0 and "no public key was given" in out
    code, out = run_verify(capsys, str(release_dir), "--public-key", str(keys[1]), "--arch", ARCH)
    assert code != 0 and f"sha256sum-{ARCH}.txt.sig: missing" in out


def _rewrite_bundle(path: Path, edit) -> None:
    """Rebuild the bundle with release.env edited (a builder bug), keeping everything else."""
    src = tarfile.open(path, "r:gz")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as out:
        for info in src.getmembers():
            data = src.extractfile(info).read() if info.isfile() else None
            if info.name.endswith("release.env"):
                data = edit(data.decode()).encode()
                info.size = len(data)
            out.addfile(info, io.BytesIO(data) if data is not None else None)
    path.write_bytes(gzip.compress(buf.getvalue(), mtime=0))


def _resum(directory: Path) -> None:
    sums = directory / f"sha256sum-{ARCH}.txt"
    checksums.write_for_arch(directory, ARCH, [directory / e.name for e in checksums.parse_file(sums)])


def test_release_env_must_match_the_archives(release_dir: Path) -> None:
    bundle = release_dir / KINDS["bundle"]

    def edit(text: str) -> str:
        lines = []
        for line in text.splitlines():
            key = line.split("=", 1)[0]
            if key == "DATA_KEY":
                line = "DATA_KEY='v0-000000000000'"
            elif key == "RUNTIME_LAYERS":
                line = "RUNTIME_LAYERS='sha256:" + "0" * 64 + "'"
            elif key == "RELEASE_ARCH":
                line = "RELEASE_ARCH='arm64'"
            lines.append(line)
        return "\n".join(lines) + "\n"

    _rewrite_bundle(bundle, edit)
    _resum(release_dir)
    report = verify_release(release_dir, [ARCH])
    messages = [p.message for p in report.problems if p.file == bundle.name]
    assert any("DATA_KEY" in m for m in messages), report.summary()
    assert any("RUNTIME_LAYERS" in m for m in messages)
    assert any("RELEASE_ARCH is 'arm64'" in m for m in messages)


def test_archive_of_the_wrong_arch(release_dir: Path) -> None:
    # A builder bug packing arm64 images into the amd64 archive, checksummed as if fine.
    for suffix in (".tar.zst", ".tar.gz", ".txt"):
        shutil.copy(release_dir / f"rke2-images-core.linux-arm64{suffix}",
                    release_dir / f"rke2-images-core.linux-{ARCH}{suffix}")
    _resum(release_dir)
    report = verify_release(release_dir, [ARCH])
    text = report.summary()
    assert "platform linux/arm64/v8, expected linux/amd64" in text
    assert "RUNTIME_MANIFEST is" in text  # the runtime image in it is not the one release.env names


def test_data_key_formula() -> None:
    ref = "docker.io/rancher/rke2-runtime:v1.32.13-rke2r1"
    assert data_key(ref).startswith("v1.32.13-rke2r1-") and len(data_key(ref)) == len(
        "v1.32.13-rke2r1-") + 12


def test_empty_directory_fails(tmp_path: Path, capsys) -> None:
    code, out = run_verify(capsys, str(tmp_path))
    assert code != 0 and "nothing to verify" in out
