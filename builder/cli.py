"""Command line: thin wrappers over the library, one function per command.

Configuration comes from flags first, then the environment (``BUILDER_STORE``, ``BUILDER_MIRRORS``,
``ARCH``, ``CROSS``), then images.lock.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder.artifacts import HOST_ARCH, KNOWN_ARCHES
from builder.errors import BuilderError
from builder.fetch.http import HttpFetcher, HttpOptions
from builder.lock import lockfile
from builder.lock.lockfile import Lock
from builder.progress import Reporter
from builder.store import Store, default_root

DESCRIPTION = """\
Build the air-gap release of an RKE2-style Kubernetes distribution from one pinned file,
images.lock, and check it again on the far side of the gap.

The pipeline, in this order:
  lock     fill in the lock's pins (connected side); `lock --check` only validates
  fetch    every pinned input into the content store, each byte checked against its pin
  build    runtime image, image archives, bundle, sha256sum-ARCH.txt into --artifacts DIR
  merge    per-arch shards (`build --arch A --shard` on separate machines) into one release
  scan     the Trivy gate, fully offline, over every image and bundle tree
  sign     detached signatures of the checksum files (a key pair from `keygen`)
  verify   offline check of a release directory (what the operator runs after the gap)
  release  publish to an OCI registry and/or a GitHub draft release, after a passing scan
"""

EPILOG = """\
examples:
  python -m builder lock --check
  python -m builder fetch --cross
  python -m builder build --cross --artifacts artifacts
  python -m builder build --json > build.json    # one JSON summary on stdout, the rest on stderr
  python -m builder verify artifacts

