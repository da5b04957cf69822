"""Attacker: the delta description (``delta.linux-ARCH.txt``) on hostile media.

The description only says where the bytes of the new archives are; the result is checked against
the signed checksums. But install.sh and ``verify --base`` parse it first, so it must be read as
data, strictly and within bounds: any bytes give a Description or a DescriptionError naming the
line, never another exception, and a description that breaks a rule of the format is refused.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from builder.artifacts import delta_archive_name
from builder.errors import BuilderError
from builder.trust import delta as d

HEX = st.text("0123456789abcdef", min_size=64, max_size=64)


def hexof(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@st.composite
def archives(draw, name: str, arch: str, file: str) -> d.ArchiveDelta:
    """A valid archive entry: pieces of random sources and lengths, delta pieces tiling."""
    with_base = draw(st.booleans())
    sources = draw(st.lists(st.sampled_from([d.BASE, d.DELTA] if with_base else [d.DELTA]),
                            min_size=1, max_size=8))
    pieces, at = [], 0
    for i, source in enumerate(sources):
        length = draw(st.integers(1, 10**12))
        label = "head" if i == 0 else "tail" if i == len(sources) - 1 else "sha256:" + draw(HEX)
        offset = at if source == d.DELTA else draw(st.integers(0, 10**12))
        if source == d.DELTA:
            at += length
        pieces.append(d.Piece(source, offset, length, draw(HEX), label))
    return d.ArchiveDelta(file, draw(HEX), sum(p.length for p in pieces),
                          draw(HEX) if with_base else None, draw(HEX), at, tuple(pieces))


@st.composite
def descriptions(draw) -> d.Description:
    name = draw(st.from_regex(d.NAME, fullmatch=True))
    arch = draw(st.sampled_from(["amd64", "arm64", "s390x"]))
    groups = draw(st.lists(st.from_regex(d.GROUP, fullmatch=True).filter(lambda g: g != "all"),
                           max_size=3, unique=True))
    files = [f"{name}-images.linux-{arch}.tar.zst"] + [
        f"{name}-images-{g}.linux-{arch}{s}" for g in groups
        for s in draw(st.lists(st.sampled_from([".tar.zst", ".tar.gz"]), min_size=1, unique=True))]
    return d.Description(name, draw(st.from_regex(d.VERSION, fullmatch=True)), arch,
                         draw(st.from_regex(d.VERSION, fullmatch=True)), draw(HEX), draw(HEX),
                         tuple(draw(archives(name, arch, f)) for f in files))


def small() -> d.Description:
    """A fixed valid description: head from the delta, a layer from the base, tail."""
    file = "rke2-images-core.linux-amd64.tar.zst"
    return d.Description("rke2", "v1.33.9+rke2r1", "amd64", "v1.32.13+rke2r1", "a" * 64, "b" * 64, (
        d.ArchiveDelta(file, "c" * 64, 1600, "e" * 64, "f" * 64, 600, (
            d.Piece(d.DELTA, 0, 500, "1" * 64, "head"),
            d.Piece(d.BASE, 4096, 1000, "2" * 64, "sha256:" + "3" * 64),
            d.Piece(d.DELTA, 500, 100, "4" * 64, "tail"))),))


def lines() -> list[str]:
    return small().render().decode().split("\n")[:-1]


def text(rows: list[str]) -> bytes:
    return ("\n".join(rows) + "\n").encode()


def test_the_small_description_reads_back_with_its_lines():
    data = small().render()
    assert data.decode().splitlines()[4] == (
        "archive rke2-images-core.linux-amd64.tar.zst " + "c" * 64 + " 1600 " + "e" * 64
        + " rke2-images-core.linux-amd64.delta.tar.zst " + "f" * 64 + " 600 3")
    parsed = d.parse(data, "delta.linux-amd64.txt")
    assert parsed == small()
    assert parsed.archives[0].lines == (6, 7, 8)
    assert parsed.archives[0].carried == 600


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(descriptions())
def test_render_then_parse_is_the_identity(desc):
    assert d.parse(desc.render(), "x") == desc
    holds_the_rules(desc)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
@example(b"")
@example(b"\n")
@example(b"airgap-builder-delta 1\n")
@example(b"airgap-builder-delta 1\r\n")
def test_arbitrary_bytes_give_a_description_or_a_builder_error(data):
    try:
        d.parse(data, "x")
    except BuilderError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_arbitrary_edits_of_a_valid_description_never_crash(data):
    """Lines swapped, dropped, duplicated or with a field replaced by random text."""
    rows = lines()
    op = data.draw(st.sampled_from(["swap", "drop", "dup", "field"]))
    i = data.draw(st.integers(0, len(rows) - 1))
    if op == "swap":
        j = data.draw(st.integers(0, len(rows) - 1))
        rows[i], rows[j] = rows[j], rows[i]
    elif op == "drop":
        del rows[i]
    elif op == "dup":
        rows.insert(i, rows[i])
    else:
        parts = rows[i].split(" ")
        k = data.draw(st.integers(0, len(parts) - 1))
        parts[k] = data.draw(st.text(max_size=80))
        rows[i] = " ".join(parts)
    try:
        parsed = d.parse(("\n".join(rows) + "\n").encode("utf-8", "surrogatepass"), "x")
    except BuilderError:
        return
    holds_the_rules(parsed)  # what still reads (e.g. a base piece moved) keeps every rule


def holds_the_rules(desc: d.Description) -> None:
    for archive in desc.archives:
        deltas = [p for p in archive.pieces if p.source == d.DELTA]
        assert [p.offset for p in deltas] == [0, *(p.end for p in deltas)][:len(deltas)]
        assert sum(p.length for p in deltas) == archive.delta_size
        assert sum(p.length for p in archive.pieces) == archive.full_size
        assert archive.base_hex is not None or len(deltas) == len(archive.pieces)
        assert all(p.length >= 1 for p in archive.pieces)


def _replace(line: int, field: int, value: str) -> bytes:
    rows = lines()
    parts = rows[line].split(" ")
    parts[field] = value
    rows[line] = " ".join(parts)
    return text(rows)


HUGE = "9" * 17
REFUSED = {
    "magic": (text(["airgap-builder-delta 2", *lines()[1:]]), "line 1: expected `airgap-builder-delta 1`"),
    "crlf": (small().render().replace(b"\n", b"\r\n"), "line 1: expected `airgap-builder-delta 1`, got 'airgap-builder-delta 1\\r'"),
    "cr inside": (_replace(1, 2, "v1\rx"), "line 2: VERSION: expected a version"),
    "no final newline": (small().render()[:-1], "last line has no newline"),
    "blank line": (text([*lines()[:4], "", *lines()[4:]]), "line 5: blank line"),
    "comment": (text([*lines()[:4], "# note", *lines()[4:]]), "line 5: expected a line starting with `archive`, got '# note'"),
    "two spaces": (small().render().replace(b"release rke2", b"release  rke2"), "line 2: expected `release NAME VERSION ARCH` (3 fields"),
    "unknown arch": (_replace(1, 3, "mips"), "line 2: ARCH: expected one of amd64"),
    "uppercase hex": (_replace(3, 1, "B" * 64), "line 4: SUMS_HEX: expected 64 lowercase hex digits"),
    "fields swapped": (text([lines()[0], lines()[2], lines()[1], *lines()[3:]]), "line 2: expected a line starting with `release`"),
    "archive of another release": (_replace(4, 1, "k3s-images-core.linux-amd64.tar.zst").replace(
        b"rke2-images-core.linux-amd64.delta", b"k3s-images-core.linux-amd64.delta"), "line 5: FILE: expected an image archive of rke2 for amd64"),
    "archive of another arch": (_replace(4, 1, "rke2-images-core.linux-arm64.tar.zst").replace(
        b"core.linux-amd64.delta", b"core.linux-arm64.delta"), "line 5: FILE: expected an image archive of rke2 for amd64"),
    "path-like file": (_replace(4, 1, "../rke2-images-core.linux-amd64.tar.zst"), "line 5: FILE"),
    "a list, not an archive": (_replace(4, 1, "rke2-images-core.linux-amd64.txt"), "line 5: FILE"),
    "the all list": (_replace(4, 1, "rke2-images-all.linux-amd64.tar.zst").replace(
        b"core.linux-amd64.delta", b"all.linux-amd64.delta"), "line 5: FILE"),
    "path-like delta file": (_replace(4, 5, "../x.delta.tar.zst"), "line 5: DELTA_FILE: expected rke2-images-core.linux-amd64.delta.tar.zst"),
    "delta file of another archive": (_replace(4, 5, "rke2-images.linux-amd64.delta.tar.zst"), "line 5: DELTA_FILE"),
    "leading zero": (_replace(4, 3, "01600"), "line 5: FULL_SIZE: expected a number"),
    "huge number": (_replace(4, 3, HUGE), "line 5: FULL_SIZE: expected a number"),
    "negative": (_replace(6, 2, "-4096"), "line 7: OFFSET: expected a number"),
    "count zero": (_replace(4, 8, "0"), "line 5: COUNT: expected 1 to 200000 pieces, got 0"),
    "count too big": (_replace(4, 8, "200001"), "line 5: COUNT: expected 1 to 200000"),
    "count short": (_replace(4, 8, "2"), "line 5: DELTA_SIZE is 600, the delta pieces end at 500"),
    "count long": (_replace(4, 8, "4"), "ends after line 8, expected piece 4 of 4"),
    "unknown source": (_replace(6, 1, "other"), "line 7: SOURCE: expected base or delta"),
    "zero length": (_replace(6, 3, "0"), "line 7: LENGTH: expected at least 1, got 0"),
    "bad label": (_replace(6, 5, "sha512:" + "3" * 64), "line 7: LABEL: expected head, tail or sha256"),
    "path-like label": (_replace(6, 5, "../../etc/passwd"), "line 7: LABEL"),
    "delta gap": (_replace(7, 2, "501"), "line 8: delta piece at OFFSET 501, expected 500"),
    "delta overlap": (_replace(7, 2, "400"), "line 8: delta piece at OFFSET 400, expected 500"),
    "delta size": (_replace(4, 7, "601"), "line 5: DELTA_SIZE is 601, the delta pieces end at 600"),
    "lengths do not sum": (_replace(4, 3, "1601"), "line 5: FULL_SIZE is 1601, the pieces' lengths sum to 1600"),
    "base piece without base": (_replace(4, 4, "-"), "line 7: a base piece, but the archive line says no base file"),
    "file twice": (text([*lines(), *lines()[4:]]), "line 9: rke2-images-core.linux-amd64.tar.zst already described on line 5"),
    "no archive": (text(lines()[:4]), "ends after line 4, expected an `archive` line"),
    "extra field": (small().render().replace(b" tail\n", b" tail x\n"), "line 8: expected `piece SOURCE OFFSET LENGTH HEX LABEL` (5 fields"),
    "not ascii": (small().render().replace(b"v1.33.9", "v1.33.\u00e9".encode()), "not ASCII text at byte"),
    "too big": (small().render() + b"x" * d.DESCRIPTION_LIMIT, "larger than 4194304 bytes"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_broken_rule_is_refused_naming_the_line(case):
    data, message = REFUSED[case]
    with pytest.raises(d.DescriptionError) as err:
        d.parse(data, "delta.linux-amd64.txt")
    assert message in err.value.message, err.value.message
    assert len(err.value.message) < 400  # a bounded repr of the line, never the whole line


def test_a_base_piece_past_the_base_is_refused():
    archive = d.parse(small().render(), "delta.linux-amd64.txt").archives[0]
    archive.check_base_size(5096, "delta.linux-amd64.txt")
    with pytest.raises(d.DescriptionError, match=r"line 7: base piece sha256:3{64} ends at byte "
                                                 r"5096, the base's rke2-images-core.linux-amd64"
                                                 r".tar.zst has 5095 bytes"):
        archive.check_base_size(5095, "delta.linux-amd64.txt")


def test_a_long_hostile_line_is_shown_bounded():
    data = _replace(1, 1, "x" * 100_000 + "\x1b[2J")
    with pytest.raises(d.DescriptionError) as err:
        d.parse(data, "delta.linux-amd64.txt")
    assert "\x1b" not in str(err.value) and len(err.value.message) < 300


def test_render_refuses_a_model_that_breaks_a_rule():
    bad = small()
    piece = bad.archives[0].pieces[0]
    broken = d.Description(bad.name, bad.version, bad.arch, bad.base_version, bad.base_sums,
                           bad.sums, (d.ArchiveDelta(
                               "../x.tar.zst", *[getattr(bad.archives[0], f) for f in (
                                   "full_hex", "full_size", "base_hex", "delta_hex",
                                   "delta_size")], (piece,)),))
    with pytest.raises(d.DescriptionError):
        broken.render()
    assert delta_archive_name("a-images.linux-amd64.tar.gz") == "a-images.linux-amd64.delta.tar.gz"
    assert hexof(b"") != d.NO_BASE


@pytest.mark.parametrize("damage", ["truncated", "not gzip"])
def test_a_damaged_bundle_tells_no_version(tmp_path, damage):
    """Which release a directory holds (build --since, verify --base) is read from its bundle when
    no provenance statement says it: a damaged bundle (a corrupt gzip raises zlib's and gzip's
    own errors) tells none, it does not stop the command."""
    import gzip
    import io
    import tarfile

    noise = b"".join(hashlib.sha256(bytes([i, j])).digest() for i in range(256) for j in range(8))
    tar = io.BytesIO()
    member = tarfile.TarInfo("share/rke2/noise")
    member.size = len(noise)
    with tarfile.open(fileobj=tar, mode="w") as out:  # a member of incompressible bytes
        out.addfile(member, io.BytesIO(noise))
    whole = gzip.compress(tar.getvalue())
    data = whole[:len(whole) // 2] if damage == "truncated" else b"\x1f\x8b" + noise[:1000]
    (tmp_path / "rke2.linux-amd64.tar.gz").write_bytes(data)
    assert d.release_version(tmp_path, "amd64", {"rke2.linux-amd64.tar.gz": hexof(data)}) is None
