"""The fetch stage for files: every pinned component file of the chosen arches into the store."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from builder.errors import BuilderError
from builder.fetch import components
from builder.fetch.http import FetchResult, HttpFetcher
from builder.humanize import human
from builder.lock.lockfile import Lock
from builder.progress import Reporter
from builder.store import Store


@dataclass
class FileReport:
    files: int = 0
    downloaded: int = 0
    cached: int = 0
    bytes_transferred: int = 0
    seconds: float = 0.0
    results: list[FetchResult] = field(default_factory=list)

    def summary(self) -> str:
        return (f"files: {self.files} ({self.downloaded} downloaded, {self.cached} already in the store), "
                f"{human(self.bytes_transferred)} transferred in {self.seconds:.2f}s")


def fetch_files(lock: Lock, arches: tuple[str, ...], store: Store, fetcher: HttpFetcher,
                reporter: Reporter, jobs: int = 4) -> FileReport:
    """Download what is missing, in parallel; collect every failure before raising."""
    started = time.monotonic()
    plan = components.plan(lock, arches)
    report = FileReport(files=len(plan))
    failures: list[BuilderError] = []

    def one(job: components.FileJob) -> FetchResult:
        with reporter.bar(job.what, None) as update:
            return fetcher.fetch(job.url, job.digest, job.what, update, size=job.size)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(one, job): job for job in plan}
        for future in as_completed(futures):
            job = futures[future]
            try:
                res = future.result()
            except BuilderError as exc:
                failures.append(exc)
                continue
            report.results.append(res)
            report.bytes_transferred += res.transferred
            if res.cached:
                report.cached += 1
            else:
                report.downloaded += 1
                reporter.line(f"fetched {job.what}: {human(res.size)} from {res.url}")
    report.seconds = time.monotonic() - started
    if failures:
        if len(failures) == 1:
            raise failures[0]
        raise BuilderError(f"{len(failures)} downloads failed:\n" + "\n".join(str(f) for f in failures),
                           "a rerun resumes partial downloads and skips what is already stored")
    # Take members out of their archives now, so a wrong member path fails at fetch, not at build.
    components.extract_all(lock, arches, store)
    return report
