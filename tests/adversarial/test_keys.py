"""Keys at rest: `keygen` makes the private key 0600 from its first byte and never replaces a key.

The moments in between (after the file appears, before its mode is final; between "does a key
exist?" and the write) cannot be paused on demand, so these tests watch them with a Python audit
hook: every ``open``/``os.chmod``/``os.rename`` the key writer performs fires an audit event
*before* the call runs, and the hook looks at the real file on disk at that instant (or plants a
competing key there, as a second keygen running at the same time would). No function of the
code under test is replaced.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from builder import cli
from builder.trust import sign
from builder.trust.sign import SigningError

_WATCHERS: list[Callable[[str, tuple], None]] = []


def _dispatch(event: str, args: tuple) -> None:
    for watch in list(_WATCHERS):
        watch(event, args)


sys.addaudithook(_dispatch)  # audit hooks cannot be removed; it does nothing without watchers

FS_EVENTS = {"open", "os.chmod", "os.rename", "os.replace", "os.link", "os.mkdir", "os.remove"}


@contextmanager
def watching(watch: Callable[[str, tuple], None]) -> Iterator[None]:
    def filtered(event: str, args: tuple) -> None:
        if event in FS_EVENTS:
            watch(event, args)

    _WATCHERS.append(filtered)
    try:
        yield
    finally:
        _WATCHERS.remove(filtered)


@contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def _modes_seen(path: Path) -> Callable[[str, tuple], None]:
    seen: list[int] = []

    def watch(event: str, args: tuple) -> None:
        try:
            seen.append(stat.S_IMODE(os.lstat(path).st_mode))
        except FileNotFoundError:
            pass

    watch.seen = seen  # type: ignore[attr-defined]
    return watch


@pytest.mark.parametrize("algorithm", ["ed25519", "ecdsa-p256"])
def test_private_key_is_never_wider_than_0600_even_with_umask_0(tmp_path: Path, algorithm) -> None:
    private = tmp_path / "keys" / "signing-key.pem"
    watch = _modes_seen(private)
    with umask(0), watching(watch):
        paths = sign.generate_key(private, algorithm=algorithm, passphrase=b"pw")
        # One more filesystem event after the call: the final state is observed too.
        os.lstat(tmp_path)
        open(os.devnull, "rb").close()
    seen = watch.seen  # type: ignore[attr-defined]
    assert seen, "the hook never saw the key file: the test would be vacuous"
    assert {oct(m) for m in seen} == {"0o600"}, f"modes the private key had on disk: {seen}"
    assert stat.S_IMODE(paths.public.stat().st_mode) == 0o644  # readable, not world-writable
    assert stat.S_IMODE(private.parent.stat().st_mode) == 0o700  # a directory keygen made


def test_existing_key_and_public_key_are_refused_and_left_byte_identical(tmp_path: Path) -> None:
    first = sign.generate_key(tmp_path / "k.pem", passphrase=b"pw")
    before = {p: p.read_bytes() for p in (first.private, first.public)}
    with pytest.raises(SigningError) as err:
        sign.generate_key(tmp_path / "k.pem", passphrase=b"other")
    assert str(err.value).startswith(f"{first.private} exists; refusing to replace a signing key")
    assert "--out" in str(err.value) and "--name" in str(err.value)
    # Only the public half left (private moved to a vault): still refused, nothing created.
    vaulted = tmp_path / "vault.pem"
    first.private.rename(vaulted)
    with pytest.raises(SigningError, match=f"{first.public} exists; refusing"):
        sign.generate_key(tmp_path / "k.pem", passphrase=b"other")
    assert not first.private.exists()
    vaulted.rename(first.private)
    assert {p: p.read_bytes() for p in (first.private, first.public)} == before


def test_symlink_in_place_of_the_key_is_refused_not_followed(tmp_path: Path) -> None:
    """A symlink planted where the key goes must not make keygen write the key elsewhere."""
    target = tmp_path / "elsewhere"
    (tmp_path / "k.pem").symlink_to(target)
    with pytest.raises(SigningError, match="exists; refusing to replace"):
        sign.generate_key(tmp_path / "k.pem", passphrase=b"pw")
    assert not target.exists()


@pytest.mark.parametrize("which", ["private", "public"])
def test_key_appearing_during_keygen_is_not_overwritten(tmp_path: Path, which: str) -> None:
    """A second keygen finishes between our "does it exist?" and our write: ours must give way."""
    private = tmp_path / "k.pem"
    planted = private if which == "private" else private.with_name("k.pem.pub")
    theirs = b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nsomeone else's key\n"

    planting: list[bool] = []

    def plant(event: str, args: tuple) -> None:
        # At the first file opened under tmp_path (the existence check is already behind us).
        if event == "open" and str(args[0]).startswith(str(tmp_path)) and not planting:
            planting.append(True)  # once: writing the planted key fires "open" again
            planted.write_bytes(theirs)

    with watching(plant), pytest.raises(SigningError, match=f"{planted} exists; refusing"):
        sign.generate_key(private, passphrase=b"pw")
    assert planted.read_bytes() == theirs
    # No half pair of ours is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == [planted.name]


def test_keygen_cli_refuses_existing_key_with_hint(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(sign.PASSPHRASE_ENV, "pw")
    assert cli.main(["keygen", "--out", str(tmp_path)]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    capsys.readouterr()
    assert cli.main(["keygen", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'signing-key.pem'} exists; refusing to replace a signing key" in err
    assert "hint: keep it if releases were signed with it" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
