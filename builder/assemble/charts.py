"""The runtime image's /charts: one HelmChart manifest per chart of the lock.

What upstream's ``charts/build-chart.sh`` does at the release tag, done here from the store:

- a chart at version 0.0.0 (removed by the release) becomes ``# NAME has been removed``;
- otherwise the chart ``.tgz`` is read from the store (re-hashed while read: a blob changed on
  disk since it was verified stops the build), its ``NAME/Chart.yaml`` gets
  ``kubeVersion: ">= vX.Y.Z"`` (the release's Kubernetes version) and the annotation
  ``fleet.cattle.io/bundle-id: rke2``, everything else of Chart.yaml kept (parsed and dumped
  again with ruamel.yaml, comments and key order included), and the chart is packed again;
- the manifest is a ``helm.cattle.io/v1`` HelmChart named after the chart, in its namespace,
  annotated with the chart's URL and ``rke2.cattle.io/inject-cluster-config: "true"``, with the
  bootstrap flag and the packed chart base64 in ``spec.chartContent``.

Unlike upstream's ``tar --delete``/``tar -r`` (member order changed, its own mtimes and gzip
header), the chart is packed again deterministically: sorted members, every mtime
SOURCE_DATE_EPOCH, owner 0/0 without names, modes 0644/0755, gzip with mtime 0 and no file name.
The same lock and epoch always give the same bytes.

A chart is held in memory while it is packed (charts are kilobytes to a few MiB); every size is
bounded, since a chart's bytes are only as trustworthy as the lock that pins them.
"""

from __future__ import annotations

import base64
import gzip
import io
import posixpath
import tarfile
import zlib
from dataclasses import dataclass
from typing import Any

import yaml

from builder.errors import BuilderError, LockError
from builder.lock.lockfile import KUBE_VERSION, Chart, Lock
from builder.oci.compress import gzip_writer
from builder.oci.layer import FileEntry, write_tar
from builder.store import Store

FOLDER = "charts"
BUNDLE_ID_ANNOTATION = "fleet.cattle.io/bundle-id"
BUNDLE_ID = "rke2"  # upstream's literal: Rancher's fleet knows the distribution's charts by it
CHART_URL_ANNOTATION = "helm.cattle.io/chart-url"
INJECT_ANNOTATION = "rke2.cattle.io/inject-cluster-config"
MAX_CHART = 64 << 20  # the .tgz; upstream's largest chart is well under 1 MiB
MAX_UNPACKED = 256 << 20  # the tar inside it: a gzip bomb stops here
MAX_MEMBERS = 20_000
MAX_CHART_YAML = 1 << 20
NO_CHARTS_HINT = ("list the release's charts under `charts:` (see docs/images-lock.md), or say "
                  "why this runtime image ships none with `runtime.no_charts: <reason>`")


@dataclass(frozen=True)
class ChartManifest:
    chart: Chart
    path: str  # charts/NAME.yaml inside the runtime image
    data: bytes


def kube_version(lock: Lock) -> str:
    """The Kubernetes version charts are constrained to: v1.32.13 for v1.32.13+rke2r1."""
    found = KUBE_VERSION.match(lock.release.version)
    if found is None:  # the lock's loader refuses such a version when it lists charts
        raise LockError(f"{lock.source}: release.version: no Kubernetes version (vX.Y.Z) at the "
                        f"start of {lock.release.version!r} to constrain the charts to")
    return found.group(0)


def require_charts(lock: Lock) -> None:
    """A runtime image without charts brings up no CNI, CoreDNS, ...: only when the lock says so."""
    assert lock.runtime is not None
    shipped = [c for c in lock.charts.values() if not c.removed]
    if shipped or lock.runtime.charts or lock.runtime.no_charts:
        return
    listed = f" (only removed ones: {', '.join(lock.charts)})" if lock.charts else ""
    raise LockError(
        f"{lock.source}: charts: the runtime image would have no charts{listed}; a server "
        "copies the HelmChart manifests of /charts (CNI, CoreDNS, ingress, ...) into its "
        "manifests at start, and without them the cluster does not come up", NO_CHARTS_HINT)


def manifests(lock: Lock, store: Store, epoch: int) -> list[ChartManifest]:
    """Every chart's manifest, in the lock's order."""
    if not lock.charts:
        return []
    kube = kube_version(lock)
    return [ChartManifest(c, f"{FOLDER}/{c.name}.yaml", manifest(store, c, kube, epoch))
            for c in lock.charts.values()]


def manifest(store: Store, chart: Chart, kube: str, epoch: int) -> bytes:
    if chart.removed:
        return f"# {chart.name} has been removed\n".encode()
    packed = repack(chart, read_chart(store, chart), kube, epoch)
    return helm_chart(chart, packed)


def read_chart(store: Store, chart: Chart) -> bytes:
    """The chart's .tgz from the store, hashed while read against its pin."""
    digest = chart.artifact.digest
    if digest is None:
        raise LockError(f"images.lock: {chart.what}.sha256 is unresolved",
                        "run `python -m builder lock` on a connected build host")
    if not store.has(digest):
        raise BuilderError(f"{chart.what}: {chart.url} is not in the store",
                           "run `python -m builder fetch` first")
    if store.size(digest) > MAX_CHART:
        raise BuilderError(f"{chart.what}: the chart is {store.size(digest)} bytes, more than "
                           f"the {MAX_CHART} a chart may have", "check the chart's URL and pin")
    with store.open_verified(digest, chart.what) as reader:
        data = reader.read()
        reader.finish()  # raises unless the bytes are the pinned chart
    return data


