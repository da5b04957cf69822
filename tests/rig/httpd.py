"""Small loopback HTTP servers for the rig's stand-ins (a request handler class in, a running server
out): 127.0.0.1, an ephemeral port, one daemon thread per connection, optional TLS."""

from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve(handler: type[BaseHTTPRequestHandler],
          tls: ssl.SSLContext | None = None) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def url(server: ThreadingHTTPServer | None, scheme: str = "http") -> str:
    """The running server's base URL, ``http://127.0.0.1:PORT``."""
    assert server is not None, "the server is not running: start() it first"
    return f"{scheme}://127.0.0.1:{server.server_address[1]}"


class Quiet(BaseHTTPRequestHandler):
    """A handler that logs no request line (they would flood the test output)."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base's name)
        pass


def shutdown(server: ThreadingHTTPServer | None) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()
