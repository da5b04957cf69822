"""The registry client against the real CNCF registry: endpoints, verification, resume, push."""

from __future__ import annotations

import re
import signal
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from builder import digest as dg
from builder.errors import BuilderError, DigestMismatch, FetchError
from builder.fetch.images import pull_images
from builder.fetch.registry import ClientOptions, RegistryClient, endpoint, endpoints_for
from builder.fetch.transport import RetryPolicy
from builder.lock.lockfile import Mirrors, RegistryMirror
from builder.oci import model as m
from builder.oci.layer import FileEntry
from builder.oci.reference import DEFAULT_HOST, Reference, parse
from builder.progress import Reporter
from builder.store import Store
from tests.rig.faults import FaultProxy
from tests.rig.images import build_single, lock_for, random_file
from tests.rig.procs import free_port


def _client(host: str, attempts: int = 2) -> RegistryClient:
    opts = ClientOptions(policy=RetryPolicy(attempts, backoff=0.02))
    return RegistryClient(mirrors=Mirrors(insecure=(host,)), options=opts)


def _registry_blob(registry, digest: str) -> Path:
    hexd = dg.hex_of(digest)
    return registry.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


# -- endpoints -------------------------------------------------------------------------------


def test_endpoints_mirrors_in_order_then_upstream():
    mirrors = Mirrors(registries=(RegistryMirror("quay.io", ("mirror-a:5000", "https://mirror-b/prefix/v2/")),),
                      insecure=("plain:5000",))
    eps = endpoints_for("quay.io", mirrors)
    assert [e.base for e in eps] == ["https://mirror-a:5000", "https://mirror-b/prefix", "https://quay.io"]
    assert [e.mirror for e in eps] == [True, True, False]
    assert eps[2].url("x/y/manifests/t") == "https://quay.io/v2/x/y/manifests/t"


def test_docker_hub_upstream_is_derived_and_fallback_false_keeps_it_out():
    upstream = endpoints_for(DEFAULT_HOST, Mirrors())
    assert len(upstream) == 1 and upstream[0].base.startswith("https://") and not upstream[0].mirror
    assert upstream[0].netloc.endswith("." + DEFAULT_HOST)  # Docker's API host convention
    air = Mirrors(registries=(RegistryMirror(DEFAULT_HOST, ("http://10.0.0.1:5000",), fallback=False),),
                  insecure=("10.0.0.1",))
    assert [e.base for e in endpoints_for(DEFAULT_HOST, air)] == ["http://10.0.0.1:5000"]


def test_plain_http_only_for_insecure_hosts():
    with pytest.raises(BuilderError, match="(?s)plain HTTP.*under `insecure:` in this host's mirrors file"):
        endpoint("docker.io", "http://mirror.example:5000", ())
    assert endpoint("docker.io", "mirror.example:5000", ("mirror.example:5000",)).base == \
        "http://mirror.example:5000"
    assert endpoint("docker.io", "mirror.example:5000", ()).base == "https://mirror.example:5000"


# -- manifests -------------------------------------------------------------------------------


def test_manifest_by_tag_and_digest(anon_setup):
    """Raw bytes with the full Accept list: OCI index and Docker list come back as pushed."""
    client = anon_setup.client()
    for image in anon_setup.images:
        ref = parse(image.ref(anon_setup.host))
        by_tag = client.get_manifest(ref)
        assert by_tag.digest == image.top.digest
        assert by_tag.media_type == image.top.media_type
        by_digest = client.get_manifest(ref, image.manifests["arm64"].digest)
        doc = by_digest.parse("x")
        assert isinstance(doc, m.Manifest) and by_digest.digest == image.manifests["arm64"].digest
    busybox = client.get_manifest(parse(anon_setup.images[0].ref(anon_setup.host))).parse("x")
    assert isinstance(busybox, m.Index)
    assert sum(d.is_attestation for d in busybox.manifests) == 2  # skipped by select()
    assert str(busybox.select(m.Platform.for_arch("arm64")).platform) == "linux/arm64/v8"


def test_registry_serving_other_bytes_for_a_pinned_manifest_is_refused(registry, fixture_set, tmp_path):
    """The registry's stored index is altered on disk: the pin is refused with both digests,
    before parsing, and nothing is stored."""
    src, images = fixture_set
    image = images[0]
    client = _client(registry.host)
    client.push_tree(src, Reference(registry.host, image.repository, image.tag), image.top)
    data = _registry_blob(registry, image.top.digest)
    data.write_bytes(data.read_bytes().replace(b'"schemaVersion":2', b'"schemaVersion": 2'))
    served = dg.of_bytes(data.read_bytes())

    store = Store(tmp_path / "store")
    lock = lock_for([image.pin(registry.host)], mirrors=client.mirrors)
    with pytest.raises(DigestMismatch) as err:
        pull_images(lock, ["amd64"], store, client=client, quiet=True)
    text = str(err.value)
    assert image.top.digest in text and served in text and image.ref(registry.host) in text
    assert not store.has(image.top.digest) and not store.has(served)


