"""Command line: thin wrappers over the library, one function per command.

Configuration comes from flags first, then the environment (``BUILDER_STORE``, ``BUILDER_MIRRORS``,
``ARCH``, ``CROSS``), then images.lock.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder import lockfile
from builder.errors import BuilderError, NotYet
from builder.lockfile import KNOWN_ARCHES, Lock
from builder.progress import Reporter
from builder.sources.http import HttpFetcher, HttpOptions
from builder.store import Store, default_root

HOST_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
             "s390x": "s390x", "ppc64le": "ppc64le"}


@dataclass
class Context:
    args: argparse.Namespace
    reporter: Reporter

    def lock(self) -> Lock:
        lock = lockfile.load(Path(self.args.lock))
        mirrors_file = self.args.mirrors or os.environ.get("BUILDER_MIRRORS")
        if mirrors_file:
            lock = lock.with_mirrors(lockfile.load_mirrors(Path(mirrors_file)))
        return lock

    def store(self) -> Store:
        return Store(Path(self.args.store) if self.args.store else default_root())

    def fetcher(self, lock: Lock, store: Store) -> HttpFetcher:
        return HttpFetcher(store, lock.mirrors.files, HttpOptions())

    def arches(self, lock: Lock) -> tuple[str, ...]:
        return select_arches(lock, getattr(self.args, "arch", None), getattr(self.args, "cross", False))


def select_arches(lock: Lock, requested: Sequence[str] | None, cross: bool,
                  env: dict[str, str] | None = None) -> tuple[str, ...]:
    """--cross / CROSS=1: every arch of the lock; else --arch / ARCH; else the host's arch."""
    env = os.environ if env is None else env
    if cross or env.get("CROSS") in ("1", "true", "yes"):
        return lock.arches
    wanted: list[str] = []
    for item in requested or ([env["ARCH"]] if env.get("ARCH") else []):
        wanted.extend(a for a in item.split(",") if a)
    if not wanted:
        host = HOST_ARCH.get(platform.machine())
        if host is None:
            raise BuilderError(f"unknown host machine {platform.machine()!r}", "pass --arch")
        wanted = [host]
    for arch in wanted:
        if arch not in KNOWN_ARCHES:
            raise BuilderError(f"unknown arch {arch!r}", f"known arches: {', '.join(KNOWN_ARCHES)}")
        if arch not in lock.arches:
            raise BuilderError(f"{lock.source}: arch {arch} is not in the lock (arches: "
                               f"{', '.join(lock.arches)})",
                               "add it to `arches:` and run `python -m builder lock`")
    return tuple(dict.fromkeys(wanted))


# -- commands ----------------------------------------------------------------------------------


def cmd_lock(ctx: Context) -> int:
    lock = ctx.lock()
    arches = ctx.arches(lock) if (ctx.args.arch or ctx.args.cross) else lock.arches
    if ctx.args.check:
        found = lock.unresolved(arches)  # valid, and what `lock` still has to fill in
        ctx.reporter.line(f"{ctx.args.lock}: valid, {lockfile.describe_unresolved(found)} for "
                          f"{', '.join(arches)} ({len(lock.components)} components, "
                          f"{len(lock.images)} images)")
        if any(found.values()):
            ctx.reporter.line(f"{lockfile.list_unresolved(found)}\n  hint: {lockfile.LOCK_HINT}")
        return 0
    from builder.resolve import resolve_files

    store = ctx.store()
    new = resolve_files(lock, ctx.fetcher(lock, store), ctx.reporter, arches, ctx.args.refresh)
    if not ctx.args.files_only:
        try:
            from builder.pull import resolve_images
        except ImportError:
            raise NotYet("lock: resolving image digests needs the registry client (not yet built)") from None
        new = resolve_images(new, store=store, reporter=ctx.reporter, arches=arches,
                             refresh=ctx.args.refresh)
    # Only the pins change in the file (comments, order, layout and its own mirrors stay).
    changed = lockfile.write_pins(new, Path(ctx.args.lock))
    ctx.reporter.line(f"{ctx.args.lock}: {'updated' if changed else 'unchanged'}")
    return 0


