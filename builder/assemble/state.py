"""What the last build wrote, so a rebuild with nothing changed does no packaging work.

Kept in ``OUT/.build-state.json``: per artifact group, the recipe hash it was built from and, for
each file, its sha256, size and mtime. A group is fresh when the recipe is the same and every file
still has the recorded size and mtime; then neither packing nor hashing runs again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from builder import digest as dg
from builder.store import fsync_dir, write_atomic

STATE_FILE = ".build-state.json"


@dataclass
class BuildState:
    path: Path
    entries: dict[str, dict] = field(default_factory=dict)
    pending: dict[Path, Path] = field(default_factory=dict)  # staged file -> its place in out

    @classmethod
    def load(cls, out: Path) -> BuildState:
        path = out / STATE_FILE
        try:
            entries = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            entries = {}
        return cls(path, entries if isinstance(entries, dict) else {})

    def fresh(self, key: str, recipe: str, out: Path, names: list[str]) -> bool:
        entry = self.entries.get(key)
        if not entry or entry.get("recipe") != recipe:
            return False
        for name in names:
            rec = entry["files"].get(name)
            try:
                st = (out / name).stat()
            except FileNotFoundError:
                return False
            if rec is None or rec["size"] != st.st_size or rec["mtime_ns"] != st.st_mtime_ns:
                return False
        return True

    def publish(self, key: str, recipe: str, work: Path, out: Path, names: list[str],
                digests: dict[str, str] | None = None) -> None:
        """Record finished files in ``work``; ``commit()`` moves them into ``out``.

        Nothing reaches ``out`` until every artifact of the build was packed (and every store
        blob in it re-hashed), so a build that stops half-way leaves the artifacts as they were.
        """
        digests = digests or {}
        files = {}
        for name in names:
            src = work / name
            sha = digests.get(name) or dg.of_file(src)[0]
            st = src.stat()  # a rename within one filesystem keeps size and mtime
            files[name] = {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
            self.pending[src] = out / name
        self.entries[key] = {"recipe": recipe, "files": files}

    def current(self, name: str, work: Path, out: Path) -> Path:
        """Where an artifact's bytes are now: staged in ``work`` by this build, else in ``out``."""
        return work / name if work / name in self.pending else out / name

    def commit(self) -> None:
        """Move every staged file into place (same filesystem: renames) and save the record."""
        if not self.pending:
            return  # nothing was rebuilt: the record (and its file's mtime) stays as it is
        for src, dest in self.pending.items():
            os.replace(src, dest)
        for folder in {dest.parent for dest in self.pending.values()}:
            fsync_dir(folder)
        self.pending.clear()
        self.save()

    def known_digests(self) -> dict[str, str]:
        return {n: f["sha256"] for e in self.entries.values() for n, f in e["files"].items()}

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.entries, sort_keys=True, indent=1).encode())