# -- blobs -----------------------------------------------------------------------------------


def test_corrupt_blob_detected_and_nothing_stored(registry, anon_setup, fixture_set, tmp_path):
    """A blob whose bytes do not match its digest (storage altered on disk): refused with both
    digests, nothing stored, no partial kept; with a healthy second mirror the pull completes."""
    src, images = fixture_set
    image = images[0]
    client = _client(registry.host)
    client.push_tree(src, Reference(registry.host, image.repository, image.tag), image.top)
    manifest = m.parse_document(src.read_bytes(image.manifests["amd64"].digest), "x")
    layer = max(manifest.layers, key=lambda d: d.size)
    data = _registry_blob(registry, layer.digest)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one bit pattern flipped
    data.write_bytes(bytes(raw))

    store = Store(tmp_path / "store")
    with pytest.raises(DigestMismatch) as err:
        pull_images(lock_for([image.pin(registry.host)], mirrors=client.mirrors), ["amd64"], store,
                    client=client, quiet=True)
    assert layer.digest in str(err.value) and dg.of_bytes(bytes(raw)) in str(err.value)
    assert not store.has(layer.digest)
    assert not any((store.root / "ingest").iterdir())  # no partial kept for a bad blob

    logical = "images.example"
    mirrors = Mirrors(registries=(RegistryMirror(logical, (registry.host, anon_setup.host),
                                                 fallback=False),),
                      insecure=(registry.host, anon_setup.host))
    pin = replace(image.pin(registry.host), ref=f"{logical}/{image.repository}:{image.tag}")
    client = RegistryClient(mirrors=mirrors, options=ClientOptions(policy=RetryPolicy(attempts=1)))
    pull_images(lock_for([pin], mirrors=mirrors), ["amd64"], store, client=client,
                quiet=True)
    assert store.has(layer.digest)


class _KillAt(Reporter):
    """A Reporter whose bars SIGKILL the registry once ``threshold`` bytes of a blob arrived."""

    def __init__(self, registry, threshold: int):
        super().__init__(quiet=True)
        self.registry, self.threshold, self.fired = registry, threshold, False

    @contextmanager
    def bar(self, label, total):
        def update(done: int, new_total: int | None = None) -> None:
            if done >= self.threshold and not self.fired:
                self.fired = True
                self.registry.process.stop(signal.SIGKILL)
        yield update


def _log_206_bytes(registry, digest: str) -> list[int]:
    """Bytes the registry says it wrote for ranged GETs of ``digest`` (its own access log)."""
    out = []
    for line in (registry.work / "registry.log").read_text().splitlines():
        if digest in line and "http.response.status=206" in line:
            found = re.search(r"http\.response\.written=(\d+)", line)
            if found:
                out.append(int(found.group(1)))
    return out


def test_registry_stopped_mid_pull_then_rerun_sends_only_the_rest(registry, tmp_path):
    """A 40 MiB random layer; the registry is killed after ~8 MiB arrived. The partial stays in
    the store's ingest area; after a restart the rerun asks with Range and receives exactly the
    missing bytes (counted by the client and by the registry's own access log)."""
    size = 40 << 20
    src = Store(tmp_path / "src")
    big = build_single(src, "fixtures/big", "1", "amd64",
                       [FileEntry("data/big.bin", random_file(tmp_path / "big.bin", size))])
    client = _client(registry.host)
    client.push_tree(src, Reference(registry.host, big.repository, big.tag), big.top)
    layer = m.parse_document(src.read_bytes(big.top.digest), "x").layers[0]
    lock = lock_for([big.pin(registry.host)], ["amd64"], client.mirrors)

    store = Store(tmp_path / "store")
    with pytest.raises(FetchError, match="kept for resume|attempts"):
        pull_images(lock, ["amd64"], store, client=client, reporter=_KillAt(registry, 8 << 20))
    partial = store.root / "ingest" / dg.hex_of(layer.digest)
    kept = partial.stat().st_size
    assert 0 < kept < layer.size and not store.has(layer.digest)

    registry.start()  # same port, same storage
    report = pull_images(lock, ["amd64"], store, client=client, quiet=True)
    assert store.has(layer.digest)
    assert report.bytes_transferred == layer.size - kept
    assert _log_206_bytes(registry, layer.digest) == [layer.size - kept]
    print(f"\n  resume: {kept} bytes kept, {report.bytes_transferred} re-sent of {layer.size}")


