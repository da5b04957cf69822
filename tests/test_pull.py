"""pull_images / resolve_images against real registries (anonymous, basic+TLS, token+TLS)."""

from __future__ import annotations

import io
import time
from dataclasses import replace

import pytest

from builder.errors import BuilderError, UnresolvedError
from builder.fetch.images import pull_images, resolve_images
from builder.fetch.transport import RetryPolicy
from builder.oci import model as m
from builder.progress import Reporter
from builder.store import Store
from tests.rig.images import build_single, lock_for
from tests.rig.payloads import binary

ARCHES = ("amd64", "arm64")


def _lock(setup, resolved=True):
    return lock_for([i.pin(setup.host, resolved=resolved) for i in setup.images], ARCHES, setup.mirrors)


def _distinct_blobs(fixture_set) -> set[str]:
    """Index, platform manifests, configs and layers of every fixture (no attestations)."""
    store, images = fixture_set
    return set().union(*(img.blobs(store) for img in images))


def test_pull_all_arches_then_warm_pull_transfers_nothing(any_setup, fixture_set, tmp_path):
    """Through each registry set-up: every image for amd64 + arm64, verified, each blob once;
    a second pull reads only the store (0 bytes, 0 fetched)."""
    store = Store(tmp_path / "store")
    lock = _lock(any_setup)
    cold = pull_images(lock, ARCHES, store, client=any_setup.client(), jobs=4, quiet=True)
    want = _distinct_blobs(fixture_set)
    assert cold.blobs_fetched == len(want)  # shared layers (base, busybox) fetched once
    assert all(store.has(d) for d in want)
    assert cold.bytes_transferred == sum(store.size(d) for d in want)
    assert {(p.ref, p.arch) for p in cold.images} == {(i.ref(any_setup.host), a)
                                                     for i in any_setup.images for a in ARCHES}
    for pulled in cold.images:
        config = m.parse_config(store.read_bytes(pulled.config), "config")
        assert config.platform.matches(m.Platform.for_arch(pulled.arch))

    warm = pull_images(lock, ARCHES, store, client=any_setup.client(), jobs=4, quiet=True)
    assert warm.bytes_transferred == 0
    assert warm.blobs_fetched == 0
    assert warm.blobs_present >= len(want)


def test_cold_pull_timings(anon_setup, tmp_path, capsys):
    """Figures for the report: cold pull with 1 worker vs the default pool, and a warm rerun."""
    lock = _lock(anon_setup)
    lines = []
    for jobs in (1, 4):
        store = Store(tmp_path / f"s{jobs}")
        start = time.perf_counter()
        report = pull_images(lock, ARCHES, store, client=anon_setup.client(), jobs=jobs,
                             quiet=True)
        lines.append(f"jobs={jobs}: cold {time.perf_counter() - start:.3f}s, "
                     f"{report.bytes_transferred} bytes, {report.blobs_fetched} blobs")
    warm = pull_images(lock, ARCHES, store, client=anon_setup.client(), quiet=True)
    lines.append(f"warm: {warm.bytes_transferred} bytes transferred, {warm.blobs_present} present")
    with capsys.disabled():
        print("\n  " + "\n  ".join(lines))
    assert warm.bytes_transferred == 0


def test_resolve_tags_to_pins(any_setup):
    """`lock`: tags → the index digest and the per-arch manifest digests the fixtures were built with."""
    lock = _lock(any_setup, resolved=False)
    with pytest.raises(UnresolvedError, match="platforms|digest"):
        pull_images(lock, ARCHES, Store.__new__(Store), quiet=True)
    resolved = resolve_images(lock, client=any_setup.client())
    assert resolved.images == tuple(i.pin(any_setup.host) for i in any_setup.images)
    assert resolved.release == lock.release  # a new Lock, the rest untouched


