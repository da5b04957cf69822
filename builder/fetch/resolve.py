"""`lock` for files: fill in unresolved sha256 pins on a connected host (or through mirrors).

Preference order for each file: the published checksum file named in the lock (``checksum_url``),
then ``URL.sha256`` / ``URL.sha256sum`` next to the file, then downloading and hashing it (the
download lands in the store, so a following `fetch` has nothing left to do).

Each resolved pin also gets its ``size:``, which bounds every later download of it: the length
hashed, or, for a published checksum, the ``Content-Length`` a ``HEAD`` of the file announces
(left null when the server does not say; `fetch` then applies BUILDER_MAX_DOWNLOAD). Everything
read here is bounded too: a checksum file at most ``MAX_CHECKSUM_FILE`` bytes, a file to hash at
most ``BUILDER_MAX_DOWNLOAD``.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import replace

import requests

from builder import digest as dg
from builder.errors import FetchError
from builder.fetch.http import HttpFetcher, Limit, TooLarge
from builder.fetch.mirrors import candidates
from builder.lock.lockfile import Chart, Component, FileArtifact, Lock
from builder.lock.lockfile import url_basename as _basename
from builder.progress import Reporter

MAX_CHECKSUM_FILE = 1 << 20
_LINE = re.compile(r"([0-9a-fA-F]{64})(?:\s+\*?(\S.*))?")  # fullmatch: the whole line


def parse_checksum_file(text: str, filename: str) -> str | None:
    """The sha256 for ``filename`` in a `sha256sum`-style or bare-hex checksum file."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    matches = [_LINE.fullmatch(ln) for ln in lines]
    if len(matches) == 1 and matches[0] and not matches[0].group(2):
        return matches[0].group(1).lower()
    for m in matches:
        if m and m.group(2) and posixpath.basename(m.group(2).strip()) == filename:
            return m.group(1).lower()
    return None


def _get_text(fetcher: HttpFetcher, url: str) -> str | None:
    """A small published text file, or None; streamed, so an endless body costs 1 MiB at most."""
    opts = fetcher.options
    for cand in candidates(url, fetcher.mirrors):
        try:
            with fetcher.session.get(cand, stream=True,
                                     timeout=(opts.connect_timeout, opts.read_timeout)) as resp:
                if resp.status_code != 200:
                    continue
                body = b""
                for chunk in resp.iter_content(1 << 16):
                    body += chunk
                    if len(body) > MAX_CHECKSUM_FILE:
                        break
                else:
                    return body.decode("utf-8", errors="replace")
        except requests.RequestException:
            continue
    return None


def _announced_size(fetcher: HttpFetcher, url: str) -> int | None:
    """The Content-Length a HEAD of the file announces (redirects followed), or None."""
    opts = fetcher.options
    for cand in candidates(url, fetcher.mirrors):
        try:
            resp = fetcher.session.head(cand, allow_redirects=True,
                                        headers={"Accept-Encoding": "identity"},
                                        timeout=(opts.connect_timeout, opts.read_timeout))
        except requests.RequestException:
            continue
        length = resp.headers.get("Content-Length", "")
        encoded = resp.headers.get("Content-Encoding", "identity") != "identity"
        if resp.status_code == 200 and length.isdigit() and int(length) > 0 and not encoded:
            return int(length)
    return None


def _download_and_hash(fetcher: HttpFetcher, url: str, what: str) -> tuple[str, int]:
    opts = fetcher.options
    limit = Limit(None, opts.max_download)
    errors = []
    for cand in candidates(url, fetcher.mirrors):
        try:
            with fetcher.session.get(cand, stream=True,
                                     timeout=(opts.connect_timeout, opts.read_timeout)) as resp:
                if resp.status_code != 200:
                    errors.append(f"{cand}: HTTP {resp.status_code}")
                    continue
                resp.raw.decode_content = True
                digest = fetcher.store.put_stream(limit.wrap(resp.raw), what=what)
                return digest, fetcher.store.size(digest)
        except TooLarge as exc:
            raise FetchError(f"{what} from {cand}: {exc}", limit.hint) from None
        except requests.RequestException as exc:
            errors.append(f"{cand}: {type(exc).__name__}")
    raise FetchError(f"{what}: could not download {url} to hash it: " + "; ".join(errors))


def resolve_artifact(fetcher: HttpFetcher, art: FileArtifact, what: str) -> tuple[FileArtifact, str]:
    assert art.url
    name = _basename(art.url)
    sources = [art.checksum_url] if art.checksum_url else []
    sources += [art.url + ".sha256", art.url + ".sha256sum"]
    for src in sources:
        text = _get_text(fetcher, src)
        found = parse_checksum_file(text, name) if text else None
        if found:
            return (replace(art, sha256=found, size=_announced_size(fetcher, art.url)),
                    f"published checksum {src}")
    digest, size = _download_and_hash(fetcher, art.url, what)
    return replace(art, sha256=dg.hex_of(digest), size=size), "downloaded and hashed"


def _resolve_one(fetcher: HttpFetcher, art: FileArtifact, what: str, reporter: Reporter) -> FileArtifact:
    resolved, how = resolve_artifact(fetcher, art, what)
    if resolved.size is None and resolved.sha256 == art.sha256:
        resolved = replace(resolved, size=art.size)  # same file: keep the size we knew
    if art.sha256 and resolved.sha256 != art.sha256:
        reporter.line(f"{what}: sha256 changed {art.sha256} -> {resolved.sha256} ({how})")
    else:
        reporter.line(f"{what}: {resolved.sha256} ({how})")
    return resolved


def resolve_files(lock: Lock, fetcher: HttpFetcher, reporter: Reporter,
                  arches: tuple[str, ...] | None = None, refresh: bool = False) -> Lock:
    """A new Lock with every unresolved (or, with refresh, every) file pin filled in: component
    files of the arches, and chart files (the same for every arch)."""
    new_components: dict[str, Component] = {}
    for name, comp in lock.components.items():
        new_arches = dict(comp.arches)
        for arch, art in comp.arches.items():
            if art.absent or not art.url or (arches and arch not in arches):
                continue
            if art.sha256 and not refresh:
                continue
            new_arches[arch] = _resolve_one(fetcher, art, f"components.{name}.{arch}", reporter)
        new_components[name] = replace(comp, arches=new_arches)
    new_charts: dict[str, Chart] = {}
    for name, chart in lock.charts.items():
        if not chart.removed and (refresh or not chart.sha256):
            art = _resolve_one(fetcher, chart.artifact, chart.what, reporter)
            chart = replace(chart, sha256=art.sha256, size=art.size)
        new_charts[name] = chart
    return replace(lock, components=new_components, charts=new_charts)
