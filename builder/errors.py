"""One exception family for everything a person has to act on.

Every error carries a message (what went wrong, naming the entry, URL or file at fault, expected
vs. got) and a hint (what to do). The CLI prints both without a traceback and exits non-zero.
"""

from __future__ import annotations


class BuilderError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class LockError(BuilderError):
    """images.lock is malformed or names something that cannot be used as it is."""


class UnresolvedError(LockError):
    """A pin the build needs is not resolved yet."""


class DigestMismatch(BuilderError):
    def __init__(self, what: str, expected: str, actual: str, hint: str | None = None):
        super().__init__(
            f"{what}: digest mismatch: expected {expected}, got {actual}",
            hint or "the source changed or is corrupt; check the pin and the mirror, nothing was stored",
        )
        self.expected = expected
        self.actual = actual


class FetchError(BuilderError):
    """A download failed for good (after retries, on every candidate URL)."""


class UnsafeArchive(BuilderError):
    """An archive member would escape the extraction root or is not a plain file."""


class NotYet(BuilderError):
    exit_code = 2
