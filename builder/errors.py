"""One exception family for everything a person has to act on.

Every error carries a message (what went wrong, naming the entry, URL or file at fault, expected
vs. got) and a hint (what to do). The CLI prints both without a traceback and exits non-zero.
"""

from __future__ import annotations

import re

# Where plain HTTP is allowed: said by the lock (refusing `insecure:`) and by the registry client
# (refusing an http:// endpoint), so it lives below both.
HOST_MIRRORS_HINT = ("list plain-HTTP registries under `insecure:` in this host's mirrors file "
                     "(--mirrors FILE or BUILDER_MIRRORS), never in images.lock")


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


class HttpStatusError(FetchError):
    """A server answered with an HTTP status the caller cannot use; ``status`` says which, so code
    decides by the number, never by the message text."""

    def __init__(self, status: int, url: str, message: str | None = None, hint: str | None = None):
        super().__init__(message or f"{url}: HTTP {status}", hint)
        self.status = status
        self.url = url


class UnsafeArchive(BuilderError):
    """An archive member would escape the extraction root or is not a plain file."""


def network_reason(exc: BaseException, limit: int = 200) -> str:
    """What a person needs from a connection failure: its cause (``Connection refused``).

    requests wraps the cause in two layers of urllib3 text (pool, retries, object reprs) that
    run past any sensible length; shortening that text cut off exactly the cause. So the innermost
    OS-level error is named (with the host and port from the first layer, when given) and
    only text without such a cause is shortened.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    root: OSError | None = None
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.strerror:
            root = cause  # keep walking: the innermost one is the real cause
        cause = cause.__cause__ or cause.__context__ or getattr(cause, "reason", None)
        if not isinstance(cause, BaseException):
            cause = None
    text = str(exc) or type(exc).__name__
    if root is not None:
        where = re.search(r"host='([^']+)', port=(\d+)", text)
        at = f" ({where.group(1)}:{where.group(2)})" if where else ""
        return f"{root.strerror}{at}"
    if "timed out" in text.lower():
        return "timed out" + (f": {text[:limit - 12]}..." if len(text) > limit else f": {text}")
    return text if len(text) <= limit else text[:limit - 3] + "..."