def cmd_fetch(ctx: Context) -> int:
    from builder.fetch import fetch_files

    lock = ctx.lock()
    arches = ctx.arches(lock)
    lock.require_resolved(arches, images=not ctx.args.files_only)  # every kind listed at once
    store = ctx.store()
    report = fetch_files(lock, arches, store, ctx.fetcher(lock, store), ctx.reporter, ctx.args.jobs)
    ctx.reporter.line(report.summary())
    if not ctx.args.files_only and lock.images:
        try:
            from builder.pull import pull_images
        except ImportError:
            raise NotYet("fetch: pulling images needs the registry client (not yet built)",
                         "use --files-only for now") from None
        images = pull_images(lock, arches, store, jobs=ctx.args.jobs, reporter=ctx.reporter)
        ctx.reporter.line(images.summary())
    ctx.reporter.line(f"store: {store.root}")
    return 0


def cmd_build(ctx: Context) -> int:
    from builder.build import build

    lock = ctx.lock()
    report = build(lock, ctx.arches(lock), ctx.store(), Path(ctx.args.out), ctx.reporter)
    ctx.reporter.line(report.summary())
    return 0


def cmd_keygen(ctx: Context) -> int:
    from builder import sign

    out = Path(ctx.args.out)
    private = out / f"{ctx.args.name}.pem"
    paths = sign.generate_key(private, out / f"{ctx.args.name}.pub", algorithm=ctx.args.algorithm,
                              allow_unencrypted=ctx.args.unencrypted)
    key = sign.load_public_key(paths.public)
    ctx.reporter.line(f"private key: {paths.private} (mode 0600; keep it off the release media)")
    ctx.reporter.line(f"public key:  {paths.public} (fingerprint {key_fingerprint(key)})")
    ctx.reporter.line("give the public key to operators out of band (INSTALL_<NAME>_PUBLIC_KEY for "
                      "install.sh, --public-key for verify); never ship it beside the artifacts")
    return 0


def key_fingerprint(key) -> str:
    """sha256 of the DER SubjectPublicKeyInfo: what people compare over a second channel."""
    from cryptography.hazmat.primitives import serialization

    from builder import digest

    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return digest.of_bytes(der)


def cmd_sign(ctx: Context) -> int:
    from builder import sign

    out = Path(ctx.args.out)
    key = sign.load_private_key(Path(ctx.args.key))
    sigs = sign.sign_checksums(out, key)
    public = key.public_key()
    for sig in sigs:
        # A signature that does not verify with our own key is a bug; catch it here, not on site.
        sign.verify_signature(sig.with_name(sig.name.removesuffix(sign.SIG_SUFFIX)), sig, public)
        ctx.reporter.line(f"signed: {sig}")
    ctx.reporter.line(f"public key fingerprint: {key_fingerprint(public)} (verify with "
                      "--public-key, distributed out of band)")
    return 0


def cmd_verify(ctx: Context) -> int:
    from builder.verify import verify_release

    arches = [a for item in ctx.args.arch or [] for a in item.split(",") if a]
    pub = Path(ctx.args.public_key) if ctx.args.public_key else None
    report = verify_release(Path(ctx.args.dir), arches, pub, ctx.args.require_signature)
    if report.passed:
        ctx.reporter.line(report.summary())
    report.raise_if_failed()
    return 0


def cmd_release(ctx: Context) -> int:
    from builder.release import PublishOptions, publish

    a = ctx.args
    arches = tuple(x for item in a.arch or [] for x in item.split(",") if x)
    opts = PublishOptions(Path(a.out), registry=a.registry, github=a.github,
                          push_images=a.push_images, insecure=a.insecure, dry_run=a.dry_run,
                          override_scan=a.override_scan, override_reason=a.override_reason,
                          arches=arches, chunk_size=a.chunk_mib << 20, revision=a.revision)
    report = publish(opts, ctx.reporter)
    print(report.summary())  # the plan is the point of --dry-run: printed even with -q
    return 0


