"""Real, small Helm charts for the loopback mirror, packed as `helm package` packs them.

Each chart is a valid chart directory (``NAME/Chart.yaml`` with apiVersion v2, name, version and
appVersion, ``values.yaml``, ``templates/*.yaml``, a ``.helmignore``) in ``NAME-VERSION.tgz``:
files only, no directory entries, Chart.yaml first, mode 0644, as helm writes them. They sit
where upstream's chart repository keeps them (``assets/PACKAGE/NAME-VERSION.tgz``), under the
rig's never-resolvable upstream prefix. One is a bootstrap chart, one is not (a ``-crd`` chart
with its own package and namespace), and one was removed by the release (version 0.0.0, no file).

The bytes depend on nothing but this file (fixed mtimes, gzip with mtime 0 and no name), so the
lock's pins can be computed without the mirror directory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from builder.lock import lockfile as L

MTIME = 1700000000


@dataclass(frozen=True)
class FixtureChart:
    name: str
    version: str
    bootstrap: bool
    files: dict[str, str]  # path inside the chart directory -> text
    namespace: str = L.DEFAULT_CHART_NAMESPACE

    @property
    def package(self) -> str:
        return L.default_chart_package(self.name)

    @property
    def relpath(self) -> str:
        return f"charts/assets/{self.package}/{self.name}-{self.version}.tgz"


COREDNS = FixtureChart("rke2-coredns", "1.45.201", True, {
    "Chart.yaml": """\
# A fixture chart of the loopback rig (not upstream's).
apiVersion: v2
name: rke2-coredns
description: CoreDNS is a DNS server that chains plugins   # kept as written
type: application
version: 1.45.201
appVersion: 1.12.3
kubeVersion: ">=1.20.0-0"
keywords:
  - coredns
  - dns
annotations:
  catalog.cattle.io/namespace: kube-system
  catalog.cattle.io/release-name: rke2-coredns
""",
    "values.yaml": """\
# Default values for rke2-coredns.
replicaCount: 1
image:
  repository: rancher/mirrored-coredns-coredns
  tag: 1.12.3
service:
  clusterIP: 10.43.0.10
""",
    "templates/_helpers.tpl": """\
{{- define "coredns.fullname" -}}
{{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end -}}
""",
    "templates/configmap.yaml": """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "coredns.fullname" . }}
  namespace: {{ .Release.Namespace }}
data:
  Corefile: |
    .:53 {
        errors
        forward . /etc/resolv.conf
    }
""",
    "templates/deployment.yaml": """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "coredns.fullname" . }}
spec:
  replicas: {{ .Values.replicaCount }}
  selector:
    matchLabels:
      k8s-app: kube-dns
  template:
    metadata:
      labels:
        k8s-app: kube-dns
    spec:
      containers:
        - name: coredns
          image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
          args: ["-conf", "/etc/coredns/Corefile"]
""",
    ".helmignore": ".git/\n*.swp\n",
})

TRAEFIK_CRD = FixtureChart("rke2-traefik-crd", "39.0.002", False, {
    "Chart.yaml": """\
apiVersion: v2
name: rke2-traefik-crd
version: 39.0.002
appVersion: v3.5.1
description: Traefik's custom resource definitions (fixture)
""",
    "values.yaml": "{}\n",
    "templates/crd.yaml": """\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: middlewares.traefik.io
spec:
  group: traefik.io
  names:
    kind: Middleware
    plural: middlewares
  scope: Namespaced
  versions:
    - name: v1alpha1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          x-kubernetes-preserve-unknown-fields: true
""",
}, namespace="fixture-system")

REMOVED = FixtureChart("rke2-snapshot-validation-webhook", L.REMOVED_VERSION, False, {})

CHARTS = (COREDNS, TRAEFIK_CRD, REMOVED)


def _order(path: str) -> tuple[int, str]:
    return (0 if path == "Chart.yaml" else 1, path)  # helm writes Chart.yaml first


def package(chart: FixtureChart) -> bytes:
    """``NAME-VERSION.tgz`` as `helm package` makes it (files only, Chart.yaml first)."""
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(chart.files, key=_order):
            data = chart.files[path].encode()
            info = tarfile.TarInfo(f"{chart.name}/{path}")
            info.size, info.mode, info.mtime = len(data), 0o644, MTIME
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def build(root: Path) -> None:
    """Lay the chart files out under the mirror root."""
    for chart in CHARTS:
        if chart.version == L.REMOVED_VERSION:
            continue
        dest = root / chart.relpath
        data = package(chart)
        if not dest.exists() or dest.read_bytes() != data:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")  # test sessions share the cache
            tmp.write_bytes(data)
            tmp.replace(dest)


def lock_entries(upstream: str, resolved: bool = True) -> dict[str, L.Chart]:
    """The lock's ``charts:`` for the fixture charts under the ``upstream`` URL prefix (pins
    computed from the bytes; left null unless ``resolved``)."""
    out = {}
    for chart in CHARTS:
        if chart.version == L.REMOVED_VERSION:
            out[chart.name] = L.Chart(chart.name, chart.version, bootstrap=chart.bootstrap,
                                      package=chart.package, source="tests.rig.charts")
            continue
        data = package(chart)
        out[chart.name] = L.Chart(
            chart.name, chart.version, url=upstream + chart.relpath,
            sha256=hashlib.sha256(data).hexdigest() if resolved else None,
            size=len(data) if resolved else None, bootstrap=chart.bootstrap,
            namespace=chart.namespace, package=chart.package, source="tests.rig.charts")
    return out