def test_index_without_arch_names_image_and_lists_arches(registry, tmp_path):
    """resolve and pull of an index that lacks arm64: error names the image and its arches."""
    from builder.fetch.registry import ClientOptions, RegistryClient
    from builder.lock.lockfile import Mirrors
    from builder.oci.image import build_index
    from builder.oci.layer import FileEntry
    from builder.oci.reference import Reference
    from tests.rig.images import FixtureImage

    src = Store(tmp_path / "src")
    single = build_single(src, "fixtures/amd64-only", "1", "amd64",
                          [FileEntry("bin/busybox", binary("busybox", "amd64"))])
    index = build_index(src, [single.top])
    image = FixtureImage("fixtures/amd64-only", "1", index, {"amd64": single.top})
    mirrors = Mirrors(insecure=(registry.host,))
    client = RegistryClient(mirrors=mirrors, options=ClientOptions(policy=RetryPolicy(attempts=2, backoff=0.01)))
    client.push_tree(src, Reference(registry.host, image.repository, image.tag), index)

    lock = lock_for([image.pin(registry.host, resolved=False)], ARCHES, mirrors)
    with pytest.raises(BuilderError) as err:
        resolve_images(lock, client=client)
    text = str(err.value)
    assert image.ref(registry.host) in text and "arm64" in text and "it has: linux/amd64" in text

    # A lock that pins arm64 anyway (hand-edited) fails the same way at fetch time.
    pin = replace(image.pin(registry.host), platforms={"amd64": single.top.digest,
                                                       "arm64": single.top.digest}, arches=None)
    with pytest.raises(BuilderError, match="has no image for arm64.*it has: linux/amd64"):
        pull_images(lock_for([pin], ARCHES, mirrors), ARCHES, Store(tmp_path / "d"), client=client,
                    quiet=True)


def test_platform_mixup_is_an_error(anon_setup, fixture_set, tmp_path):
    """Swapped per-arch pins, or an arm64-only manifest pinned for amd64: refused, no fallback."""
    _, images = fixture_set
    busybox = images[0]
    swapped = replace(busybox.pin(anon_setup.host),
                      platforms={"amd64": busybox.manifests["arm64"].digest,
                                 "arm64": busybox.manifests["amd64"].digest})
    with pytest.raises(BuilderError, match="pins .* for amd64, but index"):
        pull_images(lock_for([swapped], ARCHES, anon_setup.mirrors), ["amd64"],
                    Store(tmp_path / "a"), client=anon_setup.client(), quiet=True)

    arm = busybox.manifests["arm64"].digest  # a manifest (no index) whose config says arm64
    wrong = replace(busybox.pin(anon_setup.host), digest=arm, platforms={"amd64": arm})
    with pytest.raises(BuilderError, match="is an image for linux/arm64"):
        pull_images(lock_for([wrong], ["amd64"], anon_setup.mirrors), ["amd64"],
                    Store(tmp_path / "b"), client=anon_setup.client(), quiet=True)


def test_progress_lines_and_bars(anon_setup, tmp_path):
    """Progress goes through builder.progress.Reporter: without bars, one summary line per image
    and arch; on a terminal, a tqdm bar per blob, with those lines above the bars."""
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = io.StringIO()
    pull_images(_lock(anon_setup), ARCHES, Store(tmp_path / "s"), client=anon_setup.client(),
                reporter=Reporter(stream=out))
    lines = out.getvalue().splitlines()
    assert len(lines) == len(anon_setup.images) * len(ARCHES)
    assert all("layer(s)" in line for line in lines)

    bars = Tty()
    pull_images(_lock(anon_setup), ARCHES, Store(tmp_path / "t"), client=anon_setup.client(),
                reporter=Reporter(bars=True, stream=bars))
    assert "fixtures/busybox:1.36 arm64" in bars.getvalue()
    assert "B/s" in bars.getvalue() or "iB" in bars.getvalue()  # a byte bar was drawn

    quiet = io.StringIO()
    pull_images(_lock(anon_setup), ARCHES, Store(tmp_path / "u"), client=anon_setup.client(),
                reporter=Reporter(quiet=True, stream=quiet))
    assert quiet.getvalue() == ""


def test_resolve_keeps_pins_unless_refresh_and_reports_through_the_cli_reporter(anon_setup, tmp_path):
    """`lock` semantics: set pins stay (no request), --refresh re-resolves; the CLI's Reporter
    gets one line per resolved image and one per pulled image and arch."""
    from builder.progress import Reporter

    out = io.StringIO()
    reporter = Reporter(stream=out)
    stale = replace(anon_setup.images[0].pin(anon_setup.host),
                    digest=anon_setup.images[1].top.digest)  # a pin that is set (even if stale)
    lock = lock_for([stale], ARCHES, anon_setup.mirrors)
    store = Store(tmp_path / "s")
    kept = resolve_images(lock, client=anon_setup.client(), store=store, reporter=reporter)
    assert kept.images == (stale,) and out.getvalue() == ""
    fresh = resolve_images(lock, client=anon_setup.client(), store=store, reporter=reporter,
                           refresh=True)
    assert fresh.images == (anon_setup.images[0].pin(anon_setup.host),)
    assert f"resolved {stale.ref}: {anon_setup.images[0].top.digest}" in out.getvalue()

    out.truncate(0)
    pull_images(fresh, ARCHES, store, client=anon_setup.client(), reporter=reporter)
    assert len([x for x in out.getvalue().splitlines() if "layer(s)" in x]) == len(ARCHES)
