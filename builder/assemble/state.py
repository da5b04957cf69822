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
from builder.checksums import write_atomic

STATE_FILE = ".build-state.json"


@dataclass
class BuildState:
    path: Path
    entries: dict[str, dict] = field(default_factory=dict)

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
        """Move finished files from ``work`` into ``out`` (same filesystem) and record them."""
        digests = digests or {}
        files = {}
        for name in names:
            src = work / name
            sha = digests.get(name) or dg.of_file(src)[0]
            os.replace(src, out / name)
            st = (out / name).stat()
            files[name] = {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        self.entries[key] = {"recipe": recipe, "files": files}
        self.save()

    def known_digests(self) -> dict[str, str]:
        return {n: f["sha256"] for e in self.entries.values() for n, f in e["files"].items()}

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.entries, sort_keys=True, indent=1).encode())
