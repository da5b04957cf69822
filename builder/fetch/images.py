"""Pull the lock's images into the content store (``fetch``) and resolve tags to pins (``lock``).

``pull_images`` works in two phases over one bounded worker pool:

1. per image: the index (if the pin is one) and each arch's manifest and config, all by digest.
   The index must list the pinned manifest for the arch, and the config's os/arch must be the
   arch being built: a mix-up is an error, never a silent fallback.
2. every layer of every image and arch, deduplicated by digest, so a layer shared by several
   images or arches is fetched once; the store's per-digest lock covers two builds at once.

Anything already in the store is read from it (it was verified on the way in): a second pull
transfers nothing. The report counts bytes received and blobs fetched vs. already present.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from builder.errors import BuilderError
from builder.fetch.registry import BlobResult, ClientOptions, RegistryClient
from builder.fetch.signatures import CosignKey, cosign_keys, fetch_signature
from builder.humanize import human
from builder.lock.lockfile import LOCK_HINT, ImagePin, Lock
from builder.oci import model as m
from builder.oci import reference
from builder.oci.cosign import Verified
from builder.oci.reference import Reference
from builder.progress import Reporter
from builder.store import Store

DEFAULT_JOBS = 4


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


@dataclass
class PulledImage:
    ref: str
    arch: str
    index: str | None  # the index digest (None for a single-platform image)
    manifest: str
    config: str
    layers: tuple[str, ...]

    @property
    def blobs(self) -> tuple[str, ...]:
        return tuple(d for d in (self.index, self.manifest, self.config, *self.layers) if d)


@dataclass
class PullReport:
    images: list[PulledImage] = field(default_factory=list)
    signatures: list[Verified] = field(default_factory=list)  # cosign keys of the lock
    bytes_transferred: int = 0
    blobs_fetched: int = 0  # documents and blobs received in this run
    blobs_present: int = 0  # documents and blobs that were already in the store
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, fetched: bool, transferred: int) -> None:
        with self._lock:
            self.bytes_transferred += transferred
            if fetched:
                self.blobs_fetched += 1
            else:
                self.blobs_present += 1

    def summary(self) -> str:
        return (f"{len(self.images)} image(s): {self.blobs_fetched} blob(s) fetched, "
                f"{self.blobs_present} already present, {human(self.bytes_transferred)} "
                f"transferred in {self.seconds:.1f}s")


@dataclass
class _BlobBars:
    """One ``Reporter.bar`` per blob in flight. Several threads pull at once, the registry client
    reports each chunk it wrote while a bar wants the bytes done so far: this keeps, per label, the
    open bar and its running count (the one thing ``builder.progress.Reporter`` does not do)."""

    reporter: Reporter
    _open: dict[str, contextlib.ExitStack] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, label: str, size: int) -> Callable[[int], None]:
        stack = contextlib.ExitStack()
        update = stack.enter_context(self.reporter.bar(label, size))
        with self._lock:
            self._open[label] = stack
        done = 0

        def on_bytes(n: int) -> None:
            nonlocal done
            done += n
            update(done, size)

        return on_bytes

    def stop(self, label: str) -> None:
        with self._lock:
            stack = self._open.pop(label, None)
        if stack is not None:
            stack.close()

    def close(self) -> None:
        with self._lock:
            stacks, self._open = list(self._open.values()), {}
        for stack in stacks:
            stack.close()


# ---------------------------------------------------------------------------------------------
# Pull
# ---------------------------------------------------------------------------------------------


def _check_pins(lock: Lock, arches: Iterable[str]) -> None:
    lock.require_resolved(tuple(arches), components=False)


@dataclass
class _Puller:
    client: RegistryClient
    store: Store
    report: PullReport
    bars: _BlobBars  # and, through it, the Reporter that prints lines
    keys: dict[str, CosignKey] = field(default_factory=dict)

    def signature(self, pin: ImagePin) -> None:
        """The publisher's cosign signature of the pinned digest, when the lock names a key."""
        key = self.keys.get(pin.ref)
        if key is None:
            return
        assert pin.digest
        verified = fetch_signature(self.client, self.store, pin.ref, pin.reference, pin.digest,
                                   key.key, key.shown)
        with self.report._lock:
            self.report.signatures.append(verified)
        self.bars.reporter.line(f"{pin.ref}: cosign signature of {pin.digest[:19]} by {key.shown} verified")

    def document(self, ref: Reference, digest: str) -> m.Manifest | m.Index:
        """A manifest or index by digest, from the store when present, else fetched and stored."""
        if self.store.has(digest):
            self.report.count(False, 0)
            raw = self.store.read_bytes(digest)
            return m.parse_document(raw, f"{ref.name}@{digest}")
        got = self.client.get_manifest(ref, digest)  # verified against ``digest`` before parsing
        self.store.put_bytes(got.raw, expected=digest, what=f"{ref.name}@{digest}")
        self.report.count(True, len(got.raw))
        return got.parse(f"{ref.name}@{digest}")

    def blob(self, ref: Reference, desc: m.Descriptor, what: str) -> BlobResult:
        label = f"{ref.repository.rsplit('/', 1)[-1]} {desc.digest[7:19]}"
        on_bytes = self.bars.start(label, desc.size) if not self.store.has(desc.digest) else None
        try:
            result = self.client.fetch_blob(ref, desc, self.store, what=what, on_bytes=on_bytes)
        finally:
            if on_bytes is not None:
                self.bars.stop(label)
        self.report.count(result.fetched, result.transferred)
        return result

    def image(self, pin: ImagePin, arches: list[str]) -> list[tuple[PulledImage, m.Manifest]]:
        """Index + per-arch manifest + config, checked against the pins and the arch."""
        ref = pin.reference
        assert pin.digest
        self.signature(pin)  # before any layer: an unsigned image transfers nothing more
        top = self.document(ref, pin.digest)
        out = []
        for arch in arches:
            want = pin.platforms[arch]
            assert want
            index_digest = None
            if isinstance(top, m.Index):
                index_digest = pin.digest
                chosen = select_platform(top, arch, pin.ref)
                if chosen.digest != want:
                    raise BuilderError(
                        f"{pin.ref}: the lock pins {want} for {arch}, but index {pin.digest} "
                        f"lists {chosen.digest} for {chosen.platform}",
                        "the lock is inconsistent; re-run `python -m builder lock`")
                manifest = self.document(ref, want)
            elif want != pin.digest:
                raise BuilderError(f"{pin.ref}: {pin.digest} is a single-platform manifest, but "
                                   f"the lock pins {want} for {arch}", LOCK_HINT)
            else:
                manifest = top
            if not isinstance(manifest, m.Manifest):
                raise BuilderError(f"{pin.ref}: {want} ({arch}) is an index, not an image manifest",
                                   "nested indexes are not supported; pin the platform manifest")
            self.blob(ref, manifest.config, f"{pin.ref} config")
            config = m.parse_config(self.store.read_bytes(manifest.config.digest),
                                    f"{pin.ref} config {manifest.config.digest}")
            check_platform(config, arch, pin.ref, want)
            if len(config.diff_ids) != len(manifest.layers):
                raise BuilderError(f"{pin.ref} ({arch}): {len(manifest.layers)} layers but "
                                   f"{len(config.diff_ids)} diff_ids in the config")
            out.append((PulledImage(pin.ref, arch, index_digest, want, manifest.config.digest,
                                    tuple(layer.digest for layer in manifest.layers)), manifest))
        return out


