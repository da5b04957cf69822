"""The bundle `NAME.linux-ARCH.tar.gz`: bin/, lib/systemd/system/, share/NAME/ (owner 0, numeric).

Templates are package data, `builder/assemble/templates/` (see its README.md for placeholders), read
through importlib.resources so an installed wheel builds the same bundle as the checkout;
`share/NAME/release.env` is the release description `install.sh` reads with plain shell.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from builder.artifacts import RELEASE_ENV_KEYS, bundle_name, data_key, release_env_member
from builder.assemble.runtime import RuntimeImage, store_file
from builder.assemble.state import BuildState
from builder.fetch import components
from builder.lock.lockfile import Lock
from builder.oci import compress
from builder.oci.layer import FileEntry, write_tar
from builder.store import Store

TEMPLATES = resources.files(__package__) / "templates"


@dataclass(frozen=True)
class ReleaseInfo:
    """What release.env says; also what `verify` checks the archives against."""

    name: str
    version: str
    arch: str
    runtime: RuntimeImage
    runtime_archive: str
    default_images: str
    groups: tuple[str, ...]

    def env(self) -> str:
        values = {
            "RELEASE_NAME": self.name,
            "RELEASE_VERSION": self.version,
            "RELEASE_ARCH": self.arch,
            "RUNTIME_IMAGE": self.runtime.ref,
            "RUNTIME_MANIFEST": self.runtime.manifest.digest,
            "RUNTIME_LAYERS": " ".join(self.runtime.layers),
            "RUNTIME_ARCHIVE": self.runtime_archive,
            "DATA_KEY": data_key(self.runtime.ref),
            "DEFAULT_IMAGES": self.default_images,
            "IMAGE_GROUPS": " ".join(self.groups),
        }
        assert tuple(values) == RELEASE_ENV_KEYS, "release.env keys are artifacts.RELEASE_ENV_KEYS"
        for key, value in values.items():
            if "'" in value:
                raise ValueError(f"release.env: {key} must not contain a single quote: {value!r}")
        return "".join(f"{k}='{v}'\n" for k, v in values.items())


def _render(text: str, name: str) -> str:
    upper = name.upper().replace("-", "_").replace(".", "_")
    return text.replace("@NAME_UPPER@", upper).replace("@NAME@", name)


def _template_files(root: Traversable, prefix: str = "") -> Iterator[tuple[str, Traversable]]:
    """(relative path, file) of every template under root, in path order, README.md left out."""
    for item in sorted(root.iterdir(), key=lambda i: i.name):
        rel = f"{prefix}{item.name}"
        if item.is_dir():
            yield from _template_files(item, f"{rel}/")
        elif item.name != "README.md":
            yield rel, item


def entries(lock: Lock, arch: str, store: Store, info: ReleaseInfo,
            templates: Traversable = TEMPLATES) -> list[FileEntry]:
    name = lock.release.name
    out: list[FileEntry] = []
    for rel, src in _template_files(templates):
        rel = rel.replace("NAME", name)
        mode = 0o755 if rel.startswith("bin/") else 0o644
        out.append(FileEntry(rel, _render(src.read_text(), name).encode(), mode))
    if lock.release.supervisor:
        comp = lock.components[lock.release.supervisor]
        digest = components.file_digest(store, comp, arch)
        if digest:
            out.append(store_file(store, f"bin/{name}", digest, 0o755,
                                  f"components.{comp.name}.{arch}"))
    out.append(FileEntry(release_env_member(name), info.env().encode(), 0o644))
    return out


def write(lock: Lock, arch: str, store: Store, info: ReleaseInfo, out: Path, work: Path,
          epoch: int, state: BuildState) -> tuple[Path, bool]:
    files = entries(lock, arch, store, info)
    recipe = hashlib.sha256(json.dumps({
        "v": 1, "epoch": epoch, "gzip": list(compress.GZIP_SCHEME),
        "files": [(f.path, f.mode, hashlib.sha256(f.source).hexdigest() if isinstance(f.source, bytes)
                   else str(f.source)) for f in files],
    }, sort_keys=True).encode()).hexdigest()
    name = bundle_name(lock.release.name, arch)
    if state.fresh(name, recipe, out, [name]):
        return out / name, False
    with compress.atomic_output(work / name) as sink, compress.pgzip_writer(sink) as gz:
        write_tar(gz, files, epoch)
    state.publish(name, recipe, work, out, [name])
    return out / name, True