def test_429_retry_after_and_5xx_are_retried(registry, tmp_path):
    """The real registry behind the rig's fault proxy, which answers the first request 429 with
    Retry-After: 1 and the second 503 (the registry cannot be made to answer either on demand),
    then passes the third through. The client waits at least the second the server asked for
    (its own back-off here is 0.02 s) and stores the verified blob."""
    blob = b"flaky blob content\n" * 100
    src = Store(tmp_path / "src")
    digest = src.put_bytes(blob)
    _client(registry.host).push_blob(Reference(registry.host, "flaky/repo"), digest, len(blob),
                                     lambda: src.open(digest))
    proxy = FaultProxy(registry.url).start()
    try:
        proxy.plan("status:429:retry-after=1", "status:503")
        host = proxy.url.removeprefix("http://")
        desc = m.Descriptor("application/octet-stream", digest, len(blob))
        store = Store(tmp_path / "store")
        started = time.monotonic()
        result = _client(host, attempts=4).fetch_blob(Reference(host, "flaky/repo"), desc, store,
                                                       what="blob")
        waited = time.monotonic() - started
        assert result.fetched and store.read_bytes(digest) == blob
        assert [s.status for s in proxy.requests_seen(3)] == [429, 503, 200]
        assert waited >= 0.95  # Retry-After honoured
    finally:
        proxy.stop()


# -- mirrors ---------------------------------------------------------------------------------


def test_mirror_order_dead_mirror_skipped_and_no_fallback(anon_setup, tmp_path):
    """docker.io references pulled only through mirrors (fallback false): a dead mirror first,
    the live one second. The upstream is never tried."""
    dead = f"127.0.0.1:{free_port()}"
    mirrors = Mirrors(registries=(RegistryMirror(DEFAULT_HOST, (f"http://{dead}", f"http://{anon_setup.host}"),
                                                 fallback=False),),
                      insecure=("127.0.0.1",))
    image = anon_setup.images[0]
    pin = replace(image.pin(anon_setup.host), ref=f"{DEFAULT_HOST}/{image.repository}:{image.tag}")
    client = RegistryClient(mirrors=mirrors, options=ClientOptions(policy=RetryPolicy(attempts=1, backoff=0.01)))
    report = pull_images(lock_for([pin], mirrors=mirrors), ["amd64", "arm64"], Store(tmp_path / "s"),
                         client=client, quiet=True)
    assert report.blobs_fetched > 0

    only_dead = replace(mirrors, registries=(RegistryMirror(DEFAULT_HOST, (f"http://{dead}",),
                                                            fallback=False),))
    client = RegistryClient(mirrors=only_dead, options=ClientOptions(policy=RetryPolicy(attempts=1, backoff=0.01)))
    with pytest.raises(FetchError, match=dead):
        pull_images(lock_for([pin], mirrors=only_dead), ["amd64"], Store(tmp_path / "t"),
                    client=client, quiet=True)


# -- push ------------------------------------------------------------------------------------


def test_push_monolithic_and_chunked(registry, fixture_set, tmp_path):
    """POST+PUT and POST+PATCH…+PUT uploads both land; HEAD then says the blob exists and a
    second push sends nothing."""
    src, images = fixture_set
    image = images[2]  # socat: three layers
    client = _client(registry.host)
    mono = Reference(registry.host, "pushed/mono", "1")
    chunked = Reference(registry.host, "pushed/chunked", "1")
    assert client.push_tree(src, mono, image.top) == image.top.digest
    assert client.push_tree(src, chunked, image.top, chunk_size=64 * 1024) == image.top.digest
    log = (registry.work / "registry.log").read_text()
    assert re.search(r'"PATCH /v2/pushed/chunked/blobs/uploads/', log)

    manifest = m.parse_document(src.read_bytes(image.manifests["arm64"].digest), "x")
    for layer in manifest.layers:
        assert client.blob_exists(chunked, layer.digest)
        assert client.push_blob(chunked, layer.digest, layer.size,
                                lambda d=layer.digest: src.open(d)) is False
    store = Store(tmp_path / "back")
    for layer in manifest.layers:
        assert client.fetch_blob(chunked, layer, store, what="layer").fetched
    assert client.get_manifest(chunked).digest == image.top.digest