def select_platform(index: m.Index, arch: str, ref: str) -> m.Descriptor:
    """The index's manifest for ``arch`` (attestations skipped), or an error listing what it has."""
    platform = m.Platform.for_arch(arch)
    chosen = index.select(platform)
    if chosen is None:
        have = ", ".join(sorted({str(p) for p in index.platforms()})) or "no platforms"
        raise BuilderError(f"{ref}: index {index.digest} has no image for {arch} ({platform}); "
                           f"it has: {have}",
                           f"restrict the image to the arches it has (`arches:` in the lock) "
                           f"or use a tag that is built for {arch}")
    return chosen


def check_platform(config: m.ImageConfig, arch: str, ref: str, digest: str) -> None:
    want = m.Platform.for_arch(arch)
    if not config.platform.matches(want):
        raise BuilderError(f"{ref}: manifest {digest}, taken for {arch} ({want}), is an image for "
                           f"{config.platform or 'no platform'} according to its config",
                           "the index or the lock mixes up platforms; check the pin for this arch")


def default_client(lock: Lock, jobs: int = DEFAULT_JOBS) -> RegistryClient:
    """The lock's mirrors, credentials from env/Docker config, CA from BUILDER_REGISTRY_CA_FILE."""
    options = replace(ClientOptions.from_env(), pool_size=max(jobs, ClientOptions.pool_size))
    return RegistryClient(mirrors=lock.mirrors, options=options)


