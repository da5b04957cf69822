"""The CNCF distribution registry from Debian (`docker-registry`), anonymous, on loopback."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import requests
import yaml

from tests.rig.procs import Process, free_port, wait_for


@dataclass
class Registry:
    work: Path
    port: int = 0
    extra_config: dict = field(default_factory=dict)
    scheme: str = "http"
    ca_file: Path | None = None
    process: Process | None = field(default=None, init=False)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def storage(self) -> Path:
        return self.work / "storage"

    def config(self) -> dict:
        conf = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)},
                        "delete": {"enabled": True}},
            "http": {"addr": self.host, "secret": "rig-secret"},
        }
        for key, value in self.extra_config.items():
            if isinstance(value, dict) and isinstance(conf.get(key), dict):
                conf[key] = {**conf[key], **value}
            else:
                conf[key] = value
        return conf

    def start(self) -> Registry:
        exe = shutil.which("docker-registry") or "/usr/bin/docker-registry"
        self.work.mkdir(parents=True, exist_ok=True)
        port = self.port
        for attempt in range(5):
            self.port = port or free_port()
            conf = self.work / "config.yml"
            conf.write_text(yaml.safe_dump(self.config()))
            self.process = Process([exe, "serve", str(conf)], self.work / "registry.log").start()
            try:
                wait_for(self._ready, "docker-registry", proc=self.process.proc,
                         log=self.work / "registry.log")
                return self
            except RuntimeError:
                self.process.stop()
                if attempt == 4 or port:
                    raise
        return self

    def _ready(self) -> bool:
        verify = str(self.ca_file) if self.ca_file else True
        r = requests.get(self.url + "/v2/", timeout=1, verify=verify)
        return r.status_code in (200, 401)

    def stop(self) -> None:
        if self.process:
            self.process.stop()

    def restart(self) -> None:
        self.stop()
        self.start()
