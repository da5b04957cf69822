"""`python -m tools.bench` on a tiny input, so the benchmark cannot rot between the runs that matter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tools import bench

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("skopeo", "zstd", "sha256sum")),
    reason="needs skopeo, zstd and sha256sum (scripts/setup installs them)")


@pytest.mark.timeout(120)
def test_bench_tiny_run_reports_positive_figures(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bench.main(["--size-mib", "8", "--images", "2", "--scales", "1", "--out", str(tmp_path)])

    report = json.loads((tmp_path / "bench.json").read_text())
    assert not (tmp_path / "scratch").exists(), "scratch data must be removed without --keep"
    assert report["generation"]["gzip_bytes"] >= 8 * bench.MIB  # at least the requested size
    assert report["python_baseline_rss"] > 0
    (scale,) = report["scales"]
    assert scale["scale"] == 1 and scale["images"] == 2 and scale["input_bytes"] >= 8 * bench.MIB

    ours = scale["ours"]
    assert ours["digest_extra_passes"] == 0 and ours["sha256sum_agrees"] is True
    for phase in ("archive", "zstd", "gzip"):
        assert ours["phases"][phase]["wall_s"] > 0 and ours["phases"][phase]["peak_rss"] > 0
        assert ours["phases"][phase]["digest"].startswith("sha256:")
    assert ours["total"]["wall_s"] > 0 and ours["total"]["peak_rss"] > 0
    assert all(ours["sizes"][k] > 0 for k in ("tar", "tar_zst", "tar_gz"))

    std = scale["standard"]
    assert std["multi_image_archive"] is False
    for tool in ("skopeo_copy", "zstd16", "zstd3", "sha256sum"):
        assert std[tool]["runs"] == 2  # one per image
        assert std[tool]["wall_s"] > 0 and std[tool]["peak_rss"] > 0 and std[tool]["cpu_s"] >= 0
    # skopeo writes docker-archive layers uncompressed: bigger than our gzip layers
    assert std["sizes"]["docker_archive"] > scale["input_bytes"]
    assert all(std["sizes"][k] > 0 for k in ("zst16", "zst3"))

    expected = {"pack_time", "pack_rss", "zstd_vs_16_time", "zstd_vs_16_rss", "zstd_vs_16_size",
                "zstd_vs_3_time", "zstd_vs_3_rss", "zstd_vs_3_size", "tar_zst_total_time",
                "tar_zst_total_rss"}
    assert set(scale["ratios"]) == expected and all(v > 0 for v in scale["ratios"].values())

    out = capsys.readouterr().out
    assert "| pack (write_archive vs skopeo copy ×2)" in out and "peak RSS by input size" in out


def test_bench_refuses_when_the_disk_is_too_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(SystemExit, match="GiB free"):
        bench.main(["--size-mib", str(free // bench.MIB), "--scales", "1", "--out", str(tmp_path)])
    assert not (tmp_path / "scratch").exists()
