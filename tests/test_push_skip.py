"""`release --push-images` says what it uploaded and what it skipped (issue 15, item 4).

Against the real registry rig (docker-registry on loopback) with real releases
(tests/plugins/releases.py). What the report says is checked against what the registry holds on
disk: every blob the registry stores once under storage/docker/registry/v2/blobs/sha256/, so the
blobs a push added there are the ones it uploaded, byte for byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder import digest as dg
from builder.humanize import human
from builder.publish import release as rl
from builder.store import Store
from tests.plugins.release import run_builder, scanned_release
from tests.test_release import client_for

TOTAL = re.compile(r"^pushed (\d+) images? to (\S+): uploaded (\d+) blobs? \(([^)]+)\), skipped "
                   r"(\d+) blobs? already there \(([^:]+): (\d+) present, (\d+) mounted\)$", re.M)
IMAGE = re.compile(r"^  (\S+): uploaded (\d+) blobs? \(([^)]+)\), skipped (\d+) blobs? already "
                   r"there \(([^:]+): (\d+) present, (\d+) mounted\)$", re.M)


@dataclass(frozen=True)
class Said:
    """The figures of one push's report, as printed."""

    images: int
    where: str
    uploaded: int
    uploaded_human: str
    skipped: int
    skipped_human: str
    present: int
    mounted: int
    per_image: dict[str, tuple[int, int, int, int]]  # target → uploaded, skipped, present, mounted


def said(stdout: str) -> Said:
    totals = TOTAL.findall(stdout)
    assert len(totals) == 1, stdout
    n, where, up, up_h, skip, skip_h, present, mounted = totals[0]
    per = {t: (int(u), int(s), int(p), int(mo)) for t, u, _, s, _, p, mo in IMAGE.findall(stdout)}
    return Said(int(n), where, int(up), up_h, int(skip), skip_h, int(present), int(mounted), per)


def stored(registry) -> dict[str, int]:
    """Every blob the registry holds: digest → size (its data file). Manifests, which the
    registry keeps in the same place, are left out (each repository lists its manifests under
    _manifests/revisions): they are not pushed as blobs."""
    v2 = registry.storage / "docker" / "registry" / "v2"
    manifests = {f"sha256:{p.name}" for p in v2.glob("repositories/**/_manifests/revisions/sha256/*")}
    found = {dg.from_hex(p.parent.name): p.stat().st_size for p in v2.glob("blobs/sha256/*/*/data")}
    return {d: size for d, size in found.items() if d not in manifests}


def push(release: Path, mirror: str, store: Path) -> str:
    proc = run_builder("--store", str(store), "release", "--allow-unsigned", "--artifacts",
                       str(release), "--push-images", mirror, "--insecure")
    return proc.stdout


@pytest.fixture
def v1_v2(tmp_path: Path, releases) -> tuple[Path, Path]:
    return (scanned_release(releases["v1"], tmp_path / "v1"),
            scanned_release(releases["v2"], tmp_path / "v2"))