def _fail(chart: Chart, problem: str) -> BuilderError:
    return BuilderError(f"{chart.what}: {chart.url}: {problem}",
                        "pin the chart .tgz that `helm package` makes for this name and version")


def _unpack(chart: Chart, tgz: bytes) -> bytes:
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(tgz)) as gz:
            tar = gz.read(MAX_UNPACKED + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise _fail(chart, f"not a gzip file ({exc})") from None
    if len(tar) > MAX_UNPACKED:
        raise _fail(chart, f"unpacks to more than {MAX_UNPACKED} bytes")
    return tar


def _members(chart: Chart, tar_bytes: bytes) -> dict[str, tuple[bytes, int]]:
    """path -> (content, mode) of every file of the chart; directories are implied."""
    files: dict[str, tuple[bytes, int]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
            for count, member in enumerate(tar, 1):
                if count > MAX_MEMBERS:
                    raise _fail(chart, f"more than {MAX_MEMBERS} members")
                path = posixpath.normpath(member.name)
                if not path.startswith(f"{chart.name}/") or ".." in path.split("/"):
                    raise _fail(chart, f"member {member.name!r} is not under {chart.name}/")
                if member.isdir():
                    continue
                if not member.isfile():
                    raise _fail(chart, f"member {member.name!r} is not a regular file")
                if path in files:
                    raise _fail(chart, f"member {member.name!r} appears twice")
                fh = tar.extractfile(member)
                assert fh is not None
                files[path] = (fh.read(), 0o755 if member.mode & 0o111 else 0o644)
    except tarfile.TarError as exc:
        raise _fail(chart, f"not a tar archive inside the gzip ({exc})") from None
    return files


def _check_identity(chart: Chart, meta: Any) -> None:
    if not isinstance(meta, dict):
        raise _fail(chart, f"{chart.name}/Chart.yaml is not a mapping")
    for key, want in (("name", chart.name), ("version", chart.version)):
        if str(meta.get(key)) != want:
            raise _fail(chart, f"{chart.name}/Chart.yaml says {key} {str(meta.get(key))[:80]!r}, "
                               f"the lock pins {want!r}")


def patch_chart_yaml(chart: Chart, text: bytes, kube: str) -> bytes:
    """Chart.yaml with the kubeVersion constraint and the bundle-id annotation, the rest kept."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap
    from ruamel.yaml.error import YAMLError

    if len(text) > MAX_CHART_YAML:
        raise _fail(chart, f"{chart.name}/Chart.yaml is larger than {MAX_CHART_YAML} bytes")
    rt = YAML()  # round trip: comments, key order and quoting stay
    rt.width = 1 << 30
    try:
        meta = rt.load(text)
    except YAMLError as exc:
        raise _fail(chart, f"{chart.name}/Chart.yaml is not valid YAML: {str(exc)[:200]}") from None
    _check_identity(chart, meta)
    meta["kubeVersion"] = f">= {kube}"
    if meta.get("annotations") is None:
        meta["annotations"] = CommentedMap()
    if not isinstance(meta["annotations"], dict):
        raise _fail(chart, f"{chart.name}/Chart.yaml: annotations is not a mapping")
    meta["annotations"][BUNDLE_ID_ANNOTATION] = BUNDLE_ID
    out = io.StringIO()
    rt.dump(meta, out)
    return out.getvalue().encode()


def repack(chart: Chart, tgz: bytes, kube: str, epoch: int) -> bytes:
    """The chart with its patched Chart.yaml, packed deterministically (see the module text)."""
    files = _members(chart, _unpack(chart, tgz))
    chart_yaml = f"{chart.name}/Chart.yaml"
    if chart_yaml not in files:
        raise _fail(chart, f"no {chart_yaml} in the chart")
    text, mode = files[chart_yaml]
    files[chart_yaml] = (patch_chart_yaml(chart, text, kube), mode)
    out = io.BytesIO()
    with gzip_writer(out) as gz:
        write_tar(gz, [FileEntry(path, data, mode) for path, (data, mode) in files.items()], epoch)
    return out.getvalue()


def helm_chart(chart: Chart, packed: bytes) -> bytes:
    """The HelmChart manifest carrying ``packed``, as upstream writes it."""
    doc = {
        "apiVersion": "helm.cattle.io/v1",
        "kind": "HelmChart",
        "metadata": {
            "name": chart.name,
            "namespace": chart.namespace,
            "annotations": {CHART_URL_ANNOTATION: chart.url, INJECT_ANNOTATION: "true"},
        },
        "spec": {
            "bootstrap": chart.bootstrap,
            "chartContent": base64.b64encode(packed).decode("ascii"),
        },
    }
    return yaml.safe_dump(doc, sort_keys=False, width=1 << 30).encode()
