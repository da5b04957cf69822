"""`lock` writes pins into the file as people wrote it, through the real loopback mirror.

A hand-written lock (comments, its own key order, flow style, indented sequences, quotes) is
resolved against nginx and the registry: afterwards it is byte for byte the same text with only
the pin values filled in. A second `lock` prints "unchanged" and writes nothing (bytes and mtime
kept). A canonical copy of the same lock resolves to the same pins.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from builder.errors import LockError
from builder.lock import lockfile
from tests.rig import loopback
from tests.test_lock_schema import schema_errors

REPO = Path(__file__).resolve().parents[1]

# {name} fields are filled from the loopback rig; the pins start as `null` and `lock` fills them.
# Comment lines sit right below pin lines on purpose: the inserted lines must go above them.
TEMPLATE = """\
# A lock written by hand: comments, our own key order, flow style.
schema: 1
release:
  version: {version}   # version first
  name: rke2
  layers: registry   # the layer mode, written out
  groups:
    # canal's archive recompresses its layers
    canal: {{layers: zstd}}
arches: [amd64, arm64]   # a flow list
mirrors:
  files:
    - {{prefix: "{upstream}", endpoints: ["{nginx}/"], fallback: false}}
  registries:
    docker.io:
      endpoints: [{registry}]
      fallback: false
images:
  # busybox: block style, groups before ref
  - groups: [core]
    ref: docker.io/rancher/mirrored-library-busybox:1.36.1   # the core image
    digest: {busybox_digest}{busybox_platforms}
    # socat comes next, in flow style
  - {{ref: docker.io/rancher/fixture-socat:1.7.4, groups: [canal]{socat_pins}}}
components:
  kubelet:
    arches:
      arm64:
        url: "{arm64_url}"   # quoted, as written
        sha256: {arm64_sha256}{arm64_size}
      # amd64 in flow style
      amd64: {{url: "{amd64_url}", sha256: {amd64_sha256}{amd64_size}}}
    version: fixture   # after arches
# the end
"""


def render(lb: loopback.Loopback, lock: lockfile.Lock | None) -> str:
    """The hand-written lock, with ``lock``'s pins in the places `lock` is expected to put them."""
    kubelet = lb.lock.components["kubelet"].arches
    values = {"version": lb.lock.release.version, "upstream": lb.lock.mirrors.files[0].prefix,
              "nginx": lb.files.url.rstrip("/"), "registry": lb.registry.url,
              "busybox_digest": "null", "busybox_platforms": "", "socat_pins": ""}
    for arch in ("amd64", "arm64"):
        values.update({f"{arch}_url": kubelet[arch].url, f"{arch}_sha256": "null", f"{arch}_size": ""})
    if lock is not None:
        busybox, socat = lock.images
        values["busybox_digest"] = busybox.digest
        values["busybox_platforms"] = "".join(f"\n      {a}: {d}" for a, d in busybox.platforms.items())
        values["busybox_platforms"] = "\n    platforms:" + values["busybox_platforms"]
        values["socat_pins"] = (f", digest: {socat.digest}, platforms: {{"
                                + ", ".join(f"{a}: {d}" for a, d in socat.platforms.items()) + "}")
        for arch in ("amd64", "arm64"):
            art = lock.components["kubelet"].arches[arch]
            values[f"{arch}_sha256"] = art.sha256
            values[f"{arch}_size"] = (f"\n        size: {art.size}" if arch == "arm64"
                                      else f", size: {art.size}")
    return TEMPLATE.format(**values)


@pytest.fixture(scope="module")
def lb(tmp_path_factory):
    with loopback.running(tmp_path_factory.mktemp("roundtrip"), resolved=False) as rig:
        yield rig


def run_lock(lb: loopback.Loopback, path: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "builder", "--lock", str(path), "--store", str(path.parent / "store"),
            "lock"]
    res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, BUILDER_MIRRORS=str(lb.mirrors_path)))
    assert res.returncode == 0, res.stderr
    return res


def test_lock_keeps_comments_order_and_flow_style(lb, tmp_path):
    path = tmp_path / "images.lock"
    path.write_text(render(lb, None))
    assert any(lockfile.load(path).unresolved(("amd64", "arm64")).values())

    first = run_lock(lb, path)
    assert f"{path}: updated" in first.stderr
    resolved = lockfile.load(path)
    assert not any(resolved.unresolved(("amd64", "arm64")).values())
    for arch, art in lb.lock.components["kubelet"].arches.items():
        got = resolved.components["kubelet"].arches[arch]
        assert (got.sha256, got.size) == (art.sha256, art.size), arch
    # Every byte but the pins is as written (layer modes included).
    assert path.read_text() == render(lb, resolved)
    assert (resolved.layer_mode(None), resolved.layer_mode("canal")) == ("registry", "zstd")
    assert schema_errors(path.read_text()) == []

    # Nothing new: "unchanged", and no byte written (the mtime stays).
    before = path.stat()
    second = run_lock(lb, path)
    assert f"{path}: unchanged" in second.stderr
    after = path.stat()
    assert (after.st_mtime_ns, after.st_ino, after.st_size) == (before.st_mtime_ns, before.st_ino,
                                                               before.st_size)
    assert path.read_text() == render(lb, resolved)

    # The same lock in canonical form resolves to the same pins: the layout changes nothing.
    twin = tmp_path / "twin" / "images.lock"
    twin.parent.mkdir()
    lockfile.save(lockfile.parse(render(lb, None)), twin)
    run_lock(lb, twin)
    assert lockfile.update_text(path.read_text(), lockfile.load(twin)) == path.read_text()


def test_loopback_lock_is_schema_valid_before_and_after_lock(lb, tmp_path):
    """The demo's lock (tests/rig/loopback.py writes it as `make demo` does), unresolved and resolved."""
    path = tmp_path / "images.lock"
    path.write_bytes(lb.lock_path.read_bytes())
    assert schema_errors(path.read_text()) == []
    run_lock(lb, path)
    assert not any(lockfile.load(path).unresolved(lb.lock.arches).values())
    assert schema_errors(path.read_text()) == []


def test_a_lock_differing_in_more_than_pins_is_not_written(lb, tmp_path):
    """`write_pins` refuses to carry anything but pins into the file (nothing written)."""
    path = tmp_path / "images.lock"
    path.write_text(render(lb, None))
    before = path.stat()
    other = lockfile.load(path)
    changed = dataclasses.replace(other, release=dataclasses.replace(other.release, version="v9"))
    with pytest.raises(LockError, match="differs from the file in more than its pins"):
        lockfile.write_pins(changed, path)
    assert path.stat().st_mtime_ns == before.st_mtime_ns