Every command explains itself: python -m builder COMMAND --help
"""


@dataclass
class Context:
    args: argparse.Namespace
    reporter: Reporter
    emitted: bool = False  # the one JSON object of --json went out

    @property
    def json(self) -> bool:
        return bool(getattr(self.args, "json", False))

    def emit(self, payload: dict) -> None:
        """--json: the one machine-readable summary, alone on stdout (everything else: stderr)."""
        if self.json and not self.emitted:
            print(json.dumps({"command": self.args.command, **payload}, sort_keys=False), flush=True)
            self.emitted = True

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
                  env: Mapping[str, str] | None = None) -> tuple[str, ...]:
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
            raise BuilderError(f"{lock.source}: unknown arch {arch!r}",
                               f"known arches: {', '.join(KNOWN_ARCHES)}")
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
    from builder.fetch.resolve import resolve_files

    store = ctx.store()
    new = resolve_files(lock, ctx.fetcher(lock, store), ctx.reporter, arches, ctx.args.refresh)
    if not ctx.args.files_only:
        from builder.fetch.images import resolve_images

        new = resolve_images(new, store=store, reporter=ctx.reporter, arches=arches,
                             refresh=ctx.args.refresh)
    # Only the pins change in the file (comments, order, layout and its own mirrors stay).
    changed = lockfile.write_pins(new, Path(ctx.args.lock))
    ctx.reporter.line(f"{ctx.args.lock}: {'updated' if changed else 'unchanged'}")
    return 0


def cmd_fetch(ctx: Context) -> int:
    from builder.fetch.files import fetch_files

    lock = ctx.lock()
    arches = ctx.arches(lock)
    lock.require_resolved(arches, images=not ctx.args.files_only)  # every kind listed at once
    store = ctx.store()
    report = fetch_files(lock, arches, store, ctx.fetcher(lock, store), ctx.reporter, ctx.args.jobs)
    ctx.reporter.line(report.summary())
    images = None
    if not ctx.args.files_only and lock.images:
        from builder.fetch.images import pull_images

        images = pull_images(lock, arches, store, jobs=ctx.args.jobs, reporter=ctx.reporter)
        ctx.reporter.line(images.summary())
    ctx.reporter.line(f"store: {store.root}")
    files = {"count": report.files, "downloaded": report.downloaded, "cached": report.cached,
             "bytes": report.bytes_transferred}
    pulled = None if images is None else {
        "count": len(images.images), "blobs_fetched": images.blobs_fetched,
        "blobs_present": images.blobs_present, "bytes": images.bytes_transferred}
    ctx.emit({"ok": True, "arches": list(arches), "store": str(store.root), "files": files,
              "images": pulled,
              "blobs_fetched": report.downloaded + (images.blobs_fetched if images else 0),
              "bytes_transferred": report.bytes_transferred + (images.bytes_transferred if images else 0),
              "seconds": round(report.seconds + (images.seconds if images else 0), 3)})
    return 0


def cmd_build(ctx: Context) -> int:
    from builder.assemble.build import build
    from builder.scan.trivy import installed_identity

    lock = ctx.lock()
    arches = ctx.arches(lock)
    artifacts = Path(ctx.args.artifacts)
    since = Path(ctx.args.since) if ctx.args.since else None
    if ctx.args.delta_out and since is None:
        raise BuilderError("build --delta-out: a delta is made against a base release",
                           "add --since PREV (the release directory the site has installed)")
    if since is not None:
        from builder.assemble import delta

        delta_out = Path(ctx.args.delta_out) if ctx.args.delta_out else delta.default_out(artifacts)
        delta.check_since(since, artifacts, delta_out, list(arches))  # before any work
    store = ctx.store()
    report = build(lock, arches, store, artifacts, ctx.reporter,
                   shard=ctx.args.shard, scanner=installed_identity())
    ctx.reporter.line(report.summary())
    made = None
    if since is not None:
        made = delta.write_delta(report.out, since, delta_out, [a.arch for a in report.arches],
                                 store, lock.release.name, lock.release.version)
        ctx.reporter.line(made.summary())
    if ctx.json:
        ctx.emit({"ok": True, "artifacts": str(report.out), "source_date_epoch": report.epoch,
                  "seconds": round(report.seconds, 3), "runtime_index": report.runtime_index,
                  "shards": [str(p) for p in report.shards],
                  "arches": [_arch_json(report.out, a) for a in report.arches],
                  "delta": made.to_json() if made is not None else None})
    return 0


def cmd_merge(ctx: Context) -> int:
    from builder.publish.merge import merge

    report = merge([Path(d) for d in ctx.args.shard_dirs], Path(ctx.args.out), ctx.reporter)
    ctx.reporter.line(report.summary())
    ctx.emit({"ok": True, "out": str(report.out), "arches": list(report.arches),
              "files": report.files, "bytes": report.bytes, "linked": report.linked,
              "runtime_index": report.runtime_index, "seconds": round(report.seconds, 3)})
    return 0


def _arch_json(out: Path, result) -> dict:
    """One arch of `build --json`: every artifact with its size and sha256 (from the checksum
    file build just wrote, so nothing is hashed twice), the checksum file itself last."""
    from builder import digest
    from builder.trust import checksums
    sums = out / checksums.checksum_name(result.arch)
    listed = {e.name: e.digest for e in checksums.parse_file(sums)}
    files = [{"name": f.name, "size": f.stat().st_size, "sha256": listed[f.name]}
             for f in result.files]
    files.append({"name": sums.name, "size": sums.stat().st_size, "sha256": digest.of_file(sums)[0]})
    return {"arch": result.arch, "runtime": f"{result.runtime.ref}@{result.runtime.manifest.digest}",
            "rebuilt": list(result.rebuilt), "files": files}


def cmd_keygen(ctx: Context) -> int:
    from builder.trust import sign
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
    from builder.trust.provenance import fingerprint

    return fingerprint(key)


def cmd_sign(ctx: Context) -> int:
    from builder.trust import provenance, sign
    out = Path(ctx.args.artifacts)
    key = sign.load_private_key(Path(ctx.args.key))
    sigs = sign.sign_checksums(out, key)
    public = key.public_key()
    for sig in sigs:
        # A signature that does not verify with our own key is a bug; catch it here, not on site.
        sign.verify_signature(sig.with_name(sig.name.removesuffix(sign.SIG_SUFFIX)), sig, public)
        ctx.reporter.line(f"signed: {sig}")
    for envelope in sorted(out.glob("provenance.linux-*.dsse.json")):  # sign_checksums wrote them
        provenance.open_envelope(envelope.read_bytes(), public, envelope.name)  # same: a bug check
        ctx.reporter.line(f"signed: {envelope} (DSSE envelope of the provenance statement)")
    ctx.reporter.line(f"public key fingerprint: {key_fingerprint(public)} (verify with "
                      "--public-key, distributed out of band)")
    return 0


def cmd_verify(ctx: Context) -> int:
    from builder.trust import provenance, trustfile
    from builder.trust.verify import printable, verify_release

    a = ctx.args
    arches = [x for item in a.arch or [] for x in item.split(",") if x]
    pub = Path(a.public_key) if a.public_key else None
    if a.trust and pub is None:
        raise BuilderError("verify --trust: the trust file names keys, give the key with "
                           "--public-key too", "add --public-key signing-key.pub")
    trust = trustfile.load(Path(a.trust)) if a.trust else None
    lock = Path(a.verify_lock) if a.verify_lock else None
    if a.base:
        from builder.trust.delta_check import verify_delta

        report = verify_delta(Path(a.dir), Path(a.base), arches, pub, a.require_signature, trust,
                              lock)
    else:
        report = verify_release(Path(a.dir), arches, pub, a.require_signature, trust, lock)
    if report.passed:
        ctx.reporter.line(report.summary())
        if a.show_provenance and not ctx.json:
            for arch, doc in report.provenance.items():
                # Read from the media: every line escaped before it reaches the terminal.
                print(f"{arch}: built from\n" + "\n".join(
                    "  " + printable(line, 600) for line in provenance.describe(doc)))
    ctx.emit({"ok": report.passed, "directory": str(report.directory), "passed": report.passed,
              "arches": list(report.arches), "files_checked": len(report.checked),
              "signed": dict(report.signed),
              "signer": [{"fingerprint": fp, "name": name} for fp, name in report.signer.items()],
              "provenance": {arch: {"lock_sha256": provenance.lock_sha256(doc),
                                    "subjects": len(provenance.subjects_of(doc))}
                             for arch, doc in report.provenance.items()},
              "failures": [{"file": p.file, "problem": p.message} for p in report.problems],
              "notes": list(report.notes)})
    report.raise_if_failed()
    return 0


def cmd_release(ctx: Context) -> int:
    from builder.publish.release import PublishOptions, publish

    a = ctx.args
    arches = tuple(x for item in a.arch or [] for x in item.split(",") if x)
    opts = PublishOptions(Path(a.artifacts), registry=a.registry, github=a.github,
                          push_images=a.push_images, insecure=a.insecure, dry_run=a.dry_run,
                          override_scan=a.override_scan, override_reason=a.override_reason,
                          arches=arches, chunk_size=a.chunk_mib << 20, revision=a.revision,
                          allow_unsigned=a.allow_unsigned,
                          store=Path(a.store) if a.store else default_root())
    report = publish(opts, ctx.reporter)
    # The plan is the point of --dry-run: printed even with -q (on stderr when --json has stdout).
    print(report.summary(), file=sys.stderr if ctx.json else sys.stdout)
    ctx.emit({"ok": True, **report.to_json()})
    return 0


def cmd_pull_release(ctx: Context) -> int:
    from builder.oci.reference import parse as parse_ref
    from builder.publish.pull_release import pull_release
    from builder.publish.release import registry_client
    from builder.trust.verify import verify_release

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

    from builder.assemble.build import source_date_epoch
    from builder.fetch.registry import RegistryClient
    from builder.scan import DEFAULT_OUT, command
    from builder.scan.gate import ScanFailed
    from builder.scan.release import release_targets

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
        try:
            command.run(ctx.args, lambda: release_targets(lock, arches, store, artifacts, Path(work), epoch),
                        covers=[Path(ctx.args.lock), *sorted(artifacts.glob("sha256sum-*.txt"))],
                        store=store, client_factory=lambda: RegistryClient(mirrors=lock.mirrors),
                        echo=ctx.reporter.line)
        except ScanFailed:
            _emit_scan(ctx, Path(ctx.args.out))  # the verdict is written before the gate fails
            raise
    _emit_scan(ctx, Path(ctx.args.out))
    return 0


def _emit_scan(ctx: Context, out: Path) -> None:
    """`scan --json`: the verdict and what failed, from the status.json `release` checks."""
    if not ctx.json:
        return
    status = json.loads((out / "status.json").read_text())
    ctx.emit({"ok": status.get("verdict") == "pass", "verdict": status.get("verdict"),
              "failing": status.get("failing") or [], "problems": status.get("problems") or [],
              "warnings": status.get("warnings") or [], "status": str(out / "status.json"),
              "summary": str(out / "summary.md")})


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
    "merge": cmd_merge,
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


class _Renamed(argparse.Action):
    """An old spelling that still works (scripts keep running) and says what it is called now."""

    def __init__(self, option_strings, dest, new: str, **kw) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        notes = getattr(namespace, "renamed", None) or []
        notes.append(f"{option_string} is now {self.new} (the old spelling still works)")
        namespace.renamed = notes


def _artifacts_option(p: argparse.ArgumentParser) -> None:
    """--artifacts DIR: the one name for the directory `build` writes and later steps read."""
    p.add_argument("--artifacts", metavar="DIR", default="artifacts",
                   help="the artifacts directory (default: artifacts)")
    p.add_argument("--out", dest="artifacts", action=_Renamed, new="--artifacts",
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _common(json_summary: bool) -> argparse.ArgumentParser:
    """-q (and --json) after the command too: `build -q` reads as naturally as `-q build`."""
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="print nothing but errors" + (" (and the --json summary)" if json_summary else ""))
    if json_summary:
        c.add_argument("--json", action="store_true",
                       help="print one JSON summary on stdout for CI; everything else goes to stderr")
    return c


def _command(sub, name: str, help: str, description: str, example: str,
             json_summary: bool = False) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description,
                          epilog="example:\n  " + example.replace("\n", "\n  "),
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          parents=[_common(json_summary)])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m builder", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lock", metavar="FILE", default="images.lock",
                   help="the lock file (default: images.lock)")
    p.add_argument("--store", metavar="DIR", help="content store directory (default: $BUILDER_STORE or "
                                   "$XDG_CACHE_HOME/airgap-builder)")
    p.add_argument("--mirrors", metavar="FILE",
                   help="this host's mirrors file, YAML (also $BUILDER_MIRRORS)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("-j", "--jobs", metavar="N", type=int, default=4, help="parallel downloads (default 4)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    lk = _command(sub, "lock", "fill in the lock's pins (connected side), or validate it with --check",
                  "Resolve every unresolved pin of the lock: component files (a published checksum\n"
                  "file first, else download and hash) and image tags (index and per-platform\n"
                  "digests). Only the pins are written back: comments, key order and layout stay;\n"
                  "`unchanged` when no pin changed. --check validates offline and lists every\n"
                  "unresolved pin.",
                  "python -m builder lock --check\n"
                  "python -m builder --mirrors mirrors.yaml lock --refresh")
    lk.add_argument("--check", action="store_true", help="only validate the lock (no network)")
    lk.add_argument("--refresh", action="store_true", help="re-resolve pins that are already set")
    lk.add_argument("--files-only", action="store_true", help="resolve component files only")
    _arch_options(lk)

    fe = _command(sub, "fetch", "every pinned input into the content store",
                  "Download every pinned input of the chosen arches (component files, image\n"
                  "manifests and layers) into the content store, each byte checked against its pin.\n"
                  "Partial downloads resume; a second run transfers nothing.",
                  "python -m builder fetch --cross\n"
                  "python -m builder fetch --arch arm64 --json", json_summary=True)
    fe.add_argument("--files-only", action="store_true", help="components only, no images")
    _arch_options(fe)

    bu = _command(sub, "build", "runtime image, image archives, bundle, checksums",
                  "Build the release of the chosen arches from the lock and the store, without the\n"
                  "network: the runtime image, the image archives per group (.tar.zst, .tar.gz,\n"
                  ".txt), the bundle and sha256sum-ARCH.txt, into the artifacts directory.\n"
                  "Reproducible (SOURCE_DATE_EPOCH) and incremental; a bar per archive on a\n"
                  "terminal, one line per archive otherwise.",
                  "python -m builder build --cross --artifacts artifacts\n"
                  "python -m builder build --json > build.json\n"
                  "python -m builder build --artifacts artifacts --since /media/v1.32.13 "
                  "--delta-out delta", json_summary=True)
    _artifacts_option(bu)
    _arch_options(bu)
    bu.add_argument("--shard", action="store_true",
                    help="these arches are one part of a release built on several machines: "
                         "write shard-ARCH.json for `merge`")
    bu.add_argument("--since", metavar="PREV",
                    help="also write a delta against PREV, the release directory the site has "
                         "installed (its checksum files and lists; its archives, or their frames "
                         "in the store): only what PREV lacks is carried")
    bu.add_argument("--delta-out", metavar="DIR",
                    help="where the delta goes (default: the artifacts directory's sibling "
                         "ARTIFACTS-delta; replaced whole)")

    mg = _command(sub, "merge", "merge per-arch shards into one release tree, every digest re-checked",
                  "Merge the directories `build --arch ARCH --shard` wrote on separate machines into\n"
                  "one release directory, byte-identical to `build --cross` of the same lock. Refuses\n"
                  "shards of different locks, SOURCE_DATE_EPOCHs or builders, an arch given twice or\n"
                  "missing, a file whose sha256 or size differs from its shard manifest, and a file\n"
                  "the manifest does not list. Every file is re-hashed; nothing is written unless\n"
                  "all of it checks out (staged beside --out, renamed into place).",
                  "python -m builder merge shard-amd64/ shard-arm64/ --out artifacts",
                  json_summary=True)
    mg.add_argument("shard_dirs", metavar="SHARD_DIR", nargs="+",
                    help="a directory `build --arch ARCH --shard` wrote")
    mg.add_argument("--out", metavar="DIR", required=True,
                    help="the merged release directory (must not exist, or be empty)")

    sc = _command(sub, "scan", "the Trivy gate over every image and bundle tree (offline)",
                  "Scan every image of every arch and each bundle tree with Trivy, fully offline,\n"
                  "and apply scan-policy.yaml. Reports go to ARTIFACTS/scan/ (status.json is what\n"
                  "`release` checks); exit 3 when the gate fails.",
                  "python -m builder scan --cross --db /srv/trivy-db\n"
                  "python -m builder scan --db-ref mirror.internal/trivy-db@sha256:<hex> --json",
                  json_summary=True)
    sc.add_argument("--artifacts", metavar="DIR", default="artifacts",
                    help="the artifacts directory (default: artifacts)")
    _arch_options(sc)
    from builder.scan.command import add_arguments as scan_arguments

    scan_arguments(sc)

    kg = _command(sub, "keygen", "make a signing key pair (passphrase from $BUILDER_SIGNING_PASSPHRASE)",
                  "Make a signing key pair in a new directory: NAME.pem (private, encrypted with\n"
                  "$BUILDER_SIGNING_PASSPHRASE) and NAME.pub. Give the public key to operators out\n"
                  "of band; never ship it beside the artifacts.",
                  "BUILDER_SIGNING_PASSPHRASE=... python -m builder keygen --out keys/")
    kg.add_argument("--out", metavar="DIR", required=True, help="directory for NAME.pem and NAME.pub")
    kg.add_argument("--name", default="signing-key", help="file name stem (default signing-key)")
    kg.add_argument("--algorithm", choices=("ed25519", "ecdsa-p256"), default="ed25519")
    kg.add_argument("--unencrypted", action="store_true",
                    help="allow a private key without passphrase (tests, HSM import)")

    sg = _command(sub, "sign", "sign every sha256sum-ARCH.txt (detached .sig)",
                  "Sign every sha256sum-ARCH.txt of the artifacts directory: a detached\n"
                  "sha256sum-ARCH.txt.sig beside each (Ed25519 or ECDSA P-256).",
                  "python -m builder sign --key keys/signing-key.pem --artifacts artifacts")
    _artifacts_option(sg)
    sg.add_argument("--key", required=True, help="private key PEM (passphrase from "
                                                 "$BUILDER_SIGNING_PASSPHRASE)")

    ve = _command(sub, "verify", "check a release directory offline (signature, checksums, "
                                 "archives, release.env)",
                  "Check a release directory offline, as the operator does after the gap: the\n"
                  "signatures, the checksums, every archive's blobs, platforms and lists, and the\n"
                  "bundle's release description. Exit 1 on any problem.",
                  "python -m builder verify /media/release --public-key signing-key.pub "
                  "--require-signature\n"
                  "python -m builder verify artifacts --json\n"
                  "python -m builder verify delta --base /media/v1.32.13 --public-key "
                  "signing-key.pub", json_summary=True)
    ve.add_argument("dir", help="the release directory (or a delta directory, with --base)")
    ve.add_argument("--base", metavar="PREV",
                    help="DIR is a delta directory (`build --since`): rebuild its image archives "
                         "from PREV, the release it updates, and check them like a release's")
    ve.add_argument("--public-key", help="PEM public key; checks sha256sum-ARCH.txt.sig")
    ve.add_argument("--require-signature", action="store_true",
                    help="fail unless every checksum file has a signature that verifies")
    ve.add_argument("--arch", action="append", help="arch to check (default: every arch found)")
    ve.add_argument("--trust", metavar="FILE",
                    help="your trust file (YAML/JSON `keys: {FINGERPRINT: NAME}`): names the "
                         "signer; a key it lacks fails")
    ve.add_argument("--lock", dest="verify_lock", metavar="FILE",
                    help="the provenance must name this lock file (its sha256)")
    ve.add_argument("--show-provenance", action="store_true",
                    help="print what each arch was built from (lock, builder, inputs)")

    re_ = _command(sub, "release", "publish to an OCI registry, GitHub and/or push images",
                   "Publish the artifacts directory after a passing scan: one ORAS-compatible\n"
                   "artifact per arch to an OCI registry, a GitHub draft release, and/or every\n"
                   "image into a private registry (digests kept). Already-present blobs and assets\n"
                   "are skipped. --dry-run prints the plan without a single network call.",
                   "python -m builder release --registry registry.internal/releases/rke2 --dry-run\n"
                   "python -m builder release --github OWNER/REPO\n"
                   "python -m builder release --registry registry.internal/releases/rke2 --json "
                   "> release.json", json_summary=True)
    _artifacts_option(re_)
    re_.add_argument("--registry", help="HOST[:PORT]/REPO for the release artifact")
    re_.add_argument("--github", help="OWNER/REPO for a draft GitHub release ($GITHUB_TOKEN, "
                                      "$GITHUB_API_URL)")
    re_.add_argument("--push-images", metavar="REGISTRY",
                     help="copy every image into HOST[:PORT][/PREFIX], keeping digests")
    re_.add_argument("--insecure", action="store_true", help="plain HTTP to those registries")
    re_.add_argument("--dry-run", action="store_true",
                     help="print the plan; no network call, nothing changed")
    re_.add_argument("--override-scan", action="store_true",
                     help="release despite a failed or missing scan (recorded in scan/)")
    re_.add_argument("--override-reason", help="why (recorded with the override)")
    re_.add_argument("--revision", help="source revision for the artifact annotations")
    re_.add_argument("--allow-unsigned", action="store_true",
                     help="publish a directory without signatures (recorded as "
                          "io.airgap-builder.signed=false)")
    re_.add_argument("--chunk-mib", type=int, default=16, help="upload chunk size (default 16)")
    re_.add_argument("--arch", action="append", help="arch to release (default: every arch found)")

    pr = _command(sub, "pull-release", "fetch a release artifact into DIR, then verify it",
                  "Fetch a release artifact from an OCI registry into a new directory, checking every\n"
                  "manifest and file on the way, then verify the directory like `verify` does.",
                  "python -m builder pull-release registry.internal/releases/rke2:v1.32.13-rke2r1 "
                  "/media/release")
    pr.add_argument("ref", help="HOST/REPO:TAG (the index or one arch) or HOST/REPO@sha256:...")
    pr.add_argument("dir", help="directory to write the files to")
    pr.add_argument("--arch", action="append", help="arch to fetch from an index (default: all)")
    pr.add_argument("--insecure", action="store_true", help="plain HTTP to the registry")
    pr.add_argument("--public-key", help="PEM public key for the verify step")
    pr.add_argument("--require-signature", action="store_true")

    st = _command(sub, "store", "content store maintenance",
                  "Content store maintenance. `store verify` re-hashes every blob and removes bad\n"
                  "ones; `fetch` then downloads them again.",
                  "python -m builder store verify")
    st_sub = st.add_subparsers(dest="store_command", required=True, metavar="SUBCOMMAND")
    _command(st_sub, "verify", "re-hash every blob, remove bad ones (exit 1 if any were bad)",
             "Re-hash every blob of the content store; remove each bad one (and the index\n"
             "entries naming it) and exit 1 if any were removed, so CI notices. Then\n"
             "`python -m builder fetch` downloads them again.",
             "python -m builder --store /var/cache/airgap-builder store verify")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    ctx = Context(args, Reporter.auto(args.quiet))
    for note in getattr(args, "renamed", None) or []:
        ctx.reporter.line(f"note: {note}")
    try:
        return COMMANDS[args.command](ctx)
    except BuilderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        ctx.emit({"ok": False, "error": exc.message, "hint": exc.hint, "exit_code": exc.exit_code})
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; a rerun resumes where this one stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