def test_second_push_skips_everything_and_says_how_many_bytes(v1_v2, registry, fetched) -> None:
    """First push (through the API, for exact byte counts): its uploads are exactly the blobs the
    registry now stores; a blob several images share goes up once and is mounted into the
    others. Second push of the same release (the CLI, as a person runs it): nothing uploaded,
    every blob skipped as present, and the line says how many bytes that was."""
    v1, _ = v1_v2
    mirror = f"{registry.host}/mirror"
    first = rl.push_images(client_for(registry), rl.collect(v1), mirror, store=Store(fetched.store))
    total, blobs = first.total, stored(registry)
    assert total.counts["uploaded"] == len(blobs) and total.sizes["uploaded"] == sum(blobs.values())
    assert total.counts["mounted"] >= 1, "the fixture images share their base layer: mounted"
    assert first.sent == total.sizes["uploaded"]
    assert len(first.blobs) >= 4  # one tally per image pushed

    out = push(v1, mirror, fetched.store)
    again = said(out)
    assert stored(registry) == blobs, "the second push stored nothing"
    every = sum(total.counts.values())
    assert (again.images, again.where) == (len(first.blobs), mirror)
    assert (again.uploaded, again.uploaded_human, again.mounted) == (0, "0 B", 0)
    assert again.present == again.skipped == every
    assert again.skipped_human == human(sum(total.sizes.values()))
    assert (f"pushed {again.images} images to {mirror}: uploaded 0 blobs (0 B), skipped {every} "
            f"blobs already there ({human(sum(total.sizes.values()))}: {every} present, "
            "0 mounted)") in out.splitlines()
    assert sorted(again.per_image) == sorted(first.blobs)
    assert all(u == 0 and p == s for u, s, p, _ in again.per_image.values()), out
    print(f"first push: {rl.PushSummary(f'{len(first.blobs)} images', mirror, first).lines(False)[0]}; second: "
          f"{TOTAL.search(out).group(0)}")  # type: ignore[union-attr]


def test_v2_after_v1_uploads_only_what_changed(v1_v2, registry, fetched) -> None:
    """v2 (another version of the same lock) after v1: the images the lock pins are all there
    already (every blob present, none uploaded); what is uploaded is exactly what the registry
    did not hold, all of it the runtime image's (the one image whose content is the release's)."""
    v1, v2 = v1_v2
    mirror = f"{registry.host}/mirror"
    push(v1, mirror, fetched.store)
    before = stored(registry)
    out = push(v2, mirror, fetched.store)
    now = said(out)
    added = {d: size for d, size in stored(registry).items() if d not in before}
    assert now.uploaded == len(added) and now.uploaded_human == human(sum(added.values()))
    assert now.skipped > 0
    changed = {t for t, (u, _, _, _) in now.per_image.items() if u}
    assert changed <= {t for t in now.per_image if "/rancher/rke2-runtime:" in t}, out
    print(f"v2 after v1: uploaded {now.uploaded} blobs ({now.uploaded_human}), skipped "
          f"{now.skipped} ({now.skipped_human})")


def test_patch_after_base_uploads_the_changed_top_layer_and_config_only(
        update_pair, registry, tmp_path: Path) -> None:
    """The realistic patch (tests/rig/update.py) after its base: of the changed image only its
    new top layer and config go up (its lower layers are already in its repository), of the
    runtime image its config and the layers the base's runtime image lacks (a runtime binary
    changed, and the charts' kubeVersion with the version); every other image's blobs are
    skipped as present."""
    base = scanned_release(update_pair.base["amd64"], tmp_path / "base")
    patch = scanned_release(update_pair.patch["amd64"], tmp_path / "patch")
    mirror = f"{registry.host}/mirror"
    push(base, mirror, update_pair.store)
    out = push(patch, mirror, update_pair.store)
    now = said(out)
    by_repo = {t.split("/", 2)[2].rsplit(":", 1)[0]: v for t, v in now.per_image.items()}
    assert by_repo["rancher/fixture-socat"][:1] == (2,), out  # top layer + config
    assert by_repo["rancher/fixture-socat"][2] == 2  # its two lower layers: present
    layers = {side: set(getattr(update_pair, side)["amd64"].env["RUNTIME_LAYERS"].split())
              for side in ("base", "patch")}
    runtime = len(layers["patch"] - layers["base"]) + 1  # the new layers and the config
    assert runtime >= 2 and by_repo["rancher/rke2-runtime"][:1] == (runtime,), out
    assert all(v[0] == 0 for repo, v in by_repo.items()
               if repo not in ("rancher/fixture-socat", "rancher/rke2-runtime")), out
    assert now.uploaded == 2 + runtime
    print(f"patch after base: {TOTAL.search(out).group(0)}")  # type: ignore[union-attr]
