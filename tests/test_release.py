"""`release` to a real registry (CNCF distribution on loopback), `pull-release`, and the faults.

The end-to-end test runs the commands a release engineer runs, in subprocesses, on a real build:
scan status (written by hand: no Trivy here) → keygen → sign → release (artifact + images) →
pull-release into a fresh directory → verify, then checks what landed with our client, skopeo and
the `oras` Python package.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import requests

from builder import digest as dg
from builder.errors import BuilderError, HttpStatusError
from builder.fetch.auth import Keychain, env_key
from builder.fetch.registry import ClientOptions, NotFound, RegistryClient
from builder.fetch.transport import RetryPolicy
from builder.lock import lockfile
from builder.lock.lockfile import Mirrors
from builder.oci import model as m
from builder.oci.archive import read_archive_index
from builder.oci.convert import REGISTRY_MANIFEST
from builder.oci.image import load_image
from builder.oci.reference import Reference
from builder.oci.reference import parse as parse_ref
from builder.publish import release as rl
from builder.publish.plan import version_tag
from builder.publish.pull_release import PullError, pull_release
from builder.store import Store
from builder.trust.verify import read_release_env, verify_release
from tests.plugins.release import run_builder, scanned_release, write_scan_status

REPO = "releases/rke2"


def client_for(reg, **opts) -> RegistryClient:
    options = ClientOptions(policy=RetryPolicy(attempts=2, backoff=0.05), **opts)
    return RegistryClient(mirrors=Mirrors(insecure=(reg.host,)),
                          keychain=Keychain(env={}, config_dir=Path("/nonexistent")),
                          options=options)


def skopeo_raw(ref: str, tls_verify: bool = False) -> dict:
    proc = subprocess.run(["skopeo", "inspect", f"--tls-verify={str(tls_verify).lower()}", "--raw",
                           f"docker://{ref}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def small_release(tmp_path: Path, releases) -> Path:
    return scanned_release(releases["v1"], tmp_path / "artifacts")


@pytest.mark.slow
def test_build_sign_release_pull_verify(release_dir: Path, built_release, registry,
                                        tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    write_scan_status(release_dir)
    run_builder("keygen", "--out", str(keys), env={"BUILDER_SIGNING_PASSPHRASE": "pw-1"})
    run_builder("sign", "--artifacts", str(release_dir), "--key", str(keys / "signing-key.pem"),
                env={"BUILDER_SIGNING_PASSPHRASE": "pw-1"})
    target = f"{registry.host}/{REPO}"
    mirror = f"{registry.host}/mirror"
    args = ("release", "--artifacts", str(release_dir), "--registry", target, "--insecure",
            "--push-images", mirror, "--revision", "0123abc")
    proc = run_builder(*args)
    assert "push" in proc.stdout
    tag = built_release.version.replace("+", "-")

    # What landed: the index and the per-arch artifacts, read by our client and by skopeo.
    index = skopeo_raw(f"{target}:{tag}")
    assert index["mediaType"] == m.OCI_INDEX
    assert index["artifactType"] == "application/vnd.rke2.release.v1"
    assert sorted(d["platform"]["architecture"] for d in index["manifests"]) == ["amd64", "arm64"]
    client = client_for(registry)
    ref = Reference(registry.host, REPO)
    amd = client.get_manifest(ref.with_tag(f"{tag}-amd64"))
    assert amd.digest in {d["digest"] for d in index["manifests"]}
    doc = json.loads(amd.raw)
    assert doc["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"
    assert doc["annotations"][rl.ANNOTATION_VERSION] == built_release.version
    assert doc["annotations"][rl.ANNOTATION_REVISION] == "0123abc"
    titles = {la["annotations"][m.ANNOTATION_TITLE]: la["digest"] for la in doc["layers"]}
    for line in (release_dir / "sha256sum-amd64.txt").read_text().splitlines():
        hex_value, name = line.split("  ")
        assert titles[name] == dg.from_hex(hex_value)
    assert "sha256sum-amd64.txt.sig" in titles and "sha256sum-amd64.txt" in titles

    # The images: per-arch manifests keep their digests; the runtime index is the build's.
    for arch in built_release.arches:
        _, env = read_release_env(release_dir / f"rke2.linux-{arch}.tar.gz")
        image = parse_ref(env["RUNTIME_IMAGE"])
        got = skopeo_raw(f"{mirror}/{image.repository}@{env['RUNTIME_MANIFEST']}")
        assert [la["digest"] for la in got["layers"]] == env["RUNTIME_LAYERS"].split()
    runtime_index = skopeo_raw(f"{mirror}/rancher/rke2-runtime:{tag}")
    assert len(runtime_index["manifests"]) == 2

    # A no-op re-release: every blob skipped, every tag unchanged, nothing sent.
    started = time.monotonic()
    again = run_builder(*args)
    noop_seconds = time.monotonic() - started
    kinds = {line.split()[0] for line in again.stdout.splitlines()[1:]
             if line.startswith("  ") and not line.startswith(("  note: ", f"  {mirror}/"))}
    assert kinds == {"skip", "unchanged"}, again.stdout
    # (the notes say which form each image shipped converted went in: tests below)
    assert "0 B sent" in again.stdout
    print(f"no-op re-release: {noop_seconds:.2f}s")
    # The same with --json: one object on stdout, the report on stderr; every blob present.
    as_json = run_builder(*args, "--json")
    summary = json.loads(as_json.stdout)
    assert "0 B sent" in as_json.stderr
    assert (summary["ok"], summary["dry_run"], summary["sent"]) == (True, False, 0)
    assert summary["version"] == built_release.version and summary["arches"] == ["amd64", "arm64"]
    assert {a["kind"] for a in summary["actions"]} == {"skip", "unchanged"}
    assert [p["to"] for p in summary["pushes"]] == [target, mirror]
    for push in summary["pushes"]:
        blobs = push["blobs"]
        assert blobs["uploaded"] == {"blobs": 0, "bytes": 0} and blobs["mounted"]["blobs"] == 0
        assert blobs["present"]["blobs"] == sum(t["present"]["blobs"] for t in push["targets"].values())
    artifacts = summary["pushes"][0]
    assert artifacts["manifests"][tag] == client.get_manifest(ref.with_tag(tag)).digest
    listed = {hex_value: (release_dir / name).stat().st_size for arch in built_release.arches
              for hex_value, name in (line.split("  ") for line in
                                      (release_dir / f"sha256sum-{arch}.txt").read_text().splitlines())}
    assert artifacts["blobs"]["present"]["bytes"] >= sum(listed.values()) > 0

    # pull-release into a fresh directory, verified with the public key.
    fresh = tmp_path / "fresh"
    run_builder("pull-release", f"{target}:{tag}", str(fresh), "--insecure", "--public-key",
                str(keys / "signing-key.pub"), "--require-signature")
    report = verify_release(fresh, public_key=keys / "signing-key.pub", require_signature=True)
    assert report.passed, report.summary()
    assert sorted(p.name for p in fresh.iterdir()) == sorted(
        p.name for p in release_dir.iterdir() if p.is_file() and not p.name.startswith("."))

    # The oras package pulls the same files (ORAS compatibility).
    import oras.client

    oras_dir = tmp_path / "oras"
    files = oras.client.OrasClient(hostname=registry.host, insecure=True).pull(
        target=f"{target}:{tag}-arm64", outdir=str(oras_dir))
    assert len(files) == len([n for n in titles if "amd64" in n])
    for f in map(Path, files):
        assert dg.of_file(f)[0] == dg.of_file(fresh / f.name)[0]

    # One flipped byte in the carried copy: verify fails and names the file.
    victim = fresh / "rke2-images-core.linux-arm64.tar.gz"
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x10
    victim.write_bytes(bytes(data))
    proc = run_builder("verify", str(fresh), "--public-key", str(keys / "signing-key.pub"),
                       check=False)
    assert proc.returncode == 1
    assert f"{victim.name}: checksum mismatch" in proc.stderr


def test_pull_one_arch_by_digest_and_resume(small_release: Path, registry, tmp_path: Path) -> None:
    client = client_for(registry)
    rel = rl.collect(small_release)
    ref = Reference(registry.host, REPO)
    res = rl.push_artifacts(client, rel, ref, chunk_size=1 << 20)
    digest = res.manifests[f"{rel.tag}-amd64"]
    out = tmp_path / "pulled"
    report = pull_release(client, Reference(registry.host, REPO, None, digest), out)
    assert report.arches == ["amd64"] and not report.kept
    (out / "rke2.linux-amd64.tar.gz").unlink()
    again = pull_release(client, ref.with_tag(rel.tag), out, ["amd64"])
    assert again.fetched == ["rke2.linux-amd64.tar.gz"]  # the rest was kept
    assert verify_release(out).passed


def _push_doc(client: RegistryClient, ref: Reference, tag: str, title: str) -> None:
    data = b"payload\n"
    client.push_blob(ref, dg.of_bytes(data), len(data), lambda: io.BytesIO(data))
    client.push_blob(ref, dg.of_bytes(b"{}"), 2, lambda: io.BytesIO(b"{}"))
    doc = {"schemaVersion": 2, "mediaType": m.OCI_MANIFEST,
           "artifactType": "application/vnd.rke2.release.v1",
           "config": rl.empty_config().to_json(),
           "layers": [{"mediaType": "text/plain", "digest": dg.of_bytes(data), "size": len(data),
                       "annotations": {m.ANNOTATION_TITLE: title}}]}
    client.push_manifest(ref, tag, m.canonical_json(doc), m.OCI_MANIFEST)


@pytest.mark.parametrize("title", ["../evil", "sub/file", "..", ""])
def test_pull_refuses_unsafe_titles(registry, tmp_path: Path, title: str) -> None:
    client = client_for(registry)
    ref = Reference(registry.host, REPO)
    _push_doc(client, ref, "bad", title)
    with pytest.raises(PullError):
        pull_release(client, ref.with_tag("bad"), tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())
    assert not (tmp_path / "evil").exists()


def test_pull_checks_blob_digests(small_release: Path, registry, tmp_path: Path) -> None:
    client = client_for(registry)
    rel = rl.collect(small_release)
    ref = Reference(registry.host, REPO)
    rl.push_artifacts(client, rel, ref)
    bundle = next(f for f in rel.all_files() if f.name == "rke2.linux-amd64.tar.gz")
    hex_value = dg.hex_of(bundle.digest)
    data = registry.storage / "docker/registry/v2/blobs/sha256" / hex_value[:2] / hex_value / "data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))  # the registry's storage is corrupt (or the registry lies)
    out = tmp_path / "out"
    with pytest.raises(BuilderError, match="digest mismatch"):
        pull_release(client, ref.with_tag(rel.tag), out)
    assert not (out / bundle.name).exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp left


def test_scan_gate(small_release: Path, registry) -> None:
    target = f"{registry.host}/{REPO}"
    (small_release / "scan" / "status.json").unlink()
    proc = run_builder("release", "--allow-unsigned", "--artifacts", str(small_release), "--registry", target, "--insecure",
                       check=False)
    assert proc.returncode == 1 and "release refused" in proc.stderr and "missing" in proc.stderr
    write_scan_status(small_release, verdict="fail")
    proc = run_builder("release", "--allow-unsigned", "--artifacts", str(small_release), "--registry", target, "--insecure",
                       check=False)
    assert proc.returncode == 1 and "CVE-2099-0001" in proc.stderr
    assert requests.get(f"{registry.url}/v2/_catalog", timeout=5).json()["repositories"] == []
    proc = run_builder("release", "--allow-unsigned", "--artifacts", str(small_release), "--registry", target, "--insecure",
                       "--override-scan", "--override-reason", "test: accepted by security")
    status = json.loads((small_release / "scan" / "status.json").read_text())
    assert status["override"]["reason"] == "test: accepted by security"
    assert "scan gate overridden" in proc.stdout


def test_dry_run_changes_nothing(small_release: Path, registry) -> None:
    proc = run_builder("release", "--allow-unsigned", "--artifacts", str(small_release), "--registry",
                       f"{registry.host}/{REPO}", "--insecure", "--push-images",
                       f"{registry.host}/mirror", "--dry-run")
    assert "plan (dry run, nothing changed)" in proc.stdout and "\n  push " in proc.stdout
    assert requests.get(f"{registry.url}/v2/_catalog", timeout=5).json()["repositories"] == []


def test_dry_run_json_is_the_plan_in_one_object(small_release: Path, registry) -> None:
    proc = run_builder("release", "--allow-unsigned", "--artifacts", str(small_release), "--registry",
                       f"{registry.host}/{REPO}", "--insecure", "--push-images",
                       f"{registry.host}/mirror", "--dry-run", "--json")
    plan = json.loads(proc.stdout)  # the whole of stdout; the text plan went to stderr
    assert "plan (dry run, nothing changed)" in proc.stderr
    assert plan["dry_run"] is True and plan["sent"] == 0 and rl.OFFLINE_NOTE in plan["notes"]
    pushes = [a for a in plan["actions"] if a["kind"] == "push"]
    would = sum(p["blobs"]["uploaded"]["bytes"] for p in plan["pushes"])
    assert pushes and would == sum(a["size"] for a in pushes) > 0
    assert [p["what"] for p in plan["pushes"]] == ["the release artifacts", "4 images"]
    assert requests.get(f"{registry.url}/v2/_catalog", timeout=5).json()["repositories"] == []


def test_dry_run_plans_what_a_real_run_does_into_an_empty_registry(small_release: Path,
                                                                  registry) -> None:
    """The dry run's offline stand-in answers copy_blob as RegistryClient.copy_blob does for an
    empty registry (mount within the host, else upload): its plan is the real run's actions,
    blob for blob, mounts included."""
    opts = rl.PublishOptions(small_release, allow_unsigned=True, registry=f"{registry.host}/{REPO}",
                             push_images=f"{registry.host}/mirror", insecure=True)
    plan = rl.publish(replace(opts, dry_run=True))
    planned = plan.actions
    done = rl.publish(opts)
    assert planned == done.actions
    # The upload/skip report too, in the conditional: "would push ...: would upload ..."
    assert [line.replace("would push", "pushed").replace("would upload", "uploaded")
            .replace("would skip", "skipped") for line in plan.pushed] == done.pushed
    assert done.pushed[0].startswith(f"pushed the release artifacts to {registry.host}/{REPO}: "
                                     "uploaded ")
    assert any(line.startswith(f"pushed 4 images to {registry.host}/mirror: uploaded ")
               for line in done.pushed), done.pushed
    assert done.sent == sum(a.size for a in done.actions if a.kind == "push") > 0
    # A blob another repository of the same host holds is mounted, one of another host uploaded:
    # the real client's dry run and the stand-in agree (the release above shares no blob
    # between repositories of one archive, so the mount is asked for directly).
    client, offline = client_for(registry), rl._Offline()
    have = next(a for a in done.actions if a.kind == "push" and a.target.endswith("/" + REPO))
    digest = have.what.split()[-1]
    held, there = Reference(registry.host, REPO), Reference(registry.host, "elsewhere/repo")
    for source in (held, Reference("other.example", REPO)):
        asked = [c.copy_blob(there, digest, have.size, lambda: io.BytesIO(b""), mount_from=source,
                             dry_run=True).outcome for c in (client, offline)]
        assert asked == (["mounted"] * 2 if source is held else ["uploaded"] * 2)


def test_refuses_files_that_do_not_match_their_checksums(small_release: Path, registry) -> None:
    victim = small_release / "rke2-images-core.linux-amd64.txt"
    victim.write_text(victim.read_text() + "docker.io/x/y:z\n")
    with pytest.raises(BuilderError, match="rke2-images-core.linux-amd64.txt: checksum mismatch"):
        rl.collect(small_release)


def test_registry_killed_mid_push_then_rerun(small_release: Path, registry, monkeypatch) -> None:
    """The registry dies during a chunked upload; the rerun (registry back) completes."""
    client = client_for(registry)
    patches = {"n": 0}
    original = RegistryClient.request

    def request(self, ep, method, url, scope, **kw):
        if method == "PATCH":
            patches["n"] += 1
            if patches["n"] == 2:
                registry.stop()  # kill it between two chunks of the first large blob
        return original(self, ep, method, url, scope, **kw)

    monkeypatch.setattr(RegistryClient, "request", request)
    monkeypatch.setattr(rl, "registry_client", lambda hosts, insecure, chunk: client)
    opts = rl.PublishOptions(small_release, allow_unsigned=True, registry=f"{registry.host}/{REPO}", insecure=True,
                             chunk_size=256 << 10)
    with pytest.raises(BuilderError) as err:
        rl.publish(opts)
    assert registry.host in str(err.value)
    registry.start()  # same port, same storage
    report = rl.publish(opts)
    assert any(a.kind == "tag" for a in report.actions)
    rel = rl.collect(small_release)
    tag = client.get_manifest(Reference(registry.host, REPO, rel.tag))
    assert tag.digest == dg.of_bytes(rl.artifact_index(rel, {"amd64": rl.artifact_manifest(rel, "amd64")}))
    again = rl.publish(opts)
    assert {a.kind for a in again.actions} <= {"skip", "unchanged"} and again.sent == 0


def test_registry_auth_failure_names_registry_not_password(small_release: Path, basic_setup,
                                                           ) -> None:
    target = f"{basic_setup.host}/{REPO}"
    env = {"BUILDER_REGISTRY_CA_FILE": str(basic_setup.ca_file),
           env_key(basic_setup.host): "alice:Wrong-Secret-77"}
    proc = run_builder("release", "--allow-unsigned", "--artifacts", str(small_release), "--registry", target, env=env,
                       check=False)
    assert proc.returncode == 1
    assert basic_setup.host in proc.stderr and REPO in proc.stderr and "alice" in proc.stderr
    assert "Wrong-Secret-77" not in proc.stderr + proc.stdout
    # With the right password it goes through (TLS verified with the test CA).
    env[env_key(basic_setup.host)] = f"alice:{basic_setup.creds[1]}"
    run_builder("release", "--allow-unsigned", "--artifacts", str(small_release), "--registry", target, env=env)
    client = basic_setup.client()
    assert client.get_manifest(Reference(basic_setup.host, REPO, "v1.32.13-rke2r1-amd64")).digest


def test_registry_argument_validation() -> None:
    with pytest.raises(BuilderError, match="HOST"):
        rl.registry_ref("justaname")
    with pytest.raises(BuilderError, match="repository only"):
        rl.registry_ref("127.0.0.1:5000/releases/rke2:v1")
    assert version_tag("v1.32.13+rke2r1") == "v1.32.13-rke2r1"
    assert rl.image_target("127.0.0.1:5000/mirror", "docker.io/rancher/pause:3.6") == Reference(
        "127.0.0.1:5000", "mirror/rancher/pause", "3.6")
    assert shutil.which("skopeo")


# -- images shipped in the zstd layer mode (issue 14) ---------------------------------------------

def _converted(directory: Path, arch: str = "amd64") -> dict[str, tuple[str, str]]:
    """image → (converted manifest, registry manifest) of the release's converted images."""
    found = {}
    for archive in rl._archives_for(directory, arch):
        for img in read_archive_index(archive):
            if REGISTRY_MANIFEST in img.annotations:
                found[img.name] = (img.manifest_digest, img.annotations[REGISTRY_MANIFEST])
    return found