def cmd_pull_release(ctx: Context) -> int:
    from builder.oci.reference import parse as parse_ref
    from builder.pullrelease import pull_release
    from builder.release import registry_client
    from builder.verify import verify_release

    a = ctx.args
    try:
        ref = parse_ref(a.ref)
    except ValueError as exc:
        raise BuilderError(f"pull-release: {exc}", "e.g. HOST/REPO:v1.32.13-rke2r1") from None
    arches = [x for item in a.arch or [] for x in item.split(",") if x]
    client = registry_client([ref.host], a.insecure, 0)
    report = pull_release(client, ref, Path(a.dir), arches, ctx.reporter)
    ctx.reporter.line(report.summary())
    pub = Path(a.public_key) if a.public_key else None
    # Every arch in the directory, not only those pulled now: install.sh may use any file there.
    result = verify_release(Path(a.dir), None, pub, a.require_signature)
    if result.passed:
        ctx.reporter.line(result.summary())
    result.raise_if_failed()
    return 0


def cmd_scan(ctx: Context) -> int:
    import tempfile

    from builder.build import source_date_epoch
    from builder.scan import DEFAULT_OUT, command
    from builder.scan.release import release_targets
    from builder.sources.registry import RegistryClient

    lock = ctx.lock()
    arches = ctx.arches(lock)
    store = ctx.store()
    artifacts = Path(ctx.args.artifacts)
    if Path(ctx.args.out) == Path(DEFAULT_OUT):
        ctx.args.out = artifacts / "scan"  # where `release` looks for the verdict
    lock.require_resolved(arches)
    epoch = source_date_epoch(lock)
    # Under the store's tmp/ so image layouts can hard-link blobs (same filesystem); named by
    # pid so a killed scan's leftovers are swept by the next Store().
    with tempfile.TemporaryDirectory(prefix=f"{os.getpid()}-scan-", dir=store.root / "tmp") as work:
        command.run(ctx.args, lambda: release_targets(lock, arches, store, artifacts, Path(work), epoch),
                    covers=[Path(ctx.args.lock), *sorted(artifacts.glob("sha256sum-*.txt"))],
                    store=store, client_factory=lambda: RegistryClient(mirrors=lock.mirrors),
                    echo=ctx.reporter.line)
    return 0


def cmd_store(ctx: Context) -> int:
    store = ctx.store()  # `store verify` is the only store subcommand (argparse requires one)
    report = store.check_all()
    if report.removed:  # healed, but a non-zero exit so CI notices the store went bad
        raise BuilderError(report.summary(),
                           "the bad blobs were removed: run `python -m builder fetch` to download "
                           "them again (`python -m builder build` remakes what it built itself)")
    ctx.reporter.line(report.summary())
    return 0


COMMANDS: dict[str, Callable[[Context], int]] = {
    "lock": cmd_lock,
    "fetch": cmd_fetch,
    "build": cmd_build,
    "scan": cmd_scan,
    "keygen": cmd_keygen,
    "sign": cmd_sign,
    "verify": cmd_verify,
    "release": cmd_release,
    "pull-release": cmd_pull_release,
    "store": cmd_store,
}


