"""`python -m tools.bench_real --quick` end to end (so the real-bytes bench cannot rot between the
runs that matter), and the rig's latency proxy it puts in front of the registry."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.rig.latency_proxy import LatencyProxy
from tests.rig.registry import Registry
from tools import bench_real

TOOLS = ("zstd", "pigz", "sha256sum", "docker-registry", "nginx")


def test_latency_proxy_forwards_unchanged_after_the_delay(registry: Registry) -> None:
    with LatencyProxy(registry.url, delay_s=0.3) as proxy:
        direct = requests.get(registry.url + "/v2/", timeout=10)
        started = time.monotonic()
        via = requests.get(proxy.url + "/v2/", timeout=10)
        assert time.monotonic() - started >= 0.3
        assert (via.status_code, via.content) == (direct.status_code, direct.content)
        assert via.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
        missing = requests.head(proxy.url + "/v2/nobody/manifests/none", timeout=10)
        assert missing.status_code == 404  # statuses pass through, HEAD has no body
        assert proxy.requests == 2


def test_latency_proxy_overlaps_parallel_requests(registry: Registry) -> None:
    """Four clients at once wait the delay once, not four times: what -j 4 relies on."""
    with LatencyProxy(registry.url, delay_s=0.5) as proxy:
        codes: list[int] = []

        def get() -> None:
            codes.append(requests.get(proxy.url + "/v2/_catalog", timeout=10).status_code)

        threads = [threading.Thread(target=get) for _ in range(4)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codes == [200] * 4
        assert time.monotonic() - started < 1.5  # serial would be ≥ 2 s


def test_latency_proxy_refuses_an_upstream_it_cannot_reach() -> None:
    with pytest.raises(ValueError, match="need http://HOST:PORT"):
        LatencyProxy("https://registry.example")


@pytest.mark.skipif(not all(shutil.which(t) for t in TOOLS),
                    reason=f"needs {', '.join(TOOLS)} (scripts/setup installs them)")
@pytest.mark.timeout(900)
def test_quick_bench_measures_registry_mode_and_skips_a_refused_one(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bench_real.main(["--quick", "--modes", "registry,no-such-mode", "--out", str(tmp_path)])

    report = json.loads((tmp_path / "bench_real.json").read_text())
    assert not list(tmp_path.glob("scratch-*")), "scratch data must be removed without --keep"
    (scale,) = report["scales"]
    assert scale["images"] == 2 and scale["raw_bytes"] > 0 and scale["gzip_layer_bytes"] > 0
    assert "no-such-mode" in scale["skipped"] and scale["skipped"]["no-such-mode"]

    up = scale["upstream"]
    assert set(up["steps"]) == {"save", "zstd16", "pigz", "sha256sum"}
    assert all(s["wall_s"] > 0 and s["peak_rss"] > 0 for s in up["steps"].values())
    # the upstream archive holds the layers decompressed: bigger than the gzip layers
    assert up["sizes"]["tar"] > scale["gzip_layer_bytes"] and up["sizes"]["tar_zst"] > 0

    reg = scale["modes"]["registry"]
    assert reg["sizes"]["tar_zst"] > 0 and reg["sizes"]["tar_gz"] > 0
    assert reg["build"]["wall_s"] > 0 and reg["build"]["cpu_s"] > 0 and reg["build"]["peak_rss"] > 0
    assert reg["archive_wall_s"] is not None and reg["baseline"]["wall_s"] > 0
    assert reg["ratios"]["tar_zst"] > 0 and reg["ratios"]["build_wall"] > 0
    if isinstance(up["import"], dict):  # a real containerd (root); else the reason is recorded
        assert up["import"]["images"] == 2 and reg["import"]["images"] == 2
        assert up["import"]["root_bytes"] > 0 and reg["ratios"]["containerd_root"] > 0

    fetch = report["fetch"]
    assert fetch["j1"]["requests"] == fetch["j4"]["requests"] > 0
    # every request waited the proxy's delay, one at a time with -j 1
    assert fetch["j1"]["wall_s"] >= fetch["j1"]["requests"] * fetch["delay_ms"] / 1000 / 4
    assert fetch["speedup"] > 0 and fetch["noop_rebuild"]["wall_s"] > 0

    # The delta section (tools/bench_delta.py) at its small size: both arches, the delta
    # smaller than the full archives and directory, the delta build timed; the install pair
    # measured when install.sh installs the delta, else the reason recorded.
    delta = report["delta"]
    assert (delta["base_version"], delta["version"]) == ("v1.32.13+rke2r1", "v1.32.14+rke2r1")
    assert set(delta["arches"]) == {"amd64", "arm64"} and delta["images"] == 2
    for figures in delta["arches"].values():
        for key in ("tar_zst", "tar_gz", "directory"):
            assert 0 < figures[key]["delta"] < figures[key]["full"], (key, figures)
    assert delta["build"]["since"]["wall_s"] > 0 and delta["build"]["patch"]["wall_s"] > 0
    if isinstance(delta["install"], dict):
        assert delta["install"]["same_files"] and delta["install"]["delta_s"] > 0
    else:
        assert delta["install"]

    out = capsys.readouterr()
    assert "### delta: v1.32.13+rke2r1 → v1.32.14+rke2r1" in out.out
    assert "| the directory an operator carries |" in out.out
    assert "| .tar.zst to carry |" in out.out and "registry/upstream" in out.out
    assert "speed-up" in out.out and "No-op rebuild" in out.out and "### goals" in out.out
    assert report["goals"]["registry"][".tar.zst to carry ≤ 0.95× upstream"] in (True, False)
    assert "layer mode 'no-such-mode' skipped" in out.err


def _scale(scale: int, rss: int, ratios: dict[str, float | None]) -> dict:
    return {"scale": scale, "upstream": {"total": {"peak_rss": 100 * bench_real.MIB}},
            "modes": {"registry": {"build": {"peak_rss": rss}, "ratios": ratios}}}


def test_goals_judge_the_largest_scale_against_issue_14s_limits() -> None:
    """Pure arithmetic over a made-up report: which goal is met, missed or not measured."""
    mib = bench_real.MIB
    report = {"scales": [_scale(1, 80 * mib, {}),
                         _scale(4, 120 * mib, {"tar_zst": 0.94, "tar_gz": 1.01, "import_wall": None,
                                               "containerd_root": 0.7, "build_wall": 0.5})],
              "fetch": {"speedup": 2.4, "noop_rebuild": {"wall_s": 0.8}}}
    report["peak_rss_growth"] = bench_real.rss_growth(report["scales"])
    assert report["peak_rss_growth"] == {"upstream": 1.0, "registry": 1.5}

    met = bench_real.goals(report)["registry"]
    assert met[".tar.zst to carry ≤ 0.95× upstream"] is True
    assert met[".tar.gz ≤ 1.0× pigz's"] is False
    assert met["containerd import ≤ 0.75×"] is None  # containerd could not run
    assert met["containerd root after import ≤ 0.7×"] is True  # the limit itself is met
    assert met["peak RSS ≤ 200 MiB and flat (≤ 1.25× across scales)"] is False  # grew 1.5×
    assert met["fetch at latency: -j 4 ≥ 2.5× faster than -j 1"] is False
    assert met["no-op rebuild ≤ 1 s"] is True
    table = bench_real.goals_table(bench_real.goals(report))
    assert "| no-op rebuild ≤ 1 s | met |" in table and "**missed**" in table
