"""A fault-injecting HTTP proxy in front of a real server (nginx).

The real file server cannot, on demand, answer 500 once, throttle with 429 + Retry-After, or drop
the connection half way through a body; this proxy does exactly that for the requests it is told
to, and passes everything else through unchanged (headers, Range, status, body).

Script entries, consumed one per request: ``"pass"``, ``"status:500"``,
``"status:429:retry-after=1"``, ``"cut:<bytes>"`` (send headers and that many body bytes, then close),
``"slow:<bytes per second>"`` (pass through, throttled, so a test can kill a client mid-download).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer

import requests

from tests.rig import httpd

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass
class Seen:
    path: str
    action: str
    range: str | None
    status: int
    body_bytes: int


@dataclass
class FaultProxy:
    upstream: str
    script: deque[str] = field(default_factory=deque)
    seen: list[Seen] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return httpd.url(self.server)

    def plan(self, *actions: str) -> None:
        with self._lock:
            self.script.extend(actions)

    def _next(self) -> str:
        with self._lock:
            return self.script.popleft() if self.script else "pass"

    def requests_seen(self, at_least: int, timeout: float = 5.0) -> list[Seen]:
        """The handled requests, once ``at_least`` are recorded: the proxy records a request after
        its response is sent, so a client can be done before the record exists."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.seen) >= at_least:
                    return list(self.seen)
            time.sleep(0.01)
        with self._lock:
            return list(self.seen)

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(httpd.Quiet):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
                action = proxy._next()
                rng = self.headers.get("Range")
                if action.startswith("status:"):
                    parts = action.split(":")
                    status = int(parts[1])
                    self.send_response(status)
                    for extra in parts[2:]:
                        key, _, value = extra.partition("=")
                        self.send_header(key.title(), value)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    proxy._record(Seen(self.path, action, rng, status, 0))
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS | {"host"}}
                up = requests.get(proxy.upstream + self.path, headers=headers, stream=True, timeout=30)
                limit = int(action.split(":")[1]) if action.startswith("cut:") else None
                rate = int(action.split(":")[1]) if action.startswith("slow:") else None
                self.send_response(up.status_code)
                for k, v in up.headers.items():
                    if k.lower() not in HOP_HEADERS:
                        self.send_header(k, v)
                self.end_headers()
                sent = 0
                for chunk in up.raw.stream(65536, decode_content=False):
                    if limit is not None and sent + len(chunk) >= limit:
                        self.wfile.write(chunk[: limit - sent])
                        sent = limit
                        break
                    try:
                        self.wfile.write(chunk)
                    except OSError:  # the client went away (a test killed it)
                        break
                    sent += len(chunk)
                    if rate:
                        time.sleep(len(chunk) / rate)
                self.wfile.flush()
                up.close()
                proxy._record(Seen(self.path, action, rng, up.status_code, sent))
                if limit is not None:
                    self.close_connection = True
                    self.connection.shutdown(2)

        self.server = httpd.serve(Handler)
        return self

    def stop(self) -> None:
        httpd.shutdown(self.server)
