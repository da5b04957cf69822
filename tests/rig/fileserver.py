"""nginx from Debian as a static file server with Range support and a parseable access log."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests.rig.procs import Process, free_port, wait_for

CONF = """\
daemon off;
worker_processes 1;
user root root;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format rig '$request_method $uri $status $body_bytes_sent "$http_range" "$http_if_range"';
    access_log {work}/access.log rig;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    types {{ }}
    default_type application/octet-stream;
    sendfile on;
    etag on;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        autoindex on;
    }}
}}
"""


@dataclass
class AccessEntry:
    method: str
    path: str
    status: int
    bytes_sent: int
    range: str
    if_range: str


@dataclass
class FileServer:
    root: Path
    work: Path
    port: int = 0
    process: Process | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FileServer:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.work.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        for attempt in range(5):
            self.port = free_port()
            conf = self.work / "nginx.conf"
            conf.write_text(CONF.format(work=self.work, port=self.port, root=self.root))
            self.process = Process([nginx, "-p", str(self.work), "-c", str(conf)],
                                   self.work / "nginx.out").start()
            try:
                wait_for(lambda: requests.get(self.url + "/", timeout=1).status_code < 500,
                         "nginx", proc=self.process.proc, log=self.work / "error.log")
                return self
            except RuntimeError:
                self.process.stop()
                if attempt == 4:
                    raise
        return self

    def stop(self) -> None:
        if self.process:
            self.process.stop()

    def access_log(self) -> list[AccessEntry]:
        path = self.work / "access.log"
        if not path.exists():
            return []
        entries = []
        for line in path.read_text().splitlines():
            head, _, quoted = line.partition(' "')
            method, uri, status, sent = head.split()
            rng, _, rest = quoted.partition('" "')
            if_range = rest.rstrip('"').replace("\\x22", '"')  # nginx escapes quotes in logs
            entries.append(AccessEntry(method, uri, int(status), int(sent), rng, if_range))
        return entries

    def clear_log(self) -> None:
        (self.work / "access.log").write_text("")