def _arch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", action="append", help="arch to work on (repeatable; default: host or $ARCH)")
    p.add_argument("--cross", action="store_true", help="every arch of the lock (also CROSS=1)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m builder", description=__doc__)
    p.add_argument("--lock", default="images.lock", help="the lock file (default: images.lock)")
    p.add_argument("--store", help="content store directory (default: $BUILDER_STORE or "
                                   "$XDG_CACHE_HOME/airgap-builder)")
    p.add_argument("--mirrors", help="a YAML file of mirrors for this host (also $BUILDER_MIRRORS)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument("-j", "--jobs", type=int, default=4, help="parallel downloads (default 4)")
    sub = p.add_subparsers(dest="command", required=True)

    lk = sub.add_parser("lock", help="resolve pins (connected side) or validate with --check")
    lk.add_argument("--check", action="store_true", help="only validate images.lock")
    lk.add_argument("--refresh", action="store_true", help="re-resolve pins that are already set")
    lk.add_argument("--files-only", action="store_true", help="resolve component files only")
    _arch_options(lk)

    fe = sub.add_parser("fetch", help="fetch every pinned input into the content store")
    fe.add_argument("--files-only", action="store_true", help="components only, no images")
    _arch_options(fe)

    bu = sub.add_parser("build", help="runtime image, image archives, bundle, checksums")
    bu.add_argument("--out", default="artifacts", help="artifacts directory (default: artifacts)")
    _arch_options(bu)

    sc = sub.add_parser("scan", help="the Trivy gate over every image and bundle tree (offline)")
    sc.add_argument("--artifacts", default="artifacts", help="artifacts directory (default: artifacts)")
    _arch_options(sc)
    from builder.scan.command import add_arguments as scan_arguments

    scan_arguments(sc)

    kg = sub.add_parser("keygen", help="make a signing key pair (passphrase from "
                                       "$BUILDER_SIGNING_PASSPHRASE)")
    kg.add_argument("--out", required=True, help="directory for NAME.pem and NAME.pub")
    kg.add_argument("--name", default="signing-key", help="file name stem (default signing-key)")
    kg.add_argument("--algorithm", choices=("ed25519", "ecdsa-p256"), default="ed25519")
    kg.add_argument("--unencrypted", action="store_true",
                    help="allow a private key without passphrase (tests, HSM import)")

    sg = sub.add_parser("sign", help="sign every sha256sum-ARCH.txt (detached .sig)")
    sg.add_argument("--out", default="artifacts", help="artifacts directory (default: artifacts)")
    sg.add_argument("--key", required=True, help="private key PEM (passphrase from "
                                                 "$BUILDER_SIGNING_PASSPHRASE)")

    ve = sub.add_parser("verify", help="check a release directory offline (signature, checksums, "
                                       "archives, release.env)")
    ve.add_argument("dir", help="the release directory")
    ve.add_argument("--public-key", help="PEM public key; checks sha256sum-ARCH.txt.sig")
    ve.add_argument("--require-signature", action="store_true",
                    help="fail unless every checksum file has a signature that verifies")
    ve.add_argument("--arch", action="append", help="arch to check (default: every arch found)")

    re_ = sub.add_parser("release", help="publish to an OCI registry, GitHub and/or push images")
    re_.add_argument("--out", default="artifacts", help="artifacts directory (default: artifacts)")
    re_.add_argument("--registry", help="HOST[:PORT]/REPO for the release artifact")
    re_.add_argument("--github", help="OWNER/REPO for a draft GitHub release ($GITHUB_TOKEN, "
                                      "$GITHUB_API_URL)")
    re_.add_argument("--push-images", metavar="REGISTRY",
                     help="copy every image into HOST[:PORT][/PREFIX], keeping digests")
    re_.add_argument("--insecure", action="store_true", help="plain HTTP to those registries")
    re_.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    re_.add_argument("--override-scan", action="store_true",
                     help="release despite a failed or missing scan (recorded in scan/)")
    re_.add_argument("--override-reason", help="why (recorded with the override)")
    re_.add_argument("--revision", help="source revision for the artifact annotations")
    re_.add_argument("--chunk-mib", type=int, default=16, help="upload chunk size (default 16)")
    re_.add_argument("--arch", action="append", help="arch to release (default: every arch found)")

    pr = sub.add_parser("pull-release", help="fetch a release artifact into DIR, then verify it")
    pr.add_argument("ref", help="HOST/REPO:TAG (the index or one arch) or HOST/REPO@sha256:...")
    pr.add_argument("dir", help="directory to write the files to")
    pr.add_argument("--arch", action="append", help="arch to fetch from an index (default: all)")
    pr.add_argument("--insecure", action="store_true", help="plain HTTP to the registry")
    pr.add_argument("--public-key", help="PEM public key for the verify step")
    pr.add_argument("--require-signature", action="store_true")

    st = sub.add_parser("store", help="content store maintenance")
    st_sub = st.add_subparsers(dest="store_command", required=True)
    st_sub.add_parser("verify", help="re-hash every blob, remove bad ones (exit 1 if any were bad)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    ctx = Context(args, Reporter.auto(args.quiet))
    try:
        return COMMANDS[args.command](ctx)
    except BuilderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; a rerun resumes where this one stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
