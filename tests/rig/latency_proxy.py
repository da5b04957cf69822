"""A loopback HTTP proxy that adds a fixed delay to every request: a far registry, close by.

``LatencyProxy(upstream_url, delay_s).start()`` listens on 127.0.0.1 (ephemeral port) and forwards
each GET/HEAD to ``upstream_url`` after sleeping ``delay_s`` (a round trip to a registry on another
continent), streaming the response back unchanged (status, headers, body). It speaks HTTP/1.1 with
keep-alive on both sides and serves each client connection on its own thread, so parallel
downloads overlap their delays exactly as they would over a real long link. Used by
tools/bench_real.py to show what parallel fetching buys; only reads are forwarded (a fetch never
writes to a registry).
"""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from tests.rig import httpd

CHUNK = 1 << 16
# Per-hop headers (RFC 9110 §7.6.1): they describe one connection, never forwarded.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
              "trailer", "upgrade"}


class LatencyProxy:
    def __init__(self, upstream_url: str, delay_s: float = 0.05):
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"latency proxy: need http://HOST:PORT upstream, got {upstream_url!r}")
        self.upstream = (parts.hostname, parts.port)
        self.delay_s = delay_s
        self.requests = 0  # forwarded so far (each one delayed)
        self._count = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    @property
    def host(self) -> str:
        assert self.server is not None, "start() first"
        return f"127.0.0.1:{self.server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> LatencyProxy:
        self.server = httpd.serve(_handler(self))
        return self

    def stop(self) -> None:
        httpd.shutdown(self.server)
        self.server = None

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _counted(self) -> None:
        with self._count:
            self.requests += 1


def _handler(proxy: LatencyProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive towards the client, as a registry does
        upstream: http.client.HTTPConnection | None = None  # one per client connection

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
            pass  # quiet: a bench prints its own figures

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._forward()

        def do_HEAD(self) -> None:  # noqa: N802
            self._forward()

        def _forward(self) -> None:
            time.sleep(proxy.delay_s)
            proxy._counted()
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Host"] = f"{proxy.upstream[0]}:{proxy.upstream[1]}"
            resp = self._request(headers)
            body_follows = self.command != "HEAD" and resp.status not in (204, 304)
            length = resp.getheader("Content-Length")
            data = None
            if body_follows and length is None:  # chunked upstream: buffer, then send with a length
                data = resp.read()
                length = str(len(data))
            self.send_response(resp.status, resp.reason)
            for key, value in resp.getheaders():
                if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                    self.send_header(key, value)
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            if data is not None:
                self.wfile.write(data)
            elif body_follows:
                while chunk := resp.read(CHUNK):
                    self.wfile.write(chunk)
            resp.read()  # drain (HEAD, 304), so the upstream connection can be reused

        def _request(self, headers: dict[str, str]) -> http.client.HTTPResponse:
            for attempt in (1, 2):  # a kept-alive upstream connection may have been closed
                if self.upstream is None:
                    self.upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    self.upstream.request(self.command, self.path, headers=headers)
                    return self.upstream.getresponse()
                except (http.client.HTTPException, OSError):
                    self.upstream.close()
                    self.upstream = None
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")

    return Handler