def pull_images(lock: Lock, arches: Iterable[str], store: Store, *,
                client: RegistryClient | None = None, jobs: int = DEFAULT_JOBS,
                reporter: Reporter | None = None, quiet: bool = False) -> PullReport:
    """Fetch every image of ``lock`` applicable to each of ``arches`` into ``store``.

    ``reporter``: where progress goes (the CLI's); without one, ``Reporter.auto(quiet)``: bars
    on a terminal (not in CI), one line per image and arch otherwise, nothing when ``quiet``.
    """
    arches = list(arches)
    _check_pins(lock, arches)
    reporter = reporter or Reporter.auto(quiet)
    daemon_pins = [p for p in lock.images if p.daemon and any(p.applies_to(a) for a in arches)]
    if daemon_pins:
        from builder.fetch import daemon as daemon_images
        daemon = daemon_images.source()
        for pin in daemon_pins:
            asked = daemon_images.take(pin, arches, store, daemon)
            reporter.line(f"{pin.ref}: {f'taken from {pin.daemon}' if asked else 'already in the store'}")
        lock = replace(lock, images=tuple(p for p in lock.images if not p.daemon))
    keys = cosign_keys(lock, [p for p in lock.images if any(p.applies_to(a) for a in arches)])
    client = client or default_client(lock, jobs)
    client.check_credentials(pin.reference.host for pin in lock.images)  # before any request
    bars = _BlobBars(reporter)
    report = PullReport()
    started = time.monotonic()
    puller = _Puller(client, store, report, bars, keys)
    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="pull") as pool:
            plans = _run(pool, [
                functools.partial(puller.image, pin, [a for a in arches if pin.applies_to(a)])
                for pin in lock.images if any(pin.applies_to(a) for a in arches)
            ])
            pulled = [item for plan in plans for item in plan]
            _pull_layers(pool, puller, pulled)
    finally:
        bars.close()
    report.images = [p for p, _ in pulled]
    report.seconds = time.monotonic() - started
    return report


def _pull_layers(pool: ThreadPoolExecutor, puller: _Puller,
                 pulled: list[tuple[PulledImage, m.Manifest]]) -> None:
    # One task per distinct layer; each image's line is printed when its last layer is in.
    tasks: dict[str, tuple[Reference, m.Descriptor, str]] = {}
    waiting: dict[int, set[str]] = {}
    for n, (img, manifest) in enumerate(pulled):
        waiting[n] = {layer.digest for layer in manifest.layers}
        ref = reference.parse(img.ref)
        for layer in manifest.layers:
            tasks.setdefault(layer.digest, (ref, layer, img.ref))
    fetched: dict[str, BlobResult] = {}
    futures = {pool.submit(puller.blob, ref, desc, f"{shown} layer"): digest
               for digest, (ref, desc, shown) in tasks.items()}
    for n in [n for n, left in waiting.items() if not left]:
        _announce(puller, pulled[n][0], fetched)
    pending = set(futures)
    while pending:
        done, pending = wait(pending, return_when=FIRST_EXCEPTION)
        for fut in done:
            if fut.exception() is not None:
                for other in pending:
                    other.cancel()
                raise fut.exception()  # type: ignore[misc]
            digest = futures[fut]
            fetched[digest] = fut.result()
            for n, left in waiting.items():
                if digest in left:
                    left.discard(digest)
                    if not left:
                        _announce(puller, pulled[n][0], fetched)


