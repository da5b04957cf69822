"""Progress for people: tqdm bars on a terminal, one line per item otherwise, nothing with --quiet."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
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
        interactive = sys.stderr.isatty() and not os.environ.get("CI")
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
    def bar(self, label: str, total: int | None) -> Iterator[callable]:
        """Yields update(done, total); a no-op without a terminal."""
        if not self.bars:
            yield lambda done, total=None: None
            return
        with tqdm(total=total, desc=label[:40], unit="B", unit_scale=True, leave=False,
                  file=self.stream, dynamic_ncols=True) as bar:
            def update(done: int, new_total: int | None = None) -> None:
                if new_total and bar.total != new_total:
                    bar.total = new_total
                bar.update(done - bar.n)
            yield update

