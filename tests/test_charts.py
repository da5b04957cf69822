"""Charts as pinned inputs: the lock's `charts:`, resolved by `lock`, stored by `fetch`, and made
by `build` into the HelmChart manifests of the runtime image's /charts, as upstream does.

The build tests read the session's real release (tests/plugins/built.py: the loopback rig serves
the real, small Helm charts of tests/rig/charts.py through nginx; `lock` downloads and hashes them,
`fetch` stores them, `build` packs them). The validation tests feed the loader bad entries and
check that the JSON Schema gives the same verdict where it can state the rule.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import io
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings

from builder.assemble import charts
from builder.errors import BuilderError, LockError
from builder.lock import lockfile
from builder.store import Store
from tests.adversarial.test_lock import NAMEISH
from tests.adversarial.test_store import _copy, corrupt
from tests.plugins.built import EPOCH, REPO, Built
from tests.rig import charts as fixture_charts
from tests.rig import mirror
from tests.test_build import _runtime_layer_files
from tests.test_lock_schema import schema_errors

KUBE = "v1.32.13"  # the fixture release is v1.32.13+fixture1
ARCHES = ("amd64", "arm64")


def _chart_files(built: Built, arch: str) -> dict[str, bytes]:
    """/charts of the runtime image inside the built archive (found as the installer finds it)."""
    return {name: data for name, data in _runtime_layer_files(built, arch).items()
            if name.startswith("charts/")}


def _members(tgz: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        return {m.name: m for m in tar.getmembers()}


def _read(tgz: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        fh = tar.extractfile(name)
        assert fh is not None
        return fh.read()


# -- the real build ------------------------------------------------------------------------------

def test_lock_resolved_and_fetch_stored_every_chart(built):
    """`lock` (run by the fixture on an unresolved lock) downloaded and hashed each chart through
    the file mirror; `fetch` left each one verified in the store."""
    lock = lockfile.load(built.lock)
    store = Store(built.store)
    assert [c.name for c in lock.charts.values()] == [c.name for c in fixture_charts.CHARTS]
    for fc in fixture_charts.CHARTS:
        chart = lock.charts[fc.name]
        if chart.removed:
            assert (chart.url, chart.sha256, chart.size) == (None, None, None)
            continue
        data = fixture_charts.package(fc)
        assert (chart.sha256, chart.size) == (hashlib.sha256(data).hexdigest(), len(data))
        assert store.read_bytes(chart.artifact.digest) == data
    assert not lock.unresolved(ARCHES)["charts"]


@pytest.mark.parametrize("arch", ARCHES)
def test_runtime_image_charts_are_upstreams_helmchart_manifests(built, arch):
    files = _chart_files(built, arch)
    lock = lockfile.load(built.lock)
    assert set(files) == {f"charts/{c.name}.yaml" for c in fixture_charts.CHARTS} | {
        "charts/fixture-chart.yaml"}  # + the lock's runtime.charts component file, as it is
    for fc in fixture_charts.CHARTS:
        text = files[f"charts/{fc.name}.yaml"]
        if fc.version == lockfile.REMOVED_VERSION:
            assert text == f"# {fc.name} has been removed\n".encode()
            continue
        doc = yaml.safe_load(text)
        assert doc["apiVersion"] == "helm.cattle.io/v1" and doc["kind"] == "HelmChart"
        assert doc["metadata"]["name"] == fc.name
        assert doc["metadata"]["namespace"] == fc.namespace
        assert doc["metadata"]["annotations"] == {
            "helm.cattle.io/chart-url": lock.charts[fc.name].url,
            "rke2.cattle.io/inject-cluster-config": "true"}
        assert doc["spec"] == {"bootstrap": fc.bootstrap, "chartContent": doc["spec"]["chartContent"]}
        tgz = base64.b64decode(doc["spec"]["chartContent"], validate=True)
        _check_chart(fc, tgz)
    bootstrap = {yaml.safe_load(files[f"charts/{fc.name}.yaml"])["spec"]["bootstrap"]
                 for fc in fixture_charts.CHARTS if fc.files}
    assert bootstrap == {True, False}  # the rig has one of each


def _check_chart(fc: fixture_charts.FixtureChart, tgz: bytes) -> None:
    # Packed deterministically: gzip without file name and with mtime 0; members sorted, owned by
    # 0/0 without names, every mtime SOURCE_DATE_EPOCH.
    assert tgz[:4] == b"\x1f\x8b\x08\x00" and tgz[4:8] == b"\0\0\0\0"
    members = _members(tgz)
    assert list(members) == sorted(members)
    assert all((m.uid, m.gid, m.uname, m.gname, m.mtime) == (0, 0, "", "", int(EPOCH))
               for m in members.values())
    files = {n: _read(tgz, n) for n, m in members.items() if m.isfile()}
    # Every file but Chart.yaml is the source chart's, byte for byte.
    assert set(files) == {f"{fc.name}/{p}" for p in fc.files}
    for path, text in fc.files.items():
        if path != "Chart.yaml":
            assert files[f"{fc.name}/{path}"] == text.encode(), path
    source = yaml.safe_load(fc.files["Chart.yaml"])
    patched = yaml.safe_load(files[f"{fc.name}/Chart.yaml"])
    assert patched["kubeVersion"] == f">= {KUBE}"
    assert patched["annotations"]["fleet.cattle.io/bundle-id"] == "rke2"
    # The rest of Chart.yaml is kept: every other field and annotation, and its comments.
    want = dict(source, kubeVersion=f">= {KUBE}",
                annotations={**(source.get("annotations") or {}), "fleet.cattle.io/bundle-id": "rke2"})
    assert patched == want
    for line in fc.files["Chart.yaml"].splitlines():
        if "#" in line:
            assert line.strip() in files[f"{fc.name}/Chart.yaml"].decode()


def test_chart_manifests_are_the_same_bytes_every_time(built, tmp_path):
    """Made again from a copy of the store, at another time: the bytes in the built image.
    (test_build's reproducibility test compares the whole release, /charts included.)"""
    lock = lockfile.load(built.lock)
    copy = _copy(built, tmp_path)
    again = {m.path: m.data for m in charts.manifests(lock, Store(copy.store), int(EPOCH))}
    assert again == {k: v for k, v in _chart_files(built, "arm64").items()
                     if k != "charts/fixture-chart.yaml"}


def test_build_refuses_a_changed_chart_in_the_store(built, tmp_path):
    b = _copy(built, tmp_path)
    chart = lockfile.load(b.lock).charts["rke2-coredns"]
    assert chart.artifact.digest
    corrupt(Store(b.store), chart.artifact.digest)
    res = b.cli("build", "--cross", "--artifacts", str(b.out), check=False)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert f"charts.rke2-coredns: store blob {chart.artifact.digest}" in res.stderr
    assert f"expected {chart.artifact.digest}, got sha256:" in res.stderr
    assert "store verify" in res.stderr
    assert not b.out.exists() or not list(b.out.iterdir())


def _without_charts(built: Built, tmp_path: Path, **runtime: Any) -> Built:
    lock = lockfile.load(built.lock)
    assert lock.runtime is not None
    bare = dataclasses.replace(lock, charts={},
                               runtime=dataclasses.replace(lock.runtime, charts=(), **runtime))
    path = tmp_path / "images.lock"
    lockfile.save(bare, path)
    return dataclasses.replace(built, lock=path, out=tmp_path / "artifacts")


def test_build_refuses_a_runtime_image_without_charts(built, tmp_path):
    b = _without_charts(built, tmp_path)
    res = b.cli("build", "--arch", "amd64", "--artifacts", str(b.out), check=False)
    assert res.returncode == 1, res.stderr
    assert "\nerror: images.lock: charts: the runtime image would have no charts;" in "\n" + res.stderr
    assert ("hint: list the release's charts under `charts:` (see docs/images-lock.md), or say why "
            "this runtime image ships none with `runtime.no_charts: <reason>`") in res.stderr
    assert not b.out.exists() or not list(b.out.iterdir())


def test_no_charts_is_the_explicit_opt_out(built, tmp_path):
    b = _without_charts(built, tmp_path, no_charts="a test image: its clusters get charts elsewhere")
    assert "no_charts: 'a test image: its clusters get charts elsewhere'" in b.lock.read_text()
    b.cli("build", "--arch", "amd64", "--artifacts", str(b.out))
    files = _runtime_layer_files(b, "amd64")
    assert "bin/kubelet" in files and not [n for n in files if n.startswith("charts/")]


# -- the committed lock ----------------------------------------------------------------------------

UPSTREAM_CHARTS = {  # rancher/rke2 v1.32.13+rke2r1 charts/chart_versions.yaml: name -> (version, bootstrap)
    "rke2-cilium": ("1.19.100", True), "rke2-canal": ("v3.31.3-build2026020600", True),
    "rke2-calico": ("v3.31.300", True), "rke2-calico-crd": ("v3.31.300", True),
    "rke2-coredns": ("1.45.201", True), "rke2-ingress-nginx": ("4.14.303", False),
    "rke2-traefik": ("39.0.002", False), "rke2-traefik-crd": ("39.0.002", False),
    "rke2-metrics-server": ("3.13.007", False), "rke2-multus": ("v4.2.314", True),
    "rke2-flannel": ("v0.28.101", True), "rancher-vsphere-cpi": ("1.12.100", True),
    "rancher-vsphere-csi": ("3.5.0-rancher200", True), "harvester-cloud-provider": ("0.2.1100", True),
    "harvester-csi-driver": ("0.1.2500", True), "rke2-snapshot-controller": ("4.2.001", False),
    "rke2-snapshot-controller-crd": ("4.2.001", False),
    "rke2-snapshot-validation-webhook": ("0.0.0", False), "rke2-runtimeclasses": ("0.1.000", False),
}


def test_committed_lock_lists_every_upstream_chart_unresolved():
    lock = lockfile.load(REPO / "images.lock")
    assert {n: (c.version, c.bootstrap) for n, c in lock.charts.items()} == UPSTREAM_CHARTS
    for name, chart in lock.charts.items():
        package = name.removesuffix("-crd")
        assert chart.package == package and chart.namespace == "kube-system"
        assert chart.sha256 is None  # no source here publishes them: never invented
        if chart.removed:
            assert chart.url is None
        else:
            assert chart.url == (f"https://rke2-charts.rancher.io/assets/{package}/"
                                 f"{name}-{chart.version}.tgz")
    res = subprocess.run([sys.executable, "-m", "builder", "--lock", "images.lock", "lock", "--check"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert ", charts: 18) for amd64, arm64" in res.stderr.splitlines()[0]
    listed = res.stderr.split("\n  charts:\n", 1)[1].split("\n  hint:", 1)[0].splitlines()
    assert listed == [f"    charts.{n}.sha256" for n, (v, _) in UPSTREAM_CHARTS.items() if v != "0.0.0"]


def test_fetch_refuses_unresolved_charts_before_any_work(tmp_path):
    lock = lockfile.load(REPO / "images.lock")
    resolved_files = {n: dataclasses.replace(c, arches={a: dataclasses.replace(f, sha256=f.sha256 or "0" * 64)
                                                        for a, f in c.arches.items()})
                      for n, c in lock.components.items()}
    path = tmp_path / "images.lock"
    lockfile.save(dataclasses.replace(lock, components=resolved_files), path)
    res = subprocess.run([sys.executable, "-m", "builder", "--lock", str(path), "--store",
                          str(tmp_path / "store"), "fetch", "--files-only", "--arch", "amd64"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "error: images.lock: 18 pins unresolved (files: 0, charts: 18) for amd64:" in res.stderr
    assert "    charts.rke2-canal.sha256\n" in res.stderr
    assert not list((tmp_path / "store").glob("blobs/sha256/*"))  # nothing downloaded


# -- validation ----------------------------------------------------------------------------------

def _fixture_lock_data() -> dict:
    files = {"kubelet": {"amd64": mirror.MirrorFile("k", "a" * 64, 1)}}
    return yaml.safe_load(lockfile.dumps(mirror.lock_for(files, "http://127.0.0.1:1/", arches=("amd64",))))


def _edited(change) -> str:
    data = _fixture_lock_data()
    data["release"].pop("supervisor")
    data["runtime"]["bin"] = ["kubelet"]
    data["runtime"]["charts"] = []
    change(data)
    return yaml.safe_dump(data, sort_keys=False)


def _coredns(d: dict) -> dict:
    return d["charts"]["rke2-coredns"]


BAD = {
    "underscore in the name": (
        lambda d: d["charts"].__setitem__("rke2_dns", d["charts"].pop("rke2-coredns")),
        "charts.rke2_dns: a chart name is also its HelmChart's name and Helm release name: no '_'"),
    "upper case name": (
        lambda d: d["charts"].__setitem__("Rke2", d["charts"].pop("rke2-coredns")),
        "charts.Rke2: expected a chart name of lowercase ASCII letters"),
    "name past Helm's 53": (
        lambda d: d["charts"].__setitem__("a" * 54, d["charts"].pop("rke2-coredns")),
        f"charts.{'a' * 54}: a chart name is also"),
    "name ending in a dash": (
        lambda d: d["charts"].__setitem__("rke2-", d["charts"].pop("rke2-coredns")),
        "charts.rke2-: a chart name is also"),
    "version missing": (lambda d: _coredns(d).pop("version"),
                        "charts.rke2-coredns.version: missing required field"),
    "version with a slash": (lambda d: _coredns(d).__setitem__("version", "1/2"),
                             "charts.rke2-coredns.version: expected a chart version"),
    "url missing": (lambda d: _coredns(d).pop("url"),
                    "charts.rke2-coredns.url: missing required field (or `version: 0.0.0` for a "
                    "chart the release removed)"),
    "url not http(s)": (lambda d: _coredns(d).__setitem__("url", "file:///etc/rke2-coredns-1.45.201.tgz"),
                        "charts.rke2-coredns.url: expected an http(s) URL"),
    "url of another version": (
        lambda d: _coredns(d).__setitem__("url", "https://x.example/rke2-coredns-1.45.200.tgz"),
        "charts.rke2-coredns.url: expected the URL of rke2-coredns-1.45.201.tgz"),
    "sha256 not hex": (lambda d: _coredns(d).__setitem__("sha256", "abc"),
                       "charts.rke2-coredns.sha256: expected 64 hex digits, got 'abc'"),
    "size zero": (lambda d: _coredns(d).__setitem__("size", 0),
                  "charts.rke2-coredns.size: expected a positive number of bytes"),
    "bootstrap a string": (lambda d: _coredns(d).__setitem__("bootstrap", "yes"),
                           "charts.rke2-coredns.bootstrap: expected bool, got 'yes'"),
    "namespace with a dot": (lambda d: _coredns(d).__setitem__("namespace", "kube.system"),
                             "charts.rke2-coredns.namespace: expected a Kubernetes namespace"),
    "package with a slash": (lambda d: _coredns(d).__setitem__("package", "../x"),
                             "charts.rke2-coredns.package: expected a package name"),
    "unknown field": (lambda d: _coredns(d).__setitem__("chart_url", "x"),
                      "charts.rke2-coredns.chart_url: unknown field"),
    "removed chart with a url": (
        lambda d: d["charts"]["rke2-snapshot-validation-webhook"].__setitem__(
            "url", "https://x.example/rke2-snapshot-validation-webhook-0.0.0.tgz"),
        "charts.rke2-snapshot-validation-webhook.url: a removed chart (version 0.0.0) has no file: drop url"),
    "removed chart with a sha256": (
        lambda d: d["charts"]["rke2-snapshot-validation-webhook"].__setitem__("sha256", "a" * 64),
        "charts.rke2-snapshot-validation-webhook.sha256: a removed chart (version 0.0.0) has no file"),
    "no_charts next to charts": (
        lambda d: d["runtime"].__setitem__("no_charts", "none needed"),
        "runtime.no_charts: says the runtime image has no charts, but charts: lists some"),
    "no_charts empty": (
        lambda d: (d.pop("charts"), d["runtime"].__setitem__("no_charts", "")),
        "runtime.no_charts: expected the reason this runtime image has no charts"),
    "release version without vX.Y.Z": (
        lambda d: d["release"].__setitem__("version", "1.32-fixture"),
        "release.version: charts are constrained to the release's Kubernetes version"),
    "component file named like a chart's manifest": (
        lambda d: (d["components"]["kubelet"].__setitem__("target", "rke2-coredns.yaml"),
                   d["runtime"].__setitem__("charts", ["kubelet"]), d["runtime"].__setitem__("bin", [])),
        "runtime.charts[0]: component 'kubelet' would be /charts/rke2-coredns.yaml, the manifest of "
        "charts.rke2-coredns"),
}
# Cross-field rules a JSON Schema cannot state (docs/images-lock.md lists them).
SCHEMA_CANNOT = {"url of another version", "release version without vX.Y.Z",
                 "no_charts next to charts", "component file named like a chart's manifest"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_chart_entries_are_refused_naming_the_field(case):
    change, message = BAD[case]
    text = _edited(change)
    with pytest.raises(LockError) as err:
        lockfile.parse(text)
    assert str(err.value).startswith(f"images.lock: {message}"), str(err.value)
    # The schema (editors) agrees wherever it can state the rule.
    assert (schema_errors(text) == []) == (case in SCHEMA_CANNOT), schema_errors(text)


@settings(max_examples=150, deadline=None)
@given(NAMEISH)
def test_chart_names_same_verdict(name):
    """Validator and schema agree on every generated chart name; an accepted one is a Kubernetes
    object name (no '_', ends with a letter or digit, at most 53)."""
    removed = "rke2-snapshot-validation-webhook"  # no URL, whose file name would follow the name
    text = _edited(lambda d: d["charts"].__setitem__(name, d["charts"].pop(removed)))
    accepted = True
    try:
        lockfile.parse(text)
    except LockError:
        accepted = False
    assert accepted == (schema_errors(text) == []), repr(name)
    if accepted:
        assert "_" not in name and len(name) <= 53 and name[-1].isalnum() and name.isascii()


def test_good_chart_entries_load_and_pass_the_schema():
    text = _edited(lambda d: None)
    lock = lockfile.parse(text)
    assert schema_errors(text) == []
    assert lock.charts["rke2-traefik-crd"].package == "rke2-traefik"  # written, as upstream derives it
    assert lockfile.parse(text.replace("    package: rke2-traefik\n", "")).charts[
        "rke2-traefik-crd"].package == "rke2-traefik"  # the default
    assert lock.charts["rke2-snapshot-validation-webhook"].removed
    # Removed charts are no pin: resolved or not, they are never listed.
    unresolved = lockfile.parse(text.replace("sha256: " + lock.charts["rke2-coredns"].sha256, "sha256: null"))
    assert unresolved.unresolved(("amd64",))["charts"] == ["charts.rke2-coredns.sha256"]
    assert lockfile.parse(lockfile.dumps(lock)) == lock  # canonical dump round trip


def test_lock_writes_chart_pins_into_the_file_as_written():
    text = _edited(lambda d: [c.__setitem__("sha256", None) or c.pop("size", None)
                              for c in d["charts"].values() if "url" in c])
    text = "# my comment\n" + text.replace("  rke2-coredns:\n", "  rke2-coredns:   # DNS\n")
    want = lockfile.parse(_edited(lambda d: None))
    new = dataclasses.replace(lockfile.parse(text), charts=want.charts)
    out = lockfile.update_text(text, new)
    assert "# my comment\n" in out and "  rke2-coredns:   # DNS\n" in out
    assert lockfile.parse(out).charts == want.charts
    assert lockfile.update_text(out, new) is out  # nothing new: the same text


# -- hostile chart files (made here: no real chart repository serves them on demand) -------------

def _tgz(members: dict[str, bytes], *, symlink: str | None = None) -> bytes:
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/shadow"
            tar.addfile(info)
    return raw.getvalue()


CHART = lockfile.Chart("demo", "1.0.0", url="https://x.example/demo-1.0.0.tgz", package="demo")
GOOD_YAML = b"apiVersion: v2\nname: demo\nversion: 1.0.0\n"


@pytest.mark.parametrize("tgz, problem", [
    (b"not gzip", "not a gzip file"),
    (gzip.compress(b"not a tar", mtime=0), "not a tar archive"),
    (_tgz({"demo/values.yaml": b"{}\n"}), "no demo/Chart.yaml in the chart"),
    (_tgz({"other/Chart.yaml": GOOD_YAML}), "member 'other/Chart.yaml' is not under demo/"),
    (_tgz({"demo/../../etc/x": b""}), "is not under demo/"),
    (_tgz({"demo/Chart.yaml": GOOD_YAML}, symlink="demo/templates/x.yaml"), "is not a regular file"),
    (_tgz({"demo/Chart.yaml": GOOD_YAML.replace(b"1.0.0", b"1.0.1")}),
     "demo/Chart.yaml says version '1.0.1', the lock pins '1.0.0'"),
    (_tgz({"demo/Chart.yaml": GOOD_YAML.replace(b"name: demo", b"name: other")}),
     "demo/Chart.yaml says name 'other', the lock pins 'demo'"),
    (_tgz({"demo/Chart.yaml": b"- a list\n"}), "demo/Chart.yaml is not a mapping"),
    (_tgz({"demo/Chart.yaml": GOOD_YAML + b"annotations: [a]\n"}), "annotations is not a mapping"),
])
def test_a_bad_chart_file_is_refused_naming_the_chart(tgz, problem):
    with pytest.raises(BuilderError) as err:
        charts.repack(CHART, tgz, KUBE, int(EPOCH))
    assert str(err.value).startswith(f"charts.demo: {CHART.url}: "), str(err.value)
    assert problem in str(err.value)
    assert "hint: pin the chart .tgz" in str(err.value)


def test_a_gzip_bomb_stops_at_the_bound(monkeypatch):
    monkeypatch.setattr(charts, "MAX_UNPACKED", 1 << 16)
    bomb = gzip.compress(b"\0" * (1 << 20), mtime=0)  # 1 KiB that unpacks to 1 MiB
    with pytest.raises(BuilderError, match=f"unpacks to more than {1 << 16} bytes"):
        charts.repack(CHART, bomb, KUBE, int(EPOCH))


def test_repack_keeps_every_file_and_patches_only_chart_yaml():
    tgz = _tgz({"demo/Chart.yaml": GOOD_YAML + b"kubeVersion: '>=1.0'\nannotations:\n  a: b\n",
                "demo/templates/cm.yaml": b"kind: ConfigMap\n"})
    out = charts.repack(CHART, tgz, KUBE, int(EPOCH))
    assert out == charts.repack(CHART, tgz, KUBE, int(EPOCH))
    assert _read(out, "demo/templates/cm.yaml") == b"kind: ConfigMap\n"
    assert yaml.safe_load(_read(out, "demo/Chart.yaml")) == {
        "apiVersion": "v2", "name": "demo", "version": "1.0.0", "kubeVersion": f">= {KUBE}",
        "annotations": {"a": "b", "fleet.cattle.io/bundle-id": "rke2"}}
