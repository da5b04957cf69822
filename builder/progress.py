"""Progress for people: tqdm bars on a terminal, one line per item otherwise, nothing with --quiet."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO

from tqdm import tqdm


@dataclass
class Reporter:
    quiet: bool = False
    bars: bool = False
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def auto(cls, quiet: bool = False) -> Reporter:
        """Bars on a terminal; plain lines in CI (``$CI``), on a dumb terminal or into a pipe."""
        interactive = (sys.stderr.isatty() and not os.environ.get("CI")
                       and os.environ.get("TERM") != "dumb")
        return cls(quiet=quiet, bars=interactive and not quiet)

    def line(self, message: str) -> None:
        if self.quiet:
            return
        with self._lock:
            if self.bars:
                tqdm.write(message, file=self.stream)
            else:
                print(message, file=self.stream, flush=True)

    @contextmanager
    def bar(self, label: str, total: int | None) -> Iterator[Callable[..., None]]:
        """Yields update(done, total); a no-op without a terminal."""
        if not self.bars:
            yield lambda done, total=None: None
            return
        # A terminal that reports no size (a pty nobody sized: `script`, some CI runners) reads
        # as 0 rows to tqdm, which then hides every bar: give it an 80x24 screen instead.
        sized = _columns(self.stream) > 0
        with tqdm(total=total, desc=label[:40], unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                  file=self.stream, dynamic_ncols=sized, ncols=None if sized else 80,
                  nrows=None if sized else 24) as bar:
            def update(done: int, new_total: int | None = None) -> None:
                if new_total and bar.total != new_total:
                    bar.total = new_total
                bar.update(done - bar.n)
            yield update


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


class Meter:
    """Bytes done of a total, shown through ``update(done, total)`` (what ``Reporter.bar``
    yields). An archive's tar streams once into both compressors, so its total (the tar's size)
    is known before the first byte is packed."""

    def __init__(self, update: Callable[..., None], total: int | None = None) -> None:
        self.update = update
        self.total = total
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n
        self.update(self.done, self.total)