def _absent(client: RegistryClient, target: Reference, digest: str) -> bool:
    try:
        client.get_manifest(target, digest)
    except NotFound:
        return True
    except HttpStatusError as exc:
        return exc.status == 404
    return False


def _layer_types(raw: bytes) -> set[str]:
    return {la["mediaType"] for la in json.loads(raw)["layers"]}


def test_push_images_of_a_zstd_release_sends_the_registry_form_from_the_store(
        small_release: Path, registry, fetched) -> None:
    """`release --push-images` with the store the release was built from: every converted image
    lands with the registry's digest (the lock's pin), its gzip layers from the store; the
    archive's zstd layers and converted manifests are not sent at all."""
    converted = _converted(small_release)
    assert converted, "the session's release is built in the zstd mode (the default)"
    pins = {p.ref: p.platforms["amd64"] for p in lockfile.load(fetched.lock).images}
    mirror = f"{registry.host}/from-store"
    proc = run_builder("--store", str(fetched.store), "release", "--allow-unsigned", "--artifacts",
                       str(small_release), "--push-images", mirror, "--insecure")
    client = client_for(registry)
    for image, (mine, upstream) in sorted(converted.items()):
        assert upstream == pins[image]
        target = rl.image_target(mirror, image)
        got = client.get_manifest(target, upstream)
        assert got.digest == upstream == dg.of_bytes(got.raw)
        assert _layer_types(got.raw) <= {m.OCI_LAYER_GZIP, m.DOCKER_LAYER_GZIP}
        assert _absent(client, target, mine)
        assert (f"note: {image}: pushed in its registry form (gzip layers from the store), the "
                f"registry's digest kept: amd64 {upstream}") in proc.stdout
    assert "converted form" not in proc.stdout
    store = Store(fetched.store)  # the figures: what went from the store, what stayed in the archive
    sizes = {form: sum(d.size for pair in converted.values()
                       for d in load_image(store, pair[i])[0].layers)
             for i, form in enumerate(("zstd", "gzip"))}
    print(f"registry form: {proc.stdout.splitlines()[0]}; converted images' layers: gzip pushed "
          f"{sizes['gzip']} bytes, zstd not sent {sizes['zstd']} bytes")


def test_push_images_of_a_zstd_release_without_the_store_sends_the_converted_form(
        small_release: Path, registry, tmp_path: Path) -> None:
    """A release host without the store (here: an empty one) pushes what the archives hold, and
    says, once per image, that its digest is not the registry's, naming both."""
    converted = _converted(small_release)
    mirror = f"{registry.host}/converted"
    empty = Store(tmp_path / "empty-store")
    result = rl.push_images(client_for(registry), rl.collect(small_release, ["amd64"]), mirror,
                            store=empty)
    client = client_for(registry)
    for image, (mine, upstream) in sorted(converted.items()):
        target = rl.image_target(mirror, image)
        got = client.get_manifest(target, mine)
        assert got.digest == mine and _layer_types(got.raw) == {m.OCI_LAYER_ZSTD}
        assert _absent(client, target, upstream)
        said = [n for n in result.notes if n.startswith(f"{image}: ")]
        assert said == [f"{image}: pushed in its converted form (zstd layers): its digest differs "
                        "from the registry's, so a pin, signature or policy naming the registry "
                        f"digest does not match it: amd64 {mine} (registry {upstream}: the store "
                        f"at {empty.root} does not hold the registry manifest)"]
    print(f"converted form: {result.sent} bytes sent")