def _announce(puller: _Puller, img: PulledImage, fetched: dict[str, BlobResult]) -> None:
    results = [fetched[d] for d in img.layers if d in fetched]
    got = sum(r.transferred for r in results)
    new = sum(1 for r in results if r.fetched)
    puller.bars.reporter.line(
        f"{img.ref} {img.arch}: {len(img.layers)} layer(s), {new} fetched, "
        f"{len(img.layers) - new} already present, {human(got)}")


def _run(pool: ThreadPoolExecutor, calls: list[Callable[[], object]]) -> list:
    """Run calls in the pool; the first failure cancels what has not started and is raised."""
    futures: list[Future] = [pool.submit(c) for c in calls]
    done, pending = wait(futures, return_when=FIRST_EXCEPTION)
    for fut in futures:
        if fut.done() and fut.exception() is not None:
            for other in pending:
                other.cancel()
            raise fut.exception()  # type: ignore[misc]
    return [f.result() for f in futures]


# ---------------------------------------------------------------------------------------------
# Resolve (for `lock`)
# ---------------------------------------------------------------------------------------------


def resolve_images(lock: Lock, *, client: RegistryClient | None = None, store: Store | None = None,
                   arches: Iterable[str] | None = None, refresh: bool = False,
                   reporter: Any = None) -> Lock:
    """Tags → index digest and per-arch manifest digests; returns a new Lock.

    Pins already set for every wanted arch are kept unless ``refresh``. Each arch's manifest
    and config are fetched (small, verified) so a wrong-platform image is caught when locking,
    not when building; with ``store`` they are kept for the next fetch.
    """
    client = client or default_client(lock)
    client.check_credentials(pin.reference.host for pin in lock.images)  # before any request
    arches = list(arches or lock.arches)
    with _store_or_scratch(store) as where:
        images = []
        for pin in lock.images:
            wanted = [a for a in arches if pin.applies_to(a)]
            if not refresh and pin.digest and all(pin.platforms.get(a) for a in wanted):
                images.append(pin)
                continue
            if pin.daemon:
                from builder.fetch import daemon as daemon_images
                new = daemon_images.resolve(pin, wanted, where, daemon_images.source())
            else:
                new = resolve_pin(client, pin, wanted, where)
            if reporter is not None and new != pin:
                reporter.line(f"resolved {pin.ref}: {new.digest} ({', '.join(wanted)})")
            images.append(new)
    return replace(lock, images=tuple(images))


def resolve_pin(client: RegistryClient, pin: ImagePin, arches: list[str], store: Store) -> ImagePin:
    ref = pin.reference
    top = client.get_manifest(ref)  # by tag; the digest is computed from the bytes received
    store.put_bytes(top.raw, expected=top.digest, what=f"{pin.ref} manifest")
    doc = top.parse(f"{pin.ref} ({top.digest})")
    platforms = dict(pin.platforms)
    for arch in arches:
        if isinstance(doc, m.Index):
            digest = select_platform(doc, arch, pin.ref).digest
            got = client.get_manifest(ref, digest)
            store.put_bytes(got.raw, expected=digest, what=f"{pin.ref}@{digest}")
            manifest = got.parse(f"{pin.ref}@{digest}")
        else:
            digest, manifest = top.digest, doc
        if not isinstance(manifest, m.Manifest):
            raise BuilderError(f"{pin.ref}: {digest} ({arch}) is an index, not an image manifest")
        client.fetch_blob(ref, manifest.config, store, what=f"{pin.ref} config")
        config = m.parse_config(store.read_bytes(manifest.config.digest), f"{pin.ref} config")
        check_platform(config, arch, pin.ref, digest)
        platforms[arch] = digest
    return replace(pin, digest=top.digest, platforms=dict(sorted(platforms.items())))


@contextlib.contextmanager
def _store_or_scratch(store: Store | None) -> Iterator[Store]:
    if store is not None:
        yield store
        return
    with tempfile.TemporaryDirectory(prefix="builder-resolve-") as tmp:
        yield Store(Path(tmp))
