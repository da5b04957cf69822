"""Delta releases (issue 15): `build --since PREV` and `verify DIR --base PREV`.

The piece planner is tested on FrameIndex values; everything else on real releases the builder
builds from the session's store (tests/plugins/releases.py: lock variants, only `build` runs).
"""

from __future__ import annotations

import hashlib

from builder.assemble.delta import plan_pieces
from builder.oci.framed import Frame, FrameIndex
from builder.trust import delta as d


def sha(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def blob(name: str) -> str:
    return sha("blob " + name)


def index(*frames: tuple[str, int, str]) -> FrameIndex:
    """Frames (label, length, content) laid end to end."""
    out, at = [], 0
    for label, length, content in frames:
        out.append(Frame(label, at, length, sha(content)))
        at += length
    return FrameIndex(tuple(out))


NEW = index(("head", 100, "head v2"), (blob("config"), 10, "config"), (blob("lower"), 5000, "lower"),
            (blob("top"), 700, "top v2"), (blob("runtime"), 900, "runtime v2"), ("tail", 20, "tail"))
BASE = index(("head", 90, "head v1"), (blob("runtime"), 800, "runtime v1"),
             (blob("config"), 10, "config"), (blob("top"), 600, "top v1"),
             (blob("lower"), 5000, "lower"), ("tail", 20, "tail"))
LAYERS = frozenset({blob("lower"), blob("top"), blob("runtime")})


def test_only_layers_the_base_holds_as_the_same_bytes_come_from_the_base():
    planned = plan_pieces(NEW, BASE, LAYERS)
    assert [(p.source, p.label) for p in planned.pieces] == [
        ("delta", "head"), ("delta", blob("config")),  # metadata: always carried
        ("base", blob("lower")),  # the same compressed bytes in the base
        ("delta", blob("top")), ("delta", blob("runtime")),  # changed: another sha256
        ("delta", "tail")]
    lower = planned.pieces[2]
    assert (lower.offset, lower.length) == (BASE.by_label()[blob("lower")].offset, 5000)
    assert [p.offset for p in planned.pieces if p.source == d.DELTA] == [0, 100, 110, 810, 1710]
    assert [f.label for f in planned.carried] == ["head", blob("config"), blob("top"),
                                                  blob("runtime"), "tail"]
    assert sum(p.length for p in planned.pieces) == NEW.size


def test_without_a_base_everything_is_carried():
    planned = plan_pieces(NEW, None, LAYERS)
    assert all(p.source == d.DELTA for p in planned.pieces)
    assert planned.carried == NEW.frames


def test_a_blob_that_is_no_layer_is_carried_even_when_the_base_has_it():
    planned = plan_pieces(NEW, BASE, frozenset({blob("top")}))
    assert {p.label for p in planned.pieces if p.source == d.BASE} == set()
