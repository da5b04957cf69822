"""The loopback file mirror's content and a lock describing it.

Nothing upstream is reachable from here, so tests and the demo build a release from real Debian
binaries laid out the way upstream publishes them: a containerd release tarball (``bin/...``),
raw ``runc.ARCH`` files with a ``runc.sha256sum``, the socat ``.deb`` itself, and stand-ins for
what Debian does not package (kubelet, kubectl, crictl: copies of busybox-static, which is an ELF
of the right arch; the supervisor: a shell script), and real small Helm charts (tests/rig/charts.py)
where upstream's chart repository keeps them. Their URLs live under a reserved, never
resolvable prefix (``https://fixtures.invalid/``) that a mirror maps onto the loopback file server,
exactly as an operator maps an upstream prefix onto an internal proxy.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from builder.lock import lockfile as L
from tests.rig import charts as fixture_charts
from tests.rig import payloads

UPSTREAM = "https://fixtures.invalid/"
VERSION = "v1.32.13+fixture1"
MTIME = 1700000000


@dataclass(frozen=True)
class MirrorFile:
    relpath: str  # under the mirror root (and under UPSTREAM)
    sha256: str
    size: int

    @property
    def url(self) -> str:
        return UPSTREAM + self.relpath


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _targz(out: Path, members: dict[str, Path]) -> None:
    """A deterministic tar.gz holding ``members`` (name -> file), plus their directories."""
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({str(Path(n).parent) for n in members if "/" in n})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tar.addfile(info)
        for name in sorted(members):
            data = members[name].read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o755, MTIME
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(out)


def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists() or dest.stat().st_size != src.stat().st_size:
        shutil.copyfile(src, dest)


# The containerd tarball carries, under bin/, every binary the payloads take from Debian's
# containerd package (as upstream's release tarball does).
CONTAINERD_TAR = tuple(n for n, (package, _) in payloads.BINARIES.items() if package == "containerd")

SUPERVISOR = """#!/bin/sh
# Stand-in for the distribution's supervisor binary (fixture release; not the real one).
echo "fixture supervisor {version} ($1)"
"""

# An extra file placed in /charts as a component (`runtime.charts`), beside the HelmChart
# manifests `build` makes from the real charts of tests/rig/charts.py (the lock's `charts:`).
CHART = """apiVersion: helm.cattle.io/v1
kind: HelmChart
metadata:
  name: fixture-chart
  namespace: kube-system
spec:
  chart: fixture
  version: 0.0.1
"""


def build(root: Path, arches: tuple[str, ...] = payloads.ARCHES) -> dict[str, dict[str, MirrorFile]]:
    """Lay the fixture files out under ``root``; returns {component: {arch: MirrorFile}}."""
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, MirrorFile]] = {}

    def add(component: str, arch: str, rel: str) -> None:
        files.setdefault(component, {})[arch] = MirrorFile(rel, _sha256(root / rel), (root / rel).stat().st_size)

    runc_sums = []
    for arch in arches:
        bb = payloads.binary("busybox", arch)
        ctd_rel = f"containerd/containerd-fixture-linux-{arch}.tar.gz"
        if not (root / ctd_rel).exists():
            (root / ctd_rel).parent.mkdir(parents=True, exist_ok=True)
            _targz(root / ctd_rel, {f"bin/{n}": payloads.binary(n, arch) for n in CONTAINERD_TAR})
        (root / f"{ctd_rel}.sha256sum").write_text(f"{_sha256(root / ctd_rel)}  {Path(ctd_rel).name}\n")
        for n in CONTAINERD_TAR:
            add(n, arch, ctd_rel)

        _copy(payloads.binary("runc", arch), root / f"runc/runc.{arch}")
        runc_sums.append(f"{_sha256(root / f'runc/runc.{arch}')}  runc.{arch}")
        add("runc", arch, f"runc/runc.{arch}")

        deb = payloads.deb("socat", arch)
        _copy(deb.path, root / f"socat/{deb.filename}")
        add("socat", arch, f"socat/{deb.filename}")

        for n in ("kubelet", "kubectl"):
            _copy(bb, root / f"standins/{n}.{arch}")
            add(n, arch, f"standins/{n}.{arch}")
        crictl_rel = f"standins/crictl-linux-{arch}.tar.gz"
        if not (root / crictl_rel).exists():
            _targz(root / crictl_rel, {"crictl": bb})
        add("crictl", arch, crictl_rel)

        sup = root / f"supervisor/rke2.linux-{arch}"
        sup.parent.mkdir(parents=True, exist_ok=True)
        sup.write_text(SUPERVISOR.format(version=VERSION))
        add("rke2", arch, f"supervisor/rke2.linux-{arch}")
    (root / "runc/runc.sha256sum").write_text("\n".join(runc_sums) + "\n")
    chart = root / "charts/fixture-chart.yaml"
    chart.parent.mkdir(parents=True, exist_ok=True)
    chart.write_text(CHART)
    for arch in arches:
        add("fixture-chart", arch, "charts/fixture-chart.yaml")
    fixture_charts.build(root)  # real Helm charts, pinned under the lock's `charts:`
    return files


# Where each component sits inside the file the mirror serves (None: the file is the binary).
MEMBERS = {
    **{n: ("tar.gz", f"bin/{n}") for n in CONTAINERD_TAR},
    "crictl": ("tar.gz", "crictl"),
    "socat": ("deb", payloads.BINARIES["socat"][1]),
}
RUNTIME_BIN = ("containerd", "containerd-shim", "containerd-shim-runc-v1", "containerd-shim-runc-v2",
               "runc", "kubelet", "ctr", "crictl", "kubectl", "socat")


def lock_for(files: dict[str, dict[str, MirrorFile]], mirror_url: str,
             images: tuple[L.ImagePin, ...] = (), registry_mirrors: tuple[L.RegistryMirror, ...] = (),
             arches: tuple[str, ...] = payloads.ARCHES,
             name: str = "rke2", version: str = VERSION, charts_resolved: bool = True) -> L.Lock:
    comps = {}
    for cname, per_arch in files.items():
        fmt, member = MEMBERS.get(cname, ("raw", None))
        arts = {a: L.FileArtifact(url=f.url, sha256=f.sha256, size=f.size) for a, f in per_arch.items() if a in arches}
        mode = 0o644 if cname == "fixture-chart" else 0o755
        target = "fixture-chart.yaml" if cname == "fixture-chart" else cname
        comps[cname] = L.Component(cname, "fixture", fmt, member, target, mode, arts,
                                   source="tests.rig.mirror: computed from Debian packages on this host")
    mirrors = L.Mirrors(
        files=(L.FileMirror(UPSTREAM, (mirror_url.rstrip("/") + "/",), fallback=False),),
        registries=registry_mirrors,  # plain HTTP is the host's to allow: see loopback.running
    )
    return L.Lock(
        L.Release(name, version, None, None, ("core", "canal"), "rke2"),
        arches, comps, images,
        L.Runtime("docker.io/rancher/rke2-runtime", ("core",), RUNTIME_BIN, ("fixture-chart",)),
        mirrors,
        charts=fixture_charts.lock_entries(UPSTREAM, charts_resolved),
    )
