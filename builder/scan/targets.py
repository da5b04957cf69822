"""Turn images in the store into scan targets: one OCI layout directory per image.

Trivy reads an OCI layout *directory* (or a docker-archive tar) holding the image, but not the
project's multi-image archives (.tar.zst, or one tar holding many images). So each image gets its
own small layout whose blobs are hard links into the store: no bytes copied, nothing re-hashed.
(Across filesystems the blobs are copied instead.)
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from builder.oci.layout import ArchiveImage, write_layout
from builder.scan.findings import ScanTarget
from builder.store import Store


def image_targets(store: Store, images: Sequence[ArchiveImage], arch: str,
                  work_dir: Path) -> list[ScanTarget]:
    """One image target per image, each a layout directory under ``work_dir``."""
    out = []
    for image in images:
        probe = ScanTarget(image.name, arch, "image", work_dir)
        layout = Path(work_dir) / probe.slug
        try:
            write_layout(store, [image], layout, link=True)
        except OSError:
            # EXDEV: the work dir is on another filesystem than the store.
            shutil.rmtree(layout, ignore_errors=True)
            write_layout(store, [image], layout, link=False)
        out.append(ScanTarget(image.name, arch, "image", layout, image.manifest_digest))
    return out
